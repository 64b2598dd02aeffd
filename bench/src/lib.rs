//! What the benchmarks share (`src/bin/`): a scratch database made anew for
//! each run.

use anyhow::{Result, ensure};
use archiver::{config, db};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnectOptions;
use std::time::Duration;

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
