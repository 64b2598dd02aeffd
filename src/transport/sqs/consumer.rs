//! The worker's side: long polling for as many messages as it has free
//! slots, a heartbeat per held message that keeps it invisible to other
//! workers while its batch runs, and settling by delete or by making the
//! message visible again.
//!
//! No received message may sit invisible while nobody works on it:
//!
//! - A receive asks only for a short lease ([`RECEIVE_LEASE`]); the heartbeat
//!   extends it to the visibility timeout at once. A message the server hands
//!   to a long poll whose client is gone (a killed worker, a client-side
//!   timeout, a lost reply: the server cannot tell) is visible again after
//!   the lease, not after the whole visibility timeout.
//! - A long poll runs in a task of its own: when the caller stops waiting
//!   for it (shutdown), its reply is still taken, and `stop` hands back what
//!   it received.
//! - Settling stops the heartbeat first and waits for an extension in flight,
//!   so a late extension cannot hide a message that was just handed back.

use super::{
    ERROR_ATTRIBUTE, QUEUE_ATTRIBUTE, QueueUrls, SqsConfig, attribute_text, client_from_env,
    ensure_queues, receive, release_all, sqs_error, string_attribute, transient,
};
use crate::error::{Class, Error, Result};
use crate::transport::{Acknowledge, Consumer, Delivery, Link};
use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The visibility a receive asks for; the heartbeat extends it to the
/// visibility timeout as soon as the message is held. A message received by
/// a poll nobody reads any more is visible again after this.
pub const RECEIVE_LEASE: Duration = Duration::from_secs(10);

/// Consumes the work queue, holding at most `concurrency` messages.
pub struct SqsConsumer {
    client: Client,
    cfg: SqsConfig,
    capacity: usize,
    queues: Option<Arc<Queues>>,
    /// Received, not yet handed out (their heartbeats run).
    buffer: VecDeque<Held>,
    /// Received and not yet settled, buffered ones included.
    outstanding: Arc<AtomicUsize>,
    /// Receipt handles of the messages held, by message id.
    in_hand: HashMap<String, Weak<Receipt>>,
    /// The long poll in flight, if any: its messages are held even when the
    /// `receive` that started it was cancelled.
    polling: Option<JoinHandle<Result<Vec<Message>>>>,
    /// A receive has succeeded: from now on every failure is waited out.
    polled: bool,
    stopped: bool,
    /// The last receive succeeded (SQS has no connection to watch), for
    /// [`Consumer::connected`].
    up: Arc<AtomicBool>,
}

impl std::fmt::Debug for SqsConsumer {
    // The client's configuration holds credentials: show the queue only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsConsumer")
            .field("queue", &self.cfg.name)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// What every delivery of one consumer shares.
struct Queues {
    client: Client,
    cfg: SqsConfig,
    urls: QueueUrls,
}

/// The newest receipt handle of a held message: a message received again
/// while held is settled (and kept invisible) with the newest one.
struct Receipt(Mutex<String>);

impl Receipt {
    fn current(&self) -> String {
        self.0.lock().expect("never poisoned").clone()
    }
    fn renew(&self, handle: String) {
        *self.0.lock().expect("never poisoned") = handle;
    }
}

/// Counts a received message until it is settled or dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One received message while this consumer holds it.
struct Held {
    queues: Arc<Queues>,
    message_id: String,
    body: String,
    receive_count: u32,
    receipt: Option<Arc<Receipt>>,
    heartbeat: Option<Heartbeat>,
    _slot: Slot,
}

/// A held message's heartbeat task and the token that ends it.
struct Heartbeat {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Held {
    /// Stops the heartbeat and gives up the receipt: from now on a new
    /// receipt of this message is a new delivery. Returns the newest handle.
    /// An extension in flight is waited for (not aborted: its request may
    /// already be on its way, and landing after a hand-back it would hide
    /// the message for a whole visibility timeout).
    async fn release(&mut self) -> String {
        tracing::debug!(message_id = self.message_id, "settling");
        if let Some(h) = self.heartbeat.take() {
            h.stop.cancel();
            let _ = h.task.await;
        }
        self.receipt
            .take()
            .map(|r| r.current())
            .expect("a held message is released once")
    }
}

impl Drop for Held {
    // Dropped unsettled (a crash in a test, a panic): stop extending; the
    // message comes back when its visibility timeout ends.
    fn drop(&mut self) {
        if let Some(h) = &self.heartbeat {
            h.stop.cancel();
        }
    }
}

impl SqsConsumer {
    /// A consumer through `client` for a worker executing `concurrency`
    /// batches at once. It creates or checks the queues on first `receive`.
    pub fn new(client: Client, cfg: SqsConfig, concurrency: u16) -> Self {
        SqsConsumer {
            client,
            cfg,
            capacity: usize::from(concurrency.max(1)),
            queues: None,
            buffer: VecDeque::new(),
            outstanding: Arc::new(AtomicUsize::new(0)),
            in_hand: HashMap::new(),
            polling: None,
            polled: false,
            stopped: false,
            up: Arc::default(),
        }
    }

    /// A consumer with a client from the standard AWS environment.
    pub async fn from_env(cfg: SqsConfig, concurrency: u16) -> Self {
        let client = client_from_env(&cfg).await;
        Self::new(client, cfg, concurrency)
    }

    /// One long poll for as many messages as there are free slots. The
    /// receive runs in a task of its own: if this future is dropped, the
    /// next `poll` (or `stop`) takes its reply.
    async fn poll(&mut self) -> Result<()> {
        let queues = match &self.queues {
            Some(q) => q.clone(),
            None => {
                let urls = ensure_queues(&self.client, &self.cfg).await?;
                let q = Arc::new(Queues {
                    client: self.client.clone(),
                    cfg: self.cfg.clone(),
                    urls,
                });
                tracing::info!(queue = %self.cfg.name, capacity = self.capacity, "consuming");
                self.queues = Some(q.clone());
                q
            }
        };
        if self.polling.is_none() {
            let free = self
                .capacity
                .saturating_sub(self.outstanding.load(Ordering::SeqCst));
            let q = queues.clone();
            let (wait, lease) = (self.cfg.wait_secs(), self.cfg.lease_secs());
            self.polling = Some(tokio::spawn(async move {
                receive(&q.client, &q.urls.work, &q.cfg.name, free, wait, lease).await
            }));
        }
        let polling = self.polling.as_mut().expect("set above");
        let received = polling.await;
        self.polling = None;
        let messages = received.map_err(|e| Error::Broker(format!("SQS receive task: {e}")))??;
        self.take(messages, &queues);
        Ok(())
    }

    /// Holds the messages of one receive.
    fn take(&mut self, messages: Vec<Message>, queues: &Arc<Queues>) {
        tracing::debug!(
            queue = %self.cfg.name,
            ids = ?messages.iter().filter_map(|m| m.message_id()).collect::<Vec<_>>(),
            "received"
        );
        self.in_hand.retain(|_, r| r.strong_count() > 0);
        for m in messages {
            self.hold(m, queues);
        }
    }

    fn hold(&mut self, m: Message, queues: &Arc<Queues>) {
        let count = m
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        let (Some(message_id), Some(handle)) = (m.message_id, m.receipt_handle) else {
            tracing::warn!("SQS returned a message without id or receipt handle; ignored");
            return;
        };
        if let Some(held) = self.in_hand.get(&message_id).and_then(Weak::upgrade) {
            // Its visibility lapsed and it came back to us: one delivery,
            // settled and extended with the newest handle.
            tracing::warn!(
                message_id,
                "received again while its batch runs here; keeping the newest receipt handle"
            );
            held.renew(handle);
            return;
        }
        let receipt = Arc::new(Receipt(Mutex::new(handle)));
        self.in_hand
            .insert(message_id.clone(), Arc::downgrade(&receipt));
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        let stop = CancellationToken::new();
        let heartbeat = Heartbeat {
            task: tokio::spawn(heartbeat(
                queues.clone(),
                receipt.clone(),
                message_id.clone(),
                stop.clone(),
            )),
            stop,
        };
        self.buffer.push_back(Held {
            queues: queues.clone(),
            message_id,
            body: m.body.unwrap_or_default(),
            receive_count: count,
            receipt: Some(receipt),
            heartbeat: Some(heartbeat),
            _slot: Slot(self.outstanding.clone()),
        });
    }
}

#[async_trait]
impl Consumer for SqsConsumer {
    async fn receive(&mut self) -> Result<Option<Delivery>> {
        let mut delays = ExponentialBuilder::default()
            .with_jitter()
            .with_max_delay(Duration::from_secs(30))
            .without_max_times()
            .build();
        loop {
            if self.stopped {
                return Ok(None);
            }
            if let Some(held) = self.buffer.pop_front() {
                return Ok(Some(Delivery {
                    payload: held.body.clone().into_bytes(),
                    redelivered: held.receive_count > 1,
                    acker: Box::new(SqsAcker { held }),
                }));
            }
            let polled = self.poll().await;
            self.up.store(polled.is_ok(), Ordering::SeqCst);
            match polled {
                Ok(()) => self.polled = true,
                // Misconfigured from the start (no such access, bad
                // attributes): say so rather than wait forever.
                Err(e) if !self.polled && e.class() == Class::Permanent => return Err(e),
                Err(e) => {
                    if e.class() == Class::Permanent {
                        // The queue may have been deleted: create it again.
                        self.queues = None;
                    }
                    let d = delays.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!("SQS unavailable ({e}); polling again in {d:?}");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    fn connected(&self) -> Link {
        let up = self.up.clone();
        Link::new(move || up.load(Ordering::SeqCst))
    }

    async fn stop(&mut self) {
        self.stopped = true;
        // A long poll in flight (its receive was cancelled): what it gets
        // is handed back below rather than left invisible.
        if let (Some(mut polling), Some(q)) = (self.polling.take(), self.queues.clone()) {
            let bound = self.cfg.wait_time + Duration::from_secs(25);
            match tokio::time::timeout(bound, &mut polling).await {
                Ok(Ok(Ok(messages))) => self.take(messages, &q),
                Ok(Ok(Err(e))) => tracing::debug!("the last long poll failed: {e}"),
                Ok(Err(e)) => tracing::warn!("the last long poll's task failed: {e}"),
                Err(_) => {
                    // What it may have received is visible again after the lease.
                    polling.abort();
                    tracing::warn!("the last long poll did not end within {bound:?}; left behind");
                }
            }
        }
        let mut receipts = Vec::new();
        for mut held in self.buffer.drain(..) {
            receipts.push(held.release().await);
        }
        if let (Some(q), false) = (&self.queues, receipts.is_empty()) {
            release_all(&q.client, &q.urls.work, &self.cfg.name, &receipts).await;
        }
    }
}

/// Receipt handles SQS no longer accepts: the message was deleted, or its
/// visibility lapsed and someone received it again.
fn is_gone(code: &str) -> bool {
    matches!(code, "ReceiptHandleIsInvalid" | "MessageNotInflight")
}

/// Extends the visibility timeout at once (a receive asks only for a short
/// lease), then every third of it, until `stop`; an extension in flight
/// runs to its end.
async fn heartbeat(
    queues: Arc<Queues>,
    receipt: Arc<Receipt>,
    message_id: String,
    stop: CancellationToken,
) {
    let period = (queues.cfg.visibility_timeout / 3).max(Duration::from_millis(500));
    let mut wait = Duration::ZERO;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let extended = queues
            .set_visibility(&receipt.current(), queues.cfg.visibility_secs())
            .await;
        match extended {
            Ok(()) => {
                if failing {
                    tracing::info!(message_id, "visibility timeout extended again");
                }
                failing = false;
                wait = period;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        message_id,
                        "extending the visibility timeout failed ({e}); retrying. If it lapses, \
                         another worker may receive this batch; the ledger makes the later of \
                         the two runs a no-op"
                    );
                }
                failing = true;
                wait = (period / 4).max(Duration::from_millis(200));
            }
        }
    }
}

impl Queues {
    /// Runs one settling call, retried a few times while transient; a
    /// receipt handle SQS no longer accepts is not retried.
    async fn call<T, E, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = std::result::Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let attempt = || async {
            f().await.map_err(|e| {
                let gone = e.code().is_some_and(is_gone);
                (sqs_error(op, &self.cfg.name, e), gone)
            })
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_jitter()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_times(3),
            )
            .when(|(e, gone): &(Error, bool)| !gone && transient(e))
            .await
            .map_err(|(e, _)| e)
    }

    async fn set_visibility(&self, receipt: &str, secs: i32) -> Result<()> {
        self.call("ChangeMessageVisibility", || {
            self.client
                .change_message_visibility()
                .queue_url(&self.urls.work)
                .receipt_handle(receipt)
                .visibility_timeout(secs)
                .send()
        })
        .await
        .map(drop)
    }

    async fn delete(&self, receipt: &str) -> Result<()> {
        self.call("DeleteMessage", || {
            self.client
                .delete_message()
                .queue_url(&self.urls.work)
                .receipt_handle(receipt)
                .send()
        })
        .await
        .map(drop)
        .map_err(|e| {
            Error::Broker(format!(
                "{e}; the message will be delivered again, and the ledger makes that a no-op"
            ))
        })
    }

    /// Sends a copy of `body` to the dead-letter queue with the reason.
    async fn park(&self, body: &str, reason: &str) -> Result<()> {
        let reason = string_attribute(&attribute_text(reason));
        let queue = string_attribute(&self.cfg.name);
        self.call("SendMessage (dead letter)", || {
            self.client
                .send_message()
                .queue_url(&self.urls.dead)
                .message_body(body)
                .message_attributes(ERROR_ATTRIBUTE, reason.clone())
                .message_attributes(QUEUE_ATTRIBUTE, queue.clone())
                .send()
        })
        .await
        .map(drop)
    }
}

/// Settles one delivery; each method first stops the heartbeat.
struct SqsAcker {
    held: Held,
}

#[async_trait]
impl Acknowledge for SqsAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        let receipt = self.held.release().await;
        self.held.queues.delete(&receipt).await
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<()> {
        let receipt = self.held.release().await;
        let q = &self.held.queues;
        match q.park(&self.held.body, reason).await {
            Ok(()) => q.delete(&receipt).await,
            Err(e) => {
                // Nothing is lost: it comes back, and past the delivery
                // limit SQS parks it through the redrive policy.
                tracing::warn!(
                    message_id = self.held.message_id,
                    "dead-letter send failed ({e}); making the message visible again instead"
                );
                q.set_visibility(&receipt, 0).await
            }
        }
    }

    async fn retry_later(mut self: Box<Self>) -> Result<()> {
        // Visible again now; its next receive counts toward maxReceiveCount.
        let receipt = self.held.release().await;
        self.held.queues.set_visibility(&receipt, 0).await
    }

    async fn hand_back(mut self: Box<Self>) -> Result<()> {
        // SQS cannot give a message back without counting the receive.
        let receipt = self.held.release().await;
        self.held.queues.set_visibility(&receipt, 0).await
    }
}
