//! The fleet over real RabbitMQ: workers share batches, redelivery and a
//! crash between commit and ack change nothing, bad messages are parked.

use crate::helpers::amqp::{
    self, FastChannelTicks, amqp_config, close_broker_connections, delete_queues, drain,
    lower_consumer_timeout, queue_depth, wait_queue_empty,
};
use crate::helpers::{TestDb, plan_logs, wait_until};
use archiver::transport::amqp::{AmqpConsumer, AmqpPublisher};
use archiver::transport::{BatchMessage, Consumer, Publisher};
use archiver::vocabulary::Kind;
use archiver::worker::{self, Disposition, WorkerOptions};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test]
async fn two_workers_share_the_batches_and_archive_every_row_once() {
    let db = TestDb::new().await;
    db.load_logs(12_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 300, "amqp").await;
    assert!(planned.batches >= 20);
    let stop = CancellationToken::new();
    let workers = [
        amqp::spawn_worker(&db.url, &cfg, 1, &stop),
        amqp::spawn_worker(&db.url, &cfg, 1, &stop),
    ];
    assert_eq!(db.wait_job(planned.job).await, "completed");
    stop.cancel();
    let mut done = Vec::new();
    for w in workers {
        done.push(w.await.unwrap().done.load(Ordering::Relaxed));
    }
    assert!(
        done.iter().all(|&d| d > 0),
        "both workers executed batches: {done:?}"
    );
    assert_eq!(done.iter().sum::<u64>(), planned.batches as u64);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(queue_depth(&cfg, &cfg.queue).await, Some(0));
    assert_eq!(queue_depth(&cfg, &cfg.dead_queue()).await, Some(0));
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn every_batch_delivered_twice_has_its_effect_once() {
    let db = TestDb::new().await;
    db.load_logs(6_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 500, "amqp").await;
    // Publish every batch's message a second time.
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1")
        .bind(planned.job)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let dups: Vec<BatchMessage> = ids
        .iter()
        .map(|&id| BatchMessage::new(id, Kind::Logs))
        .collect();
    publisher.publish(&dups).await.unwrap();
    let stop = CancellationToken::new();
    let w = amqp::spawn_worker(&db.url, &cfg, 1, &stop);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    // Let the duplicates drain too.
    wait_queue_empty(&cfg).await;
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(stats.done.load(Ordering::Relaxed), ids.len() as u64);
    assert_eq!(stats.already_done.load(Ordering::Relaxed), ids.len() as u64);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_after_commit_and_before_ack_loses_and_duplicates_nothing() {
    let db = TestDb::new().await;
    db.load_logs(4_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 400, "amqp").await;

    // Receive one delivery, commit its batch, and vanish without acking.
    let mut doomed = AmqpConsumer::new(cfg.clone(), 1);
    let d = doomed.receive().await.unwrap().expect("a delivery");
    let token = CancellationToken::new();
    let outcome = worker::process(&db.pool, &d.payload, WorkerOptions::default(), &token).await;
    assert!(
        matches!(
            outcome,
            Disposition::Ack(archiver::execute::Outcome::Done { .. })
        ),
        "{outcome:?}"
    );
    drop(d);
    doomed.close().await;

    let stop = CancellationToken::new();
    let w = amqp::spawn_worker(&db.url, &cfg, 1, &stop);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(
        stats.already_done.load(Ordering::Relaxed),
        1,
        "the redelivered batch had no effect"
    );
    assert_eq!(
        stats.done.load(Ordering::Relaxed),
        planned.batches as u64 - 1
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn malformed_and_unknown_messages_are_dead_lettered_and_the_worker_goes_on() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    // Garbage and a forged batch id go first, real work after them.
    let conn = amqp::connect(&cfg).await;
    let ch = conn.create_channel().await.unwrap();
    for body in [
        b"this is not json".to_vec(),
        BatchMessage::new(Uuid::new_v4(), Kind::Logs).encode(),
    ] {
        ch.basic_publish(
            "".into(),
            cfg.queue.as_str().into(),
            Default::default(),
            &body,
            Default::default(),
        )
        .await
        .unwrap();
    }
    let planned = plan_logs(&db, &publisher, 1000, "amqp").await;
    // A stale or forged message naming a real batch with the wrong kind.
    let real: Uuid = sqlx::query_scalar("SELECT id FROM archive_batches LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    publisher
        .publish(&[BatchMessage::new(real, Kind::Metrics)])
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let w = amqp::spawn_worker(&db.url, &cfg, 1, &stop);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    wait_until(
        "three messages dead-lettered",
        Duration::from_secs(10),
        || async { queue_depth(&cfg, &cfg.dead_queue()).await >= Some(3) },
    )
    .await;
    let mut dead = drain(&cfg, &cfg.dead_queue()).await;
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 3);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    let not_done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM archive_batches WHERE status <> 'done'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(not_done, 0, "a bad message never marks a real batch dead");
    dead.sort();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let reasons: Vec<String> = dead
        .iter()
        .map(|(_, r)| r.clone().expect("reason header"))
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("the ledger says logs")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("malformed message")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not in the ledger")),
        "{reasons:?}"
    );
    assert!(dead.iter().any(|(p, _)| p == "this is not json"));
    let _ = conn.close(200, "".into()).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_worker_survives_losing_its_broker_and_database_connections() {
    let db = TestDb::new().await;
    db.load_logs(4_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let stop = CancellationToken::new();
    let w = amqp::spawn_worker(&db.url, &cfg, 1, &stop);
    // Wait until it consumes, then cut both of its connections.
    wait_until("the worker to connect", Duration::from_secs(30), || async {
        close_broker_connections(&cfg.queue).await > 0
    })
    .await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(killed > 0);
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 400, "amqp").await;
    assert_eq!(db.wait_job(planned.job).await, "completed");
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(stats.done.load(Ordering::Relaxed), planned.batches as u64);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_batch_outliving_the_consumer_timeout_has_its_effect_once_and_the_worker_goes_on() {
    let db = TestDb::new().await;
    db.load_logs(4_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 400, "amqp").await;
    let first: Uuid =
        sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1 ORDER BY seq LIMIT 1")
            .bind(planned.job)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // The first batch waits 8 s for a row the application holds.
    let holder = db.hold_a_row_of(first, Duration::from_secs(8)).await;

    let ticks = FastChannelTicks::new();
    let stop = CancellationToken::new();
    let w = amqp::spawn_worker(&db.url, &cfg, 2, &stop);
    // Once it consumes, its channel times out deliveries after 2 s.
    wait_until("the worker to consume", Duration::from_secs(30), || {
        std::future::ready(lower_consumer_timeout(&cfg.queue, 2000) > 0)
    })
    .await;
    // The broker closes that channel while the first batch is still
    // blocked; its message returns to the queue and comes back on the
    // worker's new channel. The batch commits once.
    assert_eq!(db.wait_job(planned.job).await, "completed");
    holder.await.unwrap();
    drop(ticks);
    let (attempts, status): (i32, String) =
        sqlx::query_as("SELECT attempts, status FROM archive_batches WHERE id = $1")
            .bind(first)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (attempts, status.as_str()),
        (1, "done"),
        "committed once, no failure recorded"
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;

    // The worker is still consuming: a second job completes too.
    db.load_logs(2_000).await;
    let second = plan_logs(&db, &publisher, 400, "amqp").await;
    assert!(second.batches > 0);
    assert_eq!(db.wait_job(second.job).await, "completed");
    wait_queue_empty(&cfg).await;
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(
        stats.done.load(Ordering::Relaxed),
        (planned.batches + second.batches) as u64,
        "every batch executed once"
    );
    assert!(
        stats.already_done.load(Ordering::Relaxed) >= 1,
        "the timed-out delivery came back and was a no-op"
    );
    db.assert_job_counted_once(second.job, second.rows).await;
    assert_eq!(queue_depth(&cfg, &cfg.dead_queue()).await, Some(0));
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}
