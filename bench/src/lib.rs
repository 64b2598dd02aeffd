//! What the benchmarks share (`src/bin/`): a scratch database made anew for
//! each run, and their logging.

use anyhow::{Result, ensure};
use archiver::{config, db};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnectOptions;
use std::io::IsTerminal;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: text to stderr (coloured only on a
/// terminal), as the archiver's commands write it, with `default` as its
/// filter unless `RUST_LOG` is set: the benchmarks keep the library quiet
/// this way, so stdout and stderr carry their own lines.
pub fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Drops and recreates `database` on the server at `admin_url` (as
/// `application`), then runs `settings` in it by name (e.g. `ALTER DATABASE
/// … SET`); returns the options to connect to it.
pub async fn recreate_database(
    admin_url: &str,
    database: &str,
    application: &str,
    settings: &[String],
) -> Result<PgConnectOptions> {
    ensure!(
        !database.is_empty()
            && database
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "--database: use lowercase letters, digits and _"
    );
    let admin = config::database_options(Some(admin_url), application)?;
    let pool = db::connect(&admin, 1, Duration::from_secs(30)).await?;
    let statements = [
        format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
        format!("CREATE DATABASE {database}"),
    ];
    for sql in statements.iter().chain(settings) {
        sqlx::raw_sql(AssertSqlSafe(sql.clone()))
            .execute(&pool)
            .await?;
    }
    pool.close().await;
    Ok(admin.database(database))
}
