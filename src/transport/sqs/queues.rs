//! Creating the work queue and its dead-letter queue, or finding them.

use super::{SqsConfig, is_missing_queue, sqs_error};
use crate::error::{Error, Result};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::QueueAttributeName;
use std::collections::HashMap;

/// How long a message stays in the work queue (4 days).
const WORK_RETENTION_SECS: u32 = 4 * 24 * 3600;
/// How long a parked message stays (14 days, the SQS maximum). It must
/// exceed the work queue's: a message keeps its first enqueue time.
const DEAD_RETENTION_SECS: u32 = 14 * 24 * 3600;

/// The URLs of a work queue and its dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueUrls {
    /// The work queue.
    pub work: String,
    /// The dead-letter queue.
    pub dead: String,
}

/// Creates the dead-letter queue and the work queue with its redrive
/// policy, or brings existing ones to these settings (idempotent; SQS,
/// unlike RabbitMQ, lets attributes change).
pub async fn ensure_queues(client: &Client, cfg: &SqsConfig) -> Result<QueueUrls> {
    let dead_name = cfg.dead_name();
    let dead = ensure_queue(
        client,
        &dead_name,
        HashMap::from([(
            QueueAttributeName::MessageRetentionPeriod,
            DEAD_RETENTION_SECS.to_string(),
        )]),
    )
    .await?;
    let dead_arn = client
        .get_queue_attributes()
        .queue_url(&dead)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| sqs_error("GetQueueAttributes", &dead_name, e))?
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .ok_or_else(|| Error::Broker(format!("SQS queue {dead_name} has no ARN")))?;
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dead_arn,
        "maxReceiveCount": cfg.delivery_limit,
    });
    let work = ensure_queue(
        client,
        &cfg.name,
        HashMap::from([
            (
                QueueAttributeName::MessageRetentionPeriod,
                WORK_RETENTION_SECS.to_string(),
            ),
            (QueueAttributeName::RedrivePolicy, redrive.to_string()),
        ]),
    )
    .await?;
    Ok(QueueUrls { work, dead })
}

/// The queues' URLs if both exist (creates nothing: for read-only tools).
pub async fn lookup_queues(client: &Client, cfg: &SqsConfig) -> Result<Option<QueueUrls>> {
    let mut urls = Vec::new();
    for name in [cfg.name.clone(), cfg.dead_name()] {
        match client.get_queue_url().queue_name(&name).send().await {
            Ok(out) => urls.extend(out.queue_url),
            Err(e) if e.code().is_some_and(is_missing_queue) => return Ok(None),
            Err(e) => return Err(sqs_error("GetQueueUrl", &name, e)),
        }
    }
    match <[String; 2]>::try_from(urls) {
        Ok([work, dead]) => Ok(Some(QueueUrls { work, dead })),
        Err(_) => Err(Error::Broker(format!(
            "SQS GetQueueUrl {}: no queue URL in the reply",
            cfg.name
        ))),
    }
}

async fn ensure_queue(
    client: &Client,
    name: &str,
    wanted: HashMap<QueueAttributeName, String>,
) -> Result<String> {
    let created = client
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(wanted.clone()))
        .send()
        .await;
    match created {
        Ok(out) => {
            return out
                .queue_url
                .ok_or_else(|| Error::Broker(format!("SQS CreateQueue {name}: no queue URL")));
        }
        Err(e) if matches!(e.code(), Some("QueueNameExists" | "QueueAlreadyExists")) => {}
        Err(e) => return Err(sqs_error("CreateQueue", name, e)),
    }
    // It exists with other attributes: converge them.
    let url = client
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| sqs_error("GetQueueUrl", name, e))?
        .queue_url
        .ok_or_else(|| Error::Broker(format!("SQS GetQueueUrl {name}: no queue URL")))?;
    let current = client
        .get_queue_attributes()
        .queue_url(&url)
        .set_attribute_names(Some(wanted.keys().cloned().collect()))
        .send()
        .await
        .map_err(|e| sqs_error("GetQueueAttributes", name, e))?
        .attributes
        .unwrap_or_default();
    let changed: HashMap<_, _> = wanted
        .into_iter()
        .filter(|(k, v)| !same_attribute(k, current.get(k).map(String::as_str), v))
        .collect();
    if !changed.is_empty() {
        let names: Vec<&str> = changed.keys().map(QueueAttributeName::as_str).collect();
        tracing::info!(queue = name, "updating SQS queue attributes {names:?}");
        client
            .set_queue_attributes()
            .queue_url(&url)
            .set_attributes(Some(changed))
            .send()
            .await
            .map_err(|e| sqs_error("SetQueueAttributes", name, e))?;
    }
    Ok(url)
}

/// Equal attribute values; a redrive policy's `maxReceiveCount` may come
/// back as a number or a string.
fn same_attribute(name: &QueueAttributeName, current: Option<&str>, wanted: &str) -> bool {
    let Some(current) = current else {
        return false;
    };
    if *name != QueueAttributeName::RedrivePolicy {
        return current == wanted;
    }
    redrive_policy(current).is_some_and(|c| Some(c) == redrive_policy(wanted))
}

/// A redrive policy's (dead-letter target ARN, `maxReceiveCount`); the
/// count may come back as a number or a string.
fn redrive_policy(s: &str) -> Option<(String, u64)> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    let count = match &v["maxReceiveCount"] {
        serde_json::Value::String(s) => s.parse::<u64>().ok()?,
        n => n.as_u64()?,
    };
    Some((v["deadLetterTargetArn"].as_str()?.to_string(), count))
}

/// Checks, read-only, that the work queue and its dead-letter queue exist
/// and that the work queue's redrive policy parks a message in that
/// dead-letter queue after `delivery_limit` receives. Read-only on purpose:
/// [`ensure_queues`] (what the planner and workers run at start) converges
/// attributes silently, so running it here would hide the very mismatch a
/// check is for. Returns what it found.
pub async fn check_queues(client: &Client, cfg: &SqsConfig) -> Result<String> {
    let Some(urls) = lookup_queues(client, cfg).await? else {
        return Err(Error::config(
            "QUEUE_URL",
            format!(
                "SQS queue {} or {} does not exist: the planner creates both on its first run, a worker at start",
                cfg.name,
                cfg.dead_name()
            ),
        ));
    };
    let attributes = |url: &str, queue: &str, names: Vec<QueueAttributeName>| {
        let (url, queue) = (url.to_string(), queue.to_string());
        async move {
            client
                .get_queue_attributes()
                .queue_url(&url)
                .set_attribute_names(Some(names))
                .send()
                .await
                .map_err(|e| sqs_error("GetQueueAttributes", &queue, e))
                .map(|out| out.attributes.unwrap_or_default())
        }
    };
    let waiting = QueueAttributeName::ApproximateNumberOfMessages;
    let dead_name = cfg.dead_name();
    let mut dead = attributes(
        &urls.dead,
        &dead_name,
        vec![QueueAttributeName::QueueArn, waiting.clone()],
    )
    .await?;
    let mut work = attributes(
        &urls.work,
        &cfg.name,
        vec![QueueAttributeName::RedrivePolicy, waiting.clone()],
    )
    .await?;
    let dead_arn = dead
        .remove(&QueueAttributeName::QueueArn)
        .ok_or_else(|| Error::Broker(format!("SQS queue {dead_name} has no ARN")))?;
    let policy = work.remove(&QueueAttributeName::RedrivePolicy);
    check_redrive(cfg, policy.as_deref(), dead_arn)?;
    let count = |a: &HashMap<QueueAttributeName, String>| {
        a.get(&waiting).cloned().unwrap_or_else(|| "?".into())
    };
    Ok(format!(
        "SQS queue {} and {dead_name} exist, redrive after {} receives (checked read-only); {} waiting, {} dead",
        cfg.name,
        cfg.delivery_limit,
        count(&work),
        count(&dead)
    ))
}

/// The work queue's redrive policy parks in `dead_arn` after the delivery
/// limit; a configuration error saying what it does otherwise.
fn check_redrive(cfg: &SqsConfig, policy: Option<&str>, dead_arn: String) -> Result<()> {
    let expected = (dead_arn, u64::from(cfg.delivery_limit));
    let shown = match policy.map(redrive_policy) {
        Some(Some(found)) if found == expected => return Ok(()),
        None => "none".to_string(),
        Some(None) => "unreadable".to_string(),
        Some(Some((arn, count))) => format!("to {arn} after {count} receives"),
    };
    Err(Error::config(
        "QUEUE_URL",
        format!(
            "SQS queue {}: redrive policy {shown}, expected to {} after {} receives (ARCHIVER_DELIVERY_LIMIT); the planner's next run or a starting worker sets it",
            cfg.name, expected.0, expected.1
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redrive_policy_is_checked_against_the_delivery_limit() {
        let cfg = SqsConfig::new("sqs://q", 5).unwrap();
        let arn = "arn:aws:sqs:us-east-1:1:q-dead";
        let five = format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"5"}}"#);
        assert!(check_redrive(&cfg, Some(&five), arn.into()).is_ok());
        let three = five.replace('5', "3");
        let e = check_redrive(&cfg, Some(&three), arn.into())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("QUEUE_URL: ") && e.contains("after 3 receives"),
            "{e}"
        );
        let e = check_redrive(&cfg, None, arn.into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("redrive policy none"), "{e}");
        let e = check_redrive(&cfg, Some("{"), arn.into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unreadable"), "{e}");
    }

    #[test]
    fn redrive_policies_compare_by_meaning() {
        let rp = QueueAttributeName::RedrivePolicy;
        let wanted =
            r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:1:q-dead","maxReceiveCount":5}"#;
        let same =
            r#"{"maxReceiveCount":"5","deadLetterTargetArn":"arn:aws:sqs:us-east-1:1:q-dead"}"#;
        let other =
            r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:1:q-dead","maxReceiveCount":3}"#;
        assert!(same_attribute(&rp, Some(same), wanted));
        assert!(!same_attribute(&rp, Some(other), wanted));
        assert!(!same_attribute(&rp, None, wanted));
        let ret = QueueAttributeName::MessageRetentionPeriod;
        assert!(same_attribute(&ret, Some("345600"), "345600"));
    }
}
