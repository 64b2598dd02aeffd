//! The metrics policy: exact daily aggregates, whatever the batch size and
//! however often a batch is delivered; late samples merge exactly.

use crate::helpers::amqp::{amqp_config, delete_queues, wait_queue_empty};
use crate::helpers::{TestDb, plan_options, run_inline};
use archiver::plan;
use archiver::transport::amqp::{AmqpConsumer, AmqpPublisher};
use archiver::transport::{BatchMessage, Consumer, Publisher};
use archiver::vocabulary::Kind;
use archiver::worker::{self, WorkerOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The cut-off the planner uses: whole UTC days older than 730 days.
const CUTOFF: &str =
    "date_trunc('day', (now() - interval '730 days') AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'";

/// `n` samples concentrated around the cut-off (±40 days) over 6 scenarios
/// and 3 metrics, so groups hold many samples and both sides have some.
/// `extra_data` has a key every sample shares and one that varies.
async fn load_samples(db: &TestDb, n: i64, seed: f64) {
    sqlx::query("SELECT setseed($1)")
        .bind(seed)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO scenario_metrics (scenario_id, \"timestamp\", metric_type, metric_name, value, unit, extra_data)
         SELECT ('00000000-0000-0000-0000-' || lpad(to_hex(g % 6), 12, '0'))::uuid,
                ({CUTOFF}) + (random() * 80 - 40) * interval '1 day',
                'performance', (ARRAY['cpu', 'mem', 'latency'])[1 + g % 3],
                round((random() * 1000)::numeric, 6), (ARRAY['percent', 'bytes', 'ms'])[1 + g % 3],
                jsonb_build_object('region', 'eu-west-1', 'host', 'h' || (g % 4))
         FROM generate_series(1, $1::bigint) g"
    )))
    .bind(n)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Recomputes, with one GROUP BY over the given samples, what the archive
/// must hold, and saves it in table `expected`.
async fn save_expected(db: &TestDb, samples_from: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS all_samples AS SELECT * FROM scenario_metrics WITH NO DATA;
         INSERT INTO all_samples SELECT * FROM {samples_from} WHERE \"timestamp\" < {CUTOFF};
         DROP TABLE IF EXISTS expected;
         CREATE TABLE expected AS
         SELECT scenario_id, metric_type, metric_name, unit,
                date_trunc('day', \"timestamp\" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day,
                round(avg(value), 6) AS value, count(*)::int AS n, sum(value) AS s, min(value) AS mn, max(value) AS mx
         FROM all_samples GROUP BY 1, 2, 3, 4, 5"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Rows in the archive and not expected, plus expected and not in the archive.
async fn mismatches(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "WITH a AS (SELECT scenario_id, metric_type, metric_name, unit, \"timestamp\" AS day, value, sample_count AS n,
                           value_sum AS s, value_min AS mn, value_max AS mx
                    FROM scenario_metrics_archive WHERE is_aggregated AND aggregation_period = 'day')
         SELECT (SELECT count(*) FROM (SELECT * FROM a EXCEPT ALL SELECT * FROM expected) x)
              + (SELECT count(*) FROM (SELECT * FROM expected EXCEPT ALL SELECT * FROM a) y)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn young_hash(db: &TestDb) -> String {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) || md5(COALESCE(string_agg(t::text, '|' ORDER BY t.id), ''))
         FROM scenario_metrics t WHERE \"timestamp\" >= {CUTOFF}"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn old_left(db: &TestDb) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM scenario_metrics WHERE \"timestamp\" < {CUTOFF}"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn aggregates_equal_one_group_by_whatever_the_batch_size() {
    for (i, batch_size) in [1i64, 37, 400, 1_000_000].into_iter().enumerate() {
        let db = TestDb::new().await;
        load_samples(&db, 6_000, 0.1 * i as f64).await;
        save_expected(&db, "scenario_metrics").await;
        let young = young_hash(&db).await;
        let planned = run_inline(&db, Kind::Metrics, batch_size).await;
        assert_eq!(mismatches(&db).await, 0, "batch size {batch_size}");
        assert_eq!(
            old_left(&db).await,
            0,
            "no sample older than the cut-off remains"
        );
        assert_eq!(young_hash(&db).await, young, "younger samples untouched");
        // Batches never split a group, and stay near the size.
        let split: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT id FROM scenario_metrics_archive GROUP BY id HAVING count(*) > 1) t",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(split, 0);
        let (samples, planned_rows): (i64, i64) = sqlx::query_as(
            "SELECT j.records_deleted, (SELECT sum(planned_rows)::bigint FROM archive_batches WHERE job_id = j.id)
             FROM archive_jobs j WHERE j.id = $1",
        )
        .bind(planned.job)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM all_samples")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!((samples, planned_rows), (total, total));
        db.cleanup().await;
    }
}

#[tokio::test]
async fn late_samples_merge_exactly_and_extra_data_keeps_what_all_share() {
    let db = TestDb::new().await;
    load_samples(&db, 3_000, 0.5).await;
    sqlx::query("CREATE TABLE originals AS SELECT * FROM scenario_metrics")
        .execute(&db.pool)
        .await
        .unwrap();
    run_inline(&db, Kind::Metrics, 250).await;
    let extra: serde_json::Value = sqlx::query_scalar(
        "SELECT extra_data FROM scenario_metrics_archive WHERE sample_count > 8 LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        extra,
        serde_json::json!({"region": "eu-west-1"}),
        "only the pair every sample shares"
    );

    // Late samples for days already archived (existing groups and new ones).
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO scenario_metrics (scenario_id, \"timestamp\", metric_type, metric_name, value, unit, extra_data)
         SELECT scenario_id, \"timestamp\" + interval '1 second', metric_type, metric_name, value + 1.5, unit, '{{\"region\": \"us-east-1\"}}'::jsonb
         FROM originals WHERE \"timestamp\" < {CUTOFF} AND random() < 0.3
         UNION ALL
         SELECT '00000000-0000-0000-0000-0000000000ff', {CUTOFF} - interval '3 days', 'performance', 'new', 42.123456, 'ms', '{{}}'::jsonb"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO originals SELECT * FROM scenario_metrics m WHERE NOT EXISTS (SELECT 1 FROM originals o WHERE o.id = m.id)")
        .execute(&db.pool)
        .await
        .unwrap();
    save_expected(&db, "originals").await;
    run_inline(&db, Kind::Metrics, 250).await;
    assert_eq!(
        mismatches(&db).await,
        0,
        "merged aggregates equal one GROUP BY over all samples"
    );
    assert_eq!(old_left(&db).await, 0);
    // Every aggregate's extra_data is exactly the pairs all its samples share.
    let wrong: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH s AS (
             SELECT scenario_id, metric_type, metric_name, unit, extra_data,
                    date_trunc('day', \"timestamp\" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day
             FROM originals WHERE \"timestamp\" < {CUTOFF}),
         grp AS (SELECT scenario_id, metric_type, metric_name, unit, day, count(*) AS n FROM s GROUP BY 1, 2, 3, 4, 5),
         pairs AS (SELECT scenario_id, metric_type, metric_name, unit, day, e.key, e.value, count(*) AS c
                   FROM s, jsonb_each(s.extra_data) e GROUP BY 1, 2, 3, 4, 5, 6, 7),
         exp AS (SELECT g.*, COALESCE((SELECT jsonb_object_agg(p.key, p.value) FROM pairs p
                                       WHERE (p.scenario_id, p.metric_type, p.metric_name, p.unit, p.day)
                                           = (g.scenario_id, g.metric_type, g.metric_name, g.unit, g.day)
                                         AND p.c = g.n), '{{}}'::jsonb) AS extra
                 FROM grp g)
         SELECT count(*) FROM scenario_metrics_archive a JOIN exp o
             ON (a.scenario_id, a.metric_type, a.metric_name, a.unit, a.\"timestamp\")
              = (o.scenario_id, o.metric_type, o.metric_name, o.unit, o.day)
         WHERE a.extra_data IS DISTINCT FROM o.extra"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        wrong, 0,
        "extra_data keeps exactly the pairs all samples share"
    );
    let mixed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM scenario_metrics_archive WHERE extra_data = '{}'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(mixed > 10, "the test exercises merges that drop a pair");
    db.cleanup().await;
}

#[tokio::test]
async fn redelivery_a_kill_after_commit_and_replanning_leave_aggregates_unchanged() {
    let db = TestDb::new().await;
    load_samples(&db, 4_000, 0.7).await;
    save_expected(&db, "scenario_metrics").await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan::plan(
        &db.pool,
        Kind::Metrics,
        &plan_options(300, "amqp"),
        &publisher,
    )
    .await
    .unwrap();
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1")
        .bind(planned.job)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    publisher
        .publish(
            &ids.iter()
                .map(|&id| BatchMessage::new(id, Kind::Metrics))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();

    // One delivery committed by a worker that then dies without acking.
    let mut doomed = AmqpConsumer::new(cfg.clone(), 1);
    let d = doomed.receive().await.unwrap().unwrap();
    worker::process(
        &db.pool,
        &d.payload,
        WorkerOptions::default(),
        &CancellationToken::new(),
    )
    .await;
    drop(d);
    doomed.close().await;

    let stop = CancellationToken::new();
    let (pool, wcfg, token) = (db.pool.clone(), cfg.clone(), stop.clone());
    let w = tokio::spawn(async move {
        let mut c = AmqpConsumer::new(wcfg, 2);
        worker::run(&pool, &mut c, WorkerOptions::default(), token)
            .await
            .unwrap()
    });
    assert_eq!(db.wait_job(planned.job).await, "completed");
    wait_queue_empty(&cfg).await;
    stop.cancel();
    let stats = w.await.unwrap();
    assert!(
        stats
            .already_done
            .load(std::sync::atomic::Ordering::Relaxed)
            >= ids.len() as u64
    );
    assert_eq!(mismatches(&db).await, 0);
    let archive_before: String = sqlx::query_scalar(
        "SELECT md5(string_agg(t::text, '|' ORDER BY t.id)) FROM (SELECT id, value, sample_count, value_sum FROM scenario_metrics_archive) t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // Planning again finds nothing and changes nothing.
    let again = run_inline(&db, Kind::Metrics, 300).await;
    assert_eq!(again.batches, 0);
    let archive_after: String = sqlx::query_scalar(
        "SELECT md5(string_agg(t::text, '|' ORDER BY t.id)) FROM (SELECT id, value, sample_count, value_sum FROM scenario_metrics_archive) t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(archive_before, archive_after);
    let samples: i64 = sqlx::query_scalar("SELECT records_deleted FROM archive_jobs WHERE id = $1")
        .bind(planned.job)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM all_samples")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(samples, total, "counters counted once");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}
