-- Optional (`--ordered`): metric samples in arrival order, so the heap is in
-- time order as a real append-only metrics table's is. Otherwise the same
-- rows as archiver::demo::load_metrics (which draws random times).
-- $1 = samples, $2 = scenarios, $3 = span in days.
INSERT INTO scenario_metrics (id, scenario_id, "timestamp", metric_type, metric_name, value, unit, extra_data)
SELECT gen_random_uuid(),
       ('00000000-0000-0000-0000-' || lpad(to_hex(g % $2), 12, '0'))::uuid,
       now() - make_interval(days => $3::int) * (1 - g::float8 / $1)
             + (random() - 0.5) * interval '1 hour' - interval '1 hour',
       'performance',
       (ARRAY['cpu', 'mem', 'latency', 'rps', 'errors'])[1 + g % 5],
       round((random() * 1000)::numeric, 6),
       (ARRAY['percent', 'bytes', 'ms', 'count', 'count'])[1 + g % 5],
       jsonb_build_object('region', (ARRAY['us-east-1', 'eu-west-1'])[1 + g % 2])
FROM generate_series(1, $1::bigint) g
