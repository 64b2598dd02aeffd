-- Reports (R3): deleting a report's local file is its own step after the
-- batch commits. A file that could not be deleted (permission denied, its
-- object missing, the file changed since it was archived, a symlink or
-- special file in its place) stays, with the reason and when it was last
-- tried; `planner status` lists these and the next `planner --reports` run
-- retries them. The partial index serves both and the per-batch cleanup:
-- it holds only rows whose file is still on disk.
ALTER TABLE reports_archive
    ADD COLUMN local_delete_error TEXT,
    ADD COLUMN local_delete_tried_at TIMESTAMPTZ;

CREATE INDEX reports_archive_kept_locally_idx ON reports_archive (archive_batch_id)
    WHERE NOT deleted_locally;
