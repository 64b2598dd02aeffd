//! Loads the README demo's data: migrates, then inserts logs, metric samples
//! and reports (files under `REPORTS_ROOT`, default `target/demo/reports`)
//! spanning three years. `DEMO_LOGS`, `DEMO_METRICS`, `DEMO_REPORTS` scale it.

use archiver::{config, db, demo};
use std::time::Duration;

fn env_i64(name: &str, default: i64) -> anyhow::Result<i64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}: not a whole number: {v:?}")),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = config::database_options(
        std::env::var("DATABASE_URL").ok().as_deref(),
        "archiver-demo",
    )?;
    let pool = db::connect(&opts, 2, Duration::from_secs(30)).await?;
    db::migrate(&pool).await?;
    let d = demo::DemoSize::default();
    let size = demo::DemoSize {
        logs: env_i64("DEMO_LOGS", d.logs)?,
        metrics: env_i64("DEMO_METRICS", d.metrics)?,
        reports: env_i64("DEMO_REPORTS", d.reports)?,
        ..d
    };
    let dir = std::env::var("REPORTS_ROOT").unwrap_or_else(|_| "target/demo/reports".into());
    demo::load(&pool, &size, std::path::Path::new(&dir)).await?;
    println!(
        "loaded {} log rows, {} metric samples, {} reports (files in {dir}) spanning {} days",
        size.logs, size.metrics, size.reports, size.span_days
    );
    Ok(())
}
