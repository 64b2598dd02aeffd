-- How many times each job went to `failed`: the monotonic source of the
-- metric archive_job_failures_total. A job's status alone will not do: a
-- redriven job goes from failed back to running and on to completed, and a
-- counter derived from status would fall (Prometheus reads a fall as a reset
-- and would report a new failure).
ALTER TABLE archive_jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
UPDATE archive_jobs SET failures = 1 WHERE status = 'failed';
