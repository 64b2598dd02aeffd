//! The local-directory backend: objects are files under a root directory,
//! with the same keys as in S3, and each object's metadata sits beside it in
//! `<key>.meta.json`. Every write goes to a temporary file in the same
//! directory, is fsynced and renamed into place, so a reader sees a whole
//! object or none.

use super::encode;
use super::fs::{local_error, sync_parent, temp_path};
use super::key::{check_key, check_key_name};
use super::restore;
use super::source::Source;
use super::store::{Compression, Encoding, ObjectMeta, ObjectStore, Original, Stored, verify};
use crate::error::{Error, Result};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use tokio::fs::File;
use tokio::io::AsyncWriteExt;

/// Objects as files under a directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Uses `dir` (created if missing) as the store's root.
    pub async fn open(dir: &Path) -> Result<Self> {
        let config = |e: std::io::Error| {
            Error::config("REPORTS_ARCHIVE_DIR", format!("{}: {e}", dir.display()))
        };
        tokio::fs::create_dir_all(dir).await.map_err(config)?;
        let root = tokio::fs::canonicalize(dir).await.map_err(config)?;
        Ok(LocalStore { root })
    }

    /// The store's root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file holding object `key`.
    pub fn object_path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    async fn read_meta(&self, path: &Path) -> Result<Option<ObjectMeta>> {
        let meta_path = meta_path(path);
        let text = match tokio::fs::read(&meta_path).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(local_error(&meta_path, e)),
        };
        match serde_json::from_slice(&text) {
            Ok(meta) => Ok(Some(meta)),
            Err(e) => {
                tracing::warn!(path = %meta_path.display(), error = %e, "unreadable object metadata; treating the object as absent");
                Ok(None)
            }
        }
    }
}

impl LocalStore {
    /// Opens object `key` with its metadata, refused when it is missing,
    /// without metadata, or disagreeing with `expected`.
    async fn open_checked(
        &self,
        key: &str,
        expected: Option<&Original>,
    ) -> Result<(File, ObjectMeta)> {
        let Some((_, meta)) = self.head(key).await? else {
            return Err(Error::Refused(format!("no object {}", self.location(key))));
        };
        restore::check_expected(key, &meta, expected)?;
        let path = self.object_path(key)?;
        let file = File::open(&path).await.map_err(|e| local_error(&path, e))?;
        Ok((file, meta))
    }
}

fn meta_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".meta.json");
    PathBuf::from(name)
}

/// Streams `source` through its encoder into `tmp`; returns the bytes
/// written and the original's size and SHA-256.
async fn write_encoded(
    source: &Source,
    encoding: Encoding,
    tmp: &Path,
) -> Result<(u64, u64, String)> {
    let mut encoded = encode::encode_file(source, encoding).await?;
    let mut out = File::create(tmp).await.map_err(|e| local_error(tmp, e))?;
    let mut written = 0;
    while let Some(chunk) = encoded.next().await? {
        out.write_all(&chunk)
            .await
            .map_err(|e| local_error(tmp, e))?;
        written += chunk.len() as u64;
    }
    out.flush().await.map_err(|e| local_error(tmp, e))?;
    out.sync_all().await.map_err(|e| local_error(tmp, e))?;
    let (size, sha256) = encoded.digest()?;
    Ok((written, size, sha256))
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename.
async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path)?;
    let written = async {
        let mut file = File::create(&tmp).await?;
        file.write_all(bytes).await?;
        file.sync_all().await?;
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(local_error(path, e));
    }
    Ok(())
}

/// Moves the encoded temp file into place, then writes its metadata. A
/// crash in between leaves an object without metadata, which `head` treats
/// as absent and the next `put_file` replaces.
async fn commit(tmp: &Path, path: &Path, meta: &ObjectMeta) -> Result<()> {
    tokio::fs::rename(tmp, path)
        .await
        .map_err(|e| local_error(path, e))?;
    let json = serde_json::to_vec_pretty(meta).map_err(|e| Error::Storage(e.to_string()))?;
    write_atomic(&meta_path(path), &json).await?;
    sync_parent(path).await
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_source(
        &self,
        source: &Source,
        key_base: &str,
        compression: Compression,
    ) -> Result<Stored> {
        let encoding = encode::choose_encoding(source, compression).await?;
        let key = format!("{key_base}{}", encoding.suffix());
        let path = self.object_path(&key)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| local_error(dir, e))?;
        }
        let tmp = temp_path(&path)?;
        let (stored_size, original_size, original_sha256) =
            match write_encoded(source, encoding, &tmp).await {
                Ok(done) => done,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
            };
        let meta = ObjectMeta {
            original_size,
            original_sha256,
            encoding,
        };
        commit(&tmp, &path, &meta).await?;
        verify(self.head(&key).await?, &key, stored_size, &meta)?;
        Ok(Stored {
            location: self.location(&key),
            key,
            stored_size,
            meta,
        })
    }

    async fn head(&self, key: &str) -> Result<Option<(u64, ObjectMeta)>> {
        let path = self.object_path(key)?;
        let size = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(local_error(&path, e)),
        };
        Ok(self.read_meta(&path).await?.map(|meta| (size, meta)))
    }

    async fn restore_checked(
        &self,
        key: &str,
        dest: &Path,
        expected: Option<&Original>,
    ) -> Result<u64> {
        let (file, meta) = self.open_checked(key, expected).await?;
        restore::restore_verified(file, key, &meta, dest).await
    }

    async fn verify_content(&self, key: &str, expected: Option<&Original>) -> Result<u64> {
        let (file, meta) = self.open_checked(key, expected).await?;
        restore::verify_decoded(file, key, &meta).await
    }

    async fn apply_lifecycle(&self, prefix: &str, _: i32, _: i32, _: bool) -> Result<String> {
        Ok(format!(
            "lifecycle rule for {}: not applicable (local directory store; expire old objects by other means)",
            self.location(prefix)
        ))
    }

    async fn check(&self) -> Result<String> {
        let key = check_key_name();
        let path = self.object_path(&key)?;
        let dir = path.parent().unwrap_or(&self.root);
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| local_error(dir, e))?;
        tokio::fs::write(&path, b"archiver check: safe to delete\n")
            .await
            .map_err(|e| local_error(&path, e))?;
        tokio::fs::remove_file(&path)
            .await
            .map_err(|e| local_error(&path, e))?;
        // Best effort: another check may be writing beside it.
        let _ = tokio::fs::remove_dir(dir).await;
        Ok(format!(
            "{}: writable (wrote and deleted {key})",
            self.location("")
        ))
    }

    fn location(&self, key: &str) -> String {
        let path = self.root.join(key);
        url::Url::from_file_path(&path)
            .map(String::from)
            .unwrap_or_else(|()| format!("file://{}", path.display()))
    }
}
