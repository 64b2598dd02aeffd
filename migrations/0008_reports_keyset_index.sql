-- no-transaction
-- Reports batches are keyset ranges of (created_at, id).
CREATE INDEX CONCURRENTLY IF NOT EXISTS reports_created_at_id_idx ON reports (created_at, id);
