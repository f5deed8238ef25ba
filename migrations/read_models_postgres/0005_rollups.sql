-- Analytics rollups: what analytics need of completed requests, per UTC hour and per UTC day
-- (span_us), for all of a tenant's requests (dimension '') and per value of each dimension
-- analytics filter and break down by (project, user, key, model, provider, deployment, status,
-- error_class; value '' when unset). A request counts once it completed, in the hour and day it
-- arrived; each completion is counted once (rollup_applied). Rollups outlive trace retention.
-- The projector adds a batch's completions up and writes each row it changed once.
CREATE TABLE rollups (
    tenant_id             TEXT   NOT NULL,
    dimension             TEXT   NOT NULL,
    span_us               BIGINT NOT NULL,
    bucket_start          BIGINT NOT NULL,
    value                 TEXT   NOT NULL,
    requests              BIGINT NOT NULL,
    errors                BIGINT NOT NULL,
    tokens_in             BIGINT NOT NULL,
    tokens_out            BIGINT NOT NULL,
    tokens_cached         BIGINT NOT NULL,
    cost_micro_usd        BIGINT NOT NULL,
    latency_sum_us        BIGINT NOT NULL,
    cache_saved_micro_usd BIGINT NOT NULL,
    tool_calls            BIGINT NOT NULL,
    latency_min_us        BIGINT,
    latency_max_us        BIGINT,
    ttft_min_us           BIGINT,
    ttft_max_us           BIGINT,
    -- Requests per latency (TTFT) bucket of loom_projector::buckets: a JSON array of [bucket, count].
    latency_histogram     TEXT   NOT NULL,
    ttft_histogram        TEXT   NOT NULL,
    PRIMARY KEY (tenant_id, dimension, span_us, bucket_start, value)
);
CREATE INDEX rollups_all_tenants ON rollups (dimension, span_us, bucket_start);

-- Requests that arrived from since_us on are in the rollups once completed; those before it (folded
-- before the rollups existed) are counted from their traces.
CREATE TABLE rollups_since (
    since_us BIGINT NOT NULL
);
INSERT INTO rollups_since (since_us) SELECT COALESCE(MAX(started_at) + 1, 0) FROM traces;
