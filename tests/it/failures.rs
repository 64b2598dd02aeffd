//! Failure classes, the dead-letter queue, `status` and `redrive`, over
//! RabbitMQ, with the worker as the binary runs it.

use crate::helpers::{TestDb, amqp_config, delete_queues, drain, hold_a_row_of, plan_options};
use archiver::ledger::Kind;
use archiver::plan;
use archiver::transport::Publisher;
use archiver::transport::amqp::{AmqpConfig, AmqpConsumer, AmqpPublisher};
use archiver::worker::{self, WorkerOptions, WorkerStats};
use secrecy::ExposeSecret;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A worker whose sessions give up on a row lock after 300 ms.
fn spawn_worker(
    db: &TestDb,
    cfg: &AmqpConfig,
    opts: WorkerOptions,
    stop: &CancellationToken,
) -> JoinHandle<Arc<WorkerStats>> {
    let (url, cfg, stop) = (
        format!("{}?options=-c%20lock_timeout%3D300ms", db.url),
        cfg.clone(),
        stop.clone(),
    );
    tokio::spawn(async move {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(3)
            .connect(&url)
            .await
            .unwrap();
        let mut consumer = AmqpConsumer::new(cfg, 1);
        let stats = worker::run(&pool, &mut consumer, opts, stop).await.unwrap();
        consumer.close().await;
        stats
    })
}

fn planner(db: &TestDb, cfg: &AmqpConfig, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_planner"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("QUEUE_URL", cfg.url.expose_secret())
        .env("ARCHIVER_QUEUE", &cfg.queue)
        .env_remove("REPORTS_ROOT")
        .output()
        .unwrap()
}

async fn batch_status(db: &TestDb, id: Uuid) -> (String, i32) {
    sqlx::query_as("SELECT status, attempts FROM archive_batches WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn wait_status(db: &TestDb, id: Uuid, want: &str) {
    for _ in 0..400 {
        if batch_status(db, id).await.0 == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "batch {id} never became {want}: {:?}",
        batch_status(db, id).await
    );
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
    let w = spawn_worker(&db, &cfg, WorkerOptions::default(), &stop);
    assert_eq!(db.wait_job(planned.job).await, "failed");
    wait_status(&db, victim, "dead").await;
    assert_eq!(batch_status(&db, victim).await.1, 1, "one attempt");
    let dead = drain(&cfg, &cfg.dead_queue()).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].0.contains(&victim.to_string())
            && dead[0].1.as_deref().unwrap_or("").contains("no partition"),
        "{dead:?}"
    );

    let status = planner(&db, &cfg, &["status"]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success()
            && out.contains("dead batches: 1")
            && out.contains(&victim.to_string())
            && out.contains("no partition"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&planner(&db, &cfg, &["status", "--json"]).stdout).unwrap();
    assert_eq!(json["dead_batches"][0]["id"], victim.to_string());

    // Fix the cause, then redrive: the batch and the job complete.
    let dry = planner(&db, &cfg, &["redrive", "--all", "--dry-run"]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would be redriven"));
    assert_eq!(
        batch_status(&db, victim).await.0,
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
    let o = planner(&db, &cfg, &["redrive", "--all"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(db.wait_job(planned.job).await, "completed");
    wait_status(&db, victim, "done").await;
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;

    // Redriving a done batch changes nothing.
    let before = db.hash("FROM scenario_logs_archive").await;
    let o = planner(&db, &cfg, &["redrive", "--batch", &victim.to_string()]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("is done, not dead"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
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
    let holder = hold_a_row_of(&db, batch, Duration::from_millis(1000)).await;
    let opts = WorkerOptions {
        delivery_limit: 2,
        transient_tries: 6,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let w = spawn_worker(&db, &cfg, opts, &stop);
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
    let holder = hold_a_row_of(&db, batch, Duration::from_secs(30)).await;
    let opts = WorkerOptions {
        delivery_limit: 2,
        transient_tries: 1,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let w = spawn_worker(&db, &cfg, opts, &stop);
    wait_status(&db, batch, "dead").await;
    assert_eq!(
        batch_status(&db, batch).await.1,
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
    crate::helpers::purge(&cfg).await;
    sqlx::query("UPDATE archive_batches SET published_at = now() - interval '90 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();

    // Younger than the rescue age: left alone.
    let mut c = Command::new(env!("CARGO_BIN_EXE_planner"));
    c.args(["--logs"])
        .env("DATABASE_URL", &db.url)
        .env("QUEUE_URL", cfg.url.expose_secret())
        .env("ARCHIVER_QUEUE", &cfg.queue);
    let o = c
        .env("ARCHIVER_RESCUE_AFTER_MINUTES", "120")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&o.stdout).contains("republished"));
    let o = c
        .env("ARCHIVER_RESCUE_AFTER_MINUTES", "60")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains(&format!("republished {} batch(es)", planned.batches)),
        "{out}"
    );
    // Running again right away republishes nothing: they were just sent.
    let o = c.output().unwrap();
    assert!(!String::from_utf8_lossy(&o.stdout).contains("republished"));

    let stop = CancellationToken::new();
    let w = spawn_worker(&db, &cfg, WorkerOptions::default(), &stop);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    stop.cancel();
    w.await.unwrap();
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}
