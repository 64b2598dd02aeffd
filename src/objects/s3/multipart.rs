//! Streaming a file into an S3 multipart upload with bounded memory: the
//! encoder fills one part buffer while the previous part uploads, so at most
//! two parts are in memory (2 × 8 MiB for any file up to ~70 GiB stored),
//! besides the few 1 MiB chunks of the encoding pipeline.
//! A failed upload is aborted, so no parts are left behind to pay for (the
//! lifecycle rule also aborts any a crash leaves).

use super::wire::{sdk_error, to_metadata};
use crate::error::{Error, Result};
use crate::objects::encode::EncodedFile;
use crate::objects::store::ObjectMeta;
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use tokio::task::JoinHandle;

/// The part size for ordinary files.
const PART_SIZE: usize = 8 << 20;
/// S3 allows at most 10,000 parts; leave headroom for compressed data that
/// came out slightly larger than its original.
const MAX_PARTS: u64 = 10_000;
const PLANNED_PARTS: u64 = 9_000;

/// The part size for a file of `original_size` bytes: 8 MiB, or larger
/// (whole MiB) when the file would otherwise need more than 9,000 parts.
pub(super) fn part_size(original_size: u64) -> usize {
    const MIB: u64 = 1 << 20;
    let needed = original_size.div_ceil(PLANNED_PARTS).div_ceil(MIB) * MIB;
    needed.max(PART_SIZE as u64) as usize
}

/// Uploads `first` and the rest of `source` as one multipart upload to
/// `key` in `bucket`; returns the bytes sent. Aborts the upload on any
/// failure, a file that changed while it was read included.
pub(super) async fn upload(
    client: &Client,
    bucket: &str,
    key: &str,
    first: Bytes,
    source: &mut EncodedFile,
    meta: &ObjectMeta,
) -> Result<u64> {
    let upload = Upload::create(client, bucket, key, meta).await?;
    let result = async {
        let (parts, sent) = upload.send_parts(first, source).await?;
        source.check_unchanged(meta)?;
        tracing::debug!(key, parts = parts.len(), "parts sent; completing");
        upload.complete(parts).await?;
        Ok(sent)
    }
    .await;
    if result.is_err() {
        upload.abort().await;
    }
    result
}

/// One multipart upload in progress.
struct Upload {
    client: Client,
    bucket: String,
    key: String,
    id: String,
    part_size: usize,
}

impl Upload {
    async fn create(client: &Client, bucket: &str, key: &str, meta: &ObjectMeta) -> Result<Self> {
        let out = client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .set_metadata(Some(to_metadata(meta)))
            .set_content_encoding(meta.encoding.content_encoding().map(str::to_owned))
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| sdk_error("CreateMultipartUpload", key, e))?;
        let id = out
            .upload_id
            .ok_or_else(|| Error::Storage(format!("CreateMultipartUpload {key}: no upload id")))?;
        Ok(Upload {
            client: client.clone(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            id,
            part_size: part_size(meta.original_size),
        })
    }

    /// Sends part after part, reading the next while the last one uploads.
    async fn send_parts(
        &self,
        first: Bytes,
        source: &mut EncodedFile,
    ) -> Result<(Vec<CompletedPart>, u64)> {
        let mut parts = Vec::new();
        let mut sent = 0;
        let mut in_flight: Option<InFlight> = None;
        let mut next = first;
        for number in 1.. {
            if number > MAX_PARTS {
                return Err(Error::Refused(format!(
                    "{}: more than {MAX_PARTS} parts",
                    self.key
                )));
            }
            sent += next.len() as u64;
            let task = InFlight(tokio::spawn(self.part(number as i32, next)));
            if let Some(previous) = in_flight.replace(task) {
                parts.push(previous.join().await?);
            }
            next = source.read_up_to(self.part_size).await?;
            if next.is_empty() {
                break;
            }
        }
        if let Some(last) = in_flight {
            parts.push(last.join().await?);
        }
        Ok((parts, sent))
    }

    /// The upload of one part, as a task of its own.
    fn part(
        &self,
        number: i32,
        body: Bytes,
    ) -> impl Future<Output = Result<CompletedPart>> + Send + 'static {
        let bytes = body.len();
        let request = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.id)
            .part_number(number)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .body(ByteStream::from(body));
        let key = self.key.clone();
        async move {
            let start = std::time::Instant::now();
            let out = request
                .send()
                .await
                .map_err(|e| sdk_error("UploadPart", &key, e))?;
            tracing::debug!(
                key,
                number,
                bytes,
                elapsed_ms = start.elapsed().as_millis(),
                "part uploaded"
            );
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag)
                .set_checksum_crc32(out.checksum_crc32)
                .build())
        }
    }

    async fn complete(&self, parts: Vec<CompletedPart>) -> Result<()> {
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| sdk_error("CompleteMultipartUpload", &self.key, e))?;
        Ok(())
    }

    /// Best effort: a failure here only leaves parts for the lifecycle rule.
    async fn abort(&self) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.id)
            .send()
            .await;
        if let Err(e) = aborted {
            tracing::warn!(key = %self.key, error = %sdk_error("AbortMultipartUpload", &self.key, e), "could not abort a multipart upload");
        }
    }
}

/// A part upload running as its own task; cancelled if dropped unjoined
/// (an error elsewhere), so that no part lands after the abort.
struct InFlight(JoinHandle<Result<CompletedPart>>);

impl InFlight {
    async fn join(mut self) -> Result<CompletedPart> {
        (&mut self.0)
            .await
            .map_err(|e| Error::Storage(format!("part upload task: {e}")))?
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_only_for_huge_files() {
        assert_eq!(part_size(0), PART_SIZE);
        assert_eq!(part_size(2 << 30), PART_SIZE);
        assert_eq!(part_size(70 << 30), PART_SIZE);
        let huge = 200u64 << 30;
        let size = part_size(huge) as u64;
        assert!(size > PART_SIZE as u64 && size.is_multiple_of(1 << 20));
        assert!(huge.div_ceil(size) <= PLANNED_PARTS);
    }
}
