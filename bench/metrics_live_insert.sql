-- One live sample into the hot metrics table (the table being archived).
-- Same shape as the loaded samples (archiver::demo::load_metrics), timestamp
-- now() (never eligible), and its own scenario id (loaded samples use
-- scenarios 0..999) so live samples can be told apart.
INSERT INTO scenario_metrics (id, scenario_id, "timestamp", metric_type, metric_name, value, unit, extra_data)
VALUES (gen_random_uuid(), '00000000-0000-0000-0000-00000000ffff', now(), 'performance', 'cpu',
        round((random() * 1000)::numeric, 6), 'percent', '{"region": "us-east-1"}')
