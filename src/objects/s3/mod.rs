//! The S3 backend (aws-sdk-s3; any S3-protocol server). Metadata travels as
//! user metadata (`x-amz-meta-original-size`, `-original-sha256`,
//! `-encoding`), so the file is hashed in a first pass before its bytes are
//! sent (that pass runs beside the encoder, which fills the first part
//! meanwhile). Credentials come from the SDK's provider chain and are never
//! logged.
//!
//! The store is here; beside it, `multipart` streams a large file in parts,
//! `lifecycle` keeps the bucket's rule for archived objects, and `wire`
//! holds the metadata mapping and the error classes all three share. None
//! of them knows the store: each takes the client and the bucket.

mod lifecycle;
mod multipart;
mod wire;

use crate::error::{Error, Result};
use crate::objects::encode;
use crate::objects::key::{check_key, check_key_name};
use crate::objects::restore;
use crate::objects::source::Source;
use crate::objects::store::{Compression, ObjectMeta, ObjectStore, Original, Stored, verify};
use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use std::path::Path;
use std::time::Duration;
use wire::{from_metadata, sdk_error, to_metadata};

/// Objects in one S3 bucket.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
}

impl std::fmt::Debug for S3Store {
    // The client's configuration holds credentials: show the bucket only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// A store over `bucket` through an already configured client.
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        S3Store {
            client,
            bucket: bucket.into(),
        }
    }

    /// A store over `bucket` configured from the standard AWS environment and
    /// credential chain. An endpoint override (`AWS_ENDPOINT_URL`,
    /// `AWS_ENDPOINT_URL_S3` or a profile's `endpoint_url`) turns on
    /// path-style addressing; the region defaults to `us-east-1`.
    pub async fn from_env(bucket: &str) -> Result<Self> {
        if bucket.is_empty() {
            return Err(Error::config("REPORTS_ARCHIVE_BUCKET", "is empty"));
        }
        let region = RegionProviderChain::default_provider().or_else(Region::new("us-east-1"));
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .load()
            .await;
        let endpoint = shared.endpoint_url().map(str::to_owned).or_else(|| {
            std::env::var("AWS_ENDPOINT_URL_S3")
                .ok()
                .filter(|s| !s.is_empty())
        });
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(10))
            .operation_attempt_timeout(Duration::from_secs(300))
            .build();
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(endpoint.is_some())
            .timeout_config(timeouts)
            .build();
        tracing::info!(
            bucket,
            region = ?config.region().map(Region::as_ref),
            endpoint = endpoint.as_deref().unwrap_or("default"),
            "object store: S3"
        );
        Ok(S3Store::new(Client::from_conf(config), bucket))
    }

    async fn put_single(&self, key: &str, body: Bytes, meta: &ObjectMeta) -> Result<u64> {
        let sent = body.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(Some(to_metadata(meta)))
            .set_content_encoding(meta.encoding.content_encoding().map(str::to_owned))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| sdk_error("PutObject", key, e))?;
        Ok(sent)
    }

    /// Opens object `key` for reading, with its metadata, refused (before a
    /// byte is read) when it is missing, in an archive storage class,
    /// without the archiver's metadata, or disagreeing with `expected`.
    async fn get_checked(
        &self,
        key: &str,
        expected: Option<&Original>,
    ) -> Result<(
        std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
        ObjectMeta,
    )> {
        check_key(key)?;
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Err(Error::Refused(format!("no object {}", self.location(key))));
            }
            Err(e) if e.code() == Some("InvalidObjectState") => {
                return Err(self.in_archive_tier(key).await);
            }
            Err(e) => return Err(sdk_error("GetObject", key, e)),
        };
        let meta = out.metadata().and_then(from_metadata).ok_or_else(|| {
            Error::Refused(format!("{} has no archiver metadata", self.location(key)))
        })?;
        restore::check_expected(key, &meta, expected)?;
        let body: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> =
            Box::pin(out.body.into_async_read());
        Ok((body, meta))
    }

    /// Why an object cannot be read now: it sits in an archive storage
    /// class (Glacier, Deep Archive, an archive tier of Intelligent-Tiering)
    /// and must first be restored from it, which takes hours.
    async fn in_archive_tier(&self, key: &str) -> Error {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .ok();
        let class = head
            .as_ref()
            .and_then(|h| h.storage_class())
            .map_or_else(|| "an archive".to_owned(), |c| c.as_str().to_owned());
        let restoring = head
            .as_ref()
            .and_then(|h| h.restore())
            .is_some_and(|r| r.contains("ongoing-request=\"true\""));
        let state = if restoring {
            "a restore from the archive tier is in progress; run this again once it has finished"
                .to_owned()
        } else {
            format!(
                "restore it from the archive tier first (e.g. `aws s3api restore-object --bucket {} \
                 --key {key} --restore-request Days=7`), wait until `aws s3api head-object` no longer \
                 shows ongoing-request=\"true\", then run this again",
                self.bucket
            )
        };
        Error::InArchiveTier(format!(
            "{} is in the {class} storage class and cannot be read until it is restored: {state}",
            self.location(key)
        ))
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put_source(
        &self,
        file: &Source,
        key_base: &str,
        compression: Compression,
    ) -> Result<Stored> {
        let start = std::time::Instant::now();
        let encoding = encode::choose_encoding(file, compression).await?;
        let key = format!("{key_base}{}", encoding.suffix());
        check_key(&key)?;
        // The first pass (size and SHA-256, for the metadata) runs beside
        // the encoder, which fills the first part meanwhile.
        let hashing = encode::hash_file(file);
        let mut source = encode::encode_file(file, encoding).await?;
        let part_size = multipart::part_size(source.size_hint());
        let first = source.read_up_to(part_size).await?;
        tracing::debug!(%key, elapsed_ms = start.elapsed().as_millis(), "first part encoded");
        let (original_size, original_sha256) = hashing.finish().await?;
        tracing::debug!(%key, elapsed_ms = start.elapsed().as_millis(), "first pass hashed");
        let meta = ObjectMeta {
            original_size,
            original_sha256,
            encoding,
        };
        let sent = if first.len() < part_size {
            source.check_unchanged(&meta)?;
            self.put_single(&key, first, &meta).await?
        } else {
            multipart::upload(&self.client, &self.bucket, &key, first, &mut source, &meta).await?
        };
        tracing::debug!(%key, elapsed_ms = start.elapsed().as_millis(), "uploaded");
        verify(self.head(&key).await?, &key, sent, &meta)?;
        tracing::debug!(%key, elapsed_ms = start.elapsed().as_millis(), "verified");
        Ok(Stored {
            location: self.location(&key),
            key,
            stored_size: sent,
            meta,
        })
    }

    async fn head(&self, key: &str) -> Result<Option<(u64, ObjectMeta)>> {
        check_key(key)?;
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => return Ok(None),
            Err(e) => return Err(sdk_error("HeadObject", key, e)),
        };
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        Ok(out
            .metadata()
            .and_then(from_metadata)
            .map(|meta| (size, meta)))
    }

    async fn restore_checked(
        &self,
        key: &str,
        dest: &Path,
        expected: Option<&Original>,
    ) -> Result<u64> {
        let (body, meta) = self.get_checked(key, expected).await?;
        restore::restore_verified(body, key, &meta, dest).await
    }

    async fn verify_content(&self, key: &str, expected: Option<&Original>) -> Result<u64> {
        let (body, meta) = self.get_checked(key, expected).await?;
        restore::verify_decoded(body, key, &meta).await
    }

    async fn apply_lifecycle(
        &self,
        prefix: &str,
        glacier_days: i32,
        expire_days: i32,
        dry_run: bool,
    ) -> Result<String> {
        lifecycle::apply(
            &self.client,
            &self.bucket,
            prefix,
            glacier_days,
            expire_days,
            dry_run,
        )
        .await
    }

    async fn expiry_days(&self, prefix: &str) -> Result<Option<i32>> {
        lifecycle::expiry_days(&self.client, &self.bucket, prefix).await
    }

    async fn check(&self) -> Result<String> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => {}
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {
                return Err(Error::config(
                    "REPORTS_ARCHIVE_BUCKET",
                    format!(
                        "bucket {:?} does not exist (or these credentials cannot see it)",
                        self.bucket
                    ),
                ));
            }
            Err(e) => return Err(sdk_error("HeadBucket", &self.bucket, e)),
        }
        let key = check_key_name();
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .body(ByteStream::from_static(b"archiver check: safe to delete\n"))
            .send()
            .await
            .map_err(|e| sdk_error("PutObject", &key, e))?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| sdk_error("DeleteObject", &key, e))?;
        Ok(format!(
            "{}: the bucket exists; wrote and deleted {key}",
            self.location("")
        ))
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}
