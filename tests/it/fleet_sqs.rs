//! The fleet over SQS, against the SQS-protocol server at
//! `ARCHIVER_S3_ENDPOINT` (moto serves S3 and SQS on one port): workers
//! share batches, bad messages are parked with their reason, a batch slower
//! than the visibility timeout runs once, and redrive brings parked
//! messages back. Each test has its own queues, named `test-<uuid>`.

use crate::helpers::sqs::{
    client, client_at, config, delete_queues, depth, spawn_worker, stop_all, total,
};
use crate::helpers::{TestDb, plan_logs, wait_until};
use archiver::transport::sqs::{self, SqsConfig, SqsConsumer, SqsPublisher, ensure_queues};
use archiver::transport::{BatchMessage, Consumer, Publisher};
use aws_sdk_sqs::types::QueueAttributeName;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test]
async fn queues_are_created_once_with_a_redrive_policy_that_follows_the_settings() {
    let client = client();
    let cfg = config();
    let urls = ensure_queues(&client, &cfg).await.unwrap();
    assert!(urls.work.ends_with(&format!("/{}", cfg.name)), "{urls:?}");
    assert!(urls.dead.ends_with(&cfg.dead_name()), "{urls:?}");
    assert_eq!(ensure_queues(&client, &cfg).await.unwrap(), urls);
    // A new delivery limit updates the existing queue.
    let changed = SqsConfig {
        delivery_limit: 3,
        ..cfg.clone()
    };
    assert_eq!(ensure_queues(&client, &changed).await.unwrap(), urls);
    let attrs = |url: String| {
        let client = client.clone();
        async move {
            client
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::All)
                .send()
                .await
                .unwrap()
                .attributes
                .unwrap_or_default()
        }
    };
    let work = attrs(urls.work.clone()).await;
    let dead = attrs(urls.dead.clone()).await;
    let policy: serde_json::Value =
        serde_json::from_str(&work[&QueueAttributeName::RedrivePolicy]).unwrap();
    assert_eq!(policy["maxReceiveCount"].to_string().trim_matches('"'), "3");
    assert_eq!(
        policy["deadLetterTargetArn"].as_str(),
        Some(dead[&QueueAttributeName::QueueArn].as_str())
    );
    let retention = |a: &std::collections::HashMap<QueueAttributeName, String>| -> u64 {
        a[&QueueAttributeName::MessageRetentionPeriod]
            .parse()
            .unwrap()
    };
    assert_eq!(retention(&work), 4 * 86400);
    assert_eq!(retention(&dead), 14 * 86400);
    delete_queues(&client, &urls).await;
}

#[tokio::test]
async fn settling_and_stopping_put_each_message_where_it_belongs() {
    let (client, cfg) = (client(), config());
    // Read-only tools find nothing before the queues exist.
    assert!(
        sqs::dead_messages(&client, &cfg, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(sqs::redrive_dead(&client, &cfg, 10).await.unwrap(), 0);
    let urls = ensure_queues(&client, &cfg).await.unwrap();
    let mut consumer = SqsConsumer::new(client.clone(), cfg.clone(), 3);
    client
        .send_message()
        .queue_url(&urls.work)
        .message_body("one")
        .send()
        .await
        .unwrap();
    let d = consumer.receive().await.unwrap().unwrap();
    assert_eq!((d.payload.as_slice(), d.redelivered), (&b"one"[..], false));
    // Handed back and retried: visible again at once, the receive counted.
    d.acker.hand_back().await.unwrap();
    let d = consumer.receive().await.unwrap().unwrap();
    assert_eq!((d.payload.as_slice(), d.redelivered), (&b"one"[..], true));
    d.acker.retry_later().await.unwrap();
    let d = consumer.receive().await.unwrap().unwrap();
    assert_eq!(d.payload, b"one");
    d.acker.ack().await.unwrap();
    assert_eq!(depth(&client, &urls.work).await, (0, 0));
    // Stopping makes buffered messages visible again; one in hand stays
    // held until it is settled.
    for body in ["a", "b", "c"] {
        client
            .send_message()
            .queue_url(&urls.work)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }
    let d = consumer.receive().await.unwrap().unwrap();
    consumer.stop().await;
    assert!(consumer.receive().await.unwrap().is_none());
    assert_eq!(depth(&client, &urls.work).await, (2, 1));
    d.acker.ack().await.unwrap();
    assert_eq!(depth(&client, &urls.work).await, (2, 0));
    delete_queues(&client, &urls).await;
}

#[tokio::test]
async fn two_workers_share_the_batches_and_archive_every_row_once() {
    let db = TestDb::new().await;
    db.load_logs(12_000).await;
    let (old, young) = db.split_hashes().await;
    let (client, cfg) = (client(), config());
    let publisher = SqsPublisher::new(client.clone(), &cfg).await.unwrap();
    let urls = ensure_queues(&client, &cfg).await.unwrap();
    let planned = plan_logs(&db, &publisher, 300, "sqs").await;
    assert!(planned.batches >= 20, "{}", planned.batches);
    assert_eq!(publisher.ready().await.unwrap(), planned.batches as u32);
    let stop = CancellationToken::new();
    let workers = vec![
        spawn_worker(&db.url, &cfg, client.clone(), &stop),
        spawn_worker(&db.url, &cfg, client.clone(), &stop),
    ];
    assert_eq!(db.wait_job(planned.job).await, "completed");
    let stats = stop_all(&stop, workers).await;
    let done: Vec<u64> = stats
        .iter()
        .map(|s| s.done.load(Ordering::Relaxed))
        .collect();
    assert!(
        done.iter().all(|&d| d > 0),
        "both workers executed batches: {done:?}"
    );
    assert_eq!(done.iter().sum::<u64>(), planned.batches as u64);
    assert_eq!(
        total(&stats, |s| s.dead_lettered.load(Ordering::Relaxed)),
        0
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(
        depth(&client, &urls.work).await,
        (0, 0),
        "every message deleted"
    );
    assert_eq!(depth(&client, &urls.dead).await, (0, 0));
    publisher.close().await.unwrap();
    delete_queues(&client, &urls).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_malformed_message_is_parked_with_its_reason_after_one_attempt() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let (client, cfg) = (client(), config());
    let publisher = SqsPublisher::new(client.clone(), &cfg).await.unwrap();
    let urls = ensure_queues(&client, &cfg).await.unwrap();
    // Garbage first, real work after it.
    client
        .send_message()
        .queue_url(&urls.work)
        .message_body("this is not json")
        .send()
        .await
        .unwrap();
    let planned = plan_logs(&db, &publisher, 1000, "sqs").await;
    let stop = CancellationToken::new();
    let workers = vec![spawn_worker(&db.url, &cfg, client.clone(), &stop)];
    assert_eq!(db.wait_job(planned.job).await, "completed");
    let dead = wait_until(
        "the message to be parked",
        Duration::from_secs(30),
        || async {
            let dead = sqs::dead_messages(&client, &cfg, 10).await.unwrap();
            (!dead.is_empty()).then_some(dead)
        },
    )
    .await;
    let stats = stop_all(&stop, workers).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (body, reason) = &dead[0];
    assert_eq!(body, "this is not json");
    let reason = reason
        .as_deref()
        .expect("the reason travels with the message");
    assert!(reason.starts_with("malformed message"), "{reason}");
    // Parked by the worker at its first attempt, not by SQS's redrive
    // policy after five receives; the worker went on with the real work.
    assert_eq!(
        total(&stats, |s| s.dead_lettered.load(Ordering::Relaxed)),
        1
    );
    assert_eq!(total(&stats, |s| s.retried.load(Ordering::Relaxed)), 0);
    assert_eq!(
        total(&stats, |s| s.done.load(Ordering::Relaxed)),
        planned.batches as u64
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(depth(&client, &urls.work).await, (0, 0));
    // Peeking left it in place.
    assert_eq!(sqs::dead_messages(&client, &cfg, 10).await.unwrap(), dead);
    publisher.close().await.unwrap();
    delete_queues(&client, &urls).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_batch_slower_than_the_visibility_timeout_runs_once() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let client = client();
    let cfg = SqsConfig {
        visibility_timeout: Duration::from_secs(2),
        ..config()
    };
    let publisher = SqsPublisher::new(client.clone(), &cfg).await.unwrap();
    let urls = ensure_queues(&client, &cfg).await.unwrap();
    let planned = plan_logs(&db, &publisher, 500, "sqs").await;
    assert!(planned.batches >= 2, "{}", planned.batches);
    // Hold a row of the first batch: its worker's DELETE waits for it.
    let mut holder = db.pool.begin().await.unwrap();
    let held: Uuid = sqlx::query_scalar(
        "SELECT l.id FROM scenario_logs l, archive_batches b
         WHERE b.job_id = $1 AND b.seq = (SELECT min(seq) FROM archive_batches WHERE job_id = $1)
           AND (l.received_at, l.id) > (COALESCE(b.lo_ts, '-infinity'::timestamptz),
                                        COALESCE(b.lo_id, '00000000-0000-0000-0000-000000000000'::uuid))
           AND (l.received_at, l.id) <= (b.hi_ts, b.hi_id)
         ORDER BY l.received_at, l.id LIMIT 1
         FOR UPDATE OF l",
    )
    .bind(planned.job)
    .fetch_one(&mut *holder)
    .await
    .unwrap();
    let stop = CancellationToken::new();
    // Two workers: a message whose visibility lapsed would go to the other.
    let workers = vec![
        spawn_worker(&db.url, &cfg, client.clone(), &stop),
        spawn_worker(&db.url, &cfg, client.clone(), &stop),
    ];
    wait_until(
        "a worker to reach the held row",
        Duration::from_secs(60),
        || async { db.lock_waiters().await > 0 },
    )
    .await;
    // 2.5 visibility timeouts, while the other worker polls an empty queue:
    // the time passing is the scenario.
    tokio::time::sleep(Duration::from_secs(5)).await;
    holder.rollback().await.unwrap();
    assert_eq!(db.wait_job(planned.job).await, "completed");
    // Let a lapsed message, if any, reach a worker before counting (what
    // is awaited is that nothing arrives: there is no condition to poll).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = stop_all(&stop, workers).await;
    assert_eq!(
        total(&stats, |s| s.done.load(Ordering::Relaxed)),
        planned.batches as u64
    );
    assert_eq!(
        total(&stats, |s| s.already_done.load(Ordering::Relaxed)),
        0,
        "the slow batch was never delivered a second time (held row {held})"
    );
    assert_eq!(total(&stats, |s| s.retried.load(Ordering::Relaxed)), 0);
    let retried: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM archive_batches
         WHERE job_id = $1 AND (attempts <> 1 OR last_error IS NOT NULL)",
    )
    .bind(planned.job)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(retried, 0, "every batch ran once, without failing");
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(depth(&client, &urls.work).await, (0, 0));
    publisher.close().await.unwrap();
    delete_queues(&client, &urls).await;
    db.cleanup().await;
}

#[tokio::test]
async fn redrive_moves_a_parked_message_back_and_the_job_completes() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let (old, young) = db.split_hashes().await;
    let (client, cfg) = (client(), config());
    let publisher = SqsPublisher::new(client.clone(), &cfg).await.unwrap();
    let urls = ensure_queues(&client, &cfg).await.unwrap();
    let planned = plan_logs(&db, &publisher, 500, "sqs").await;
    assert!(planned.batches >= 2, "{}", planned.batches);
    // Park one batch's message, as a worker does with a poisoned batch.
    let mut parker = SqsConsumer::new(client.clone(), cfg.clone(), 1);
    let d = parker.receive().await.unwrap().expect("a delivery");
    let parked = BatchMessage::decode(&d.payload).unwrap();
    d.acker.dead_letter("test: parked by hand").await.unwrap();
    parker.stop().await;
    assert_eq!(
        sqs::dead_messages(&client, &cfg, 10).await.unwrap(),
        vec![(
            String::from_utf8(parked.encode()).unwrap(),
            Some("test: parked by hand".to_string())
        )]
    );
    let stop = CancellationToken::new();
    let workers = vec![spawn_worker(&db.url, &cfg, client.clone(), &stop)];
    // Every other batch completes; the parked one waits.
    wait_until(
        "every batch but the parked one to be done",
        Duration::from_secs(60),
        || async {
            let open: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM archive_batches WHERE job_id = $1 AND status <> 'done'",
            )
            .bind(planned.job)
            .fetch_all(&db.pool)
            .await
            .unwrap();
            open == [parked.batch_id]
        },
    )
    .await;
    assert_eq!(sqs::redrive_dead(&client, &cfg, 100).await.unwrap(), 1);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    assert!(
        sqs::dead_messages(&client, &cfg, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(sqs::redrive_dead(&client, &cfg, 100).await.unwrap(), 0);
    let stats = stop_all(&stop, workers).await;
    assert_eq!(
        total(&stats, |s| s.done.load(Ordering::Relaxed)),
        planned.batches as u64
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(depth(&client, &urls.work).await, (0, 0));
    assert_eq!(depth(&client, &urls.dead).await, (0, 0));
    publisher.close().await.unwrap();
    delete_queues(&client, &urls).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_worker_keeps_polling_through_an_sqs_outage() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let client = client();
    // A message SQS hands to a receive whose reply is lost in the outage
    // stays invisible for this long, then comes back.
    let cfg = SqsConfig {
        visibility_timeout: Duration::from_secs(4),
        ..config()
    };
    let publisher = SqsPublisher::new(client.clone(), &cfg).await.unwrap();
    let urls = ensure_queues(&client, &cfg).await.unwrap();
    let mut relay = crate::helpers::sqs::relay().await;
    let stop = CancellationToken::new();
    let workers = vec![spawn_worker(
        &db.url,
        &cfg,
        client_at(&relay.endpoint()),
        &stop,
    )];
    // Cut once the worker polls through the relay, and plan during the
    // outage.
    wait_until("the worker to poll SQS", Duration::from_secs(30), || {
        std::future::ready(relay.accepted() > 0)
    })
    .await;
    relay.cut().await;
    let planned = plan_logs(&db, &publisher, 500, "sqs").await;
    // The outage lasts: the time passing is the scenario.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM archive_batches WHERE job_id = $1 AND status = 'done'",
    )
    .bind(planned.job)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(done, 0, "the worker cannot reach SQS");
    relay.restore().await;
    assert_eq!(db.wait_job(planned.job).await, "completed");
    let stats = stop_all(&stop, workers).await;
    assert_eq!(
        total(&stats, |s| s.done.load(Ordering::Relaxed)),
        planned.batches as u64
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(depth(&client, &urls.work).await, (0, 0));
    relay.cut().await;
    publisher.close().await.unwrap();
    delete_queues(&client, &urls).await;
    db.cleanup().await;
}
