//! How batch messages travel from the planner to workers. A message carries
//! a batch id and its kind, never rows or ranges: the ledger says what the
//! batch is, so a stale, duplicated or forged message can do nothing the
//! planner did not plan.
//!
//! Three small traits form the seam: a [`Publisher`] that returns only once
//! the broker holds every message, a [`Consumer`] that yields deliveries, and
//! the [`Acknowledge`] handle each delivery carries. A consumer also hands
//! out a [`Link`], which tells other tasks whether it is connected.

pub mod amqp;
pub mod config;
pub mod inline;
pub mod sqs;

pub use config::QueueConfig;

use crate::error::{Error, Result};
use crate::vocabulary::Kind;
use async_trait::async_trait;
use std::sync::Arc;
use uuid::Uuid;

/// The body of every message: `{"v":1,"batch_id":"…","kind":"logs"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchMessage {
    /// Format version; only 1 exists.
    pub v: u8,
    /// The batch in the ledger.
    pub batch_id: Uuid,
    /// Its kind, checked against the ledger.
    pub kind: Kind,
}

/// Larger payloads are refused before parsing.
const MAX_PAYLOAD: usize = 4096;

impl BatchMessage {
    /// A version-1 message for a batch.
    pub fn new(batch_id: Uuid, kind: Kind) -> Self {
        BatchMessage {
            v: 1,
            batch_id,
            kind,
        }
    }

    /// Serializes to JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a BatchMessage always serializes")
    }

    /// Parses a payload, naming what is wrong with a bad one.
    pub fn decode(payload: &[u8]) -> Result<Self> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::BadMessage(format!(
                "{} bytes, more than {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        let msg: BatchMessage = serde_json::from_slice(payload).map_err(|e| {
            let shown: String = String::from_utf8_lossy(payload).chars().take(80).collect();
            Error::BadMessage(format!("{e} in {shown:?}"))
        })?;
        if msg.v != 1 {
            return Err(Error::BadMessage(format!("unsupported version {}", msg.v)));
        }
        Ok(msg)
    }
}

/// Sends batch messages. The planner calls `publish` for several chunks at
/// once (see `plan`), so an implementation must allow concurrent calls.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Enqueues every message durably. `Ok` means the broker confirmed each
    /// one; on `Err` some may have been enqueued and others not.
    async fn publish(&self, messages: &[BatchMessage]) -> Result<()>;

    /// No more messages will be published.
    async fn close(&self) -> Result<()>;

    /// Messages waiting in the work queue, not counting those being worked
    /// on; `None` when this transport cannot tell.
    async fn backlog(&self) -> Result<Option<u32>> {
        Ok(None)
    }
}

/// Settles one delivery. Exactly one method is called, once.
#[async_trait]
pub trait Acknowledge: Send {
    /// The batch's effect is committed: remove the message.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// The message can never succeed: park it, with the reason, in the
    /// dead-letter queue.
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<()>;
    /// It failed for now: deliver it again later, counting the attempt.
    async fn retry_later(self: Box<Self>) -> Result<()>;
    /// Not processed (shutting down): give it back without counting.
    async fn hand_back(self: Box<Self>) -> Result<()>;
}

/// One received message and the handle that settles it.
pub struct Delivery {
    /// The raw body.
    pub payload: Vec<u8>,
    /// The broker delivered it before.
    pub redelivered: bool,
    /// Settles the delivery.
    pub acker: Box<dyn Acknowledge>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("payload", &String::from_utf8_lossy(&self.payload))
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

/// Yields deliveries.
#[async_trait]
pub trait Consumer: Send {
    /// The next delivery, waiting (and reconnecting) as long as it takes.
    /// `None`: there will be no more. Cancel-safe.
    async fn receive(&mut self) -> Result<Option<Delivery>>;
    /// Stop taking deliveries; unsettled ones go back to the queue.
    async fn stop(&mut self);

    /// Release the connection once the loop is over (after `stop`).
    async fn close(&mut self) {}

    /// A handle that says, whenever asked and from any task, whether this
    /// consumer is connected to its broker now: the worker loop owns the
    /// consumer, and the worker's `/readyz` asks the handle. No broker
    /// (inline): always connected.
    fn connected(&self) -> Link {
        Link::always()
    }
}

/// Whether a consumer is connected to its broker, read at the time of asking
/// (see [`Consumer::connected`]).
#[derive(Clone)]
pub struct Link(Arc<dyn Fn() -> bool + Send + Sync>);

impl Link {
    /// A link that asks `up` each time.
    pub fn new(up: impl Fn() -> bool + Send + Sync + 'static) -> Link {
        Link(Arc::new(up))
    }

    /// A link that is always up (no broker to lose).
    pub fn always() -> Link {
        Link::new(|| true)
    }

    /// Connected now.
    pub fn is_up(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Link").field(&self.is_up()).finish()
    }
}

/// A publisher to the configured broker (declaring its queues); `None` with
/// no broker, where the planner runs batches itself ([`inline`]).
pub async fn publisher(queue: &QueueConfig) -> Result<Option<Box<dyn Publisher>>> {
    Ok(match queue {
        QueueConfig::Inline => None,
        QueueConfig::Amqp(cfg) => Some(Box::new(amqp::AmqpPublisher::connect(cfg.clone()).await?)),
        QueueConfig::Sqs(cfg) => Some(Box::new(sqs::SqsPublisher::connect(cfg).await?)),
    })
}

/// A consumer of the configured broker's work queue for a worker executing
/// `concurrency` batches at once. It connects on its first `receive` (and
/// reconnects as long as it takes). With no broker there is nothing to
/// consume: a configuration error naming `QUEUE_URL`.
pub async fn consumer(queue: &QueueConfig, concurrency: u16) -> Result<Box<dyn Consumer>> {
    match queue {
        QueueConfig::Inline => Err(config::no_broker()),
        QueueConfig::Amqp(cfg) => Ok(Box::new(amqp::AmqpConsumer::new(cfg.clone(), concurrency))),
        QueueConfig::Sqs(cfg) => Ok(Box::new(
            sqs::SqsConsumer::from_env(cfg.clone(), concurrency).await,
        )),
    }
}

/// Checks the configured broker as the planner and workers use it, and
/// says what it found (never a password): RabbitMQ through the declare the
/// publisher runs at start ([`amqp::check`]), SQS read-only
/// ([`sqs::check_queues`]). `None` with no broker (inline).
pub async fn check(queue: &QueueConfig) -> Result<Option<String>> {
    Ok(match queue {
        QueueConfig::Inline => None,
        QueueConfig::Amqp(cfg) => Some(amqp::check(cfg).await?),
        QueueConfig::Sqs(cfg) => {
            let client = sqs::client_from_env(cfg).await;
            let found = sqs::check_queues(&client, cfg).await?;
            let at = cfg.endpoint.as_deref().unwrap_or("the AWS endpoint");
            let region = client
                .config()
                .region()
                .map_or("no region".to_string(), |r| r.to_string());
            Some(format!("{at} ({region}), {found}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = BatchMessage::new(Uuid::new_v4(), Kind::Logs);
        assert_eq!(BatchMessage::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn bad_messages_say_why() {
        let e = BatchMessage::decode(b"not json").unwrap_err().to_string();
        assert!(e.starts_with("malformed message: "), "{e}");
        let e = BatchMessage::decode(
            br#"{"v":2,"batch_id":"00000000-0000-0000-0000-000000000000","kind":"logs"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported version 2"), "{e}");
        let e = BatchMessage::decode(br#"{"v":1,"batch_id":"x","kind":"logs"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_id") || e.contains("UUID"), "{e}");
        assert!(BatchMessage::decode(&vec![b' '; 5000]).is_err());
    }
}
