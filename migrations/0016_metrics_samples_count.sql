-- planner verify, metrics: the sample count a metrics batch's aggregates
-- hold, beside their value sum (samples_value_sum) and digest
-- (content_digest, schema::METRICS_AGG_DIGEST). Not rows_deleted: when a
-- later batch merges late samples into a day's aggregate, the row (and the
-- samples it already held) moves to that batch, and these three move with
-- it (subtracted from the batch that wrote the row, added to the one that
-- merged into it), so that per batch they always equal the sums over the
-- aggregate rows carrying its archive_batch_id. NULL on batches recorded
-- before this migration (nothing to verify against); 0 for new ones.
ALTER TABLE archive_batches ADD COLUMN samples_count BIGINT;
ALTER TABLE archive_batches ALTER COLUMN samples_count SET DEFAULT 0;
