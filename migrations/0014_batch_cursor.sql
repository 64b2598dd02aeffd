-- A batch runs as one or more chunks, each its own transaction. Its cursor
-- is the key the last committed chunk ended at (inclusive), updated in that
-- chunk's transaction: a redelivered batch resumes above it, so nothing is
-- moved twice. NULL: no chunk has run (the batch starts at lo). Rows already
-- in the table (batches run whole, before chunks) keep NULL and 0, which is
-- what they are: no cursor needed, done or not.
ALTER TABLE archive_batches
    ADD COLUMN cursor_ts TIMESTAMPTZ,
    ADD COLUMN cursor_id UUID,
    ADD COLUMN chunks INTEGER NOT NULL DEFAULT 0,
    ADD CONSTRAINT archive_batches_cursor_whole
        CHECK ((cursor_ts IS NULL) = (cursor_id IS NULL));
