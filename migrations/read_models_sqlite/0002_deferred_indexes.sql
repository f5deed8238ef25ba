-- Secondary indexes a replay drops while it fills a new version's tables, with the statements
-- that create them again once it has caught up (before readers are switched to it). Kept here
-- so that an interrupted replay, resumed, still knows them.
CREATE TABLE deferred_indexes (
    name       TEXT PRIMARY KEY,
    definition TEXT NOT NULL
);
