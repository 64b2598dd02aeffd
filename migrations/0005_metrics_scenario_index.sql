-- no-transaction
-- Per-scenario reads of live metrics (the query API, v_scenario_metrics_all).
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenario_metrics_scenario_id_timestamp_idx
    ON scenario_metrics (scenario_id, "timestamp");
