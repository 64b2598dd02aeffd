//! The dead-letter queue for operators: list parked messages with their
//! reasons, and move them back to the work queue.

use super::{SqsConfig, lookup_queues, reason_of, receive, release_all, sqs_error};
use crate::error::{Error, Result};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, Message, SendMessageBatchRequestEntry};
use std::collections::HashSet;

/// How long a peek or a redrive holds a dead message it has received.
const HOLD_SECS: i32 = 60;

/// Lists up to `max` parked messages, (body, reason), without removing
/// them (each is received, then made visible again). A message that SQS
/// moved after `delivery_limit` receives has no reason. The listing may miss
/// messages that another client holds. No queues: an empty list.
pub async fn dead_messages(
    client: &Client,
    cfg: &SqsConfig,
    max: usize,
) -> Result<Vec<(String, Option<String>)>> {
    let Some(urls) = lookup_queues(client, cfg).await? else {
        return Ok(Vec::new());
    };
    let queue = cfg.dead_name();
    let mut seen = HashSet::new();
    let mut listed = Vec::new();
    let mut receipts = Vec::new();
    let mut result = Ok(());
    while listed.len() < max {
        let batch =
            match receive(client, &urls.dead, &queue, max - listed.len(), 1, HOLD_SECS).await {
                Ok(b) => b,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
        if batch.is_empty() {
            break;
        }
        for m in batch {
            receipts.extend(m.receipt_handle().map(str::to_owned));
            if seen.insert(m.message_id().unwrap_or_default().to_owned()) {
                listed.push((m.body().unwrap_or_default().to_owned(), reason_of(&m)));
            }
        }
    }
    release_all(client, &urls.dead, &queue, &receipts).await;
    result.map(|()| listed)
}

/// Moves up to `max` parked messages back to the work queue (receive, send,
/// delete; `StartMessageMoveTask` is not needed, which SQS-compatible
/// servers lack). Returns how many moved (no queues: 0). A
/// message sent whose delete then fails is moved twice; the ledger makes
/// the second delivery a no-op.
pub async fn redrive_dead(client: &Client, cfg: &SqsConfig, max: usize) -> Result<usize> {
    let Some(urls) = lookup_queues(client, cfg).await? else {
        return Ok(0);
    };
    let dead = cfg.dead_name();
    let mut moved = 0;
    while moved < max {
        let batch = receive(client, &urls.dead, &dead, max - moved, 1, HOLD_SECS).await?;
        if batch.is_empty() {
            break;
        }
        let entries = batch
            .iter()
            .enumerate()
            .map(|(i, m)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(m.body().unwrap_or_default())
                    .build()
                    .expect("id and body are set")
            })
            .collect();
        let sent = client
            .send_message_batch()
            .queue_url(&urls.work)
            .set_entries(Some(entries))
            .send()
            .await;
        let sent = match sent {
            Ok(out) => out,
            Err(e) => {
                let receipts: Vec<String> = batch
                    .iter()
                    .filter_map(|m| m.receipt_handle().map(str::to_owned))
                    .collect();
                release_all(client, &urls.dead, &dead, &receipts).await;
                return Err(sqs_error("SendMessageBatch", &cfg.name, e));
            }
        };
        let ok: HashSet<&str> = sent.successful.iter().map(|s| s.id.as_str()).collect();
        let (done, failed): (Vec<_>, Vec<_>) = batch
            .iter()
            .enumerate()
            .partition(|(i, _)| ok.contains(i.to_string().as_str()));
        delete_all(client, &urls.dead, &dead, &done).await;
        moved += done.len();
        if !failed.is_empty() {
            let receipts: Vec<String> = failed
                .iter()
                .filter_map(|(_, m)| m.receipt_handle().map(str::to_owned))
                .collect();
            release_all(client, &urls.dead, &dead, &receipts).await;
            let why = sent
                .failed
                .first()
                .map(|f| format!("{}: {}", f.code, f.message.as_deref().unwrap_or_default()))
                .unwrap_or_default();
            return Err(Error::Broker(format!(
                "redrive to {}: {} message(s) refused ({why}) after {moved} moved",
                cfg.name,
                failed.len()
            )));
        }
    }
    Ok(moved)
}

/// Deletes received messages; a failure leaves a copy behind (logged).
async fn delete_all(client: &Client, url: &str, queue: &str, messages: &[(usize, &Message)]) {
    if messages.is_empty() {
        return;
    }
    let entries = messages
        .iter()
        .map(|(i, m)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .build()
                .expect("id and receipt handle are set")
        })
        .collect();
    match client
        .delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
    {
        Ok(out) if out.failed.is_empty() => {}
        Ok(out) => tracing::warn!(
            queue,
            "{} redriven message(s) not deleted: they will be redriven again (a no-op)",
            out.failed.len()
        ),
        Err(e) => tracing::warn!(
            "{}: redriven messages will be redriven again (a no-op)",
            sqs_error("DeleteMessageBatch", queue, e)
        ),
    }
}
