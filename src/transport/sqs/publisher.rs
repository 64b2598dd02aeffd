//! The planner's side: `SendMessageBatch` of up to ten messages, several
//! batches in flight at once, every entry checked.

use super::{SqsConfig, client_from_env, ensure_queues, sqs_error, transient};
use crate::error::{Error, Result};
use crate::transport::{BatchMessage, Publisher};
use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::time::Duration;

/// Entries in one `SendMessageBatch` (the SQS limit).
const BATCH: usize = 10;
/// `SendMessageBatch` calls in flight at once.
const IN_FLIGHT: usize = 16;
/// Tries of one batch's refused entries (or of a failed call).
const TRIES: usize = 5;

/// Publishes batch messages to the work queue.
pub struct SqsPublisher {
    client: Client,
    name: String,
    url: String,
}

impl std::fmt::Debug for SqsPublisher {
    // The client's configuration holds credentials: show the queue only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsPublisher")
            .field("queue", &self.name)
            .finish_non_exhaustive()
    }
}

impl SqsPublisher {
    /// A publisher through `client`; creates or updates the queues.
    pub async fn new(client: Client, cfg: &SqsConfig) -> Result<Self> {
        let urls = ensure_queues(&client, cfg).await?;
        Ok(SqsPublisher {
            client,
            name: cfg.name.clone(),
            url: urls.work,
        })
    }

    /// A publisher with a client from the standard AWS environment.
    pub async fn connect(cfg: &SqsConfig) -> Result<Self> {
        Self::new(client_from_env(cfg).await, cfg).await
    }

    /// Messages waiting in the work queue, not counting those being worked
    /// on (SQS's approximate count).
    pub async fn ready(&self) -> Result<u32> {
        let name = QueueAttributeName::ApproximateNumberOfMessages;
        let attrs = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(name.clone())
            .send()
            .await
            .map_err(|e| sqs_error("GetQueueAttributes", &self.name, e))?
            .attributes
            .unwrap_or_default();
        attrs
            .get(&name)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::Broker(format!(
                    "SQS GetQueueAttributes {}: no message count in the reply",
                    self.name
                ))
            })
    }

    /// Sends one batch of at most ten, retrying refused entries; `Ok` once
    /// SQS accepted every one.
    async fn send(&self, chunk: &[BatchMessage]) -> Result<()> {
        let bodies: Vec<String> = chunk
            .iter()
            .map(|m| String::from_utf8(m.encode()).expect("JSON is UTF-8"))
            .collect();
        // Entry ids are indexes into `bodies`; only unaccepted ones are resent.
        let mut pending: Vec<usize> = (0..bodies.len()).collect();
        let mut delays = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .build();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let entries = pending
                .iter()
                .map(|&i| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(&bodies[i])
                        .build()
                        .expect("id and body are set")
                })
                .collect();
            let sent = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await;
            let failure = match sent {
                // The call succeeds even when entries fail: check each.
                Ok(out) => {
                    let accepted: HashSet<&str> =
                        out.successful.iter().map(|s| s.id.as_str()).collect();
                    pending.retain(|i| !accepted.contains(i.to_string().as_str()));
                    if pending.is_empty() {
                        return Ok(());
                    }
                    let first = out.failed.first().map_or_else(
                        || "missing from the reply".to_string(),
                        |f| format!("{}: {}", f.code, f.message.as_deref().unwrap_or_default()),
                    );
                    let failure = Error::Broker(format!(
                        "SQS SendMessageBatch {}: {} of {} message(s) refused ({first})",
                        self.name,
                        pending.len(),
                        chunk.len()
                    ));
                    if out.failed.iter().any(|f| f.sender_fault) {
                        // Would be refused again the same way.
                        return Err(failure);
                    }
                    failure
                }
                Err(e) => {
                    let err = sqs_error("SendMessageBatch", &self.name, e);
                    if !transient(&err) {
                        return Err(err);
                    }
                    err
                }
            };
            if attempt >= TRIES {
                return Err(failure);
            }
            let d = delays.next().unwrap_or(Duration::from_secs(5));
            tracing::warn!("{failure}; retrying {} in {d:?}", pending.len());
            tokio::time::sleep(d).await;
        }
    }
}

#[async_trait]
impl Publisher for SqsPublisher {
    async fn publish(&self, messages: &[BatchMessage]) -> Result<()> {
        // Made up front (they start only when polled): a closure in the
        // stream would trip async_trait's Send check on higher-ranked lifetimes.
        let sends: Vec<_> = messages.chunks(BATCH).map(|c| self.send(c)).collect();
        futures::stream::iter(sends)
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    async fn backlog(&self) -> Result<Option<u32>> {
        self.ready().await.map(Some)
    }
}
