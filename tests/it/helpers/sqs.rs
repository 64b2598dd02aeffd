//! SQS for the tests (moto, at `ARCHIVER_S3_ENDPOINT`): clients, queues of
//! their own per test, their depth, in-process workers (stoppable, or in a
//! runtime of their own to be killed), and a relay to cut the network.

use super::relay::Relay;
use archiver::transport::sqs::{self, QueueUrls, SqsConfig, SqsConsumer};
use archiver::worker::{self, WorkerOptions, WorkerStats};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::QueueAttributeName;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// moto's endpoint: it serves S3 and SQS on one port.
pub fn endpoint() -> String {
    super::s3::endpoint()
}

fn builder(endpoint: &str) -> aws_sdk_sqs::config::Builder {
    aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .endpoint_url(endpoint)
}

/// A client with static credentials (moto accepts any).
pub fn client() -> Client {
    client_at(&endpoint())
}

/// The same, reaching SQS at `endpoint` (a relay, say).
pub fn client_at(endpoint: &str) -> Client {
    Client::from_conf(builder(endpoint).build())
}

/// A client as the worker binary builds one (its timeouts included).
pub fn binary_client(cfg: &SqsConfig) -> Client {
    Client::from_conf(
        builder(&endpoint())
            .timeout_config(sqs::timeout_config(cfg))
            .build(),
    )
}

/// Queues no other test uses.
pub fn config() -> SqsConfig {
    let name = format!("test-{}", Uuid::new_v4().simple());
    SqsConfig {
        endpoint: Some(endpoint()),
        ..SqsConfig::new(&name, 5).unwrap()
    }
}

/// (visible, in flight) messages of a queue.
pub async fn depth(client: &Client, url: &str) -> (u64, u64) {
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

/// Sends a message to a queue.
pub async fn send(client: &Client, url: &str, body: &str) {
    client
        .send_message()
        .queue_url(url)
        .message_body(body)
        .send()
        .await
        .unwrap();
}

/// Deletes a test's work and dead-letter queues.
pub async fn delete_queues(client: &Client, urls: &QueueUrls) {
    for url in [&urls.work, &urls.dead] {
        let _ = client.delete_queue().queue_url(url).send().await;
    }
}

/// A worker as the binary runs it, in this process: its own pool and
/// consumer (reaching SQS through `client`), one batch at a time.
pub fn spawn_worker(
    database_url: &str,
    cfg: &SqsConfig,
    client: Client,
    stop: &CancellationToken,
) -> JoinHandle<Arc<WorkerStats>> {
    let (url, cfg, stop) = (database_url.to_string(), cfg.clone(), stop.clone());
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
        worker::run(super::small_chunks(&pool), &mut consumer, opts, stop)
            .await
            .unwrap()
    })
}

/// Stops the workers; their stats.
pub async fn stop_all(
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

/// Sums a counter over the workers' stats.
pub fn total(stats: &[Arc<WorkerStats>], f: impl Fn(&WorkerStats) -> u64) -> u64 {
    stats.iter().map(|s| f(s)).sum()
}

/// A worker in a runtime of its own, as a process is: killing it drops
/// everything it was doing, with no chance to give anything back.
pub struct Process {
    rt: tokio::runtime::Runtime,
}

impl Process {
    /// Two slots, a client as the binary builds one; never stopped, only
    /// killed.
    pub fn start(db_url: &str, cfg: &SqsConfig) -> Process {
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
            let mut consumer = SqsConsumer::new(binary_client(&cfg), cfg, 2);
            let opts = WorkerOptions {
                concurrency: 2,
                ..Default::default()
            };
            let never = CancellationToken::new();
            worker::run(&pool, &mut consumer, opts, never)
                .await
                .unwrap()
        });
        Process { rt }
    }

    /// `kill -9`.
    pub fn kill(self) {
        self.rt.shutdown_background();
    }
}

/// A relay to the SQS server on loopback (see [`Relay`]).
pub async fn relay() -> Relay {
    let url = url::Url::parse(&endpoint()).unwrap();
    let target = format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap()
    );
    Relay::to(&target).await
}
