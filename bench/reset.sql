-- Identical starting state before every measurement. Adapted from
-- shared/bench-limits/reset.sql: keeps the indexes our migrations create,
-- and empties the ledger so its size is the same for every run.
-- One statement per line group, each ending in ";" at the end of a line.
TRUNCATE scenario_logs;
TRUNCATE scenario_logs_archive;
DELETE FROM archive_batches;
DELETE FROM archive_jobs;
INSERT INTO scenario_logs SELECT * FROM logs_pristine;
VACUUM ANALYZE scenario_logs;
VACUUM ANALYZE scenario_logs_archive;
VACUUM ANALYZE archive_batches;
VACUUM ANALYZE archive_jobs;
CHECKPOINT;
