//! RabbitMQ for the tests: a queue of its own per test, looking into and
//! emptying queues, an in-process worker consuming one, and reaching into
//! the broker (`rabbitmqctl`) to cut connections or shorten timeouts.

use super::wait::wait_until;
use archiver::transport::amqp::{AmqpConfig, AmqpConsumer};
use archiver::worker::{self, WorkerOptions, WorkerStats};
use secrecy::ExposeSecret;
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn amqp_url() -> String {
    std::env::var("ARCHIVER_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A RabbitMQ config with a queue no other test uses.
pub fn amqp_config() -> AmqpConfig {
    AmqpConfig {
        url: amqp_url().into(),
        queue: format!("test.{}", Uuid::new_v4().simple()),
        delivery_limit: 5,
    }
}

/// A connection of the test's own to the broker: to the first node of a
/// cluster's list that answers.
pub async fn connect(cfg: &AmqpConfig) -> lapin::Connection {
    let mut last = None;
    for url in cfg.url.expose_secret().split(',') {
        match lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await {
            Ok(conn) => return conn,
            Err(e) => last = Some(e),
        }
    }
    panic!("no broker node answered: {last:?}")
}

/// The test cluster's nodes (`scripts/services.sh cluster`) as one
/// `QUEUE_URL`, with a queue no other test uses; `None` (the test skips,
/// saying why) when no cluster was started.
pub fn cluster_config() -> Option<AmqpConfig> {
    match std::env::var("ARCHIVER_AMQP_CLUSTER_URLS") {
        Ok(urls) if !urls.trim().is_empty() => Some(AmqpConfig {
            url: urls.into(),
            ..amqp_config()
        }),
        _ => {
            eprintln!(
                "skipped: ARCHIVER_AMQP_CLUSTER_URLS is not set (scripts/services.sh cluster starts the test cluster)"
            );
            None
        }
    }
}

/// The names of the test cluster's nodes (`archc1@localhost`, …).
pub const CLUSTER_NODES: [&str; 3] = ["archc1@localhost", "archc2@localhost", "archc3@localhost"];

/// `rabbitmqctl -n <node> <args>`, bounded; its stdout (panics on failure).
pub fn rabbitmqctl_on(node: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("timeout")
        .args(["90", "rabbitmqctl", "-n", node, "-q"])
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl -n {node} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A quorum queue's leader and members, as node `via` sees them.
pub fn quorum_leader_and_members(via: &str, queue: &str) -> (String, Vec<String>) {
    let out = rabbitmqctl_on(
        via,
        &[
            "list_queues",
            "--no-table-headers",
            "name",
            "leader",
            "members",
        ],
    );
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("queue {queue} not listed by {via}:\n{out}"));
    let mut fields = line.split_whitespace().skip(1);
    let leader = fields.next().unwrap_or_default().to_string();
    let members = CLUSTER_NODES
        .iter()
        .filter(|n| line.contains(*n))
        .map(|n| n.to_string())
        .collect();
    (leader, members)
}

/// The test cluster to oneself: a test that stops a node holds this for
/// its whole run, so that two such tests (of this run or of another
/// worktree's, sharing the cluster) never have two of the three nodes down
/// at once. Waits (bounded) for the other to finish; released when dropped.
pub async fn lock_cluster() -> std::fs::File {
    let path = std::env::temp_dir().join("archiver-test-cluster.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap();
    wait_until(
        &format!("the test cluster's lock {}", path.display()),
        Duration::from_secs(300),
        || std::future::ready(file.try_lock().is_ok()),
    )
    .await;
    file
}

/// A cluster node whose RabbitMQ application the test stopped: started
/// again when the test says so, or when it is dropped (a failing test must
/// not leave the cluster short of a node).
pub struct StoppedNode(Option<String>);

impl StoppedNode {
    /// Stops `node`'s application (`rabbitmqctl stop_app`): its clients'
    /// connections close and its queue replicas go down.
    pub fn stop(node: &str) -> StoppedNode {
        rabbitmqctl_on(node, &["stop_app"]);
        StoppedNode(Some(node.to_string()))
    }

    /// Starts it again and waits until it runs (`start_app` returns then).
    pub fn start(mut self) {
        if let Some(node) = self.0.take() {
            rabbitmqctl_on(&node, &["start_app"]);
        }
    }
}

impl Drop for StoppedNode {
    fn drop(&mut self) {
        if let Some(node) = self.0.take() {
            let _ = std::process::Command::new("timeout")
                .args(["90", "rabbitmqctl", "-n", &node, "-q", "start_app"])
                .status();
        }
    }
}

/// A worker as the binary runs it, in this process: its own pool and
/// consumer, executing `concurrency` batches at once.
pub fn spawn_worker(
    database_url: &str,
    cfg: &AmqpConfig,
    concurrency: usize,
    stop: &CancellationToken,
) -> JoinHandle<Arc<WorkerStats>> {
    let opts = WorkerOptions {
        concurrency,
        ..Default::default()
    };
    spawn_worker_with(database_url, cfg, concurrency as u16, opts, stop)
}

/// The same with options of the test's choosing: a pool of two sessions
/// more than the consumer's `prefetch`.
pub fn spawn_worker_with(
    database_url: &str,
    cfg: &AmqpConfig,
    prefetch: u16,
    opts: WorkerOptions,
    stop: &CancellationToken,
) -> JoinHandle<Arc<WorkerStats>> {
    let (url, cfg, stop) = (database_url.to_string(), cfg.clone(), stop.clone());
    tokio::spawn(async move {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(prefetch as u32 + 2)
            .connect(&url)
            .await
            .unwrap();
        let mut consumer = AmqpConsumer::new(cfg, prefetch);
        let exec = super::small_chunks(&pool);
        let stats = worker::run(exec, &mut consumer, opts, stop).await.unwrap();
        consumer.close().await;
        stats
    })
}

/// Waits (bounded) until no message is ready in the work queue, then long
/// enough for a worker to settle what it still holds in its prefetch buffer
/// (ready counts exclude those), so that stopping it loses no delivery.
pub async fn wait_queue_empty(cfg: &AmqpConfig) {
    let empty_for = Cell::new(0);
    wait_until(
        &format!("queue {} to drain", cfg.queue),
        Duration::from_secs(30),
        || async {
            if queue_depth(cfg, &cfg.queue).await == Some(0) {
                empty_for.set(empty_for.get() + 1);
            } else {
                empty_for.set(0);
            }
            empty_for.get() >= 10
        },
    )
    .await;
}

/// Messages ready in a queue (declares nothing if it does not exist: returns None).
pub async fn queue_depth(cfg: &AmqpConfig, queue: &str) -> Option<u32> {
    let conn = connect(cfg).await;
    let ch = conn.create_channel().await.unwrap();
    let opts = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let r = ch
        .queue_declare(queue.into(), opts, lapin::types::FieldTable::default())
        .await;
    let n = r.ok().map(|q| q.message_count());
    let _ = conn.close(200, "".into()).await;
    n
}

/// Drops every ready message of the work queue (a broker that lost them).
pub async fn purge(cfg: &AmqpConfig) {
    let conn = connect(cfg).await;
    conn.create_channel()
        .await
        .unwrap()
        .queue_purge(cfg.queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "".into()).await;
}

/// Takes every message from a queue: (payload, x-archiver-error header).
pub async fn drain(cfg: &AmqpConfig, queue: &str) -> Vec<(String, Option<String>)> {
    let conn = connect(cfg).await;
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let reason = m.delivery.properties.headers().as_ref().and_then(|h| {
            h.inner().get("x-archiver-error").map(|v| match v {
                lapin::types::AMQPValue::LongString(s) => {
                    String::from_utf8_lossy(s.as_bytes()).to_string()
                }
                other => format!("{other:?}"),
            })
        });
        out.push((
            String::from_utf8_lossy(&m.delivery.data).to_string(),
            reason,
        ));
    }
    let _ = conn.close(200, "".into()).await;
    out
}

/// Deletes a test's queues and exchange (quorum queues are not free).
pub async fn delete_queues(cfg: &AmqpConfig) {
    let conn = connect(cfg).await;
    let ch = conn.create_channel().await.unwrap();
    for q in [cfg.queue.clone(), cfg.dead_queue()] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = ch
        .exchange_delete(cfg.dlx().as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "".into()).await;
}

/// Closes this queue's worker connections at the broker, as a broker restart
/// or a network cut would; how many it closed.
pub async fn close_broker_connections(queue: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let pids: Vec<String> = text
        .lines()
        .filter(|l| l.contains(&format!("archiver-worker {queue}")))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    for pid in &pids {
        let st = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: simulated broker failure"])
            .status()
            .await
            .unwrap();
        assert!(st.success());
    }
    pids.len()
}

/// Runs `rabbitmqctl eval EXPR`; its printed result.
fn rabbit_eval(expr: &str) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", expr])
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl eval {expr}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Makes every channel opened from now on check its consumer timeout every
/// 250 ms (RabbitMQ's default: once a minute); puts the old interval back
/// when dropped. Harmless to other tests: a tick only checks timeouts.
pub struct FastChannelTicks(String);

impl FastChannelTicks {
    pub fn new() -> Self {
        let old = rabbit_eval("application:get_env(rabbit, channel_tick_interval).");
        let old = old
            .strip_prefix("{ok,")
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or("60000")
            .to_string();
        rabbit_eval("application:set_env(rabbit, channel_tick_interval, 250).");
        FastChannelTicks(old)
    }
}

impl Drop for FastChannelTicks {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args([
                "eval",
                &format!(
                    "application:set_env(rabbit, channel_tick_interval, {}).",
                    self.0
                ),
            ])
            .output();
    }
}

/// Lowers the consumer timeout of the channels of this queue's worker
/// connections to `ms`, and of no other channel: RabbitMQ 3.10 has no
/// per-queue or per-consumer timeout, and changing the global one would
/// reach other tests' channels. Each channel copies the global value into
/// its state when it opens; this rewrites that copy, after checking the
/// field holds the global value (so a different broker version fails here
/// instead of silently testing nothing). Returns the channels changed.
pub fn lower_consumer_timeout(queue: &str, ms: u32) -> usize {
    let expr = format!(
        r#"Name = <<"archiver-worker {queue}">>,
        Props = fun(P) -> case catch rabbit_reader:info(P, [client_properties]) of
                              [{{client_properties, T}}] when is_list(T) -> T;
                              _ -> []
                          end end,
        Conns = [P || P <- rabbit_networking:connections_local(),
                      lists:keyfind(<<"connection_name">>, 1, Props(P))
                        =:= {{<<"connection_name">>, longstr, Name}}],
        ConnOf = fun(C) -> case catch rabbit_channel:info(C, [connection]) of
                               [{{connection, X}}] -> X;
                               _ -> none
                           end end,
        Chans = [C || C <- rabbit_channel:list_local(), lists:member(ConnOf(C), Conns)],
        {{ok, Global}} = application:get_env(rabbit, consumer_timeout),
        Set = fun(G) -> gs2_state = element(1, G),
                        Ch = element(4, G), ch = element(1, Ch),
                        Cfg = element(2, Ch), conf = element(1, Cfg),
                        Global = element(18, Cfg),
                        setelement(4, G, setelement(2, Ch, setelement(18, Cfg, {ms}))) end,
        [sys:replace_state(C, Set) || C <- Chans],
        length(Chans)."#
    );
    rabbit_eval(&expr)
        .parse()
        .expect("a channel count from rabbitmqctl eval")
}
