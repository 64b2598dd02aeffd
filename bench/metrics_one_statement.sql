-- In-database limit for metrics: one statement deletes every eligible sample
-- and writes one daily aggregate per group. Adapted from
-- shared/bench-limits/limit_m.sql: $1 = cut-off (the archiver's: whole UTC
-- days older than 730 days), $2 = batch id; the id is the archiver's
-- deterministic one (an MD5 of the group key), value = round(sum / count, 6),
-- and archived_at / archive_batch_id are stamped as the archiver does.
-- extra_data is left '{}' (the archiver keeps the pairs common to a group).
WITH moved AS (
    DELETE FROM scenario_metrics WHERE "timestamp" < $1
    RETURNING *
)
INSERT INTO scenario_metrics_archive (id, scenario_id, "timestamp", metric_type, metric_name,
    value, unit, extra_data, archived_at, archive_batch_id, is_aggregated, aggregation_period,
    sample_count, value_sum, value_min, value_max)
SELECT md5(concat_ws('|', scenario_id, metric_type, metric_name, unit, to_char(day, 'YYYY-MM-DD')))::uuid,
       scenario_id, day AT TIME ZONE 'UTC', metric_type, metric_name,
       round(sum(value) / count(*), 6), unit, '{}', now(), $2, true, 'day',
       count(*), sum(value), min(value), max(value)
FROM (SELECT *, date_trunc('day', "timestamp" AT TIME ZONE 'UTC') AS day FROM moved) m
GROUP BY scenario_id, metric_type, metric_name, unit, day
