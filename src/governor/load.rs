//! Database load: other sessions active, and the round trip of a trivial
//! statement against its idle baseline.

use super::Governor;
use crate::error::Result;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Waits while the database is busier than the settings allow.
pub async fn wait(_g: &Governor, _pool: &PgPool, _stop: &CancellationToken) -> Result<()> {
    Ok(())
}
