-- no-transaction
-- Serves `planner status`, the retry of files left in place, and the
-- per-batch cleanup: it holds only rows whose file is still on disk. Built
-- concurrently, so reads and writes of reports_archive go on meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS reports_archive_kept_locally_idx
    ON reports_archive (archive_batch_id) WHERE NOT deleted_locally;
