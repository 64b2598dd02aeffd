//! The fleet over SQS, against the SQS-protocol server at
//! `ARCHIVER_S3_ENDPOINT` (moto serves S3 and SQS on one port): workers
//! share batches, bad messages are parked with their reason, a batch slower
//! than the visibility timeout runs once, and redrive brings parked
//! messages back. Each test has its own queues, named `test-<uuid>`.

use crate::helpers::{TestDb, plan_options};
use archiver::ledger::Kind;
use archiver::plan;
use archiver::transport::sqs::{
    self, QueueUrls, SqsConfig, SqsConsumer, SqsPublisher, ensure_queues,
};
use archiver::transport::{BatchMessage, Consumer, Publisher};
use archiver::worker::{self, WorkerOptions, WorkerStats};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::QueueAttributeName;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub(crate) fn endpoint() -> String {
    std::env::var("ARCHIVER_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

/// A client with static credentials (moto accepts any).
fn client() -> Client {
    client_at(&endpoint())
}

fn client_at(endpoint: &str) -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(config)
}

/// Queues no other test uses.
fn config() -> SqsConfig {
    let name = format!("test-{}", Uuid::new_v4().simple());
    SqsConfig {
        endpoint: Some(endpoint()),
        ..SqsConfig::new(&name, 5).unwrap()
    }
}

/// A worker as the binary runs it: its own pool, client and consumer.
fn spawn_worker(
    db: &TestDb,
    cfg: &SqsConfig,
    stop: &CancellationToken,
) -> JoinHandle<Arc<WorkerStats>> {
    spawn_worker_with(db, cfg, client(), stop)
}

fn spawn_worker_with(
    db: &TestDb,
    cfg: &SqsConfig,
    client: Client,
    stop: &CancellationToken,
) -> JoinHandle<Arc<WorkerStats>> {
    let (url, cfg, stop) = (db.url.clone(), cfg.clone(), stop.clone());
    tokio::spawn(async move {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(3)
            .connect(&url)
            .await
            .unwrap();
        let mut consumer = SqsConsumer::new(client, cfg, 1);
        let opts = WorkerOptions {
            concurrency: 1,
            ..Default::default()
        };
        worker::run(&pool, &mut consumer, opts, stop).await.unwrap()
    })
}

async fn plan_to(db: &TestDb, publisher: &SqsPublisher, batch_size: i64) -> plan::Planned {
    plan::plan(
        &db.pool,
        Kind::Logs,
        &plan_options(batch_size, "sqs"),
        publisher,
    )
    .await
    .unwrap()
}

/// (visible, in flight) messages of a queue.
pub(crate) async fn depth(client: &Client, url: &str) -> (u64, u64) {
    let a = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    let n = |k| a.get(&k).map_or(0, |v| v.parse().unwrap());
    (
        n(QueueAttributeName::ApproximateNumberOfMessages),
        n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

async fn delete_queues(client: &Client, urls: &QueueUrls) {
    for url in [&urls.work, &urls.dead] {
        let _ = client.delete_queue().queue_url(url).send().await;
    }
}

/// Sums a counter over the workers' stats.
fn total(stats: &[Arc<WorkerStats>], f: impl Fn(&WorkerStats) -> u64) -> u64 {
    stats.iter().map(|s| f(s)).sum()
}

async fn stop_all(
    stop: &CancellationToken,
    workers: Vec<JoinHandle<Arc<WorkerStats>>>,
) -> Vec<Arc<WorkerStats>> {
    stop.cancel();
    let mut stats = Vec::new();
    for w in workers {
        stats.push(w.await.unwrap());
    }
    stats
}

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
    let planned = plan_to(&db, &publisher, 300).await;
    assert!(planned.batches >= 20, "{}", planned.batches);
    assert_eq!(publisher.ready().await.unwrap(), planned.batches as u32);
    let stop = CancellationToken::new();
    let workers = vec![
        spawn_worker(&db, &cfg, &stop),
        spawn_worker(&db, &cfg, &stop),
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
    let planned = plan_to(&db, &publisher, 1000).await;
    let stop = CancellationToken::new();
    let workers = vec![spawn_worker(&db, &cfg, &stop)];
    assert_eq!(db.wait_job(planned.job).await, "completed");
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = sqs::dead_messages(&client, &cfg, 10).await.unwrap();
        if !dead.is_empty() || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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

/// Backends of this test's database waiting for a lock.
async fn lock_waiters(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
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
    let planned = plan_to(&db, &publisher, 500).await;
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
        spawn_worker(&db, &cfg, &stop),
        spawn_worker(&db, &cfg, &stop),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    while lock_waiters(&db).await == 0 {
        assert!(Instant::now() < deadline, "no worker reached the held row");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 2.5 visibility timeouts, while the other worker polls an empty queue.
    let blocked = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    holder.rollback().await.unwrap();
    assert_eq!(db.wait_job(planned.job).await, "completed");
    assert!(blocked.elapsed() >= Duration::from_secs(5));
    // Let a lapsed message, if any, reach a worker before counting.
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
    let planned = plan_to(&db, &publisher, 500).await;
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
    let workers = vec![spawn_worker(&db, &cfg, &stop)];
    // Every other batch completes; the parked one waits.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM archive_batches WHERE job_id = $1 AND status <> 'done'",
        )
        .bind(planned.job)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        if open == [parked.batch_id] {
            break;
        }
        assert!(Instant::now() < deadline, "open batches: {open:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// A TCP relay to the SQS server on loopback that can be cut and restored,
/// as a network outage would.
struct Relay {
    port: u16,
    target: String,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    async fn start() -> Relay {
        let url = url::Url::parse(&endpoint()).unwrap();
        let target = format!(
            "{}:{}",
            url.host_str().unwrap(),
            url.port_or_known_default().unwrap()
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut relay = Relay {
            port,
            target,
            task: None,
        };
        relay.serve(listener);
        relay
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let target = self.target.clone();
        self.task = Some(tokio::spawn(async move {
            // Dropping the set (when the task is aborted) cuts every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.serve(listener);
    }
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
    let mut relay = Relay::start().await;
    let stop = CancellationToken::new();
    let workers = vec![spawn_worker_with(
        &db,
        &cfg,
        client_at(&relay.endpoint()),
        &stop,
    )];
    // Cut while the worker long-polls, and plan during the outage.
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.cut().await;
    let planned = plan_to(&db, &publisher, 500).await;
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
