-- no-transaction
-- The planner cuts batches from this index alone (index-only scan), and each
-- batch deletes its keyset range through it. CONCURRENTLY: building it on a
-- live mockupAWS table must not block the application's inserts.
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenario_logs_received_at_id_idx
    ON scenario_logs (received_at, id);
