-- One live insert into the hot table. Adapted from
-- shared/bench-limits/live_insert.pgb: same row shape, but its own scenario id
-- (loaded rows use scenarios 0..999) so live rows can be told apart.
INSERT INTO scenario_logs (id, scenario_id, received_at, message_hash, message_preview, source,
                           size_bytes, has_pii, token_count, sqs_blocks)
VALUES (gen_random_uuid(), '00000000-0000-0000-0000-00000000ffff', now(),
        md5(random()::text) || md5(random()::text), repeat('x', 200), 'api', 500, false, 100, 1)
