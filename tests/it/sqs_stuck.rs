//! No SQS message sits unprocessed while workers idle (issue 10, item 12):
//! the operator's scenario — two workers of two slots each, a logs job, one
//! worker killed (`kill -9`: its runtime vanishes mid-poll) and started
//! again, then two malformed messages — repeated; and a worker stopping
//! while its long poll waits.
use crate::helpers::amqp::{amqp_config, delete_queues, purge, queue_depth};
use crate::helpers::sqs::{self, Process, binary_client, depth, endpoint, send};
use crate::helpers::{TestDb, ok, plan_options, poll_until};
use archiver::plan;
use archiver::transport::Consumer;
use archiver::transport::sqs::{SqsConfig, SqsConsumer, SqsPublisher, ensure_queues};
use archiver::vocabulary::Kind;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The operator's scenario, repeated: two workers (two slots each) on their
/// own queues; in the first round they run a logs job first. One worker is
/// killed while it waits on a long poll, and started again; then two
/// malformed messages are sent. Both must be parked well within the
/// visibility timeout (the default, 60 s), every round.
///
/// What this catches: a long poll whose client is gone still takes a
/// message on the server (see scripts/repro/moto_abandoned_poll.py), which
/// then stays invisible for the visibility timeout the receive asked for.
/// The consumer asks for a short lease and extends it once it holds the
/// message, so such a message is back within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_a_live_worker_after_another_is_killed_mid_poll() {
    let rounds: usize = std::env::var("ARCHIVER_TEST_STUCK_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    // Half the visibility timeout: a message a dead poll took comes back
    // after the 10 s lease, one hidden for the visibility timeout does not;
    // the margin keeps a loaded CI machine from failing a healthy round.
    let patience = Duration::from_secs(30);
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let mut stuck = Vec::new();
    for round in 0..rounds {
        let cfg = SqsConfig {
            endpoint: Some(endpoint()),
            ..SqsConfig::new(&format!("test-{}", Uuid::new_v4().simple()), 5).unwrap()
        };
        assert!(cfg.visibility_timeout >= Duration::from_secs(60));
        let client = binary_client(&cfg);
        let urls = ensure_queues(&client, &cfg).await.unwrap();
        let a = Process::start(&db.url, &cfg);
        let b = Process::start(&db.url, &cfg);
        if round == 0 {
            let publisher = SqsPublisher::new(client.clone(), &cfg).await.unwrap();
            let planned = plan::plan(&db.pool, Kind::Logs, &plan_options(70, "sqs"), &publisher)
                .await
                .unwrap();
            assert!(planned.batches >= 15, "{}", planned.batches);
            assert_eq!(db.wait_job(planned.job).await, "completed");
        }
        // Both idle, each waiting on a long poll. (A poll in flight cannot
        // be observed from outside: the scenario waits for one to start.)
        tokio::time::sleep(Duration::from_millis(700)).await;
        b.kill();
        let b = Process::start(&db.url, &cfg);
        // Likewise: the restarted worker starts its first poll.
        tokio::time::sleep(Duration::from_millis(300)).await;
        send(&client, &urls.work, "not json 1").await;
        send(&client, &urls.work, "not json 2").await;
        let sent = Instant::now();
        let parked = poll_until(patience, || async {
            (depth(&client, &urls.dead).await.0 >= 2).then(|| sent.elapsed())
        })
        .await;
        let work = depth(&client, &urls.work).await;
        eprintln!("round {round}: parked in {parked:?}; work queue (visible, in flight) {work:?}");
        if parked.is_none() {
            stuck.push((round, work));
        }
        // Killed rather than stopped: a stop waits for the poll in flight.
        a.kill();
        b.kill();
        sqs::delete_queues(&client, &urls).await;
    }
    db.cleanup().await;
    assert!(
        stuck.is_empty(),
        "rounds whose second message was not parked within {patience:?}, with the work queue's (visible, in flight): {stuck:?}"
    );
}

/// A worker stopping while its long poll waits (the receive is cancelled,
/// as the worker's loop does on SIGTERM) hands back what that poll still
/// receives: visible again at once, not hidden for the visibility timeout
/// by a reply nobody reads.
#[tokio::test]
async fn stopping_during_a_long_poll_hands_back_what_it_receives() {
    let cfg = SqsConfig {
        endpoint: Some(endpoint()),
        wait_time: Duration::from_secs(3),
        ..SqsConfig::new(&format!("test-{}", Uuid::new_v4().simple()), 5).unwrap()
    };
    let client = binary_client(&cfg);
    let urls = ensure_queues(&client, &cfg).await.unwrap();
    let mut consumer = SqsConsumer::new(client.clone(), cfg.clone(), 2);
    let waited = tokio::time::timeout(Duration::from_millis(1500), consumer.receive()).await;
    assert!(waited.is_err(), "nothing to receive yet");
    // Arrives while the abandoned long poll still waits on the server.
    send(&client, &urls.work, "late").await;
    consumer.stop().await;
    assert!(consumer.receive().await.unwrap().is_none());
    assert_eq!(
        depth(&client, &urls.work).await,
        (1, 0),
        "visible again at once, not in flight"
    );
    sqs::delete_queues(&client, &urls).await;
}

/// Rescue (issue 10, "Also"): the queue holds messages of every kind, so a
/// backlog of logs must not hide that every metrics message was lost.
#[tokio::test]
async fn a_backlog_of_one_kind_does_not_hide_lost_messages_of_another() {
    use archiver::transport::Publisher;
    use archiver::transport::amqp::AmqpPublisher;
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    archiver::demo::load_metrics(&db.pool, 3_000, 5, 3 * 365)
        .await
        .unwrap();
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let metrics = plan::plan(
        &db.pool,
        Kind::Metrics,
        &plan_options(500, "amqp"),
        &publisher,
    )
    .await
    .unwrap();
    // Every metrics message is lost...
    purge(&cfg).await;
    // ...while the logs' wait, more of them than metrics batches.
    let logs = plan::plan(&db.pool, Kind::Logs, &plan_options(50, "amqp"), &publisher)
        .await
        .unwrap();
    assert!(
        metrics.batches >= 1 && logs.batches > metrics.batches,
        "{metrics:?} {logs:?}"
    );
    assert_eq!(
        queue_depth(&cfg, &cfg.queue).await,
        Some(logs.batches as u32)
    );
    sqlx::query("UPDATE archive_batches SET published_at = now() - interval '90 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = ok(&db
        .planner()
        .args(["--metrics"])
        .amqp(&cfg)
        .env("ARCHIVER_RESCUE_AFTER_MINUTES", "60")
        .output()
        .await);
    assert!(
        out.contains(&format!(
            "metrics: republished {} batch(es)",
            metrics.batches
        )),
        "{out}"
    );
    assert_eq!(
        queue_depth(&cfg, &cfg.queue).await,
        Some((logs.batches + metrics.batches) as u32)
    );
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}
