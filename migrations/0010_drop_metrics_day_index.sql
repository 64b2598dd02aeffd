-- no-transaction
-- Replaced by scenario_metrics_day_scenario_ts_idx (0009); one index less for
-- every application insert to maintain.
DROP INDEX CONCURRENTLY IF EXISTS scenario_metrics_day_scenario_idx;
