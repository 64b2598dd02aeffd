//! The byte pipeline both backends share: choosing an encoding from a
//! sample, streaming a file through an encoder while hashing what was read,
//! and decoding an object into a file that appears only once its size and
//! SHA-256 match the object's metadata.

use super::{Compression, Encoding, ObjectMeta};
use crate::{Error, Result};
use async_compression::tokio::bufread::{GzipDecoder, GzipEncoder, ZstdDecoder, ZstdEncoder};
use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::fs::File;
use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadBuf,
};

/// How much of a file decides whether it is worth compressing.
const SAMPLE_SIZE: usize = 1 << 20;
/// Read and write buffer of the streaming paths.
pub(crate) const IO_BUFFER: usize = 256 << 10;
/// Compression is kept when the sample shrinks to at most 95 % of its size:
/// below that saving, decompressing on restore costs more than it is worth.
const KEEP_RATIO: (usize, usize) = (95, 100);

/// What a first look at a file found.
#[derive(Debug)]
pub(crate) struct Inspection {
    /// Bytes read.
    pub(crate) size: u64,
    /// Hex SHA-256 of the whole file, when asked for.
    pub(crate) sha256: Option<String>,
    /// The encoding the file will be stored with.
    pub(crate) encoding: Encoding,
}

/// Reads the file's first MiB to choose its encoding and, with `hash`, the
/// rest of it for its size and SHA-256 (the S3 backend must set metadata
/// before the first byte goes out).
pub(crate) async fn inspect(
    path: &Path,
    compression: Compression,
    hash: bool,
) -> Result<Inspection> {
    let owned = path.to_path_buf();
    let (sample, size, sha256) = tokio::task::spawn_blocking(move || read_sample(&owned, hash))
        .await
        .map_err(|e| Error::Storage(format!("inspecting {}: {e}", path.display())))?
        .map_err(|e| source_error(path, e))?;
    let encoding = choose(&sample, compression).await?;
    Ok(Inspection {
        size,
        sha256,
        encoding,
    })
}

fn read_sample(path: &Path, hash: bool) -> io::Result<(Vec<u8>, u64, Option<String>)> {
    let mut file = std::fs::File::open(path)?;
    let mut sample = Vec::with_capacity(SAMPLE_SIZE);
    (&mut file)
        .take(SAMPLE_SIZE as u64)
        .read_to_end(&mut sample)?;
    if !hash {
        return Ok((sample, 0, None));
    }
    let mut hasher = Sha256::new();
    hasher.update(&sample);
    let mut size = sample.len() as u64;
    let mut buf = vec![0; IO_BUFFER];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((sample, size, Some(hex::encode(hasher.finalize()))));
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
}

/// Compresses the sample in memory and keeps the codec only if it pays.
async fn choose(sample: &[u8], compression: Compression) -> Result<Encoding> {
    if sample.is_empty() {
        return Ok(Encoding::Identity);
    }
    let encoding = Encoding::from(compression);
    let mut encoder = Encode::new(sample, encoding);
    let compressed = tokio::io::copy(&mut encoder, &mut tokio::io::sink())
        .await
        .map_err(|e| Error::Storage(format!("compressing a sample: {e}")))?;
    let (keep, of) = KEEP_RATIO;
    Ok(if compressed as usize * of <= sample.len() * keep {
        encoding
    } else {
        Encoding::Identity
    })
}

/// A missing or unreadable source file will not get better by retrying.
pub(crate) fn source_error(path: &Path, e: io::Error) -> Error {
    let what = format!("cannot read {}: {e}", path.display());
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied | io::ErrorKind::IsADirectory => {
            Error::Refused(what)
        }
        _ => Error::Storage(what),
    }
}

/// Counts and hashes the bytes read through it.
#[derive(Debug)]
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R> Hashing<R> {
    pub(crate) fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes read so far and their hex SHA-256.
    pub(crate) fn digest(&self) -> (u64, String) {
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

/// A reader that encodes what it reads from `R`.
#[derive(Debug)]
pub(crate) enum Encode<R> {
    /// zstd, level 3 (the zstd CLI's default).
    Zstd(ZstdEncoder<R>),
    /// gzip, level 6.
    Gzip(GzipEncoder<R>),
    /// As it is.
    Identity(R),
}

impl<R: AsyncBufRead> Encode<R> {
    pub(crate) fn new(inner: R, encoding: Encoding) -> Self {
        match encoding {
            Encoding::Zstd => Encode::Zstd(ZstdEncoder::new(inner)),
            Encoding::Gzip => Encode::Gzip(GzipEncoder::new(inner)),
            Encoding::Identity => Encode::Identity(inner),
        }
    }

    pub(crate) fn get_ref(&self) -> &R {
        match self {
            Encode::Zstd(e) => e.get_ref(),
            Encode::Gzip(e) => e.get_ref(),
            Encode::Identity(r) => r,
        }
    }
}

impl<R: AsyncBufRead + AsyncRead + Unpin> AsyncRead for Encode<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Encode::Zstd(e) => Pin::new(e).poll_read(cx, buf),
            Encode::Gzip(e) => Pin::new(e).poll_read(cx, buf),
            Encode::Identity(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// A file read through an encoder, hashing the original bytes on the way.
pub(crate) type FileEncoder = Encode<BufReader<Hashing<File>>>;

/// Opens `path` for streaming with `encoding`.
pub(crate) async fn encode_file(path: &Path, encoding: Encoding) -> Result<FileEncoder> {
    let file = File::open(path).await.map_err(|e| source_error(path, e))?;
    let reader = BufReader::with_capacity(IO_BUFFER, Hashing::new(file));
    Ok(Encode::new(reader, encoding))
}

/// Size and hex SHA-256 of what the encoder has read from its file so far
/// (all of it, once it is exhausted).
pub(crate) fn digest(encoder: &FileEncoder) -> (u64, String) {
    encoder.get_ref().get_ref().digest()
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

/// Decodes `object` (stored under `key` with `meta`) into `dest`, through a
/// temporary file beside it that is renamed into place only when the size
/// and SHA-256 match. Any failure leaves nothing at `dest` and no temp file.
pub(crate) async fn restore_verified<R>(
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
    let mut reader = Hashing::new(decoder(object, meta.encoding));
    let file = File::create(tmp).await.map_err(|e| local_error(tmp, e))?;
    let mut out = BufWriter::with_capacity(IO_BUFFER, file);
    let mut buf = vec![0; IO_BUFFER];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| read_error(key, e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .await
            .map_err(|e| local_error(tmp, e))?;
    }
    out.flush().await.map_err(|e| local_error(tmp, e))?;
    let (size, sha256) = reader.digest();
    if size != meta.original_size || sha256 != meta.original_sha256 {
        return Err(Error::Refused(format!(
            "{key} is corrupt: restored {size} bytes with SHA-256 {sha256}, its metadata says {} bytes with {}",
            meta.original_size, meta.original_sha256
        )));
    }
    out.into_inner()
        .sync_all()
        .await
        .map_err(|e| local_error(tmp, e))
}

/// A failure to read the object is worth a retry; bytes that do not decode are not.
fn read_error(key: &str, e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<SourceFailed>()) {
        Error::Storage(format!("reading {key}: {e}"))
    } else {
        Error::Refused(format!("{key} is corrupt: it does not decode: {e}"))
    }
}

/// A local filesystem failure while writing: a missing directory or a
/// denied permission stays that way until someone acts; anything else (a
/// full disk, an I/O error) may pass.
pub(crate) fn local_error(path: &Path, e: io::Error) -> Error {
    let what = format!("{}: {e}", path.display());
    match e.kind() {
        io::ErrorKind::NotFound
        | io::ErrorKind::PermissionDenied
        | io::ErrorKind::ReadOnlyFilesystem => Error::Refused(what),
        _ => Error::Storage(what),
    }
}

/// A unique temporary name in the same directory as `path` (so that the
/// final rename is atomic).
pub(crate) fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Refused(format!("{} names no file", path.display())))?;
    let tmp = format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    );
    Ok(path.with_file_name(tmp))
}

/// Makes a rename in `path`'s directory durable.
pub(crate) async fn sync_parent(path: &Path) -> Result<()> {
    let Some(dir) = path.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    }) else {
        return Ok(());
    };
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(|e| Error::Storage(format!("syncing a directory: {e}")))?
        .map_err(|e| local_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn text_compresses_and_noise_does_not() {
        let text = "id,name,value\n".repeat(10_000);
        assert_eq!(
            choose(text.as_bytes(), Compression::Zstd).await.unwrap(),
            Encoding::Zstd
        );
        assert_eq!(
            choose(text.as_bytes(), Compression::Gzip).await.unwrap(),
            Encoding::Gzip
        );
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        assert_eq!(
            choose(&noise, Compression::Zstd).await.unwrap(),
            Encoding::Identity
        );
        assert_eq!(
            choose(&[], Compression::Zstd).await.unwrap(),
            Encoding::Identity
        );
    }

    #[test]
    fn temp_files_sit_beside_their_target() {
        let tmp = temp_path(Path::new("/a/b/report.csv")).unwrap();
        assert_eq!(tmp.parent(), Some(Path::new("/a/b")));
        assert!(
            tmp.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".report.csv.")
        );
    }
}
