//! What `QUEUE_URL` names: an SQS queue URL, `sqs://<name>` or a bare
//! name, turned into the queue's name and, when the URL says so, the
//! endpoint and region to reach it.

use super::DEAD_SUFFIX;
use crate::error::{Error, Result};

/// SQS queue names are at most 80 characters, the suffix included.
const MAX_NAME: usize = 80 - DEAD_SUFFIX.len();

/// The queue a `QUEUE_URL` names.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) name: String,
    pub(super) endpoint: Option<String>,
    pub(super) region: Option<String>,
}

fn bad_url(reason: impl Into<String>) -> Error {
    Error::config("QUEUE_URL", reason)
}

/// Parses `sqs://<name>`, a bare name, or an SQS queue URL. Errors never
/// echo the URL (it might hold credentials by mistake).
pub(super) fn parse_target(s: &str) -> Result<Target> {
    if let Some(name) = s.strip_prefix("sqs://") {
        return named(name, None, None);
    }
    if !s.contains("://") {
        return named(s, None, None);
    }
    let url = url::Url::parse(s).map_err(|e| bad_url(format!("not a valid SQS queue URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad_url(format!(
            "unsupported scheme {:?} for SQS: expected https://, http:// or sqs://",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad_url(
            "an SQS queue URL holds no credentials: they come from the AWS credential chain",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad_url("an SQS queue URL has no query or fragment"));
    }
    let segments: Vec<&str> = url
        .path_segments()
        .map(Iterator::collect)
        .unwrap_or_default();
    let [account, name] = segments[..] else {
        return Err(bad_url(
            "expected an SQS queue URL, https://sqs.<region>.amazonaws.com/<account>/<queue name>",
        ));
    };
    if account.is_empty() {
        return Err(bad_url("the SQS queue URL has no account segment"));
    }
    let host = url
        .host_str()
        .ok_or_else(|| bad_url("the SQS queue URL has no host"))?
        .to_ascii_lowercase();
    match standard_aws_region(&host) {
        Some(region) => {
            if url.scheme() != "https" || !account.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad_url(
                    "an AWS queue URL is https://sqs.<region>.amazonaws.com/<12-digit account>/<queue name>",
                ));
            }
            named(name, None, Some(region))
        }
        // Any other host is an endpoint of its own: an SQS-compatible
        // server, or a FIPS, dual-stack or VPC endpoint of AWS.
        None => named(
            name,
            Some(url.origin().ascii_serialization()),
            embedded_region(&host),
        ),
    }
}

/// The region of a standard SQS endpoint host, whose endpoint the SDK
/// derives from the region itself.
fn standard_aws_region(host: &str) -> Option<String> {
    if host == "queue.amazonaws.com" {
        return Some("us-east-1".into());
    }
    let region = host
        .strip_prefix("sqs.")
        .and_then(|h| {
            h.strip_suffix(".amazonaws.com")
                .or_else(|| h.strip_suffix(".amazonaws.com.cn"))
        })
        .or_else(|| host.strip_suffix(".queue.amazonaws.com"))?;
    is_region(region).then(|| region.to_string())
}

/// A region spelled inside another endpoint's host (`sqs-fips.<region>.…`).
fn embedded_region(host: &str) -> Option<String> {
    let mut labels = host.split('.');
    let first = labels.next()?;
    let second = labels.next()?;
    (matches!(first, "sqs" | "sqs-fips") && is_region(second)).then(|| second.to_string())
}

fn is_region(s: &str) -> bool {
    s.len() >= 4
        && s.contains('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn named(name: &str, endpoint: Option<String>, region: Option<String>) -> Result<Target> {
    if name.ends_with(".fifo") {
        return Err(bad_url(format!(
            "{name} is a FIFO queue; the archiver uses a standard queue"
        )));
    }
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if name.is_empty() || name.len() > MAX_NAME || !valid {
        return Err(bad_url(format!(
            "SQS queue name {name:?}: must be 1 to {MAX_NAME} letters, digits, '-' or '_' \
             ({DEAD_SUFFIX:?} is appended for the dead-letter queue)"
        )));
    }
    Ok(Target {
        name: name.to_string(),
        endpoint,
        region,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        parse_target(s).unwrap()
    }

    #[test]
    fn aws_queue_urls_name_the_queue_and_the_region() {
        let t = target("https://sqs.eu-west-1.amazonaws.com/123456789012/archiver-batches");
        assert_eq!(t.name, "archiver-batches");
        assert_eq!(t.region.as_deref(), Some("eu-west-1"));
        assert_eq!(t.endpoint, None);
        let t = target("https://queue.amazonaws.com/123456789012/q");
        assert_eq!(t.region.as_deref(), Some("us-east-1"));
        let t = target("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q");
        assert_eq!(t.region.as_deref(), Some("cn-north-1"));
        let t = target("https://us-west-2.queue.amazonaws.com/123456789012/q");
        assert_eq!(t.region.as_deref(), Some("us-west-2"));
    }

    #[test]
    fn other_hosts_become_the_endpoint() {
        let t = target("http://127.0.0.1:5000/123456789012/test-q");
        assert_eq!(t.name, "test-q");
        assert_eq!(t.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(t.region, None);
        let t = target("https://sqs-fips.us-gov-west-1.amazonaws.com/123456789012/q");
        assert_eq!(
            t.endpoint.as_deref(),
            Some("https://sqs-fips.us-gov-west-1.amazonaws.com")
        );
        assert_eq!(t.region.as_deref(), Some("us-gov-west-1"));
        let t = target("http://localhost:9324/queue/q_1");
        assert_eq!(t.endpoint.as_deref(), Some("http://localhost:9324"));
    }

    #[test]
    fn names_stand_alone_or_after_sqs_scheme() {
        assert_eq!(target("sqs://archiver-batches").name, "archiver-batches");
        assert_eq!(target("archiver_batches").name, "archiver_batches");
        assert_eq!(target("sqs://q").endpoint, None);
    }

    #[test]
    fn bad_targets_name_the_variable_and_say_why() {
        for (bad, why) in [
            ("sqs://", "must be 1 to 75"),
            ("sqs://has.dot", "must be 1 to 75"),
            ("sqs://jobs.fifo", "FIFO"),
            ("http://127.0.0.1:5000/q", "expected an SQS queue URL"),
            ("http://127.0.0.1:5000/1/2/3", "expected an SQS queue URL"),
            ("http://u:hunter2@127.0.0.1:5000/1/q", "no credentials"),
            ("http://h/1/q?x=1", "no query"),
            (
                "http://sqs.us-east-1.amazonaws.com/123456789012/q",
                "https://",
            ),
            ("https://sqs.us-east-1.amazonaws.com/acct/q", "12-digit"),
            ("ftp://h/1/q", "unsupported scheme"),
        ] {
            let e = parse_target(bad).unwrap_err().to_string();
            assert!(e.starts_with("QUEUE_URL: "), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let long = format!("sqs://{}", "a".repeat(76));
        assert!(parse_target(&long).is_err());
        assert!(parse_target(&format!("sqs://{}", "a".repeat(75))).is_ok());
    }
}
