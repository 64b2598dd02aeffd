-- Optional (`--random-order`): the rows of archiver::demo::load_metrics,
-- but at random times, so the heap is in no order and every batch of a day
-- range touches most of the table's pages: the worst case for any batched
-- mover. $1 = samples, $2 = scenarios, $3 = span in days.
INSERT INTO scenario_metrics (id, scenario_id, "timestamp", metric_type, metric_name, value, unit, extra_data)
SELECT gen_random_uuid(),
       ('00000000-0000-0000-0000-' || lpad(to_hex(g % $2), 12, '0'))::uuid,
       now() - random() * make_interval(days => $3::int) - interval '1 hour',
       'performance',
       (ARRAY['cpu', 'mem', 'latency', 'rps', 'errors'])[1 + (g / $2) % 5],
       round((random() * 1000)::numeric, 6),
       (ARRAY['percent', 'bytes', 'ms', 'count', 'count'])[1 + (g / $2) % 5],
       jsonb_build_object('region', (ARRAY['us-east-1', 'eu-west-1'])[1 + g % $2 % 2])
FROM generate_series(1, $1::bigint) g
