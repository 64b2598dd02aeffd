//! Restoring an object on its way back: decoding it into a temporary file
//! beside the destination while hashing what comes out, renamed into place
//! only once size and SHA-256 match the object's metadata (and the ledger's
//! record, when one is given). A failure to read the object (worth a retry)
//! is told apart from bytes that do not decode (refused).

use super::fs::{local_error, sync_parent, temp_path};
use super::store::{Encoding, ObjectMeta, Original};
use crate::error::{Error, Result};
use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use sha2::{Digest, Sha256};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::fs::File;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadBuf};

/// Read and write buffer of the restore path.
const IO_BUFFER: usize = 256 << 10;

/// Counts and hashes the bytes read through it.
#[derive(Debug)]
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes read so far and their hex SHA-256.
    fn digest(&self) -> (u64, String) {
        (self.count, hex::encode(self.hasher.clone().finalize()))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Hashing<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        this.hasher.update(new);
        this.count += new.len() as u64;
        Poll::Ready(Ok(()))
    }
}

/// Marks an error of the reader an object is restored from, so that it is
/// not mistaken for the object's bytes failing to decode.
#[derive(Debug)]
struct SourceFailed(io::Error);

impl std::fmt::Display for SourceFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SourceFailed {}

/// Tags every error of `R` as [`SourceFailed`].
struct Tagged<R>(R);

impl<R: AsyncRead + Unpin> AsyncRead for Tagged<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0)
            .poll_read(cx, buf)
            .map_err(|e| io::Error::new(e.kind(), SourceFailed(e)))
    }
}

fn decoder<'a, R: AsyncRead + Unpin + Send + 'a>(
    reader: R,
    encoding: Encoding,
) -> Box<dyn AsyncRead + Unpin + Send + 'a> {
    let buffered = BufReader::with_capacity(IO_BUFFER, Tagged(reader));
    match encoding {
        Encoding::Zstd => Box::new(ZstdDecoder::new(buffered)),
        Encoding::Gzip => Box::new(GzipDecoder::new(buffered)),
        Encoding::Identity => Box::new(buffered),
    }
}

/// Refuses an object whose metadata disagrees with what the ledger
/// recorded for it (another file's object under this key, or metadata
/// rewritten): its bytes would verify against the wrong digest.
pub(super) fn check_expected(
    key: &str,
    meta: &ObjectMeta,
    expected: Option<&Original>,
) -> Result<()> {
    match expected {
        Some(want) if want.size != meta.original_size || want.sha256 != meta.original_sha256 => {
            Err(Error::Refused(format!(
                "{key} is not the archived file: its metadata says {} bytes with SHA-256 {}, \
                 reports_archive recorded {} bytes with SHA-256 {}; nothing restored",
                meta.original_size, meta.original_sha256, want.size, want.sha256
            )))
        }
        _ => Ok(()),
    }
}

/// Decodes `object` (stored under `key` with `meta`) into `dest`, through a
/// temporary file beside it that is renamed into place only when the size
/// and SHA-256 match. Any failure leaves nothing at `dest` and no temp file.
pub(super) async fn restore_verified<R>(
    object: R,
    key: &str,
    meta: &ObjectMeta,
    dest: &Path,
) -> Result<u64>
where
    R: AsyncRead + Unpin + Send,
{
    let tmp = temp_path(dest)?;
    let outcome = decode_into(object, key, meta, &tmp).await;
    let renamed = match outcome {
        Ok(()) => tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| local_error(dest, e)),
        Err(e) => Err(e),
    };
    if let Err(e) = renamed {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    sync_parent(dest).await?;
    Ok(meta.original_size)
}

async fn decode_into<R>(object: R, key: &str, meta: &ObjectMeta, tmp: &Path) -> Result<()>
where
    R: AsyncRead + Unpin + Send,
{
    let file = File::create(tmp).await.map_err(|e| local_error(tmp, e))?;
    let mut out = BufWriter::with_capacity(IO_BUFFER, file);
    decode_checked(object, key, meta, &mut out, |e| local_error(tmp, e)).await?;
    out.into_inner()
        .sync_all()
        .await
        .map_err(|e| local_error(tmp, e))
}

/// Decodes `object` (stored under `key` with `meta`) and checks its size
/// and SHA-256 against `meta`, writing nothing: the check of a restore
/// without the file (`planner verify --deep`). Returns the original size.
pub(super) async fn verify_decoded<R>(object: R, key: &str, meta: &ObjectMeta) -> Result<u64>
where
    R: AsyncRead + Unpin + Send,
{
    let mut sink = tokio::io::sink();
    decode_checked(object, key, meta, &mut sink, |e| {
        Error::Storage(format!("{key}: {e}"))
    })
    .await?;
    Ok(meta.original_size)
}

/// Decodes `object` into `out` while hashing what comes out, then checks
/// the size and SHA-256 against `meta`; `write_error` tells what a failed
/// write to `out` was.
async fn decode_checked<R, W>(
    object: R,
    key: &str,
    meta: &ObjectMeta,
    out: &mut W,
    write_error: impl Fn(io::Error) -> Error,
) -> Result<()>
where
    R: AsyncRead + Unpin + Send,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut reader = Hashing::new(decoder(object, meta.encoding));
    let mut buf = vec![0; IO_BUFFER];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| read_error(key, e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).await.map_err(&write_error)?;
    }
    out.flush().await.map_err(&write_error)?;
    let (size, sha256) = reader.digest();
    if size != meta.original_size || sha256 != meta.original_sha256 {
        return Err(Error::Refused(format!(
            "{key} is corrupt: restored {size} bytes with SHA-256 {sha256}, its metadata says {} bytes with {}",
            meta.original_size, meta.original_sha256
        )));
    }
    Ok(())
}

/// A failure to read the object is worth a retry; bytes that do not decode are not.
fn read_error(key: &str, e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<SourceFailed>()) {
        Error::Storage(format!("reading {key}: {e}"))
    } else {
        Error::Refused(format!("{key} is corrupt: it does not decode: {e}"))
    }
}
