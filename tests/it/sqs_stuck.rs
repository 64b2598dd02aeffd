//! No SQS message sits unprocessed while workers idle (issue 10, item 12):
//! the operator's scenario — two workers of two slots each, a logs job, one
//! worker killed (`kill -9`: its runtime vanishes mid-poll) and started
//! again, then two malformed messages — repeated; and a worker stopping
//! while its long poll waits.
use crate::helpers::{TestDb, plan_options};
use crate::sqs::{depth, endpoint};
use archiver::ledger::Kind;
use archiver::plan;
use archiver::transport::Consumer;
use archiver::transport::sqs::{self, SqsConfig, SqsConsumer, SqsPublisher, ensure_queues};
use archiver::worker::{self, WorkerOptions};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use secrecy::ExposeSecret;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A client as the worker binary builds one (its timeouts included).
fn client(cfg: &SqsConfig) -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .endpoint_url(endpoint())
        .timeout_config(sqs::timeout_config(cfg))
        .build();
    Client::from_conf(config)
}

/// A worker in a runtime of its own, as a process is: killing it drops
/// everything it was doing, with no chance to give anything back.
struct Process {
    rt: tokio::runtime::Runtime,
}

impl Process {
    fn start(db_url: &str, cfg: &SqsConfig) -> Process {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (url, cfg) = (db_url.to_string(), cfg.clone());
        rt.spawn(async move {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(&url)
                .await
                .unwrap();
            let mut consumer = SqsConsumer::new(client(&cfg), cfg, 2);
            let opts = WorkerOptions {
                concurrency: 2,
                ..Default::default()
            };
            // Never stopped, only killed.
            let never = CancellationToken::new();
            worker::run(&pool, &mut consumer, opts, never)
                .await
                .unwrap()
        });
        Process { rt }
    }

    /// `kill -9`.
    fn kill(self) {
        self.rt.shutdown_background();
    }
}

/// Sends a message to a queue.
async fn send(client: &Client, url: &str, body: &str) {
    client
        .send_message()
        .queue_url(url)
        .message_body(body)
        .send()
        .await
        .unwrap();
}

/// Waits until the dead-letter queue holds `n` messages; how long it took,
/// `None` if not within `patience`.
async fn parked_within(client: &Client, url: &str, n: u64, patience: Duration) -> Option<Duration> {
    let sent = Instant::now();
    loop {
        if depth(client, url).await.0 >= n {
            return Some(sent.elapsed());
        }
        if sent.elapsed() > patience {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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
        let client = client(&cfg);
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
        // Both idle, each waiting on a long poll.
        tokio::time::sleep(Duration::from_millis(700)).await;
        b.kill();
        let b = Process::start(&db.url, &cfg);
        tokio::time::sleep(Duration::from_millis(300)).await;
        send(&client, &urls.work, "not json 1").await;
        send(&client, &urls.work, "not json 2").await;
        let parked = parked_within(&client, &urls.dead, 2, patience).await;
        let work = depth(&client, &urls.work).await;
        eprintln!("round {round}: parked in {parked:?}; work queue (visible, in flight) {work:?}");
        if parked.is_none() {
            stuck.push((round, work));
        }
        // Killed rather than stopped: a stop waits for the poll in flight.
        a.kill();
        b.kill();
        for url in [&urls.work, &urls.dead] {
            let _ = client.delete_queue().queue_url(url).send().await;
        }
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
    let client = client(&cfg);
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
    for url in [&urls.work, &urls.dead] {
        let _ = client.delete_queue().queue_url(url).send().await;
    }
}

/// Rescue (issue 10, "Also"): the queue holds messages of every kind, so a
/// backlog of logs must not hide that every metrics message was lost.
#[tokio::test]
async fn a_backlog_of_one_kind_does_not_hide_lost_messages_of_another() {
    use crate::helpers::{amqp_config, delete_queues, ok, queue_depth};
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
    crate::helpers::purge(&cfg).await;
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
    let out = ok(&std::process::Command::new(env!("CARGO_BIN_EXE_planner"))
        .args(["--metrics"])
        .env("DATABASE_URL", &db.url)
        .env("QUEUE_URL", cfg.url.expose_secret())
        .env("ARCHIVER_QUEUE", &cfg.queue)
        .env("ARCHIVER_RESCUE_AFTER_MINUTES", "60")
        .env_remove("RUST_LOG")
        .output()
        .unwrap());
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
