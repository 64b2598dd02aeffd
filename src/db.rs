//! Connecting to PostgreSQL and applying the embedded migrations.

use crate::config::describe;
use crate::error::{Class, Error, Result};
use backon::{ExponentialBuilder, Retryable};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::time::Duration;

/// The schema, embedded in every binary (`migrations/`).
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Opens a pool of at most `max` connections, retrying while the server is
/// unreachable for up to `patience`. The error names the server, not the
/// password.
pub async fn connect(opts: &PgConnectOptions, max: u32, patience: Duration) -> Result<PgPool> {
    let attempt = || async {
        PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.clone())
            .await
            .map_err(Error::from)
    };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_jitter()
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(patience))
                .without_max_times(),
        )
        .when(|e: &Error| e.class() == Class::Unavailable)
        .notify(|e, d| {
            tracing::warn!(
                "database at {} unreachable ({e}); retrying in {d:?}",
                describe(opts)
            )
        })
        .await
        .map_err(|e| match e {
            Error::Db(inner) => Error::config(
                "DATABASE_URL",
                format!("cannot connect to {}: {inner}", describe(opts)),
            ),
            other => other,
        })
}

/// Applies every migration not yet applied. Safe to run concurrently: sqlx
/// serializes migrators with an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Fails with a clear message when the schema is older than this binary.
pub async fn check_migrated(pool: &PgPool) -> Result<()> {
    let newest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> = sqlx::query_scalar(
        "SELECT max(version) FROM _sqlx_migrations WHERE success
         AND EXISTS (SELECT 1 FROM pg_tables WHERE tablename = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(None);
    if applied.unwrap_or(0) < newest {
        return Err(Error::config(
            "DATABASE_URL",
            format!(
                "schema is not up to date (have {}, need {newest}): run `planner migrate`",
                applied.unwrap_or(0)
            ),
        ));
    }
    Ok(())
}
