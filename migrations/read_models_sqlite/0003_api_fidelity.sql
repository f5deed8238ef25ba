-- llm_call.completed v2: the upstream's id of its answer (how a stored response is found again),
-- cache writes, what the prompt cache saved, and the fields a translation between APIs dropped.
ALTER TABLE llm_calls ADD COLUMN response_id TEXT;
ALTER TABLE llm_calls ADD COLUMN tokens_cache_creation BIGINT;
ALTER TABLE llm_calls ADD COLUMN cache_saved_micro_usd BIGINT;
ALTER TABLE llm_calls ADD COLUMN dropped_fields TEXT; -- a JSON array; NULL when none
CREATE INDEX llm_calls_response ON llm_calls (tenant_id, response_id);
