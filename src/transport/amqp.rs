//! RabbitMQ through lapin: a durable quorum queue with a delivery limit and a
//! dead-letter exchange, persistent messages published with confirms and
//! `mandatory`, and a consumer that reconnects with jittered backoff.
//!
//! `QUEUE_URL` may name the nodes of a cluster (comma-separated): a
//! connection tries them in turn from a rotating start, so a fleet spreads
//! over the nodes, and a consumer or publisher whose node goes moves on to
//! the next. A publish whose confirm was lost with its node is sent again on
//! another (at least once: the ledger makes a second delivery a no-op).
//!
//! Topology for work queue `Q`: exchange `Q.dlx` (fanout) → queue `Q.dead`.
//! Queue arguments cannot change once declared; a mismatch is reported with
//! the queue's name.

use super::{Acknowledge, BatchMessage, Consumer, Delivery, Link, Publisher};
use crate::error::{Error, Result};
use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use secrecy::{ExposeSecret, SecretString};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where and how to reach the broker.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://` URL, or the URLs of a cluster's nodes separated by commas
    /// (holds credentials: redacted from `Debug`, never logged).
    pub url: SecretString,
    /// Work queue name.
    pub queue: String,
    /// Deliveries before the broker dead-letters a message.
    pub delivery_limit: u32,
}

impl AmqpConfig {
    /// The dead-letter exchange.
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.queue)
    }
    /// The dead-letter queue.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }
    /// The node URLs, in the order given (one for a single broker).
    fn nodes(&self) -> Vec<&str> {
        self.url
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }
}

/// Where the next connection of this process starts in the node list:
/// random at first (so a fleet's processes spread over a cluster), then one
/// further for each connection.
fn rotating_start() -> usize {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: OnceLock<AtomicUsize> = OnceLock::new();
    NEXT.get_or_init(|| {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        AtomicUsize::new((seed % 1024) as usize)
    })
    .fetch_add(1, Ordering::Relaxed)
}

/// Timeout for one call to the broker; lapin can hang on a dying connection.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

async fn timed<T>(what: &'static str, f: impl Future<Output = lapin::Result<T>>) -> Result<T> {
    match tokio::time::timeout(BROKER_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| Error::Broker(format!("{what}: {e}"))),
        Err(_) => Err(Error::Timeout(what)),
    }
}

/// A connection to one node, with a channel in confirm mode on which the
/// topology is declared.
struct Opened {
    conn: Connection,
    channel: Channel,
    depths: Depths,
    /// Which node of the list (`0..`), counting on from where the attempt
    /// started (so `node + 1` is the next one to try).
    node: usize,
}

impl Opened {
    /// Connection and channel still open: a node that went closes them.
    fn usable(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

/// Opens a connection and a channel in confirm mode, and declares the
/// topology (see [`declare`] for what it returns), on the first node that
/// lets it, trying the nodes in turn from `start` (modulo their number),
/// each within the per-call timeout.
async fn open(cfg: &AmqpConfig, name: &str, start: usize) -> Result<Opened> {
    let nodes = cfg.nodes();
    let n = nodes.len().max(1);
    let mut last = None;
    for node in start..start + n {
        let url = nodes.get(node % n).copied().unwrap_or_default();
        match open_node(cfg, name, url).await {
            Ok((conn, channel, depths)) => {
                if n > 1 {
                    tracing::info!(queue = %cfg.queue, node = %describe_node(url), "connected to broker node {} of {n}", node % n + 1);
                }
                return Ok(Opened {
                    conn,
                    channel,
                    depths,
                    node,
                });
            }
            // A queue declared with other arguments is the same on every node.
            Err(e @ Error::Config { .. }) => return Err(e),
            Err(e) => {
                if n > 1 {
                    tracing::warn!(queue = %cfg.queue, node = %describe_node(url), "broker node {} of {n} unavailable ({e}); trying the next", node % n + 1);
                }
                last = Some(e);
            }
        }
    }
    let e = last.unwrap_or_else(|| Error::Broker("no broker URL".into()));
    Err(if n > 1 {
        match e {
            Error::Broker(m) => Error::Broker(format!(
                "none of the {n} broker nodes answered; the last: {m}"
            )),
            e => e,
        }
    } else {
        e
    })
}

async fn open_node(
    cfg: &AmqpConfig,
    name: &str,
    url: &str,
) -> Result<(Connection, Channel, Depths)> {
    let props =
        // Named after the queue too, so operators (and tests) can tell fleets apart.
        ConnectionProperties::default().with_connection_name(LongString::from(format!("{name} {}", cfg.queue)));
    let conn = timed("connect", Connection::connect(url, props)).await?;
    let set_up = async {
        let channel = timed("channel.open", conn.create_channel()).await?;
        timed(
            "confirm.select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let depths = declare(&channel, cfg).await?;
        Ok::<_, Error>((channel, depths))
    };
    match set_up.await {
        Ok((channel, depths)) => Ok((conn, channel, depths)),
        Err(e) => {
            // Not left open on a node that half works (the next is tried).
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                conn.close(200, "setup failed".into()),
            )
            .await;
            Err(e)
        }
    }
}

/// Messages ready in the work queue and in the dead-letter queue, as their
/// declare found them.
#[derive(Debug, Clone, Copy)]
struct Depths {
    work: u32,
    dead: u32,
}

/// Declares exchange, dead-letter queue and work queue (idempotent);
/// returns the depths the declares report.
async fn declare(channel: &Channel, cfg: &AmqpConfig) -> Result<Depths> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    timed(
        "exchange.declare",
        channel.exchange_declare(
            cfg.dlx().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    let mut dead_args = FieldTable::default();
    dead_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let dead = timed(
        "queue.declare (dead)",
        channel.queue_declare(cfg.dead_queue().into(), durable, dead_args),
    )
    .await
    .map_err(|e| mismatch(e, &cfg.dead_queue()))?;
    timed(
        "queue.bind",
        channel.queue_bind(
            cfg.dead_queue().into(),
            cfg.dlx().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(cfg.dlx().into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(cfg.delivery_limit as i32),
    );
    // Dead-letter at least once (the default for quorum queues is at most once).
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let work = timed(
        "queue.declare",
        channel.queue_declare(cfg.queue.as_str().into(), durable, args),
    )
    .await
    .map_err(|e| mismatch(e, &cfg.queue))?;
    Ok(Depths {
        work: work.message_count(),
        dead: dead.message_count(),
    })
}

fn mismatch(e: Error, queue: &str) -> Error {
    let text = e.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
        Error::config(
            "ARCHIVER_QUEUE",
            format!(
                "queue {queue} exists with other arguments ({text}); delete it or choose another queue name"
            ),
        )
    } else {
        e
    }
}

/// Where `cfg` points, for people: scheme, user, host and port of each
/// node, and the vhost; never the password.
pub fn describe(cfg: &AmqpConfig) -> String {
    let nodes = cfg.nodes();
    let vhost = match nodes.first().map(|u| u.parse::<lapin::uri::AMQPUri>()) {
        Some(Ok(u)) => u.vhost,
        // `QueueConfig::parse` has parsed it already; never echo it.
        _ => return "(an unparsable URL)".to_string(),
    };
    let each: Vec<String> = nodes.iter().map(|u| describe_node(u)).collect();
    if each.len() > 1 {
        format!("{} ({} nodes), vhost {vhost}", each.join(", "), each.len())
    } else {
        format!("{}, vhost {vhost}", each.join(", "))
    }
}

/// One node's URL for people: scheme, user, host and port.
fn describe_node(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(u) => format!(
            "{}://{}@{}:{}",
            u.scheme, u.authority.userinfo.username, u.authority.host, u.authority.port
        ),
        Err(_) => "(an unparsable URL)".to_string(),
    }
}

/// Checks the broker as the planner and the workers find it at start:
/// opens a connection as they do ([`open`]), which runs the same
/// [`declare`]. That declare is the argument
/// check: the broker refuses to redeclare an existing queue with other
/// arguments (quorum, delivery limit, dead-letter exchange), and that
/// refusal is the error; a missing queue is created as the process would
/// create it. (A passive declare cannot see arguments, and on a missing
/// queue it closes the channel with an error lapin logs.) The declares
/// also report the queues' depths. Returns what it found.
pub async fn check(cfg: &AmqpConfig) -> Result<String> {
    // Failures say where (lapin's do not); never with the password.
    let Opened {
        conn,
        channel,
        depths,
        ..
    } = open(cfg, "archiver-check", 0).await.map_err(|e| match e {
        Error::Broker(m) => Error::Broker(format!("{}: {m}", describe(cfg))),
        e => e,
    })?;
    let _ = timed("channel.close", channel.close(200, "checked".into())).await;
    let _ = timed("connection.close", conn.close(200, "checked".into())).await;
    Ok(format!(
        "{}, queue {} (quorum, delivery limit {}, dead-letter exchange {}) and {} (quorum) \
         as the publisher declares them (arguments as expected; created if missing); {} ready, {} dead",
        describe(cfg),
        cfg.queue,
        cfg.delivery_limit,
        cfg.dlx(),
        cfg.dead_queue(),
        depths.work,
        depths.dead
    ))
}

/// Publishes batch messages with confirms. Its connection is replaced
/// (on the next node of a cluster) when a publish finds it gone, and the
/// messages whose confirms it took with it are published again.
pub struct AmqpPublisher {
    cfg: AmqpConfig,
    /// The connection in use; replaced under the lock, so concurrent
    /// publishes that lose it reconnect once.
    session: tokio::sync::Mutex<Arc<Opened>>,
}

impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("queue", &self.cfg.queue)
            .finish_non_exhaustive()
    }
}

/// Messages in flight before waiting for their confirms.
const PUBLISH_WINDOW: usize = 500;

/// Times one window of messages is published again on a new connection
/// after the one it went out on failed, before the publish fails.
const PUBLISH_RETRIES: usize = 6;

/// How a window of messages failed to be confirmed.
enum Unconfirmed {
    /// The connection (or its node) failed, or the broker refused the
    /// messages for now (nack, as a quorum queue without a leader may):
    /// worth publishing again on another connection.
    Lost(Error),
    /// It can never succeed this way (e.g. unroutable).
    Failed(Error),
}

impl AmqpPublisher {
    /// Connects and declares the topology.
    pub async fn connect(cfg: AmqpConfig) -> Result<Self> {
        let opened = open(&cfg, "archiver-planner", rotating_start()).await?;
        Ok(AmqpPublisher {
            cfg,
            session: tokio::sync::Mutex::new(Arc::new(opened)),
        })
    }

    async fn current(&self) -> Arc<Opened> {
        self.session.lock().await.clone()
    }

    /// A new connection in place of `failed`, starting at the node after
    /// its own; the one already made if another publish replaced it first.
    async fn replace(&self, failed: &Arc<Opened>) -> Result<Arc<Opened>> {
        let mut current = self.session.lock().await;
        if !Arc::ptr_eq(&current, failed) {
            return Ok(current.clone());
        }
        let opened = Arc::new(open(&self.cfg, "archiver-planner", failed.node + 1).await?);
        let old = std::mem::replace(&mut *current, opened.clone());
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            old.conn.close(320, "reconnecting".into()),
        )
        .await;
        Ok(opened)
    }

    /// Messages ready in the work queue (not counting those being worked on).
    pub async fn ready(&self) -> Result<u32> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let mut session = self.current().await;
        if !session.usable() {
            session = self.replace(&session).await?;
        }
        let q = timed(
            "queue.declare (passive)",
            session.channel.queue_declare(
                self.cfg.queue.as_str().into(),
                passive,
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(q.message_count())
    }

    /// Publishes one window on `session` and waits for every confirm.
    async fn publish_window(
        &self,
        session: &Opened,
        window: &[BatchMessage],
    ) -> std::result::Result<(), Unconfirmed> {
        let lost = |e: Error| {
            if matches!(e, Error::Timeout(_)) || !session.usable() {
                Unconfirmed::Lost(e)
            } else {
                Unconfirmed::Failed(e)
            }
        };
        let mut confirms = Vec::with_capacity(window.len());
        for m in window {
            let c = timed(
                "basic.publish",
                session.channel.basic_publish(
                    "".into(),
                    self.cfg.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.encode(),
                    properties(&m.batch_id.to_string()),
                ),
            )
            .await
            .map_err(lost)?;
            confirms.push(c);
        }
        let what = format!("publish to {}", self.cfg.queue);
        let mut refused = None;
        for c in confirms {
            match confirmed(c, &what).await {
                Ok(()) => {}
                Err(Refusal::Nack(e)) => refused = Some(e),
                Err(Refusal::Other(e)) => return Err(lost(e)),
            }
        }
        match refused {
            None => Ok(()),
            Some(e) => Err(Unconfirmed::Lost(e)),
        }
    }
}

fn properties(msg_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(msg_id))
}

/// Why a confirm was not a plain ack.
enum Refusal {
    /// The broker refused the message (nack).
    Nack(Error),
    /// Anything else: returned unroutable, no confirm, a failed channel.
    Other(Error),
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        match r {
            Refusal::Nack(e) | Refusal::Other(e) => e,
        }
    }
}

async fn confirmed(c: lapin::PublisherConfirm, what: &str) -> std::result::Result<(), Refusal> {
    match timed("publisher confirm", c)
        .await
        .map_err(Refusal::Other)?
    {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(Refusal::Other(Error::Broker(format!(
            "{what}: returned unroutable (does the queue exist?)"
        )))),
        Confirmation::Nack(_) => Err(Refusal::Nack(Error::Broker(format!(
            "{what}: the broker refused the message (nack)"
        )))),
        Confirmation::NotRequested => Err(Refusal::Other(Error::Broker(format!(
            "{what}: channel is not in confirm mode"
        )))),
    }
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish(&self, messages: &[BatchMessage]) -> Result<()> {
        for window in messages.chunks(PUBLISH_WINDOW) {
            let mut delays = ExponentialBuilder::default()
                .with_jitter()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(PUBLISH_RETRIES)
                .build();
            let mut session = self.current().await;
            loop {
                let mut failure = match self.publish_window(&session, window).await {
                    Ok(()) => break,
                    Err(Unconfirmed::Failed(e)) => return Err(e),
                    Err(Unconfirmed::Lost(e)) => e,
                };
                // Publish the window again on a new connection (the next
                // node's), as long as the retries last.
                loop {
                    let Some(d) = delays.next() else {
                        return Err(failure);
                    };
                    tracing::warn!(
                        queue = %self.cfg.queue,
                        messages = window.len(),
                        "publish not confirmed ({failure}); publishing again on a new connection in {d:?}"
                    );
                    tokio::time::sleep(d).await;
                    match self.replace(&session).await {
                        Ok(s) => {
                            session = s;
                            break;
                        }
                        Err(e) => failure = e,
                    }
                }
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let session = self.current().await;
        let _ = timed("channel.close", session.channel.close(200, "done".into())).await;
        let _ = timed("connection.close", session.conn.close(200, "done".into())).await;
        Ok(())
    }

    async fn backlog(&self) -> Result<Option<u32>> {
        self.ready().await.map(Some)
    }
}

/// Consumes the work queue with bounded prefetch, reconnecting as needed.
pub struct AmqpConsumer {
    cfg: AmqpConfig,
    prefetch: u16,
    /// The node the next connection tries first: after the one it last
    /// used, so a consumer whose node went moves on.
    next_node: usize,
    live: Option<Live>,
    /// The live connection's status (lapin updates it as the socket lives
    /// and dies), for [`Consumer::connected`]: `None` while not consuming.
    status: Arc<Mutex<Option<lapin::ConnectionStatus>>>,
}

struct Live {
    conn: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
}

impl std::fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConsumer")
            .field("queue", &self.cfg.queue)
            .finish_non_exhaustive()
    }
}

impl AmqpConsumer {
    /// A consumer for a worker executing `concurrency` batches at once; it
    /// will connect on first `receive` and hold at most twice that many
    /// unsettled deliveries (prefetch).
    pub fn new(cfg: AmqpConfig, concurrency: u16) -> Self {
        AmqpConsumer {
            cfg,
            prefetch: concurrency.max(1).saturating_mul(2),
            next_node: rotating_start(),
            live: None,
            status: Arc::default(),
        }
    }

    async fn start(&mut self) -> Result<Live> {
        let Opened {
            conn,
            channel,
            node,
            ..
        } = open(&self.cfg, "archiver-worker", self.next_node).await?;
        self.next_node = node + 1;
        // Set on every (re)connect: a recovered channel may not keep it.
        timed(
            "basic.qos",
            // One delivery in hand per executor slot, so a slot that frees
            // up starts its next batch without a round trip to the broker.
            channel.basic_qos(self.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let consumer = timed(
            "basic.consume",
            channel.basic_consume(
                self.cfg.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Live {
            conn,
            channel,
            consumer,
        })
    }

    async fn connect_until_up(&mut self) {
        let mut delays = ExponentialBuilder::default()
            .with_jitter()
            .with_max_delay(Duration::from_secs(30))
            .without_max_times()
            .build();
        loop {
            match self.start().await {
                Ok(live) => {
                    tracing::info!(queue = %self.cfg.queue, prefetch = self.prefetch, "consuming");
                    self.set_status(Some(live.conn.status().clone()));
                    self.live = Some(live);
                    return;
                }
                Err(e) => {
                    let d = delays.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!("broker unavailable ({e}); reconnecting in {d:?}");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn receive(&mut self) -> Result<Option<Delivery>> {
        loop {
            if self.live.is_none() {
                self.connect_until_up().await;
            }
            let cfg = self.cfg.clone();
            let live = self.live.as_mut().expect("connected above");
            match live.consumer.next().await {
                Some(Ok(d)) => {
                    let acker = AmqpAcker {
                        cfg,
                        channel: live.channel.clone(),
                        acker: d.acker,
                        payload: d.data.clone(),
                    };
                    return Ok(Some(Delivery {
                        payload: d.data,
                        redelivered: d.redelivered,
                        acker: Box::new(acker),
                    }));
                }
                Some(Err(e)) => tracing::warn!("consumer failed ({e}); reconnecting"),
                None => tracing::warn!("consumer cancelled by the broker; reconnecting"),
            }
            self.set_status(None);
            if let Some(old) = self.live.take() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    old.conn.close(320, "reconnecting".into()),
                )
                .await;
            }
        }
    }

    async fn stop(&mut self) {
        if let Some(live) = &self.live {
            let tag = live.consumer.tag();
            let _ = timed(
                "basic.cancel",
                live.channel
                    .basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
        }
    }

    async fn close(&mut self) {
        AmqpConsumer::close(self).await;
    }

    /// Consuming, over a connection lapin still holds open: a socket the
    /// network closed shows at once, even while no `receive` runs.
    fn connected(&self) -> Link {
        let status = self.status.clone();
        Link::new(move || {
            status
                .lock()
                .expect("never poisoned")
                .as_ref()
                .is_some_and(|s| s.connected())
        })
    }
}

impl AmqpConsumer {
    fn set_status(&self, status: Option<lapin::ConnectionStatus>) {
        *self.status.lock().expect("never poisoned") = status;
    }

    /// Closes the connection; unsettled deliveries return to the queue.
    pub async fn close(&mut self) {
        self.set_status(None);
        if let Some(live) = self.live.take() {
            let _ = timed("channel.close", live.channel.close(200, "shutdown".into())).await;
            let _ = timed("connection.close", live.conn.close(200, "shutdown".into())).await;
        }
    }
}

struct AmqpAcker {
    cfg: AmqpConfig,
    channel: Channel,
    acker: lapin::Acker,
    payload: Vec<u8>,
}

/// lapin returns `Ok(false)` when the channel is gone and nothing was sent:
/// the broker will redeliver, and the ledger makes that a no-op.
fn sent(what: &'static str, ok: bool) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Broker(format!(
            "{what} not sent: channel closed; the message will be redelivered"
        )))
    }
}

#[async_trait]
impl Acknowledge for AmqpAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let ok = timed("basic.ack", self.acker.ack(BasicAckOptions::default())).await?;
        sent("ack", ok)
    }

    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<()> {
        // Publish to the DLX ourselves so the parked message carries the
        // reason; only then drop the original. If that fails, reject without
        // requeue: the broker dead-letters it (reason "rejected").
        let mut headers = FieldTable::default();
        headers.insert(
            "x-archiver-error".into(),
            AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            "x-archiver-queue".into(),
            AMQPValue::LongString(self.cfg.queue.as_str().into()),
        );
        let props = properties("dead-letter").with_headers(headers);
        let published = async {
            let c = timed(
                "basic.publish (dead letter)",
                self.channel.basic_publish(
                    self.cfg.dlx().into(),
                    self.cfg.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &self.payload,
                    props,
                ),
            )
            .await?;
            confirmed(c, "dead-letter publish")
                .await
                .map_err(Error::from)
        }
        .await;
        match published {
            Ok(()) => {
                let ok = timed("basic.ack", self.acker.ack(BasicAckOptions::default())).await?;
                sent("ack", ok)
            }
            Err(e) => {
                tracing::warn!("dead-letter publish failed ({e}); rejecting instead");
                let ok = timed(
                    "basic.reject",
                    self.acker.reject(BasicRejectOptions { requeue: false }),
                )
                .await?;
                sent("reject", ok)
            }
        }
    }

    async fn retry_later(self: Box<Self>) -> Result<()> {
        // reject (not nack) counts toward x-delivery-limit on every version.
        let ok = timed(
            "basic.reject",
            self.acker.reject(BasicRejectOptions { requeue: true }),
        )
        .await?;
        sent("reject", ok)
    }

    async fn hand_back(self: Box<Self>) -> Result<()> {
        let ok = timed(
            "basic.nack",
            self.acker.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            }),
        )
        .await?;
        sent("nack", ok)
    }
}
