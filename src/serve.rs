//! The worker process: connect to the database (waiting for it), build the
//! executor for the kinds it serves, consume the broker's work queue with
//! the worker loop ([`worker::run_counting`]) until `shutdown`, finish the
//! batches in flight, and close the connection. With `--listen`, [`http`]
//! serves `/healthz`, `/readyz` and `/metrics` from before the database is
//! reached until the batches in flight are finished.

pub mod http;

use crate::app::App;
use crate::error::Result;
use crate::governor::Governor;
use crate::vocabulary::Kind;
use crate::worker::{self, WorkerStats};
use http::Probe;
use sqlx::postgres::PgPoolOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a starting worker waits for the database: fleets are often
/// started together with it.
const DATABASE_PATIENCE: Duration = Duration::from_secs(600);

/// The worker's HTTP endpoint (`--listen`, `--stuck-after`).
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    /// Where to serve it.
    pub listen: SocketAddr,
    /// `/healthz` fails once the loop has not turned for this long.
    pub stuck_after: Duration,
}

/// Serves batches of `kinds` (empty: every kind) until `shutdown`, with the
/// HTTP endpoint when one is given.
pub async fn run(
    app: &App,
    kinds: &[Kind],
    endpoint: Option<Endpoint>,
    shutdown: CancellationToken,
) -> Result<()> {
    app.queue.broker()?;
    let kinds = app.served(kinds)?;
    let stats = Arc::new(WorkerStats::default());
    // One governor for the executor and the endpoint's throttle series.
    let governor = app.governor();
    // Served until the batches in flight are done (not until SIGTERM), so
    // that `/readyz` says "draining" meanwhile.
    let stop_http = CancellationToken::new();
    let mut probe = None;
    let mut server = None;
    if let Some(e) = endpoint {
        let listener = crate::http::bind(e.listen).await?;
        let bound = listener.local_addr().unwrap_or(e.listen);
        tracing::info!("worker endpoint on http://{bound} (/healthz, /readyz, /metrics)");
        let p = Arc::new(
            Probe::new(stats.clone(), e.stuck_after, shutdown.clone())
                .with_governor(governor.clone()),
        );
        server = Some(tokio::spawn(http::serve(
            listener,
            p.clone(),
            stop_http.clone(),
        )));
        probe = Some(p);
    }
    let served = consume(app, kinds, stats, governor, probe.as_deref(), shutdown).await;
    stop_http.cancel();
    if let Some(s) = server {
        let _ = s.await;
    }
    served
}

async fn consume(
    app: &App,
    kinds: Option<Vec<Kind>>,
    stats: Arc<WorkerStats>,
    governor: Arc<Governor>,
    probe: Option<&Probe>,
    shutdown: CancellationToken,
) -> Result<()> {
    let concurrency = u32::from(app.settings().concurrency);
    let pool = app.batch_pool(concurrency + 2, DATABASE_PATIENCE).await?;
    crate::db::check_migrated(&pool).await?;
    let mut exec = app.executor(&pool).await?;
    exec.governor = governor;
    if let Some(kinds) = &kinds {
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        tracing::info!("serving {} batches only", names.join(","));
    }
    exec.kinds = kinds;
    let mut consumer = app.consumer().await?;
    if let Some(probe) = probe {
        // One session of its own for `/readyz`, opened when first asked.
        let probe_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(http::DB_PROBE_TIMEOUT)
            .connect_lazy_with(app.database.clone());
        probe.attach(pool.clone(), probe_pool, consumer.connected());
    }
    let opts = app.worker_options();
    let ran = worker::run_counting(&exec, consumer.as_mut(), opts, shutdown, stats.clone()).await;
    consumer.close().await;
    tracing::info!(?stats, "worker stopped");
    ran
}
