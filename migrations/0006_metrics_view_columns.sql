-- v_scenario_metrics_all as in the spec, plus (at the end, so the spec's
-- column order is kept) how many samples a row stands for and its period.
CREATE OR REPLACE VIEW v_scenario_metrics_all AS
SELECT id, scenario_id, "timestamp", metric_type, metric_name, value, unit, extra_data,
       NULL::timestamptz AS archived_at, false AS is_aggregated, false AS is_archived,
       1 AS sample_count, NULL::varchar(20) AS aggregation_period
FROM scenario_metrics
UNION ALL
SELECT id, scenario_id, "timestamp", metric_type, metric_name, value, unit, extra_data,
       archived_at, is_aggregated, true AS is_archived,
       sample_count, aggregation_period
FROM scenario_metrics_archive;
