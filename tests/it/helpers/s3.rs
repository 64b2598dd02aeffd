//! S3 for the tests (moto, at `ARCHIVER_S3_ENDPOINT`): a client, a bucket
//! of its own per test, and removing it again.

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use uuid::Uuid;

/// moto's endpoint (S3 and SQS on one port).
pub fn endpoint() -> String {
    std::env::var("ARCHIVER_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

/// A client with static credentials (moto accepts any), path-style.
pub fn client() -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .endpoint_url(endpoint())
        .force_path_style(true)
        .build();
    Client::from_conf(config)
}

/// Creates a bucket no other test uses; its name.
pub async fn new_bucket(client: &Client) -> String {
    let bucket = format!("test-{}", Uuid::new_v4().simple());
    client
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create bucket (is moto running?)");
    bucket
}

/// Deletes a bucket and every object in it.
pub async fn delete_bucket(client: &Client, bucket: &str) {
    let listed = client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    for object in listed.contents() {
        client
            .delete_object()
            .bucket(bucket)
            .key(object.key().unwrap())
            .send()
            .await
            .unwrap();
    }
    client.delete_bucket().bucket(bucket).send().await.unwrap();
}

/// Moves object `key` to Glacier, as a lifecycle rule does after its days:
/// its content can no longer be read until it is restored.
pub async fn to_glacier(client: &Client, bucket: &str, key: &str) {
    client
        .copy_object()
        .bucket(bucket)
        .key(key)
        .copy_source(format!("{bucket}/{key}"))
        .storage_class(aws_sdk_s3::types::StorageClass::Glacier)
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Copy)
        .send()
        .await
        .unwrap();
}
