//! The object store archived report files go to: one small trait, two
//! backends — S3 ([`s3`], any S3-protocol server) and a local directory
//! ([`local`], the embedded default) — with the same key layout.
//!
//! A file is streamed through a compressor (zstd by default, gzip on
//! request; stored as it is when a sample shows it does not shrink) with
//! bounded memory, and stored with its original size, SHA-256 and encoding
//! as metadata. Keys are deterministic, so a retried upload overwrites the
//! same object. A restore decodes and verifies against that metadata.

mod compress;
pub mod local;
pub mod s3;
pub mod source;

use crate::{Error, Result};
use async_trait::async_trait;
use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::str::FromStr;
use uuid::Uuid;

pub use local::LocalStore;
pub use s3::S3Store;
pub use source::Source;

/// The prefix every archived report's key starts with.
pub const REPORTS_PREFIX: &str = "archived-reports/";

/// The codec an operator asks for; [`Encoding`] is what was actually stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// zstd, level 3: fast, and the default.
    #[default]
    Zstd,
    /// gzip, level 6: slower, readable by anything.
    Gzip,
}

impl FromStr for Compression {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "zstd" => Ok(Compression::Zstd),
            "gzip" => Ok(Compression::Gzip),
            _ => Err(Error::Refused(format!(
                "unknown compression {s:?}: expected zstd or gzip"
            ))),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Encoding::from(*self).as_str())
    }
}

/// How an object's bytes relate to the original file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// A zstd frame.
    Zstd,
    /// A gzip member.
    Gzip,
    /// The file's bytes as they are (it did not compress).
    Identity,
}

impl Encoding {
    /// What the object key gets appended: `.zst`, `.gz` or nothing.
    pub fn suffix(self) -> &'static str {
        match self {
            Encoding::Zstd => ".zst",
            Encoding::Gzip => ".gz",
            Encoding::Identity => "",
        }
    }

    /// The HTTP `Content-Encoding` of the object, if compressed.
    pub fn content_encoding(self) -> Option<&'static str> {
        match self {
            Encoding::Zstd => Some("zstd"),
            Encoding::Gzip => Some("gzip"),
            Encoding::Identity => None,
        }
    }

    /// The name recorded in metadata: `zstd`, `gzip` or `identity`.
    pub fn as_str(self) -> &'static str {
        self.content_encoding().unwrap_or("identity")
    }
}

impl From<Compression> for Encoding {
    fn from(c: Compression) -> Self {
        match c {
            Compression::Zstd => Encoding::Zstd,
            Compression::Gzip => Encoding::Gzip,
        }
    }
}

impl FromStr for Encoding {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "zstd" => Ok(Encoding::Zstd),
            "gzip" => Ok(Encoding::Gzip),
            "identity" => Ok(Encoding::Identity),
            _ => Err(Error::Refused(format!("unknown encoding {s:?}"))),
        }
    }
}

/// What an object says about the file it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Size of the original file in bytes.
    pub original_size: u64,
    /// SHA-256 of the original file, lowercase hex.
    pub original_sha256: String,
    /// How the stored bytes encode the original.
    pub encoding: Encoding,
}

/// A verified object, as [`ObjectStore::put_file`] stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The object key: the key base plus the encoding's suffix.
    pub key: String,
    /// Where it is, as [`ObjectStore::location`] spells it.
    pub location: String,
    /// Bytes stored (after compression).
    pub stored_size: u64,
    /// The metadata stored with it.
    pub meta: ObjectMeta,
}

/// What an archived file must decode to, as the ledger recorded it
/// (`reports_archive.file_size_bytes` and `sha256`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Original {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// A place report files are archived to and restored from.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Streams the open file `source` into object `<key_base><suffix>`:
    /// compressed with `compression` unless a sample (the first 1 MiB) shows
    /// it does not shrink (then [`Encoding::Identity`]). Memory stays bounded
    /// whatever the file's size (S3: multipart upload of 8 MiB parts, two in
    /// memory at most; a file smaller than one part is a single PutObject).
    /// Every pass reads the same open file (never its path again).
    /// Overwrites an existing object with the same key, so retries are
    /// idempotent. Stores the original size, SHA-256 and encoding as
    /// metadata, with `Content-Encoding` when compressed; verifies the
    /// stored object (size and metadata) before returning it.
    ///
    /// An unreadable file is [`Error::Refused`]; a file that changes while
    /// it is read is [`Error::Storage`] (retry later), and nothing is stored
    /// for it.
    async fn put_source(
        &self,
        source: &Source,
        key_base: &str,
        compression: Compression,
    ) -> Result<Stored>;

    /// [`ObjectStore::put_source`] of the file at `path`, opened once
    /// (symlinks followed; never blocking on a FIFO). A missing, unreadable
    /// or non-regular file is [`Error::Refused`].
    async fn put_file(
        &self,
        path: &Path,
        key_base: &str,
        compression: Compression,
    ) -> Result<Stored> {
        let source = Source::open(path)?;
        self.put_source(&source, key_base, compression).await
    }

    /// Stored size and metadata of an object; `None` if it does not exist or
    /// lacks the archiver's metadata (an incomplete or foreign object, which
    /// a `put_file` to the same key replaces).
    async fn head(&self, key: &str) -> Result<Option<(u64, ObjectMeta)>>;

    /// Downloads and decodes the object into `dest` through a temporary file
    /// beside it, renamed into place only once the original size and SHA-256
    /// from the object's metadata match — and, given `expected` (what the
    /// ledger recorded), match it too: an object whose metadata disagrees
    /// with the ledger is refused before a byte is downloaded. A mismatch,
    /// undecodable bytes or a missing object is [`Error::Refused`] and
    /// leaves no file at `dest`; so is an object in an archive storage class
    /// (Glacier), with what to do about it. Returns the restored size.
    async fn restore_checked(
        &self,
        key: &str,
        dest: &Path,
        expected: Option<&Original>,
    ) -> Result<u64>;

    /// [`ObjectStore::restore_checked`] against the object's own metadata.
    async fn restore(&self, key: &str, dest: &Path) -> Result<u64> {
        self.restore_checked(key, dest, None).await
    }

    /// Idempotently applies, then reads back and verifies, a lifecycle rule
    /// on `prefix` (a trailing `/` is added if missing): transition to
    /// GLACIER after `glacier_days`, expire after `expire_days`, abort
    /// multipart uploads left incomplete for a week. Other rules of the
    /// bucket are kept. With `dry_run`, only reports the current rule and
    /// what would change. Returns a one-line report; the local backend
    /// reports "not applicable".
    async fn apply_lifecycle(
        &self,
        prefix: &str,
        glacier_days: i32,
        expire_days: i32,
        dry_run: bool,
    ) -> Result<String>;

    /// Human/SQL location of a key: `s3://bucket/key` or `file:///abs/dir/key`.
    fn location(&self, key: &str) -> String;
}

/// Builds the store from settings: `bucket` Some → S3 (region, credentials
/// and endpoint from the standard AWS environment and credential chain,
/// `AWS_ENDPOINT_URL` included; path-style addressing when an endpoint is
/// given; region `us-east-1` if none is configured); else the local
/// directory `dir`, created if missing.
pub async fn open(bucket: Option<&str>, dir: &Path) -> Result<Box<dyn ObjectStore>> {
    match bucket {
        Some(bucket) => Ok(Box::new(S3Store::from_env(bucket).await?)),
        None => Ok(Box::new(LocalStore::open(dir).await?)),
    }
}

/// `archived-reports/YYYY/MM/<report id>.<format>` for a report created at
/// `created_at` (UTC). `format` is lowercased and kept to ASCII letters,
/// digits, `-` and `_` (an empty result becomes `bin`), so a stray value can
/// never add a path component.
pub fn report_key_base(created_at: DateTime<Utc>, id: Uuid, format: &str) -> String {
    let mut format: String = format
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if format.is_empty() {
        format = "bin".into();
    }
    format!(
        "{REPORTS_PREFIX}{:04}/{:02}/{}.{format}",
        created_at.year(),
        created_at.month(),
        id.as_hyphenated()
    )
}

/// Checks what `head` found against what was written.
fn verify(found: Option<(u64, ObjectMeta)>, key: &str, sent: u64, meta: &ObjectMeta) -> Result<()> {
    match found {
        Some((size, ref stored)) if size == sent && stored == meta => Ok(()),
        Some((size, stored)) => Err(Error::Storage(format!(
            "{key} did not verify: stored {size} bytes with {stored:?}, expected {sent} bytes with {meta:?}"
        ))),
        None => Err(Error::Storage(format!(
            "{key} did not verify: missing (or without metadata) right after it was written"
        ))),
    }
}

/// Refuses keys that are empty, absolute, or climb out of the store.
fn check_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\\')
        || key.contains('\0')
        || key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(Error::Refused(format!("invalid object key {key:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn report_keys_follow_the_layout() {
        let id = Uuid::parse_str("0b6a4c1e-8a1f-4d5e-9c2b-3f4e5d6c7b8a").unwrap();
        let at = Utc.with_ymd_and_hms(2025, 3, 31, 23, 59, 59).unwrap();
        assert_eq!(
            report_key_base(at, id, "csv"),
            "archived-reports/2025/03/0b6a4c1e-8a1f-4d5e-9c2b-3f4e5d6c7b8a.csv"
        );
        let at = Utc.with_ymd_and_hms(2024, 12, 1, 0, 0, 0).unwrap();
        assert_eq!(
            report_key_base(at, id, "../PDF"),
            "archived-reports/2024/12/0b6a4c1e-8a1f-4d5e-9c2b-3f4e5d6c7b8a.pdf"
        );
        assert!(report_key_base(at, id, "").ends_with(".bin"));
        let key = format!(
            "{}{}",
            report_key_base(at, id, "csv"),
            Encoding::Zstd.suffix()
        );
        assert!(key.ends_with(".csv.zst"));
        check_key(&key).unwrap();
    }

    #[test]
    fn bad_keys_are_refused() {
        for key in ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "a/"] {
            assert!(matches!(check_key(key), Err(Error::Refused(_))), "{key:?}");
        }
    }

    #[test]
    fn names_parse_and_print() {
        assert_eq!("ZSTD".parse::<Compression>().unwrap(), Compression::Zstd);
        assert_eq!("gzip".parse::<Compression>().unwrap(), Compression::Gzip);
        assert!("lz4".parse::<Compression>().is_err());
        for e in [Encoding::Zstd, Encoding::Gzip, Encoding::Identity] {
            assert_eq!(e.as_str().parse::<Encoding>().unwrap(), e);
        }
        assert_eq!(Encoding::Gzip.suffix(), ".gz");
        assert_eq!(Encoding::Identity.content_encoding(), None);
    }
}
