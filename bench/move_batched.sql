-- In-database limit 2: a server-side loop of keyset batches of bs rows on
-- (received_at, id), one transaction each. Adapted from
-- shared/bench-limits/batched.sql: the cut-off is a parameter, and each batch
-- stamps archived_at and one archive_batch_id (there: one per row), as the
-- archiver does.
CREATE OR REPLACE PROCEDURE bench_move_batched(bs int, cutoff timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    lo_t  timestamptz := '-infinity';
    lo_id uuid := '00000000-0000-0000-0000-000000000000';
    hi    record;
    bid   uuid;
BEGIN
    LOOP
        bid := gen_random_uuid();
        SELECT received_at, id INTO hi FROM scenario_logs
         WHERE (received_at, id) > (lo_t, lo_id) AND received_at < cutoff
         ORDER BY received_at, id OFFSET bs - 1 LIMIT 1;
        IF NOT FOUND THEN
            -- The tail: fewer than bs rows left.
            WITH moved AS (
                DELETE FROM scenario_logs
                 WHERE (received_at, id) > (lo_t, lo_id) AND received_at < cutoff
                RETURNING id, scenario_id, received_at, message_hash, message_preview, source,
                          size_bytes, has_pii, token_count, sqs_blocks
            )
            INSERT INTO scenario_logs_archive (id, scenario_id, received_at, message_hash,
                message_preview, source, size_bytes, has_pii, token_count, sqs_blocks,
                archived_at, archive_batch_id)
            SELECT id, scenario_id, received_at, message_hash, message_preview, source,
                   size_bytes, has_pii, token_count, sqs_blocks, now(), bid
            FROM moved;
            COMMIT;
            EXIT;
        END IF;
        WITH moved AS (
            DELETE FROM scenario_logs
             WHERE (received_at, id) > (lo_t, lo_id)
               AND (received_at, id) <= (hi.received_at, hi.id)
               AND received_at < cutoff
            RETURNING id, scenario_id, received_at, message_hash, message_preview, source,
                      size_bytes, has_pii, token_count, sqs_blocks
        )
        INSERT INTO scenario_logs_archive (id, scenario_id, received_at, message_hash,
            message_preview, source, size_bytes, has_pii, token_count, sqs_blocks,
            archived_at, archive_batch_id)
        SELECT id, scenario_id, received_at, message_hash, message_preview, source,
               size_bytes, has_pii, token_count, sqs_blocks, now(), bid
        FROM moved;
        COMMIT;
        lo_t := hi.received_at;
        lo_id := hi.id;
    END LOOP;
END $$;
