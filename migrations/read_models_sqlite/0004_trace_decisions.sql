-- What a trace's timeline shows beyond its calls: the routing decision with its candidates, the
-- policy verdict with its findings (rule, kind, location; never the secret) and quota decisions,
-- each the event's payload as JSON.
CREATE TABLE trace_decisions (
    event_id    TEXT   NOT NULL PRIMARY KEY,
    tenant_id   TEXT   NOT NULL,
    trace_id    TEXT   NOT NULL,
    kind        TEXT   NOT NULL, -- routing, policy, quota_consumed, quota_denied
    occurred_at BIGINT NOT NULL,
    detail      TEXT   NOT NULL
);
CREATE INDEX trace_decisions_trace ON trace_decisions (tenant_id, trace_id);
CREATE INDEX trace_decisions_age ON trace_decisions (occurred_at);

-- A tool call's result arrives with the next request (another trace): found by its id.
CREATE INDEX tool_calls_id ON tool_calls (tenant_id, tool_call_id);
CREATE INDEX tool_calls_age ON tool_calls (occurred_at);
