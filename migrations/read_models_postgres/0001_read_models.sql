-- Loom's read models: folds of the log, rebuilt by `loom replay`. Each version of them lives in a
-- schema of its own (loom_read_v1, …), chosen through search_path. Timestamps are microseconds
-- since the Unix epoch, money integer micro-USD. The SQLite version of this file has the same
-- tables and columns: the projector's queries run unchanged on both.

-- Where the projection is in each log partition; written in the same transaction as its rows.
CREATE TABLE positions (
    topic       TEXT   NOT NULL,
    partition   BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- Records that could not be folded, with why; the partition moves on past them.
CREATE TABLE dead_letters (
    topic       TEXT   NOT NULL,
    partition   BIGINT NOT NULL,
    log_offset  BIGINT NOT NULL,
    event_id    TEXT,
    event_type  TEXT,
    reason      TEXT   NOT NULL,
    record      BYTEA  NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (topic, partition, log_offset)
);

-- ---- control plane ----------------------------------------------------------------------------
CREATE TABLE tenants (
    tenant_id  TEXT PRIMARY KEY,
    name       TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    erased_at  BIGINT
);

CREATE TABLE projects (
    project_id      TEXT PRIMARY KEY,
    tenant_id       TEXT   NOT NULL,
    name            TEXT   NOT NULL,
    routing_policy  TEXT,
    security_policy TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX projects_tenant ON projects (tenant_id);

CREATE TABLE api_keys (
    key_id        TEXT PRIMARY KEY,
    tenant_id     TEXT   NOT NULL,
    project_id    TEXT,
    name          TEXT,
    key_hash      BYTEA  NOT NULL,
    prefix        TEXT   NOT NULL,
    roles         TEXT   NOT NULL, -- comma-separated
    expires_at    BIGINT,
    issued_at     BIGINT NOT NULL,
    revoked_at    BIGINT,
    revoke_reason TEXT
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE role_bindings (
    tenant_id  TEXT   NOT NULL,
    principal  TEXT   NOT NULL,
    role       TEXT   NOT NULL,
    project_id TEXT   NOT NULL, -- '' for the whole tenant
    granted_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, principal, role, project_id)
);

CREATE TABLE quota_limits (
    tenant_id    TEXT   NOT NULL,
    scope        TEXT   NOT NULL,
    scope_id     TEXT   NOT NULL,
    metric       TEXT   NOT NULL,
    quota_window TEXT   NOT NULL,
    limit_value  BIGINT, -- NULL: no limit
    set_at       BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, scope, scope_id, metric, quota_window)
);

-- ---- traces -----------------------------------------------------------------------------------
-- One row per request, filled in by its events as they arrive. started_at is the request's
-- arrival (the first event's time if that one is missing): monthly partitions (traces_pYYYY_MM)
-- are created by the projector as months arrive and dropped past retention.
CREATE TABLE traces (
    tenant_id       TEXT NOT NULL,
    trace_id        TEXT NOT NULL,
    project_id      TEXT,
    user_id         TEXT,
    api_key_id      TEXT,
    endpoint        TEXT,
    stream          BOOLEAN,
    model_requested TEXT,
    model_served    TEXT,
    provider        TEXT,
    deployment      TEXT,
    status          TEXT,
    http_status     BIGINT,
    error_class     TEXT,
    latency_us      BIGINT,
    ttft_us         BIGINT,
    overhead_us     BIGINT,
    tokens_in       BIGINT,
    tokens_out      BIGINT,
    tokens_cached   BIGINT,
    cost_micro_usd  BIGINT,
    policy_action   TEXT,
    policy_findings BIGINT,
    attempts        BIGINT,
    started_at      BIGINT NOT NULL,
    completed_at    BIGINT,
    PRIMARY KEY (tenant_id, trace_id, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX traces_recent ON traces (tenant_id, started_at DESC);
CREATE INDEX traces_model ON traces (tenant_id, model_served);
CREATE INDEX traces_trace ON traces (trace_id);

-- One row per upstream attempt.
CREATE TABLE llm_calls (
    event_id        TEXT    NOT NULL,
    tenant_id       TEXT    NOT NULL,
    trace_id        TEXT    NOT NULL,
    attempt         BIGINT  NOT NULL,
    deployment      TEXT    NOT NULL,
    provider        TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    http_status     BIGINT,
    error_class     TEXT,
    stream          BOOLEAN NOT NULL,
    started_at      BIGINT  NOT NULL,
    latency_us      BIGINT  NOT NULL,
    ttft_us         BIGINT,
    tokens_in       BIGINT,
    tokens_out      BIGINT,
    tokens_cached   BIGINT,
    cost_micro_usd  BIGINT,
    usage_estimated BOOLEAN NOT NULL,
    PRIMARY KEY (event_id, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX llm_calls_trace ON llm_calls (tenant_id, trace_id);

CREATE TABLE tool_calls (
    event_id     TEXT PRIMARY KEY,
    tenant_id    TEXT   NOT NULL,
    trace_id     TEXT   NOT NULL,
    direction    TEXT   NOT NULL,
    tool_call_id TEXT   NOT NULL,
    name         TEXT,
    occurred_at  BIGINT NOT NULL
);
CREATE INDEX tool_calls_trace ON tool_calls (tenant_id, trace_id);

-- Request/response bodies and tool arguments, still sealed with the tenant's data key.
CREATE TABLE trace_bodies (
    event_id    TEXT   NOT NULL,
    field       TEXT   NOT NULL,
    tenant_id   TEXT   NOT NULL,
    trace_id    TEXT   NOT NULL,
    occurred_at BIGINT NOT NULL,
    sealed      BYTEA  NOT NULL,
    PRIMARY KEY (event_id, field, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX trace_bodies_trace ON trace_bodies (tenant_id, trace_id);
CREATE INDEX trace_bodies_age ON trace_bodies (occurred_at);

-- ---- usage rollups ----------------------------------------------------------------------------
-- Completed requests counted once each (by the request.completed event id).
CREATE TABLE rollup_applied (
    event_id TEXT PRIMARY KEY
);

-- Per hour (bucket_start on the hour) and per day. project_id and user_id are '' when unset.
-- latency_le_* count requests by latency bucket (upper bound, inclusive), for percentiles.
CREATE TABLE usage_hourly (
    tenant_id         TEXT   NOT NULL,
    project_id        TEXT   NOT NULL,
    user_id           TEXT   NOT NULL,
    model             TEXT   NOT NULL,
    bucket_start      BIGINT NOT NULL,
    requests          BIGINT NOT NULL,
    errors            BIGINT NOT NULL,
    tokens_in         BIGINT NOT NULL,
    tokens_out        BIGINT NOT NULL,
    tokens_cached     BIGINT NOT NULL,
    cost_micro_usd    BIGINT NOT NULL,
    latency_sum_us    BIGINT NOT NULL,
    latency_le_10ms   BIGINT NOT NULL,
    latency_le_25ms   BIGINT NOT NULL,
    latency_le_50ms   BIGINT NOT NULL,
    latency_le_100ms  BIGINT NOT NULL,
    latency_le_250ms  BIGINT NOT NULL,
    latency_le_500ms  BIGINT NOT NULL,
    latency_le_1s     BIGINT NOT NULL,
    latency_le_2500ms BIGINT NOT NULL,
    latency_le_5s     BIGINT NOT NULL,
    latency_le_10s    BIGINT NOT NULL,
    latency_le_30s    BIGINT NOT NULL,
    latency_le_60s    BIGINT NOT NULL,
    latency_le_inf    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, project_id, user_id, model, bucket_start)
);
CREATE INDEX usage_hourly_recent ON usage_hourly (tenant_id, bucket_start);

CREATE TABLE usage_daily (
    tenant_id         TEXT   NOT NULL,
    project_id        TEXT   NOT NULL,
    user_id           TEXT   NOT NULL,
    model             TEXT   NOT NULL,
    bucket_start      BIGINT NOT NULL,
    requests          BIGINT NOT NULL,
    errors            BIGINT NOT NULL,
    tokens_in         BIGINT NOT NULL,
    tokens_out        BIGINT NOT NULL,
    tokens_cached     BIGINT NOT NULL,
    cost_micro_usd    BIGINT NOT NULL,
    latency_sum_us    BIGINT NOT NULL,
    latency_le_10ms   BIGINT NOT NULL,
    latency_le_25ms   BIGINT NOT NULL,
    latency_le_50ms   BIGINT NOT NULL,
    latency_le_100ms  BIGINT NOT NULL,
    latency_le_250ms  BIGINT NOT NULL,
    latency_le_500ms  BIGINT NOT NULL,
    latency_le_1s     BIGINT NOT NULL,
    latency_le_2500ms BIGINT NOT NULL,
    latency_le_5s     BIGINT NOT NULL,
    latency_le_10s    BIGINT NOT NULL,
    latency_le_30s    BIGINT NOT NULL,
    latency_le_60s    BIGINT NOT NULL,
    latency_le_inf    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, project_id, user_id, model, bucket_start)
);
CREATE INDEX usage_daily_recent ON usage_daily (tenant_id, bucket_start);
