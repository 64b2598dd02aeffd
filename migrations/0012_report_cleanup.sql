-- Reports (R3): deleting a report's local file is its own step after the
-- batch commits. A file that could not be deleted (permission denied, its
-- object missing, the file changed since it was archived, a symlink or
-- special file in its place) stays, with the reason and when it was last
-- tried; `planner status` lists these and the next `planner --reports` run
-- retries them. (Nullable columns without a default: a catalog change, no
-- table rewrite. Their index is built concurrently by 0013.)
ALTER TABLE reports_archive
    ADD COLUMN local_delete_error TEXT,
    ADD COLUMN local_delete_tried_at TIMESTAMPTZ;
