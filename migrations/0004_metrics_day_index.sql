-- no-transaction
-- Metrics batches are ranges of (UTC day, scenario_id): the planner counts
-- samples per key and each batch deletes its range through this index.
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenario_metrics_day_scenario_idx
    ON scenario_metrics ((date_trunc('day', "timestamp" AT TIME ZONE 'UTC')), scenario_id);
