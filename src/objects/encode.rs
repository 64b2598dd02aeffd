//! Encoding a file on its way out: choosing the encoding from a sample,
//! and streaming the file through the encoder while hashing what was read
//! (plus, for the S3 backend, a hashing pass of its own ahead of the body).
//!
//! Encoding runs on two blocking threads, so that reading and hashing
//! overlap with the codec and none of it runs on the async runtime: one
//! reads the file in 1 MiB chunks (SHA-256 and size on the way), the other
//! encodes them (zstd or flate2, single-threaded) and hands 1 MiB chunks of
//! output to the async side, which writes them to a file or into S3 parts.
//! Bounded channels of two chunks between the stages keep memory bounded.

use super::fs::{read_full, source_error};
use super::source::{Source, SourceReader};
use super::store::{Compression, Encoding, ObjectMeta};
use crate::error::{Error, Result};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How much of a file decides whether it is worth compressing.
const SAMPLE_SIZE: usize = 1 << 20;
/// Compression is kept when the sample shrinks to at most 95 % of its size:
/// below that saving, decompressing on restore costs more than it is worth.
const KEEP_RATIO: (usize, usize) = (95, 100);
/// zstd's level: 3, the zstd CLI's default.
const ZSTD_LEVEL: i32 = 3;
/// gzip's level: 6, gzip's default.
const GZIP_LEVEL: u32 = 6;

/// Chunks the file is read in, and the encoded bytes are handed on in.
const CHUNK: usize = 1 << 20;
/// Chunks waiting between two stages of the encoding pipeline.
const DEPTH: usize = 2;

/// Reads the file's first MiB to choose its encoding.
pub(super) async fn choose_encoding(source: &Source, compression: Compression) -> Result<Encoding> {
    let owned = source.clone();
    let sample = tokio::task::spawn_blocking(move || read_sample(&owned))
        .await
        .map_err(|e| Error::Storage(format!("inspecting {}: {e}", source.path().display())))?
        .map_err(|e| source_error(source.path(), e))?;
    choose(&sample, compression).await
}

fn read_sample(source: &Source) -> io::Result<Vec<u8>> {
    let mut sample = vec![0; SAMPLE_SIZE];
    let n = read_full(&mut source.reader(), &mut sample)?;
    sample.truncate(n);
    Ok(sample)
}

/// Compresses the sample in memory and keeps the codec only if it pays.
async fn choose(sample: &[u8], compression: Compression) -> Result<Encoding> {
    if sample.is_empty() {
        return Ok(Encoding::Identity);
    }
    let compressed = compressed_len(sample, compression)
        .map_err(|e| Error::Storage(format!("compressing a sample: {e}")))?;
    let (keep, of) = KEEP_RATIO;
    Ok(if compressed as usize * of <= sample.len() * keep {
        Encoding::from(compression)
    } else {
        Encoding::Identity
    })
}

fn compressed_len(data: &[u8], compression: Compression) -> io::Result<u64> {
    let mut encoder = Encoder::new(Counter(0), compression)?;
    encoder.write_all(data)?;
    Ok(encoder.finish()?.0)
}

/// Size and hex SHA-256 of a whole file, computed on a blocking thread
/// that starts at once (the S3 backend's first pass: its metadata must
/// precede the body). Dropping it stops the thread at its next chunk.
pub(super) struct HashPass {
    path: PathBuf,
    handle: JoinHandle<io::Result<(u64, String)>>,
    stop: Arc<AtomicBool>,
}

/// Starts hashing `source`.
pub(super) fn hash_file(source: &Source) -> HashPass {
    let stop = Arc::new(AtomicBool::new(false));
    let (mut file, flag) = (source.reader(), stop.clone());
    let handle = tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        let mut size = 0;
        let mut buf = vec![0; CHUNK];
        loop {
            if flag.load(Ordering::Relaxed) {
                return Err(io::Error::other("hashing abandoned"));
            }
            let n = read_full(&mut file, &mut buf)?;
            if n == 0 {
                return Ok((size, hex::encode(hasher.finalize())));
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
    });
    HashPass {
        path: source.path().to_path_buf(),
        handle,
        stop,
    }
}

impl HashPass {
    /// The file's size and hex SHA-256.
    pub(super) async fn finish(mut self) -> Result<(u64, String)> {
        (&mut self.handle)
            .await
            .map_err(|e| Error::Storage(format!("hashing {}: {e}", self.path.display())))?
            .map_err(|e| source_error(&self.path, e))
    }
}

impl Drop for HashPass {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A synchronous encoder writing into `W`.
enum Encoder<W: Write> {
    /// zstd, level 3 (the zstd CLI's default).
    Zstd(zstd::stream::write::Encoder<'static, W>),
    /// gzip, level 6.
    Gzip(flate2::write::GzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    fn new(out: W, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?),
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::new(GZIP_LEVEL),
            )),
        })
    }

    /// Ends the stream and returns the writer.
    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Zstd(e) => e.finish(),
            Encoder::Gzip(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Gzip(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Zstd(e) => e.flush(),
            Encoder::Gzip(e) => e.flush(),
        }
    }
}

/// Counts what is written to it.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Gathers an encoder's output into chunks of [`CHUNK`] bytes and sends
/// them to the async side.
struct Chunker {
    buf: Vec<u8>,
    tx: mpsc::Sender<Bytes>,
}

impl Chunker {
    fn send(&mut self, chunk: Bytes) -> io::Result<()> {
        self.tx.blocking_send(chunk).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the reader of the encoded bytes is gone",
            )
        })
    }

    /// Sends what is left (the last, short chunk).
    fn send_rest(mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let rest = std::mem::take(&mut self.buf);
        self.send(rest.into())
    }
}

impl Write for Chunker {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(CHUNK);
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            let full = std::mem::take(&mut self.buf);
            self.send(full.into())?;
        }
        Ok(n)
    }

    /// Chunks go out when full, and the last one from `send_rest`: an
    /// encoder's flush must not cut a short chunk.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A file being read, hashed and encoded by two blocking threads — one reads
/// and hashes, the other encodes — while the async side takes the encoded
/// bytes in chunks. Memory stays bounded: [`DEPTH`] chunks wait between
/// the stages. Dropping it stops both threads at their next chunk.
pub(super) struct EncodedFile {
    path: PathBuf,
    size_hint: u64,
    chunks: mpsc::Receiver<Bytes>,
    pending: Option<Bytes>,
    reader: Option<JoinHandle<Option<(u64, String)>>>,
    encoder: Option<JoinHandle<io::Result<()>>>,
    digest: Option<(u64, String)>,
}

/// Starts encoding `source` with `encoding`.
pub(super) async fn encode_file(source: &Source, encoding: Encoding) -> Result<EncodedFile> {
    let (path, size_hint, file) = (source.path(), source.len_at_open(), source.reader());
    let (raw_tx, raw_rx) = std::sync::mpsc::sync_channel(DEPTH);
    let (out_tx, out_rx) = mpsc::channel(DEPTH);
    let reader = tokio::task::spawn_blocking(move || read_chunks(file, &raw_tx));
    let encoder = tokio::task::spawn_blocking(move || encode_chunks(&raw_rx, encoding, out_tx));
    Ok(EncodedFile {
        path: path.to_path_buf(),
        size_hint,
        chunks: out_rx,
        pending: None,
        reader: Some(reader),
        encoder: Some(encoder),
        digest: None,
    })
}

/// The reading stage: chunks of the file, hashed on the way. A read error
/// is passed on to the encoder; returns the size and hex SHA-256 of the
/// whole file, or `None` if it stopped early.
fn read_chunks(
    mut file: SourceReader,
    tx: &SyncSender<io::Result<Bytes>>,
) -> Option<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut size = 0;
    loop {
        let mut buf = vec![0; CHUNK];
        match read_full(&mut file, &mut buf) {
            Ok(0) => return Some((size, hex::encode(hasher.finalize()))),
            Ok(n) => {
                buf.truncate(n);
                hasher.update(&buf);
                size += n as u64;
                tx.send(Ok(buf.into())).ok()?;
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return None;
            }
        }
    }
}

/// The encoding stage: what the reader sends, encoded, in chunks to `tx`.
fn encode_chunks(
    rx: &Receiver<io::Result<Bytes>>,
    encoding: Encoding,
    tx: mpsc::Sender<Bytes>,
) -> io::Result<()> {
    let mut out = Chunker {
        buf: Vec::new(),
        tx,
    };
    let compression = match encoding {
        Encoding::Zstd => Compression::Zstd,
        Encoding::Gzip => Compression::Gzip,
        Encoding::Identity => {
            for chunk in rx {
                out.send(chunk?)?;
            }
            return Ok(());
        }
    };
    let mut encoder = Encoder::new(out, compression)?;
    for chunk in rx {
        encoder.write_all(&chunk?)?;
    }
    encoder.finish()?.send_rest()
}

impl EncodedFile {
    /// The file's size when it was opened.
    pub(super) fn size_hint(&self) -> u64 {
        self.size_hint
    }

    /// The next chunk of encoded bytes; `None` at the end, once the whole
    /// file was read and encoded.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>> {
        if let Some(chunk) = self.pending.take() {
            return Ok(Some(chunk));
        }
        if let Some(chunk) = self.chunks.recv().await {
            return Ok(Some(chunk));
        }
        if self.digest.is_none() {
            self.digest = Some(self.finish().await?);
        }
        Ok(None)
    }

    /// Up to `limit` encoded bytes; fewer only at the end.
    pub(super) async fn read_up_to(&mut self, limit: usize) -> Result<Bytes> {
        let mut part = Vec::with_capacity(limit);
        while part.len() < limit {
            let Some(chunk) = self.next().await? else {
                break;
            };
            let n = chunk.len().min(limit - part.len());
            part.extend_from_slice(&chunk[..n]);
            if n < chunk.len() {
                self.pending = Some(chunk.slice(n..));
            }
        }
        Ok(part.into())
    }

    /// Waits for both stages; the reader's size and SHA-256.
    async fn finish(&mut self) -> Result<(u64, String)> {
        let path = &self.path;
        let failed =
            |e: tokio::task::JoinError| Error::Storage(format!("encoding {}: {e}", path.display()));
        if let Some(encoder) = self.encoder.take() {
            encoder
                .await
                .map_err(failed)?
                .map_err(|e| source_error(path, e))?;
        }
        let reader = self.reader.take().ok_or_else(|| {
            Error::Storage(format!("encoding {}: already failed", path.display()))
        })?;
        reader.await.map_err(failed)?.ok_or_else(|| {
            Error::Storage(format!(
                "encoding {}: reading stopped early",
                path.display()
            ))
        })
    }

    /// Fails unless the encoder read exactly the bytes `meta` describes
    /// (the first pass hashed them): a file that changed while it was
    /// archived is not stored.
    pub(super) fn check_unchanged(&self, meta: &ObjectMeta) -> Result<()> {
        let (size, sha256) = self.digest()?;
        if size == meta.original_size && sha256 == meta.original_sha256 {
            return Ok(());
        }
        Err(Error::Storage(format!(
            "{} changed while it was archived ({} bytes became {size}); nothing was stored",
            self.path.display(),
            meta.original_size
        )))
    }

    /// Size and hex SHA-256 of the bytes read, once [`EncodedFile::next`]
    /// has returned `None`.
    pub(super) fn digest(&self) -> Result<(u64, String)> {
        self.digest.clone().ok_or_else(|| {
            Error::Storage(format!(
                "{}: digest asked for before the end",
                self.path.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

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

    /// A scratch file with `bytes`, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(bytes: &[u8]) -> Self {
            let path = std::env::temp_dir().join(format!(
                "archiver-compress-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::write(&path, bytes).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pseudo_random(size: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        (0..size)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect()
    }

    /// Reads all of `encoded` in pieces of `limit` bytes; checks that only
    /// the last piece is short.
    async fn read_in_pieces(encoded: &mut EncodedFile, limit: usize) -> Vec<u8> {
        let mut all = Vec::new();
        let mut short = false;
        loop {
            let piece = encoded.read_up_to(limit).await.unwrap();
            if piece.is_empty() {
                return all;
            }
            assert!(!short, "a short piece before the end");
            short = piece.len() < limit;
            all.extend_from_slice(&piece);
        }
    }

    #[tokio::test]
    async fn pipeline_cuts_pieces_across_chunks_and_hashes_the_whole_file() {
        // Neither a multiple of the chunk size nor of the piece size.
        let bytes = pseudo_random(2 * CHUNK + 12_345);
        let file = Scratch::new(&bytes);
        let sha256 = hex::encode(Sha256::digest(&bytes));

        let mut identity = encode_file(&Source::open(&file.0).unwrap(), Encoding::Identity)
            .await
            .unwrap();
        assert!(identity.digest().is_err(), "a digest before the end");
        assert_eq!(identity.size_hint(), bytes.len() as u64);
        assert_eq!(read_in_pieces(&mut identity, 700_001).await, bytes);
        assert_eq!(
            identity.digest().unwrap(),
            (bytes.len() as u64, sha256.clone())
        );

        let text = "2026-01-01T00:00:03Z,scenario-42,cpu,73.25,ok\n".repeat(60_000);
        let file = Scratch::new(text.as_bytes());
        let mut zstd = encode_file(&Source::open(&file.0).unwrap(), Encoding::Zstd)
            .await
            .unwrap();
        let compressed = read_in_pieces(&mut zstd, 3_000).await;
        assert!(compressed.len() * 10 < text.len());
        assert_eq!(zstd::decode_all(&compressed[..]).unwrap(), text.as_bytes());
        let mut gzip = encode_file(&Source::open(&file.0).unwrap(), Encoding::Gzip)
            .await
            .unwrap();
        let compressed = read_in_pieces(&mut gzip, 1 << 20).await;
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, text.as_bytes());
        assert_eq!(gzip.digest().unwrap().0, text.len() as u64);
    }

    #[tokio::test]
    async fn a_read_error_reaches_the_async_side_as_refused() {
        // A directory opens, but reading it fails (EISDIR): the reader
        // thread's error must reach the async side, classified as
        // `source_error` does, and no digest is claimed.
        let dir = std::env::temp_dir();
        let dir_source = Source::unchecked(std::fs::File::open(&dir).unwrap(), &dir);
        let mut encoded = encode_file(&dir_source, Encoding::Zstd).await.unwrap();
        let err = loop {
            match encoded.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a directory encoded to the end"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::Refused(_)), "{err}");
        assert!(encoded.digest().is_err());
    }
}
