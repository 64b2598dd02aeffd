//! Which transport carries the batches, read once from `QUEUE_URL`: the
//! typed configuration [`QueueConfig`] that the transport's constructors
//! ([`super::publisher`], [`super::consumer`]) take. Nothing outside
//! `transport/` names a backend.

use super::amqp::AmqpConfig;
use super::sqs::SqsConfig;
use crate::config::redact;
use crate::error::{Error, Result};
use secrecy::{ExposeSecret, SecretString};

/// Where batches travel between planner and workers.
#[derive(Debug, Clone)]
pub enum QueueConfig {
    /// No broker: the planner executes its batches itself.
    Inline,
    /// RabbitMQ: a quorum queue with `<queue>.dlx` and `<queue>.dead`.
    Amqp(AmqpConfig),
    /// AWS SQS (or an SQS-compatible server), standard queue, with
    /// `<name>-dead`.
    Sqs(SqsConfig),
}

impl QueueConfig {
    /// Reads `QUEUE_URL` (unset or empty: inline): `amqp(s)://…` for
    /// RabbitMQ (the queue is `queue`); an SQS queue URL
    /// (`https://sqs.<region>.amazonaws.com/<account>/<name>`, or
    /// `http(s)://host:port/<account>/<name>` for an SQS-compatible server)
    /// or `sqs://<name>` for SQS (the URL names the queue).
    pub fn parse(url: Option<&str>, queue: &str, delivery_limit: u32) -> Result<Self> {
        let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(QueueConfig::Inline);
        };
        if queue.is_empty() || queue.len() > 200 {
            return Err(Error::config(
                "ARCHIVER_QUEUE",
                "must be 1 to 200 characters",
            ));
        }
        if delivery_limit == 0 {
            return Err(Error::config(
                "ARCHIVER_DELIVERY_LIMIT",
                "must be at least 1",
            ));
        }
        // Never echo the URL: it may hold a password, with or without a
        // scheme in front of it.
        // The first entry's scheme (a list of nodes may start with an empty
        // entry, which `amqp_nodes` names).
        let first = url.trim_start_matches([',', ' ']);
        let Some((scheme, _)) = first.split_once("://") else {
            return Err(Error::config(
                "QUEUE_URL",
                "not a URL (no scheme://): expected amqp://user:pass@host:5672/vhost, an SQS queue URL or sqs://<name>",
            ));
        };
        let scheme = if scheme.len() <= 10
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+')
        {
            scheme
        } else {
            "(not shown)"
        };
        match scheme {
            "amqp" | "amqps" => {
                let nodes = amqp_nodes(url, scheme)?;
                Ok(QueueConfig::Amqp(AmqpConfig {
                    url: SecretString::from(nodes.join(",")),
                    queue: queue.to_string(),
                    delivery_limit,
                }))
            }
            "sqs" | "http" | "https" if url.contains(',') => Err(Error::config(
                "QUEUE_URL",
                "several URLs separated by commas are for RabbitMQ (amqp://) only: SQS takes one queue URL",
            )),
            "sqs" | "http" | "https" => Ok(QueueConfig::Sqs(SqsConfig::new(url, delivery_limit)?)),
            _ => Err(Error::config(
                "QUEUE_URL",
                format!(
                    "unsupported scheme {scheme:?}: expected amqp://, amqps://, an SQS queue URL or sqs:// (or unset for inline)"
                ),
            )),
        }
    }

    /// This configuration, when it names a broker; with none, an error
    /// naming `QUEUE_URL` for a process that needs one (a worker).
    pub fn broker(&self) -> Result<&Self> {
        match self {
            QueueConfig::Inline => Err(no_broker()),
            broker => Ok(broker),
        }
    }

    /// Short name recorded in `archive_jobs.transport`.
    pub fn name(&self) -> &'static str {
        match self {
            QueueConfig::Inline => "inline",
            QueueConfig::Amqp(_) => "amqp",
            QueueConfig::Sqs(_) => "sqs",
        }
    }

    /// The work queue's name, as operators see it in the broker (`inline`
    /// with no broker).
    pub fn queue_name(&self) -> &str {
        match self {
            QueueConfig::Inline => "inline",
            QueueConfig::Amqp(cfg) => &cfg.queue,
            QueueConfig::Sqs(cfg) => &cfg.name,
        }
    }
}

/// Entries of an AMQP `QUEUE_URL`: one URL, or the nodes of a cluster
/// separated by commas, each checked to be an AMQP URL of the same scheme
/// and virtual host as the first (the queues live in one vhost of one
/// cluster). Errors name the entry by its position, never its text. A comma
/// inside a password is written `%2C`.
fn amqp_nodes(url: &str, scheme: &str) -> Result<Vec<String>> {
    let entries: Vec<&str> = url.split(',').map(str::trim).collect();
    let n = entries.len();
    let which = |i: usize| {
        if n == 1 {
            String::new()
        } else {
            format!("entry {} of {n}: ", i + 1)
        }
    };
    let mut vhost = None;
    for (i, entry) in entries.iter().enumerate() {
        if entry.is_empty() {
            return Err(Error::config(
                "QUEUE_URL",
                format!(
                    "{}empty (a list is amqp://…,amqp://…, with no empty entry)",
                    which(i)
                ),
            ));
        }
        if entry.split_once("://").map(|(s, _)| s) != Some(scheme) {
            return Err(Error::config(
                "QUEUE_URL",
                format!(
                    "{}not an {scheme}:// URL: every entry of the list must be one, like the first (a comma in a password is written %2C)",
                    which(i)
                ),
            ));
        }
        let parsed = entry.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            Error::config(
                "QUEUE_URL",
                format!(
                    "{}not a valid AMQP URL: {}",
                    which(i),
                    redact(
                        &redact(&e.to_string(), url, "<QUEUE_URL>"),
                        entry,
                        "<entry>"
                    )
                ),
            )
        })?;
        match &vhost {
            None => vhost = Some(parsed.vhost),
            Some(first) if *first != parsed.vhost => {
                return Err(Error::config(
                    "QUEUE_URL",
                    format!(
                        "{}virtual host differs from entry 1's: the nodes of a list must serve the same vhost",
                        which(i)
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(entries.into_iter().map(str::to_string).collect())
}

/// The error of a process that needs a broker and was given none.
pub(super) fn no_broker() -> Error {
    Error::config(
        "QUEUE_URL",
        "not set: a worker consumes from a broker (amqp://… or an SQS queue URL); with no broker the planner runs batches itself",
    )
}

impl PartialEq for QueueConfig {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (QueueConfig::Inline, QueueConfig::Inline) => true,
            (QueueConfig::Amqp(a), QueueConfig::Amqp(b)) => {
                a.url.expose_secret() == b.url.expose_secret()
                    && a.queue == b.queue
                    && a.delivery_limit == b.delivery_limit
            }
            (QueueConfig::Sqs(a), QueueConfig::Sqs(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for QueueConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_url_errors_and_debug_never_show_the_password() {
        for bad in [
            "guest:hunter2@rabbit:5672",
            "guest:hunter2@rabbit:5672/%2f",
            "amqp://guest:hunter2@rabbit:notaport/%2f",
            "amqp://guest:hunter2@[::1/%2f",
            "kafka://guest:hunter2@rabbit",
            "user:hunter2@host://x",
            "https://guest:hunter2@example.com/not-a-queue",
            "hunter2",
        ] {
            let e = QueueConfig::parse(Some(bad), "q", 5)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("QUEUE_URL: "), "{bad}: {e}");
            assert!(!e.contains("hunter2"), "{bad}: {e}");
        }
        let q = QueueConfig::parse(Some("amqp://guest:hunter2@rabbit:5672/%2f"), "q", 5).unwrap();
        assert!(!format!("{q:?}").contains("hunter2"), "{q:?}");
        let cfg = AmqpConfig {
            url: "amqp://guest:hunter2@rabbit:5672/%2f".into(),
            queue: "q".into(),
            delivery_limit: 5,
        };
        assert!(!format!("{cfg:?}").contains("hunter2"), "{cfg:?}");
    }

    #[test]
    fn queue_url_may_list_a_clusters_nodes() {
        let list = " amqp://guest:hunter2@r1:5672/%2f , amqp://guest:hunter2@r2:5673/%2f,amqp://guest:hunter2@r3/%2f";
        let QueueConfig::Amqp(cfg) = QueueConfig::parse(Some(list), "q", 5).unwrap() else {
            panic!("not AMQP")
        };
        assert_eq!(
            cfg.url.expose_secret(),
            "amqp://guest:hunter2@r1:5672/%2f,amqp://guest:hunter2@r2:5673/%2f,amqp://guest:hunter2@r3/%2f"
        );
        assert_eq!(
            super::super::amqp::describe(&cfg),
            "amqp://guest@r1:5672, amqp://guest@r2:5673, amqp://guest@r3:5672 (3 nodes), vhost /"
        );
        // A comma in a password is percent-encoded.
        QueueConfig::parse(
            Some("amqp://guest:a%2Cb@r1/%2f,amqp://guest:a%2Cb@r2/%2f"),
            "q",
            5,
        )
        .unwrap();
    }

    #[test]
    fn a_bad_entry_of_a_list_is_named_by_its_position_never_shown() {
        for (bad, want) in [
            ("amqp://u:hunter2@r1/%2f,", "entry 2 of 2: empty"),
            (",amqp://u:hunter2@r1/%2f", "entry 1 of 2: empty"),
            (
                "amqp://u:hunter2@r1/%2f,,amqp://u:hunter2@r2/%2f",
                "entry 2 of 3: empty",
            ),
            (
                "amqp://u:hunter2@r1/%2f,sqs://jobs",
                "entry 2 of 2: not an amqp:// URL",
            ),
            (
                "amqp://u:hunter2@r1/%2f,amqps://u:hunter2@r2/%2f",
                "entry 2 of 2: not an amqp:// URL",
            ),
            (
                "amqp://u:hunter2@r1/%2f,u:hunter2@r2/%2f",
                "entry 2 of 2: not an amqp:// URL",
            ),
            // An unencoded comma in the password splits it.
            (
                "amqp://u:hun,ter2@r1/%2f",
                "entry 1 of 2: not a valid AMQP URL",
            ),
            (
                "amqp://u:hunter2@r1/%2f,amqp://u:hunter2@r2:notaport/%2f",
                "entry 2 of 2: not a valid AMQP URL",
            ),
            (
                "amqp://u:hunter2@r1/%2f,amqp://u:hunter2@r2/other",
                "entry 2 of 2: virtual host differs",
            ),
            // A heartbeat asked for in the URL (README: partitions) is
            // checked like the rest of it.
            (
                "amqp://u:hunter2@r1/%2f?heartbeat=abc",
                "not a valid AMQP URL",
            ),
            (
                "amqp://u:hunter2@r1/%2f?heartbeat=5,amqp://u:hunter2@r2/%2f?heartbeat=-1",
                "entry 2 of 2: not a valid AMQP URL",
            ),
            ("sqs://jobs,sqs://other", "for RabbitMQ (amqp://) only"),
            (
                "https://sqs.eu-west-1.amazonaws.com/1/a,https://u:hunter2@x/1/b",
                "for RabbitMQ (amqp://) only",
            ),
        ] {
            let e = QueueConfig::parse(Some(bad), "q", 5)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("QUEUE_URL: "), "{bad}: {e}");
            assert!(e.contains(want), "{bad}: {e}");
            assert!(!e.contains("hunter2") && !e.contains("ter2"), "{bad}: {e}");
        }
    }

    #[test]
    fn queue_url_selects_the_transport() {
        assert_eq!(
            QueueConfig::parse(None, "q", 5).unwrap(),
            QueueConfig::Inline
        );
        assert_eq!(
            QueueConfig::parse(Some(" "), "q", 5).unwrap(),
            QueueConfig::Inline
        );
        let amqp =
            QueueConfig::parse(Some("amqp://guest:guest@127.0.0.1:5672/%2f"), "q", 5).unwrap();
        assert_eq!(amqp.name(), "amqp");
        let e = QueueConfig::parse(Some("kafka://x"), "q", 5)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("QUEUE_URL: "), "{e}");
    }

    #[test]
    fn sqs_queue_urls_and_names_select_sqs() {
        let sqs = |q: QueueConfig| match q {
            QueueConfig::Sqs(cfg) => cfg,
            other => panic!("not SQS: {other:?}"),
        };
        let aws = "https://sqs.eu-west-1.amazonaws.com/123456789012/archiver-batches";
        let q = QueueConfig::parse(Some(aws), "archiver.batches", 5).unwrap();
        assert_eq!(q.name(), "sqs");
        assert_eq!(q.queue_name(), "archiver-batches");
        let cfg = sqs(q);
        assert_eq!(cfg, SqsConfig::new(aws, 5).unwrap());
        assert_eq!(cfg.region.as_deref(), Some("eu-west-1"));
        let local = "http://127.0.0.1:5000/123456789012/jobs";
        let cfg = sqs(QueueConfig::parse(Some(local), "q", 3).unwrap());
        assert_eq!(cfg.name, "jobs");
        assert_eq!(cfg.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(cfg.delivery_limit, 3);
        let q = QueueConfig::parse(Some("sqs://jobs"), "q", 5).unwrap();
        assert_eq!(q.name(), "sqs");
        let cfg = sqs(q);
        assert_eq!((cfg.name.as_str(), cfg.endpoint.as_deref()), ("jobs", None));
        assert_eq!(cfg.delivery_limit, 5);
    }

    #[test]
    fn bad_sqs_settings_name_the_setting() {
        for bad in [
            "sqs://",
            "sqs://a.fifo",
            "https://example.com/not-a-queue",
            "http://127.0.0.1:5000/1/bad.name",
        ] {
            let e = QueueConfig::parse(Some(bad), "q", 5)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("QUEUE_URL: "), "{bad}: {e}");
        }
        let e = QueueConfig::parse(Some("sqs://jobs"), "q", 1001)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ARCHIVER_DELIVERY_LIMIT: "), "{e}");
    }
}
