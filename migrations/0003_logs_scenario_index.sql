-- no-transaction
-- Per-scenario, newest-first reads of live logs (the query API, the views).
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenario_logs_scenario_id_received_at_idx
    ON scenario_logs (scenario_id, received_at DESC);
