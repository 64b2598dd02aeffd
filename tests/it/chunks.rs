//! Batches executed as chunks, each its own transaction with the batch's
//! cursor: several chunks archive exactly what one transaction did; a worker
//! killed between chunks, two deliveries at once and a stop between chunks
//! lose and duplicate nothing; a metrics group is never split; a cursor that
//! contradicts its batch is refused.

use crate::helpers::amqp::{amqp_config, delete_queues};
use crate::helpers::{
    TestDb, plan_logs, plan_only, plan_options, poll_until, small_chunks, wait_until,
};
use archiver::execute::{self, Executor, Outcome};
use archiver::transport::amqp::AmqpPublisher;
use archiver::transport::{BatchMessage, Publisher};
use archiver::vocabulary::Kind;
use archiver::worker::{self, Disposition, WorkerOptions};
use sqlx::Row;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// An executor whose chunks aim at 1 ms: after the first (1,000 rows)
/// every chunk is the minimum (100 rows), so a 5,000-row batch is many.
fn tiny_chunks(db: &TestDb) -> Executor {
    small_chunks(&db.pool)
}

/// (chunks, cursor = hi, status, rows_deleted, planned_rows) of a batch.
async fn progress(db: &TestDb, id: Uuid) -> (i32, bool, String, i64, i64) {
    let r = sqlx::query(
        "SELECT chunks, (cursor_ts, cursor_id) IS NOT DISTINCT FROM (hi_ts, hi_id) AS at_hi,
                status, rows_deleted, planned_rows
         FROM archive_batches WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    (
        r.get("chunks"),
        r.get("at_hi"),
        r.get("status"),
        r.get("rows_deleted"),
        r.get("planned_rows"),
    )
}

#[tokio::test]
async fn a_batch_runs_as_several_chunks_and_archives_every_row_once() {
    let db = TestDb::new().await;
    db.load_logs(15_000).await;
    let (old, young) = db.split_hashes().await;
    let planned = plan_only(&db, Kind::Logs, &plan_options(5_000, "inline")).await;
    let exec = tiny_chunks(&db);
    let stop = CancellationToken::new();
    let mut total = 0;
    for id in db.batches_of(planned.job).await {
        match execute::execute_batch(&exec, id, Kind::Logs, &stop)
            .await
            .unwrap()
        {
            Outcome::Done { counts, .. } => total += counts.archived,
            other => panic!("{other:?}"),
        }
        let (chunks, at_hi, status, moved, planned_rows) = progress(&db, id).await;
        assert_eq!(status, "done");
        assert!(at_hi, "the cursor of a done batch is its upper bound");
        assert_eq!(moved, planned_rows);
        if planned_rows > 1_000 {
            assert!(chunks > 1, "{planned_rows} rows in {chunks} chunk(s)");
        }
    }
    let chunks = db
        .scalar(&format!(
            "SELECT sum(chunks)::bigint FROM archive_batches WHERE job_id = '{}'",
            planned.job
        ))
        .await;
    assert!(
        chunks >= 3 * planned.batches as i64,
        "{chunks} chunks for {} batches",
        planned.batches
    );
    assert_eq!(total, old.0);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_between_chunks_is_resumed_at_the_cursor_exactly_once() {
    let db = TestDb::new().await;
    db.load_logs(45_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 5_000, "amqp").await;
    assert!(planned.batches >= 4);
    let worker = || {
        db.worker()
            .amqp(&cfg)
            .env("ARCHIVER_CHUNK_TIME", "1ms")
            .env("ARCHIVER_CONCURRENCY", "1")
            .env("ARCHIVER_KINDS", "logs")
            .spawn()
    };
    let doomed = worker();
    let midway: Option<Uuid> = poll_until(Duration::from_secs(60), || async {
        sqlx::query_scalar(
            "SELECT id FROM archive_batches
                 WHERE status = 'pending' AND cursor_ts IS NOT NULL LIMIT 1",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    })
    .await;
    let midway = midway.unwrap_or_else(|| {
        panic!(
            "no batch with some chunks done and some to go; the worker said:\n{}",
            doomed.log()
        )
    });
    drop(doomed); // SIGKILL: no chance to finish the chunk in hand
    let (chunks_before, ..) = progress(&db, midway).await;
    let archived_before = db
        .scalar("SELECT count(*) FROM scenario_logs_archive")
        .await;
    assert!(
        archived_before > 0 && archived_before < old.0,
        "killed midway: {archived_before} of {}",
        old.0
    );

    let w = worker();
    assert_eq!(db.wait_job(planned.job).await, "completed", "{}", w.log());
    let log = w.stop().await;
    let (chunks_after, at_hi, status, moved, planned_rows) = progress(&db, midway).await;
    assert_eq!(status, "done", "{log}");
    assert!(at_hi);
    assert!(chunks_after > chunks_before, "resumed with more chunks");
    assert_eq!(moved, planned_rows, "the batch's rows counted once");
    assert_eq!(
        db.scalar("SELECT count(*) FROM archive_batches WHERE status = 'dead'")
            .await,
        0
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn two_executions_of_one_batch_at_once_take_turns_chunk_by_chunk() {
    let db = TestDb::new().await;
    db.load_logs(9_000).await;
    let (old, young) = db.split_hashes().await;
    let planned = plan_only(&db, Kind::Logs, &plan_options(10_000, "inline")).await;
    assert_eq!(planned.batches, 1);
    let id = db.batches_of(planned.job).await[0];
    let (a, b) = (tiny_chunks(&db), tiny_chunks(&db));
    let stop = CancellationToken::new();
    let (ra, rb) = tokio::join!(
        execute::execute_batch(&a, id, Kind::Logs, &stop),
        execute::execute_batch(&b, id, Kind::Logs, &stop),
    );
    let rows = |o: Outcome| match o {
        Outcome::Done { counts, .. } => counts.archived,
        Outcome::AlreadyDone => 0,
    };
    let (ra, rb) = (rows(ra.unwrap()), rows(rb.unwrap()));
    assert_eq!(
        ra + rb,
        old.0,
        "each row counted by exactly one: {ra} + {rb}"
    );
    // They took turns: the one waiting on the batch's row lock runs the next
    // chunk, so both moved rows (not one all and the other none).
    assert!(ra > 0 && rb > 0, "both took chunks: {ra} + {rb}");
    let (chunks, at_hi, status, moved, _) = progress(&db, id).await;
    assert_eq!((status.as_str(), at_hi, moved), ("done", true, old.0));
    assert!(chunks > 1);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    db.cleanup().await;
}

/// The cut-off the planner uses for metrics: whole UTC days older than 730.
const METRICS_CUTOFF: &str =
    "date_trunc('day', (now() - interval '730 days') AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'";

#[tokio::test]
async fn a_metrics_key_larger_than_a_chunk_stays_one_aggregate_per_group() {
    let db = TestDb::new().await;
    // 3,000 samples over 10 days and 3 scenarios, 3 metrics; and one
    // (day, scenario) of 900 samples: 300 per group, three times a chunk.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO scenario_metrics (scenario_id, \"timestamp\", metric_type, metric_name, value, unit, extra_data)
         SELECT ('00000000-0000-0000-0000-' || lpad(to_hex(g % 3), 12, '0'))::uuid,
                ({METRICS_CUTOFF}) - interval '12 days' + (g % 10) * interval '1 day' + (g % 7) * interval '1 minute',
                'performance', (ARRAY['cpu', 'mem', 'latency'])[1 + g % 3], g / 7.0, 'u', '{{}}'
         FROM generate_series(1, 3000) g;
         INSERT INTO scenario_metrics (scenario_id, \"timestamp\", metric_type, metric_name, value, unit, extra_data)
         SELECT '00000000-0000-0000-0000-0000000000ff',
                ({METRICS_CUTOFF}) - interval '5 days' + g * interval '1 second',
                'performance', (ARRAY['cpu', 'mem', 'latency'])[1 + g % 3], g / 3.0, 'u', '{{}}'
         FROM generate_series(1, 900) g;
         CREATE TABLE expected AS
         SELECT scenario_id, metric_type, metric_name, unit,
                date_trunc('day', \"timestamp\" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day,
                count(*)::int AS n, sum(value) AS s, min(value) AS mn, max(value) AS mx
         FROM scenario_metrics WHERE \"timestamp\" < {METRICS_CUTOFF} GROUP BY 1, 2, 3, 4, 5;
         ANALYZE scenario_metrics;"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let samples = db.scalar("SELECT sum(n)::bigint FROM expected").await;
    assert_eq!(samples, 3_900);
    let planned = plan_only(&db, Kind::Metrics, &plan_options(5_000, "inline")).await;
    assert_eq!(planned.batches, 1);
    let id = db.batches_of(planned.job).await[0];
    let exec = tiny_chunks(&db);
    // Warm the sizer down to its minimum (100 samples) first, so the big
    // key meets chunks smaller than itself.
    for _ in 0..10 {
        exec.chunks.record(
            Kind::Metrics,
            100,
            Duration::from_millis(50),
            Duration::from_millis(1),
        );
    }
    assert_eq!(
        exec.chunks.size(Kind::Metrics, Duration::from_millis(1)),
        Some(100)
    );
    let out = execute::execute_batch(&exec, id, Kind::Metrics, &CancellationToken::new())
        .await
        .unwrap();
    let Outcome::Done { counts, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(counts.processed, samples);
    let (chunks, at_hi, status, moved, _) = progress(&db, id).await;
    assert_eq!((status.as_str(), at_hi, moved), ("done", true, samples));
    assert!(chunks > 3, "{chunks} chunks");
    let mismatches = db
        .scalar(
            "WITH a AS (SELECT scenario_id, metric_type, metric_name, unit, \"timestamp\" AS day,
                               sample_count AS n, value_sum AS s, value_min AS mn, value_max AS mx
                        FROM scenario_metrics_archive)
             SELECT (SELECT count(*) FROM (SELECT * FROM a EXCEPT ALL SELECT * FROM expected) x)
                  + (SELECT count(*) FROM (SELECT * FROM expected EXCEPT ALL SELECT * FROM a) y)",
        )
        .await;
    assert_eq!(mismatches, 0, "one exact aggregate per group");
    let big = db
        .scalar(
            "SELECT count(*) FROM scenario_metrics_archive
             WHERE scenario_id = '00000000-0000-0000-0000-0000000000ff' AND sample_count = 300",
        )
        .await;
    assert_eq!(big, 3, "the big key's three groups, whole");
    db.cleanup().await;
}

/// Hands `id`'s message to `worker::process` as a delivery would.
async fn deliver(exec: &Executor, id: Uuid, kind: Kind, stop: &CancellationToken) -> Disposition {
    let payload = BatchMessage::new(id, kind).encode();
    worker::process(exec, &payload, WorkerOptions::default(), stop).await
}

#[tokio::test]
async fn a_cursor_that_contradicts_its_batch_is_dead_lettered_and_nothing_moves() {
    let db = TestDb::new().await;
    db.load_logs(9_000).await;
    let live = db.hash("FROM scenario_logs").await;
    let planned = plan_only(&db, Kind::Logs, &plan_options(2_000, "inline")).await;
    let ids = db.batches_of(planned.job).await;
    assert!(ids.len() >= 3);
    // The schema itself refuses half a cursor...
    let half = sqlx::query("UPDATE archive_batches SET cursor_ts = hi_ts WHERE id = $1")
        .bind(ids[0])
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(
        half.to_string().contains("archive_batches_cursor_whole"),
        "{half}"
    );
    // ...and the worker does too, should a row get past it.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE archive_batches DROP CONSTRAINT archive_batches_cursor_whole;
         UPDATE archive_batches SET cursor_ts = hi_ts WHERE id = '{}';
         UPDATE archive_batches SET cursor_ts = hi_ts + interval '1 day', cursor_id = hi_id WHERE id = '{}';
         UPDATE archive_batches SET cursor_ts = lo_ts - interval '1 day', cursor_id = lo_id WHERE id = '{}';",
        ids[0], ids[1], ids[2]
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let exec = tiny_chunks(&db);
    let stop = CancellationToken::new();
    for (id, why) in [
        (ids[0], "half a cursor"),
        (ids[1], "above the batch's upper bound"),
        (ids[2], "below the batch's lower bound"),
    ] {
        match deliver(&exec, id, Kind::Logs, &stop).await {
            Disposition::DeadLetter(reason) => {
                assert!(
                    reason.contains("cursor") && reason.contains(why),
                    "{reason}"
                );
                assert!(reason.contains(&id.to_string()), "{reason}");
            }
            other => panic!("{why}: {other:?}"),
        }
        assert_eq!(db.batch_state(id).await.0, "dead");
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM scenario_logs_archive")
            .await,
        0
    );
    assert_eq!(db.hash("FROM scenario_logs").await, live, "no row moved");
    db.cleanup().await;
}

#[tokio::test]
async fn a_stop_between_chunks_hands_the_batch_back_and_a_later_run_finishes_it_exactly() {
    let db = TestDb::new().await;
    db.load_logs(9_000).await;
    let (old, young) = db.split_hashes().await;
    let planned = plan_only(&db, Kind::Logs, &plan_options(10_000, "inline")).await;
    let id = db.batches_of(planned.job).await[0];
    // The application holds the 1,001st row: the first chunk (1,000 rows)
    // commits, the second waits on it.
    let mut app = db.pool.begin().await.unwrap();
    // (Found first, then locked: FOR UPDATE would lock the rows OFFSET skips.)
    sqlx::query(
        "SELECT 1 FROM scenario_logs WHERE id = (
             SELECT l.id FROM scenario_logs l, archive_batches b WHERE b.id = $1
               AND (l.received_at, l.id) <= (b.hi_ts, b.hi_id)
               AND l.received_at < now() - interval '365 days'
             ORDER BY l.received_at, l.id OFFSET 1000 LIMIT 1)
         FOR UPDATE",
    )
    .bind(id)
    .execute(&mut *app)
    .await
    .unwrap();
    let exec = tiny_chunks(&db);
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (exec, stop) = (exec.clone(), stop.clone());
        async move { deliver(&exec, id, Kind::Logs, &stop).await }
    });
    wait_until(
        "the first chunk committed and the second waiting",
        Duration::from_secs(30),
        || async { progress(&db, id).await.0 == 1 && db.lock_waiters().await > 0 },
    )
    .await;
    stop.cancel();
    app.rollback().await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the stopped batch settles")
        .unwrap();
    assert_eq!(d, Disposition::HandBack);
    let (chunks, at_hi, status, moved, planned_rows) = progress(&db, id).await;
    assert_eq!(status, "pending");
    assert_eq!(chunks, 2, "the chunk in hand finished, no other started");
    assert!(!at_hi && moved > 1_000 && moved < planned_rows, "{moved}");
    assert_eq!(db.batch_state(id).await.1, 0, "no attempt spent");
    assert_eq!(
        db.scalar("SELECT count(*) FROM scenario_logs_archive")
            .await,
        moved,
        "the cursor says what is archived"
    );
    let (batch_rows, job_rows) = (
        db.scalar(&format!(
            "SELECT rows_archived FROM archive_batches WHERE id = '{id}'"
        ))
        .await,
        db.scalar(&format!(
            "SELECT records_archived FROM archive_jobs WHERE id = '{}'",
            planned.job
        ))
        .await,
    );
    assert_eq!(batch_rows, moved, "the batch's counters follow its chunks");
    assert_eq!(job_rows, 0, "the job counts a batch once it is done");

    let again = deliver(&exec, id, Kind::Logs, &CancellationToken::new()).await;
    match again {
        Disposition::Ack(Outcome::Done {
            counts,
            job_completed,
            ..
        }) => {
            assert_eq!(counts.archived, planned_rows - moved, "only the rest");
            assert!(job_completed);
        }
        other => panic!("{other:?}"),
    }
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    db.cleanup().await;
}
