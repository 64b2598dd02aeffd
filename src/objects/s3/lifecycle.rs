//! The bucket lifecycle rule for archived objects (S3 only): applying it
//! reads the bucket's rules, replaces only the archiver's own (found by its
//! ID), and checks what it reads back. The rule itself is built, merged and
//! compared without a server, and unit-tested that way.

use super::wire::sdk_error;
use crate::error::{Error, Result};
use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::types::{
    AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, ExpirationStatus,
    LifecycleExpiration, LifecycleRule, LifecycleRuleFilter, Transition, TransitionStorageClass,
};

/// Multipart uploads abandoned by a crash are cleaned up after this many days.
const ABORT_INCOMPLETE_DAYS: i32 = 7;

/// `ObjectStore::apply_lifecycle` on `bucket`: idempotently puts the rule
/// for `prefix` (unless `dry_run`), keeping the bucket's other rules, and
/// verifies it by reading it back. Returns the one-line report.
pub(super) async fn apply(
    client: &Client,
    bucket: &str,
    prefix: &str,
    glacier_days: i32,
    expire_days: i32,
    dry_run: bool,
) -> Result<String> {
    let wanted = Wanted::new(prefix, glacier_days, expire_days)?;
    let desired = describe(&wanted.rule()?);
    let current = read_rules(client, bucket).await?;
    let before = wanted.find(&current).map(describe);
    let target = format!("lifecycle rule {} on s3://{bucket}", wanted.id());
    if before.as_deref() == Some(desired.as_str()) {
        return Ok(format!(
            "{target}: already in place ({desired}); nothing to change"
        ));
    }
    let before = before.unwrap_or_else(|| "none".into());
    if dry_run {
        return Ok(format!(
            "dry run: {target}: would change [{before}] to [{desired}]"
        ));
    }
    write_rules(client, bucket, merged(&current, &wanted)?).await?;
    let read_back = read_rules(client, bucket).await?;
    match wanted.find(&read_back).map(describe) {
        Some(after) if after == desired => {
            Ok(format!("{target}: applied [{desired}] (was [{before}])"))
        }
        after => Err(Error::Storage(format!(
            "{target}: read back [{}] after applying [{desired}]",
            after.unwrap_or_else(|| "none".into())
        ))),
    }
}

/// After how many days a lifecycle rule of `bucket` deletes objects under
/// `prefix`: the shortest expiry of its enabled rules that cover every key
/// there (a prefix filter that `prefix` starts with, no other condition);
/// `None` when no rule expires them.
#[allow(deprecated)]
pub(super) async fn expiry_days(
    client: &Client,
    bucket: &str,
    prefix: &str,
) -> Result<Option<i32>> {
    let rules = read_rules(client, bucket).await?;
    Ok(rules
        .iter()
        .filter(|r| r.status() == &ExpirationStatus::Enabled)
        .filter(|r| {
            let filter = r.filter();
            let only_prefix = filter.is_none_or(|f| {
                f.tag().is_none()
                    && f.and().is_none()
                    && f.object_size_greater_than().is_none()
                    && f.object_size_less_than().is_none()
            });
            let covers = filter
                .and_then(|f| f.prefix())
                .or(r.prefix())
                .is_none_or(|p| prefix.starts_with(p));
            only_prefix && covers
        })
        .filter_map(|r| r.expiration().and_then(|e| e.days()))
        .min())
}

/// The bucket's lifecycle rules; none if it has no lifecycle configuration.
async fn read_rules(client: &Client, bucket: &str) -> Result<Vec<LifecycleRule>> {
    match client
        .get_bucket_lifecycle_configuration()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(out) => Ok(out.rules.unwrap_or_default()),
        Err(e) if e.code() == Some("NoSuchLifecycleConfiguration") => Ok(Vec::new()),
        Err(e) => Err(sdk_error("GetBucketLifecycleConfiguration", bucket, e)),
    }
}

/// Replaces the bucket's lifecycle configuration with `rules`.
async fn write_rules(client: &Client, bucket: &str, rules: Vec<LifecycleRule>) -> Result<()> {
    let config = BucketLifecycleConfiguration::builder()
        .set_rules(Some(rules))
        .build()
        .map_err(|e| Error::Refused(format!("lifecycle configuration: {e}")))?;
    client
        .put_bucket_lifecycle_configuration()
        .bucket(bucket)
        .lifecycle_configuration(config)
        .send()
        .await
        .map_err(|e| sdk_error("PutBucketLifecycleConfiguration", bucket, e))?;
    Ok(())
}

/// The rule the archiver wants on one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    /// Key prefix, ending in `/`.
    prefix: String,
    /// Days after creation when objects move to GLACIER.
    glacier_days: i32,
    /// Days after creation when objects are deleted.
    expire_days: i32,
}

impl Wanted {
    /// Validates the days (S3 wants expiry after the transition) and
    /// normalises the prefix to end in `/`.
    fn new(prefix: &str, glacier_days: i32, expire_days: i32) -> Result<Self> {
        if glacier_days < 0 || expire_days <= glacier_days {
            return Err(Error::Refused(format!(
                "lifecycle: need 0 <= glacier days < expiry days, got {glacier_days} and {expire_days}"
            )));
        }
        let mut prefix = prefix.trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Wanted {
            prefix,
            glacier_days,
            expire_days,
        })
    }

    /// The rule's ID: one per prefix, so reapplying replaces rather than adds.
    fn id(&self) -> String {
        format!("archiver:{}", self.prefix)
    }

    /// The rule as the SDK sends it.
    fn rule(&self) -> Result<LifecycleRule> {
        LifecycleRule::builder()
            .id(self.id())
            .filter(LifecycleRuleFilter::builder().prefix(&self.prefix).build())
            .status(ExpirationStatus::Enabled)
            .transitions(
                Transition::builder()
                    .days(self.glacier_days)
                    .storage_class(TransitionStorageClass::Glacier)
                    .build(),
            )
            .expiration(
                LifecycleExpiration::builder()
                    .days(self.expire_days)
                    .build(),
            )
            .abort_incomplete_multipart_upload(
                AbortIncompleteMultipartUpload::builder()
                    .days_after_initiation(ABORT_INCOMPLETE_DAYS)
                    .build(),
            )
            .build()
            .map_err(|e| Error::Refused(format!("lifecycle rule: {e}")))
    }

    /// The archiver's rule among `rules`, if there.
    fn find<'a>(&self, rules: &'a [LifecycleRule]) -> Option<&'a LifecycleRule> {
        let id = self.id();
        rules.iter().find(|r| r.id() == Some(id.as_str()))
    }
}

/// A one-line, order-independent description of a rule: two rules with the
/// same description have the same effect, whichever way the server spells
/// them (filter prefix or the legacy top-level prefix, which older servers
/// still return).
#[allow(deprecated)]
fn describe(rule: &LifecycleRule) -> String {
    let prefix = rule
        .filter()
        .and_then(|f| f.prefix())
        .or(rule.prefix())
        .unwrap_or("");
    let other_filter = rule.filter().is_some_and(|f| {
        f.tag().is_some() || f.and().is_some() || f.object_size_greater_than().is_some()
    });
    let mut transitions: Vec<String> = rule
        .transitions()
        .iter()
        .map(|t| {
            let class = t.storage_class().map(|c| c.as_str()).unwrap_or("?");
            format!("{class} after {}d", t.days().unwrap_or(-1))
        })
        .collect();
    transitions.sort();
    let expire = rule.expiration().and_then(|e| e.days());
    let abort = rule
        .abort_incomplete_multipart_upload()
        .and_then(|a| a.days_after_initiation());
    let mut text = format!(
        "prefix {prefix:?} {}, transition [{}], expire after {}, abort incomplete uploads after {}",
        rule.status().as_str(),
        transitions.join(", "),
        days(expire),
        days(abort),
    );
    if other_filter
        || !rule.noncurrent_version_transitions().is_empty()
        || rule.noncurrent_version_expiration().is_some()
    {
        text.push_str(" (plus other conditions)");
    }
    text
}

fn days(d: Option<i32>) -> String {
    d.map_or_else(|| "never".into(), |d| format!("{d}d"))
}

/// The bucket's rules with the archiver's replaced by (or extended with) `rule`.
fn merged(current: &[LifecycleRule], wanted: &Wanted) -> Result<Vec<LifecycleRule>> {
    let id = wanted.id();
    let mut rules: Vec<LifecycleRule> = current
        .iter()
        .filter(|r| r.id() != Some(id.as_str()))
        .cloned()
        .collect();
    rules.push(wanted.rule()?);
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_validated_and_described() {
        assert!(Wanted::new("archived-reports/", 90, 90).is_err());
        assert!(Wanted::new("archived-reports/", -1, 90).is_err());
        let wanted = Wanted::new("archived-reports", 90, 1095).unwrap();
        assert_eq!(wanted.prefix, "archived-reports/");
        assert_eq!(wanted.id(), "archiver:archived-reports/");
        assert_eq!(
            describe(&wanted.rule().unwrap()),
            "prefix \"archived-reports/\" Enabled, transition [GLACIER after 90d], \
             expire after 1095d, abort incomplete uploads after 7d"
        );
    }

    #[test]
    fn merging_keeps_other_rules_and_replaces_ours() {
        let other = LifecycleRule::builder()
            .id("someone-else")
            .filter(LifecycleRuleFilter::builder().prefix("tmp/").build())
            .status(ExpirationStatus::Enabled)
            .expiration(LifecycleExpiration::builder().days(1).build())
            .build()
            .unwrap();
        let old = Wanted::new("archived-reports/", 30, 60).unwrap();
        let new = Wanted::new("archived-reports/", 90, 1095).unwrap();
        let rules = merged(&[other.clone(), old.rule().unwrap()], &new).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0], other);
        assert_eq!(
            describe(new.find(&rules).unwrap()),
            describe(&new.rule().unwrap())
        );
    }
}
