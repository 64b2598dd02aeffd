//! Failure classes, the dead-letter queue, `status` and `redrive`, over
//! RabbitMQ, with the worker as the binary runs it.

use crate::helpers::amqp::{self, amqp_config, delete_queues, drain, purge};
use crate::helpers::bin::{stderr, stdout};
use crate::helpers::{TestDb, plan_options};
use archiver::plan;
use archiver::transport::Publisher;
use archiver::transport::amqp::{AmqpConfig, AmqpPublisher};
use archiver::vocabulary::Kind;
use archiver::worker::{WorkerOptions, WorkerStats};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A worker whose sessions give up on a row lock after 300 ms.
fn impatient_worker(
    db: &TestDb,
    cfg: &AmqpConfig,
    opts: WorkerOptions,
    stop: &CancellationToken,
) -> JoinHandle<Arc<WorkerStats>> {
    let url = format!("{}?options=-c%20lock_timeout%3D300ms", db.url);
    amqp::spawn_worker_with(&url, cfg, 1, opts, stop)
}

#[tokio::test]
async fn a_permanent_failure_is_parked_at_once_and_redrive_completes_it_after_the_fix() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan::plan(&db.pool, Kind::Logs, &plan_options(500, "amqp"), &publisher)
        .await
        .unwrap();
    // Break one batch for good: its month's partition disappears.
    let (victim, month): (Uuid, String) = sqlx::query_as(
        "SELECT id, to_char((lo_ts + (hi_ts - lo_ts) / 2) AT TIME ZONE 'UTC', 'YYYY_MM') FROM archive_batches WHERE job_id = $1 ORDER BY seq LIMIT 1 OFFSET 1",
    )
    .bind(planned.job)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let part = format!("scenario_logs_archive_{month}");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE scenario_logs_archive DETACH PARTITION {part}"
    )))
    .execute(&db.pool)
    .await
    .unwrap();

    let stop = CancellationToken::new();
    let w = impatient_worker(&db, &cfg, WorkerOptions::default(), &stop);
    assert_eq!(db.wait_job(planned.job).await, "failed");
    db.wait_batch(victim, "dead").await;
    assert_eq!(db.batch_state(victim).await.1, 1, "one attempt");
    let dead = drain(&cfg, &cfg.dead_queue()).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].0.contains(&victim.to_string())
            && dead[0].1.as_deref().unwrap_or("").contains("no partition"),
        "{dead:?}"
    );

    let status = db.planner().amqp(&cfg).args(["status"]).output().await;
    let out = stdout(&status);
    assert!(
        status.status.success()
            && out.contains("dead batches: 1")
            && out.contains(&victim.to_string())
            && out.contains("no partition"),
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_slice(
        &db.planner()
            .amqp(&cfg)
            .args(["status", "--json"])
            .output()
            .await
            .stdout,
    )
    .unwrap();
    assert_eq!(json["dead_batches"][0]["id"], victim.to_string());

    // Fix the cause, then redrive: the batch and the job complete.
    let dry = db
        .planner()
        .amqp(&cfg)
        .args(["redrive", "--all", "--dry-run"])
        .output()
        .await;
    assert!(stdout(&dry).contains("would be redriven"));
    assert_eq!(
        db.batch_state(victim).await.0,
        "dead",
        "a dry run changes nothing"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE scenario_logs_archive ATTACH PARTITION {part} FOR VALUES FROM ('{}-01 00:00:00+00') TO ('{}-01 00:00:00+00')",
        month.replace('_', "-"),
        next_month(&month)
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let o = db
        .planner()
        .amqp(&cfg)
        .args(["redrive", "--all"])
        .output()
        .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(db.wait_job(planned.job).await, "completed");
    db.wait_batch(victim, "done").await;
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;

    // Redriving a done batch changes nothing.
    let before = db.hash("FROM scenario_logs_archive").await;
    let o = db
        .planner()
        .amqp(&cfg)
        .args(["redrive", "--batch", &victim.to_string()])
        .output()
        .await;
    assert!(stdout(&o).contains("is done, not dead"), "{}", stdout(&o));
    assert_eq!(db.hash("FROM scenario_logs_archive").await, before);
    stop.cancel();
    w.await.unwrap();
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

fn next_month(yyyy_mm: &str) -> String {
    let (y, m) = yyyy_mm.split_once('_').unwrap();
    let (y, m): (i32, u32) = (y.parse().unwrap(), m.parse().unwrap());
    if m == 12 {
        format!("{}-01", y + 1)
    } else {
        format!("{y}-{:02}", m + 1)
    }
}

#[tokio::test]
async fn transient_failures_are_retried_and_parked_only_past_the_delivery_limit() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let cfg = AmqpConfig {
        delivery_limit: 2,
        ..amqp_config()
    };
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan::plan(
        &db.pool,
        Kind::Logs,
        &plan_options(10_000, "amqp"),
        &publisher,
    )
    .await
    .unwrap();
    let batch: Uuid = sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1")
        .bind(planned.job)
        .fetch_one(&db.pool)
        .await
        .unwrap();

    // A lock held for ~1 s: lock timeouts, retried in place, then success.
    let holder = db.hold_a_row_of(batch, Duration::from_millis(1000)).await;
    let opts = WorkerOptions {
        delivery_limit: 2,
        transient_tries: 6,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let w = impatient_worker(&db, &cfg, opts, &stop);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    holder.await.unwrap();
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(
        (
            stats.done.load(Ordering::Relaxed),
            stats.dead_lettered.load(Ordering::Relaxed)
        ),
        (1, 0)
    );

    // A lock held longer than every retry of every delivery: parked.
    db.load_logs(2_000).await;
    let planned = plan::plan(
        &db.pool,
        Kind::Logs,
        &plan_options(10_000, "amqp"),
        &publisher,
    )
    .await
    .unwrap();
    let batch: Uuid = sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1")
        .bind(planned.job)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let holder = db.hold_a_row_of(batch, Duration::from_secs(30)).await;
    let opts = WorkerOptions {
        delivery_limit: 2,
        transient_tries: 1,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let w = impatient_worker(&db, &cfg, opts, &stop);
    db.wait_batch(batch, "dead").await;
    assert_eq!(
        db.batch_state(batch).await.1,
        2,
        "parked after the delivery limit"
    );
    assert_eq!(db.wait_job(planned.job).await, "failed");
    holder.abort();
    stop.cancel();
    let stats = w.await.unwrap();
    assert!(stats.retried.load(Ordering::Relaxed) >= 1);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn batches_whose_messages_were_lost_are_republished_by_the_next_run() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan::plan(&db.pool, Kind::Logs, &plan_options(400, "amqp"), &publisher)
        .await
        .unwrap();
    // The broker loses every message; an hour and a half passes.
    purge(&cfg).await;
    sqlx::query("UPDATE archive_batches SET published_at = now() - interval '90 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();

    // Younger than the rescue age: left alone.
    let rescue_after = |minutes: &str| {
        db.planner()
            .amqp(&cfg)
            .args(["--logs"])
            .env("ARCHIVER_RESCUE_AFTER_MINUTES", minutes)
            .output()
    };
    let o = rescue_after("120").await;
    assert!(!stdout(&o).contains("republished"));
    let o = rescue_after("60").await;
    let out = stdout(&o);
    assert!(
        o.status.success() && out.contains(&format!("republished {} batch(es)", planned.batches)),
        "{out}"
    );
    // Running again right away republishes nothing: they were just sent.
    let o = rescue_after("60").await;
    assert!(!stdout(&o).contains("republished"));

    let stop = CancellationToken::new();
    let w = impatient_worker(&db, &cfg, WorkerOptions::default(), &stop);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    stop.cancel();
    w.await.unwrap();
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}
