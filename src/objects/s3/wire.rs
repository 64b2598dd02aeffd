//! What the S3 backend says on the wire besides the bytes: the archiver's
//! metadata as S3 user metadata (`x-amz-meta-original-size`,
//! `-original-sha256`, `-encoding`), and how an SDK failure maps to the
//! archiver's error classes. Both are pure and unit-tested without a server;
//! every S3 call of the backend (the store, multipart uploads, lifecycle
//! rules) maps its failure through [`sdk_error`].

use crate::error::Error;
use crate::objects::store::{Encoding, ObjectMeta};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use std::collections::HashMap;

const META_SIZE: &str = "original-size";
const META_SHA256: &str = "original-sha256";
const META_ENCODING: &str = "encoding";

/// The archiver's metadata as S3 user metadata.
pub(super) fn to_metadata(meta: &ObjectMeta) -> HashMap<String, String> {
    HashMap::from([
        (META_SIZE.to_owned(), meta.original_size.to_string()),
        (META_SHA256.to_owned(), meta.original_sha256.clone()),
        (META_ENCODING.to_owned(), meta.encoding.as_str().to_owned()),
    ])
}

/// The archiver's metadata, if all of it is there and well-formed.
pub(super) fn from_metadata(map: &HashMap<String, String>) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        original_size: map.get(META_SIZE)?.parse().ok()?,
        original_sha256: map.get(META_SHA256)?.clone(),
        encoding: map.get(META_ENCODING)?.parse::<Encoding>().ok()?,
    })
}

/// Error codes worth retrying whatever their HTTP status.
const RETRYABLE_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "OperationAborted",
    "InternalError",
    "ServiceUnavailable",
    "ExpiredToken",
    "NoSuchUpload",
];

/// Maps an SDK failure to the archiver's error: connection trouble,
/// timeouts, 5xx and throttling are [`Error::Storage`] (retry); a missing
/// bucket or denied access is a configuration error; any other refusal is
/// [`Error::Refused`].
pub(super) fn sdk_error<E>(op: &str, key: &str, e: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = match &e {
        SdkError::ServiceError(service) => service.raw().status().as_u16(),
        SdkError::ConstructionFailure(_) => {
            return Error::Refused(format!("{op} {key}: {}", DisplayErrorContext(&e)));
        }
        _ => return Error::Storage(format!("{op} {key}: {}", DisplayErrorContext(&e))),
    };
    let code = e.code().map(str::to_owned);
    let what = format!("{op} {key}: {}", DisplayErrorContext(&e));
    classify(code.as_deref(), status, what)
}

fn classify(code: Option<&str>, status: u16, what: String) -> Error {
    if status >= 500
        || status == 429
        || status == 408
        || code.is_some_and(|c| RETRYABLE_CODES.contains(&c))
    {
        return Error::Storage(what);
    }
    match code {
        Some("InvalidObjectState") => Error::Refused(format!(
            "the object is in an archive storage class (Glacier): restore it from the archive tier first: {what}"
        )),
        Some("NoSuchBucket") => Error::config("REPORTS_ARCHIVE_BUCKET", what),
        _ if status == 403 => Error::config(
            "REPORTS_ARCHIVE_BUCKET",
            format!("access denied (check the AWS credentials and the bucket policy): {what}"),
        ),
        _ => Error::Refused(what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Class;

    #[test]
    fn metadata_round_trips() {
        let meta = ObjectMeta {
            original_size: 42,
            original_sha256: "ab".repeat(32),
            encoding: Encoding::Gzip,
        };
        assert_eq!(from_metadata(&to_metadata(&meta)), Some(meta));
        assert_eq!(from_metadata(&HashMap::new()), None);
    }

    #[test]
    fn failures_are_classified() {
        let class = |code, status| classify(code, status, String::new()).class();
        assert_eq!(class(Some("SlowDown"), 503), Class::Transient);
        assert_eq!(class(Some("InternalError"), 500), Class::Transient);
        assert_eq!(class(Some("RequestTimeout"), 400), Class::Transient);
        assert_eq!(class(Some("AccessDenied"), 403), Class::Permanent);
        assert_eq!(class(Some("NoSuchBucket"), 404), Class::Permanent);
        assert_eq!(class(Some("InvalidArgument"), 400), Class::Permanent);
        let glacier = classify(Some("InvalidObjectState"), 403, String::new());
        assert!(
            matches!(&glacier, Error::Refused(m) if m.contains("Glacier")),
            "{glacier}"
        );
    }
}
