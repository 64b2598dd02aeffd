//! The worker process: connect to the database (waiting for it), build the
//! executor for the kinds it serves, consume the broker's work queue with
//! the worker loop ([`worker::run`]) until `shutdown`, finish the batches in
//! flight, and close the connection.

use crate::app::App;
use crate::error::Result;
use crate::vocabulary::Kind;
use crate::worker;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a starting worker waits for the database: fleets are often
/// started together with it.
const DATABASE_PATIENCE: Duration = Duration::from_secs(600);

/// Serves batches of `kinds` (empty: every kind) until `shutdown`.
pub async fn run(app: &App, kinds: &[Kind], shutdown: CancellationToken) -> Result<()> {
    app.queue.broker()?;
    let kinds = app.served(kinds)?;
    let concurrency = u32::from(app.settings().concurrency);
    let pool = app.batch_pool(concurrency + 2, DATABASE_PATIENCE).await?;
    crate::db::check_migrated(&pool).await?;
    let mut exec = app.executor(&pool).await?;
    if let Some(kinds) = &kinds {
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        tracing::info!("serving {} batches only", names.join(","));
    }
    exec.kinds = kinds;
    let mut consumer = app.consumer().await?;
    let stats = worker::run(&exec, consumer.as_mut(), app.worker_options(), shutdown).await?;
    consumer.close().await;
    tracing::info!(?stats, "worker stopped");
    Ok(())
}
