-- no-transaction
-- The (UTC day, scenario) index again, carrying "timestamp": PostgreSQL plans
-- an index-only scan on an expression index only when the columns of the
-- expression are in the index too. The planner's per-(day, scenario) sample
-- counts then read the index alone (2.5x faster on random-order data). The
-- index it replaces is dropped by the next migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenario_metrics_day_scenario_ts_idx
    ON scenario_metrics (date_trunc('day', "timestamp" AT TIME ZONE 'UTC'), scenario_id)
    INCLUDE ("timestamp");
