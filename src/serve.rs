//! The worker process: connect to the database (waiting for it), build the
//! executor for the kinds it serves, consume the broker's work queue with
//! the worker loop ([`worker::run_counting`]) until `shutdown`, finish the
//! batches in flight, and close the connection. With `--window`, outside
//! the window it holds no consumer and waits for the window to open; at its
//! close (or past `--max-runtime`) it takes no new batch and hands back the
//! batches in hand at their next chunk. With `--listen`, [`http`]
//! serves `/healthz`, `/readyz` and `/metrics` from before the database is
//! reached until the batches in flight are finished.

pub mod http;

use crate::app::App;
use crate::error::Result;
use crate::governor::window::{self, Window};
use crate::governor::{Governor, Reason};
use crate::transport::Link;
use crate::vocabulary::Kind;
use crate::worker::{self, WorkerStats};
use chrono::Utc;
use http::Probe;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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
    // The executor's governor, whose throttle series the endpoint shows.
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
    let served = consume(app, kinds, stats, probe.as_deref(), shutdown).await;
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
    probe: Option<&Probe>,
    shutdown: CancellationToken,
) -> Result<()> {
    let concurrency = u32::from(app.settings().concurrency);
    let pool = app.batch_pool(concurrency + 2, DATABASE_PATIENCE).await?;
    crate::db::check_migrated(&pool).await?;
    let mut exec = app.executor(&pool).await?;
    if let Some(kinds) = &kinds {
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        tracing::info!("serving {} batches only", names.join(","));
    }
    exec.kinds = kinds;
    let current = attach_probe(app, &pool, probe);
    let opts = app.worker_options();
    let gov = exec.governor.clone();
    let ran = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        if let Some(why) = window::past_deadline(&gov) {
            tracing::info!("{why}: the worker stops (what it held was handed back)");
            break Ok(());
        }
        if let Some(w) = &gov.opts.window
            && !w.contains(Utc::now())
        {
            wait_for_window(w, &gov, &stats, probe, &shutdown).await;
            continue;
        }
        let mut consumer = app.consumer().await?;
        set(&current, Some(consumer.connected()));
        // Fires at the window's close or the deadline: no new delivery is
        // taken, and the batches in hand are handed back at their next chunk.
        let turn = shutdown.child_token();
        let timer = tokio::spawn(close_turn(gov.clone(), turn.clone()));
        let ran =
            worker::run_counting(&exec, consumer.as_mut(), opts, turn.clone(), stats.clone()).await;
        timer.abort();
        consumer.close().await;
        set(&current, None);
        if ran.is_err() || !turn.is_cancelled() {
            break ran;
        }
    };
    tracing::info!(?stats, "worker stopped");
    ran
}

/// Gives the probe its pools and a broker link that asks the consumer open
/// now. The consumer is closed outside the window and a new one opened when
/// it reopens; with none open, there is no broker link to lose. Returns
/// where the open consumer's link is to be put.
fn attach_probe(app: &App, pool: &PgPool, probe: Option<&Probe>) -> Arc<Mutex<Option<Link>>> {
    let current: Arc<Mutex<Option<Link>>> = Arc::default();
    if let Some(probe) = probe {
        // One session of its own for `/readyz`, opened when first asked.
        let probe_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(http::DB_PROBE_TIMEOUT)
            .connect_lazy_with(app.database.clone());
        let link = current.clone();
        let broker = Link::new(move || {
            link.lock()
                .map(|l| l.as_ref().is_none_or(Link::is_up))
                .unwrap_or(true)
        });
        probe.attach(pool.clone(), probe_pool, broker);
    }
    current
}

fn set(current: &Mutex<Option<Link>>, link: Option<Link>) {
    if let Ok(mut l) = current.lock() {
        *l = link;
    }
}

/// Cancels `turn` when the window closes or the deadline passes.
async fn close_turn(gov: Arc<Governor>, turn: CancellationToken) {
    tokio::select! {
        why = window::until_stop(&gov) => tracing::info!(
            "{why}: taking no new batch; batches in hand are handed back at their next chunk"
        ),
        () = turn.cancelled() => return,
    }
    turn.cancel();
}

/// Outside the window: holds no delivery (the consumer is closed), waits
/// until the window opens, the deadline passes or `shutdown`, beating the
/// heartbeat (the worker is alive) and counting the wait as
/// [`Reason::Window`].
async fn wait_for_window(
    w: &Window,
    gov: &Governor,
    stats: &WorkerStats,
    probe: Option<&Probe>,
    shutdown: &CancellationToken,
) {
    let open = w.next_open(Utc::now());
    let why = format!(
        "outside the maintenance window {w}: taking no batch until it opens at {}",
        w.show(open)
    );
    tracing::info!("{why}");
    if let Some(p) = probe {
        p.waiting(Some(why));
    }
    // One wait, its time counted as it goes (`/metrics` shows it meanwhile).
    gov.throttled.add(Reason::Window, Duration::ZERO);
    let mut counted = Instant::now();
    let mut tick = tokio::time::interval(worker::HEARTBEAT_TICK);
    let deadline = async {
        match gov.opts.deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    // Wall-clock time is read again at each tick: a long sleep computed
    // once would drift from it (or miss a clock step).
    while !w.contains(Utc::now()) {
        stats.heartbeat.beat();
        gov.throttled.spent(Reason::Window, counted.elapsed());
        counted = Instant::now();
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut deadline => break,
            () = shutdown.cancelled() => break,
        }
    }
    gov.throttled.spent(Reason::Window, counted.elapsed());
    if let Some(p) = probe {
        p.waiting(None);
    }
    if w.contains(Utc::now()) {
        tracing::info!(
            "the maintenance window {w} is open until {}: taking batches again",
            w.show(w.closes_at(Utc::now()).unwrap_or(open))
        );
    }
}
