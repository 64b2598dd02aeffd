-- Identical starting state before every metrics measurement. Adapted from
-- shared/bench-limits/reset.sql, as bench/reset.sql is: keeps the indexes
-- our migrations create and the archive's monthly partitions (TRUNCATE of
-- the parent empties them), and empties the ledger.
-- One statement per line group, each ending in ";" at the end of a line.
TRUNCATE scenario_metrics;
TRUNCATE scenario_metrics_archive;
DELETE FROM archive_batches;
DELETE FROM archive_jobs;
INSERT INTO scenario_metrics SELECT * FROM metrics_pristine;
VACUUM ANALYZE scenario_metrics;
VACUUM ANALYZE scenario_metrics_archive;
VACUUM ANALYZE archive_batches;
VACUUM ANALYZE archive_jobs;
CHECKPOINT;
