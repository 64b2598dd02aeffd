-- In-database limit 1: one statement moves every eligible row.
-- Adapted from shared/bench-limits/limit_a.sql. $1 = cut-off, $2 = batch id.
WITH moved AS (
    DELETE FROM scenario_logs WHERE received_at < $1
    RETURNING id, scenario_id, received_at, message_hash, message_preview, source,
              size_bytes, has_pii, token_count, sqs_blocks
)
INSERT INTO scenario_logs_archive (id, scenario_id, received_at, message_hash, message_preview,
    source, size_bytes, has_pii, token_count, sqs_blocks, archived_at, archive_batch_id)
SELECT id, scenario_id, received_at, message_hash, message_preview, source,
       size_bytes, has_pii, token_count, sqs_blocks, now(), $2
FROM moved
