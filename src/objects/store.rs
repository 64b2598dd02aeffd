//! What a store speaks about: the [`ObjectStore`] trait both backends
//! implement, the codec an operator asks for ([`Compression`]) and the one
//! an object holds ([`Encoding`]), the metadata stored with each object,
//! and the check every backend runs on what it has just written.

use super::source::Source;
use crate::error::{Error, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::str::FromStr;

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

    /// Downloads and decodes the object as [`ObjectStore::restore_checked`]
    /// does, checked the same way (against its metadata and `expected`),
    /// writing nothing: proof that the object still holds the archived
    /// file (`planner verify --deep`). Same errors; returns the original
    /// size.
    async fn verify_content(&self, key: &str, expected: Option<&Original>) -> Result<u64>;

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

    /// After how many days the store's own lifecycle deletes objects under
    /// `prefix` (S3: the bucket's rules); `None`: never (the local backend).
    async fn expiry_days(&self, _prefix: &str) -> Result<Option<i32>> {
        Ok(None)
    }

    /// Checks that archiving could write here now: S3, that the bucket
    /// exists; both, that a test object written under
    /// `archived-reports/.archiver-check/<uuid>` can be deleted again.
    /// Returns what it found, for `check`.
    async fn check(&self) -> Result<String>;

    /// Human/SQL location of a key: `s3://bucket/key` or `file:///abs/dir/key`.
    fn location(&self, key: &str) -> String;
}

/// Checks what `head` found against what was written.
pub(super) fn verify(
    found: Option<(u64, ObjectMeta)>,
    key: &str,
    sent: u64,
    meta: &ObjectMeta,
) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
