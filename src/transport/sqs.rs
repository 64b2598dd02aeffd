//! AWS SQS (aws-sdk-sqs; any SQS-protocol server): a standard queue whose
//! redrive policy parks a message in `<name>-dead` after `delivery_limit`
//! receives, batched sends from the planner, and a consumer that long-polls
//! and keeps each message it holds invisible to other workers with a
//! heartbeat until the batch is settled.
//!
//! Standard queues deliver at least once (a duplicate can follow even a
//! delete): the ledger makes every delivery after the first a no-op.
//! Redriving the dead-letter queue is receive → send → delete, which works
//! where `StartMessageMoveTask` does not (SQS-compatible servers).
//!
//! Client, region and credentials come from the standard AWS environment;
//! every function takes the [`Client`] so that tests and tools can pass one
//! of their own ([`client_from_env`] builds the usual one).

mod consumer;
mod dead;
mod publisher;
mod queues;
mod target;

pub use consumer::{RECEIVE_LEASE, SqsConsumer};
pub use dead::{dead_messages, redrive_dead};
pub use publisher::SqsPublisher;
pub use queues::{QueueUrls, check_queues, ensure_queues, lookup_queues};

use crate::error::{Class, Error, Result};
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::{BehaviorVersion, Region};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, Message, MessageAttributeValue,
};
use std::time::Duration;
use target::parse_target;

/// Appended to the work queue's name to name its dead-letter queue.
const DEAD_SUFFIX: &str = "-dead";
/// The message attribute that carries a dead-letter reason.
pub const ERROR_ATTRIBUTE: &str = "archiver-error";
/// The message attribute that names the queue a parked message came from.
pub const QUEUE_ATTRIBUTE: &str = "archiver-queue";
/// SQS's limit on a visibility timeout (12 hours).
const MAX_VISIBILITY_SECS: u64 = 12 * 3600;

/// Where the queues are and how messages are held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsConfig {
    /// The work queue's name; `<name>-dead` is its dead-letter queue.
    pub name: String,
    /// Endpoint of an SQS-compatible server; `None`: the standard AWS
    /// environment decides (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_SQS`, or AWS).
    pub endpoint: Option<String>,
    /// Region named by the queue URL; `None`: the standard environment,
    /// else `us-east-1`.
    pub region: Option<String>,
    /// Receives after which SQS moves a message to the dead-letter queue
    /// (the redrive policy's `maxReceiveCount`).
    pub delivery_limit: u32,
    /// How long a received message is hidden from other consumers; a
    /// heartbeat renews it every third of this while its batch runs.
    pub visibility_timeout: Duration,
    /// Long-polling wait of one receive (1 to 20 s). A stopping worker
    /// waits for its poll in flight to end (to hand back what it gets), so
    /// this bounds how long stopping takes beyond the batches in flight.
    pub wait_time: Duration,
}

impl SqsConfig {
    /// A configuration for a queue given as an SQS queue URL
    /// (`https://sqs.<region>.amazonaws.com/<account>/<name>`, or
    /// `http(s)://host:port/<account>/<name>` for an SQS-compatible server,
    /// which then becomes the endpoint), as `sqs://<name>`, or as a bare
    /// name. Errors name `QUEUE_URL`.
    pub fn new(queue_url_or_name: &str, delivery_limit: u32) -> Result<Self> {
        let target = parse_target(queue_url_or_name.trim())?;
        if !(1..=1000).contains(&delivery_limit) {
            return Err(Error::config(
                "ARCHIVER_DELIVERY_LIMIT",
                format!("{delivery_limit}: SQS allows a maxReceiveCount of 1 to 1000"),
            ));
        }
        Ok(SqsConfig {
            name: target.name,
            endpoint: target.endpoint,
            region: target.region,
            delivery_limit,
            visibility_timeout: Duration::from_secs(60),
            wait_time: Duration::from_secs(10),
        })
    }

    /// The dead-letter queue's name.
    pub fn dead_name(&self) -> String {
        format!("{}{DEAD_SUFFIX}", self.name)
    }

    fn visibility_secs(&self) -> i32 {
        self.visibility_timeout
            .as_secs()
            .clamp(1, MAX_VISIBILITY_SECS) as i32
    }

    fn wait_secs(&self) -> i32 {
        // At least 1 s: an empty queue must not turn into a busy loop.
        self.wait_time.as_secs().clamp(1, 20) as i32
    }

    /// The visibility a receive asks for (see [`RECEIVE_LEASE`]).
    fn lease_secs(&self) -> i32 {
        self.visibility_secs().min(RECEIVE_LEASE.as_secs() as i32)
    }
}

/// A client configured from the standard AWS environment and credential
/// chain, with `cfg`'s endpoint and region when it names them.
pub async fn client_from_env(cfg: &SqsConfig) -> Client {
    let region = match &cfg.region {
        Some(r) => RegionProviderChain::first_try(Region::new(r.clone())),
        None => RegionProviderChain::default_provider(),
    }
    .or_else(Region::new("us-east-1"));
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .load()
        .await;
    let mut builder =
        aws_sdk_sqs::config::Builder::from(&shared).timeout_config(timeout_config(cfg));
    if let Some(endpoint) = &cfg.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    let config = builder.build();
    tracing::info!(
        queue = %cfg.name,
        region = ?config.region().map(Region::as_ref),
        endpoint = cfg.endpoint.as_deref().or(shared.endpoint_url()).unwrap_or("default"),
        "transport: SQS"
    );
    Client::from_conf(config)
}

/// The client's timeouts for `cfg`.
pub fn timeout_config(cfg: &SqsConfig) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        // Well beyond a receive's long poll: a receive abandoned by this
        // timeout may still take messages on the server (they come back
        // after the receive lease).
        .operation_attempt_timeout(Duration::from_secs(cfg.wait_secs() as u64 + 20))
        .build()
}

/// Maps an SDK failure: refused credentials or access, a missing queue and
/// invalid attributes are configuration errors (permanent); everything
/// else — connection trouble, timeouts, throttling, 5xx — is
/// [`Error::Broker`], which is transient.
fn sqs_error<E>(op: &str, queue: &str, e: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = match &e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        _ => None,
    };
    let code = e.code().map(str::to_owned);
    classify(
        code.as_deref(),
        status,
        format!("SQS {op} {queue}: {}", DisplayErrorContext(&e)),
    )
}

fn classify(code: Option<&str>, status: Option<u16>, what: String) -> Error {
    const DENIED: &[&str] = &[
        "AccessDenied",
        "AccessDeniedException",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidSecurity",
        "MissingAuthenticationToken",
        "IncompleteSignature",
    ];
    match code {
        Some(c) if DENIED.contains(&c) || (status == Some(403) && !c.contains("Throttl")) => {
            Error::config(
                "QUEUE_URL",
                format!("access denied (check the AWS credentials and the queue policy): {what}"),
            )
        }
        Some(c) if is_missing_queue(c) => Error::config("QUEUE_URL", what),
        Some("InvalidAttributeName" | "InvalidAttributeValue" | "InvalidParameterValue") => {
            Error::config("QUEUE_URL", what)
        }
        _ => Error::Broker(what),
    }
}

fn is_missing_queue(code: &str) -> bool {
    matches!(
        code,
        "QueueDoesNotExist" | "AWS.SimpleQueueService.NonExistentQueue" | "NonExistentQueue"
    )
}

/// Builds a string message attribute (SQS refuses empty values).
fn string_attribute(value: &str) -> MessageAttributeValue {
    let value = if value.is_empty() { "unknown" } else { value };
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("data type is set")
}

/// A reason as SQS accepts it: no control characters but tab and newline,
/// at most 1,000 characters.
fn attribute_text(reason: &str) -> String {
    reason
        .chars()
        .map(|c| {
            if c.is_control() && c != '\t' && c != '\n' {
                ' '
            } else {
                c
            }
        })
        .take(1000)
        .collect()
}

/// Receives up to `max` (≤ 10) messages with their dead-letter reason.
async fn receive(
    client: &Client,
    url: &str,
    queue: &str,
    max: usize,
    wait: i32,
    visibility: i32,
) -> Result<Vec<Message>> {
    let out = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max.clamp(1, 10) as i32)
        .wait_time_seconds(wait)
        .visibility_timeout(visibility)
        .message_attribute_names(ERROR_ATTRIBUTE)
        .message_system_attribute_names(
            aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
        )
        .send()
        .await
        .map_err(|e| sqs_error("ReceiveMessage", queue, e))?;
    Ok(out.messages.unwrap_or_default())
}

fn reason_of(m: &Message) -> Option<String> {
    m.message_attributes()
        .and_then(|a| a.get(ERROR_ATTRIBUTE))
        .and_then(|v| v.string_value())
        .map(str::to_owned)
}

/// Makes received messages visible again at once (best effort: they come
/// back by themselves when their visibility timeout ends).
async fn release_all(client: &Client, url: &str, queue: &str, receipts: &[String]) {
    for chunk in receipts.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, r)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(0)
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        let sent = client
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await;
        match sent {
            Ok(out) if out.failed.is_empty() => {}
            Ok(out) => tracing::warn!(
                queue,
                "{} message(s) stay invisible until their timeout ends",
                out.failed.len()
            ),
            Err(e) => tracing::warn!(
                "{}; the messages come back when their timeout ends",
                sqs_error("ChangeMessageVisibilityBatch", queue, e)
            ),
        }
    }
}

/// Transient SQS errors are worth a few quick tries in place.
fn transient(e: &Error) -> bool {
    e.class() != Class::Permanent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_the_delivery_limit() {
        let c = SqsConfig::new("sqs://q", 5).unwrap();
        assert_eq!(c.dead_name(), "q-dead");
        assert_eq!(c.visibility_timeout, Duration::from_secs(60));
        assert_eq!(c.wait_time, Duration::from_secs(10));
        assert_eq!(c.lease_secs(), 10);
        let short = SqsConfig {
            visibility_timeout: Duration::from_secs(2),
            ..c.clone()
        };
        assert_eq!(short.lease_secs(), 2);
        for bad in [0, 1001] {
            let e = SqsConfig::new("sqs://q", bad).unwrap_err().to_string();
            assert!(e.starts_with("ARCHIVER_DELIVERY_LIMIT: "), "{e}");
        }
    }

    #[test]
    fn failures_are_classified() {
        let class = |code, status| classify(code, status, String::new()).class();
        assert_eq!(class(Some("AccessDenied"), Some(403)), Class::Permanent);
        assert_eq!(
            class(Some("QueueDoesNotExist"), Some(400)),
            Class::Permanent
        );
        assert_eq!(
            class(Some("AWS.SimpleQueueService.NonExistentQueue"), Some(400)),
            Class::Permanent
        );
        assert_eq!(class(Some("RequestThrottled"), Some(400)), Class::Transient);
        assert_eq!(
            class(Some("ThrottlingException"), Some(400)),
            Class::Transient
        );
        assert_eq!(class(Some("InternalError"), Some(500)), Class::Transient);
        assert_eq!(class(None, None), Class::Transient);
    }

    #[test]
    fn reasons_fit_in_an_attribute() {
        assert_eq!(attribute_text("a\u{0}b\nc"), "a b\nc");
        assert_eq!(attribute_text(&"x".repeat(5000)).len(), 1000);
    }
}
