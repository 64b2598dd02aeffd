//! The object store archived report files go to: one small trait, two
//! backends — S3 ([`s3`], any S3-protocol server) and a local directory
//! ([`local`], the embedded default) — with the same key layout.
//!
//! A file is streamed through a compressor (zstd by default, gzip on
//! request; stored as it is when a sample shows it does not shrink) with
//! bounded memory, and stored with its original size, SHA-256 and encoding
//! as metadata. Keys are deterministic, so a retried upload overwrites the
//! same object. A restore decodes and verifies against that metadata.
//!
//! Where things are: the trait and its vocabulary in `store`, the key
//! layout in `key`, the backends in [`s3`] and [`local`], the file being
//! archived in [`source`]; a file goes out through `encode` and comes back
//! through `restore`, with the file-system helpers of both in `fs`.

mod encode;
mod fs;
mod key;
pub mod local;
mod restore;
pub mod s3;
pub mod source;
mod store;

use crate::error::Result;
use std::path::Path;

pub use key::{REPORTS_PREFIX, report_key_base};
pub use local::LocalStore;
pub use s3::S3Store;
pub use source::Source;
pub use store::{Compression, Encoding, ObjectMeta, ObjectStore, Original, Stored};

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
