-- Projects carry feature flags and a version (1 when created, one more per update); keys may act
-- for a user (owner), whose role caps theirs.
ALTER TABLE projects ADD COLUMN feature_flags TEXT;
ALTER TABLE projects ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
ALTER TABLE api_keys ADD COLUMN owner TEXT;
-- The tier (L0-L3) of the alias a request was routed to, from `routing.decided` v2.
ALTER TABLE traces ADD COLUMN tier TEXT;
