//! The worker's HTTP endpoint (`worker --listen ADDR`), for an orchestrator
//! and for Prometheus; about this worker only (the ledger-wide figures are
//! `planner metrics`'s):
//!
//! - `GET /healthz`: 200 while the worker loop turns; 503 once it has not
//!   turned for `--stuck-after` (what counts as turning: see
//!   [`Heartbeat`]). Restarting such a worker is the cure, except while its
//!   batches wait out an unreachable database: that is 200 (and `/readyz`
//!   503), since a restart cannot bring the database back.
//! - `GET /readyz`: 200 when the database answers `SELECT 1` within
//!   [`DB_PROBE_TIMEOUT`], the consumer is connected to its broker
//!   ([`Link`]) and the worker is not draining; otherwise 503 and a
//!   one-line reason. From SIGTERM on it stays 503 while in-flight batches
//!   finish. Outside its maintenance window (`--window`) the worker holds
//!   no consumer and `/readyz` is 200, saying when the window opens.
//! - `GET /metrics`: this worker's Prometheus series (see [`render`]).
//!
//! Anything else is 404; a method other than GET or HEAD, 405. A slow or
//! flooding client cannot starve the worker: the server is a task of its
//! own, bounded as [`crate::http`] says.

use crate::error::{Error, Result};
use crate::governor::{Governor, Reason, Throttled};
use crate::http::{Reply, reply};
use crate::monitoring::CONTENT_TYPE;
use crate::monitoring::{metric_error, register};
use crate::transport::Link;
use crate::worker::{Heartbeat, WorkerStats};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{CounterVec, Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use sqlx::PgPool;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long `/readyz` waits for the database's `SELECT 1`.
pub const DB_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoint reads: the loop's counters and heartbeat, the shutdown
/// token, and — once the worker has connected — its pools and broker link.
#[derive(Debug)]
pub struct Probe {
    stats: Arc<WorkerStats>,
    stuck_after: Duration,
    draining: CancellationToken,
    parts: OnceLock<Parts>,
    /// Set while the worker waits for its maintenance window: why.
    waiting: Mutex<Option<String>>,
    governor: Arc<Governor>,
}

/// What exists only once the worker has reached its database.
#[derive(Debug)]
struct Parts {
    /// The sessions that execute batches (for the pool gauge).
    batches: PgPool,
    /// A session of its own for `SELECT 1`, so that a worker whose batch
    /// sessions are all busy is not reported unreachable.
    probe: PgPool,
    broker: Link,
}

impl Probe {
    /// A probe of the loop counting into `stats`, stuck after `stuck_after`
    /// without a turn, draining once `shutdown` is cancelled.
    pub fn new(
        stats: Arc<WorkerStats>,
        stuck_after: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Probe {
            stats,
            stuck_after,
            draining: shutdown,
            parts: OnceLock::new(),
            waiting: Mutex::default(),
            governor: Arc::default(),
        }
    }

    /// The worker waits outside its maintenance window (`Some(why)`), or
    /// no longer (`None`). Meanwhile `/readyz` is 200 and says why it takes
    /// nothing: the worker is not broken, and a rollout must not stall on
    /// workers waiting for their window.
    pub fn waiting(&self, why: Option<String>) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = why;
        }
    }

    /// The governor whose waits `/metrics` shows.
    pub fn with_governor(mut self, governor: Arc<Governor>) -> Self {
        self.governor = governor;
        self
    }

    /// The worker is connected: its batch pool, a pool for the readiness
    /// query, and its consumer's link. Until then `/readyz` says starting.
    pub fn attach(&self, batches: PgPool, probe: PgPool, broker: Link) {
        let _ = self.parts.set(Parts {
            batches,
            probe,
            broker,
        });
    }

    /// `/healthz`: the status and its one-line reason. A loop that has not
    /// turned because its batches wait out an unreachable database is not
    /// stuck: a restart would not bring the database back, and a fleet
    /// restarted together during an outage only adds to it. `/readyz` says
    /// the database is unreachable meanwhile. Nor is one whose batches wait
    /// for the governor (lagging replicas, a busy database, the WAL rate).
    pub async fn health(&self) -> (StatusCode, String) {
        let (status, why) = health(&self.stats.heartbeat, self.stuck_after, &self.stats);
        if status == StatusCode::OK {
            return (status, why);
        }
        let waiting = self.governor.waiting();
        if waiting > 0 {
            return (
                StatusCode::OK,
                format!("alive: {waiting} batch(es) wait for the governor (see /metrics)\n"),
            );
        }
        match self.database().await {
            Err(unreachable) => (
                StatusCode::OK,
                format!("alive: batches wait for the database ({unreachable})\n"),
            ),
            Ok(()) => (status, why),
        }
    }

    /// Whether the database answers `SELECT 1` in time on the probe's own
    /// session; why not, when it does not.
    async fn database(&self) -> std::result::Result<(), String> {
        let Some(parts) = self.parts.get() else {
            return Err("not connected to the database yet".into());
        };
        let select = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&parts.probe);
        match tokio::time::timeout(DB_PROBE_TIMEOUT, select).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("database unreachable: {}", one_line(&e))),
            Err(_) => Err(format!(
                "database unreachable: no answer to SELECT 1 within {DB_PROBE_TIMEOUT:?}"
            )),
        }
    }

    /// `/readyz`: the status and its one-line reason.
    pub async fn readiness(&self) -> (StatusCode, String) {
        let unready = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why);
        if self.draining.is_cancelled() {
            return unready("draining: stopping, finishing the batches in flight".into());
        }
        let Some(parts) = self.parts.get() else {
            return unready("starting: not connected to the database yet".into());
        };
        if let Err(why) = self.database().await {
            return unready(why);
        }
        if let Some(why) = self.waiting.lock().ok().and_then(|w| w.clone()) {
            return (StatusCode::OK, format!("ready: {why}\n"));
        }
        if !parts.broker.is_up() {
            return unready("broker unreachable: the consumer is not connected".into());
        }
        (StatusCode::OK, "ready\n".into())
    }

    /// `/metrics`: this worker's series in the text exposition format.
    pub fn metrics(&self) -> Result<String> {
        let pool = self.parts.get().map(|p| &p.batches);
        let in_use = pool.map_or(0, |p| i64::from(p.size()) - p.num_idle() as i64);
        render(&self.stats, in_use, &self.governor.throttled)
    }
}

fn health(beat: &Heartbeat, stuck_after: Duration, stats: &WorkerStats) -> (StatusCode, String) {
    match beat.since() {
        None => (StatusCode::OK, "alive: starting\n".into()),
        Some(since) if since > stuck_after => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stuck: the worker loop has not turned for {}s (--stuck-after {}s); {} batch(es) in flight\n",
                since.as_secs(),
                stuck_after.as_secs(),
                stats.in_flight.load(Ordering::Relaxed)
            ),
        ),
        Some(_) => (StatusCode::OK, "alive\n".into()),
    }
}

/// An error's text on one line.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

/// Renders the worker's series, with `in_use` database sessions:
/// `archiver_worker_batches_in_flight`, `archiver_worker_batch_duration_seconds{kind,outcome}`,
/// `archiver_worker_rows_total{kind}`, `archiver_worker_bytes_total{kind}`,
/// `archiver_worker_retries_total`, `archiver_worker_hand_backs_total`,
/// `archiver_worker_dead_letters_total`, `archiver_worker_db_connections_in_use`
/// and `archiver_worker_last_settled_timestamp_seconds` (0 until a batch is
/// settled), and what the governor spent waiting before chunks, by reason:
/// `archiver_worker_throttled_seconds_total{reason}` and
/// `archiver_worker_throttle_waits_total{reason}`. Counters count since
/// the process started.
pub fn render(stats: &WorkerStats, in_use: i64, throttled: &Throttled) -> Result<String> {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, value: i64| -> Result<()> {
        let g = register(
            &registry,
            IntGauge::with_opts(Opts::new(name, help)).map_err(metric_error)?,
        )?;
        g.set(value);
        Ok(())
    };
    let counter = |name: &str, help: &str, value: &std::sync::atomic::AtomicU64| -> Result<()> {
        let c = register(
            &registry,
            IntCounter::with_opts(Opts::new(name, help)).map_err(metric_error)?,
        )?;
        c.inc_by(value.load(Ordering::Relaxed));
        Ok(())
    };
    let by_kind = |name: &str, help: &str| -> Result<IntCounterVec> {
        register(
            &registry,
            IntCounterVec::new(Opts::new(name, help), &["kind"]).map_err(metric_error)?,
        )
    };
    gauge(
        "archiver_worker_batches_in_flight",
        "Batches this worker is handling now (taken, not yet settled).",
        stats.in_flight.load(Ordering::Relaxed),
    )?;
    gauge(
        "archiver_worker_db_connections_in_use",
        "Batch sessions of this worker's database pool in use (pool size minus idle).",
        in_use,
    )?;
    let rows = by_kind(
        "archiver_worker_rows_total",
        "Rows this worker archived, by kind (metrics: daily aggregates; reports: files).",
    )?;
    let bytes = by_kind(
        "archiver_worker_bytes_total",
        "Bytes this worker archived, by kind (reports: original file bytes).",
    )?;
    for k in crate::vocabulary::Kind::ALL {
        let of = stats.of(k);
        rows.with_label_values(&[k.as_str()])
            .inc_by(of.rows.load(Ordering::Relaxed));
        bytes
            .with_label_values(&[k.as_str()])
            .inc_by(of.bytes.load(Ordering::Relaxed));
    }
    counter(
        "archiver_worker_retries_total",
        "Deliveries this worker gave back to be retried later (an attempt spent).",
        &stats.retried,
    )?;
    counter(
        "archiver_worker_hand_backs_total",
        "Deliveries this worker gave back unrun, spending no attempt (stopping, or a kind it does not serve).",
        &stats.handed_back,
    )?;
    counter(
        "archiver_worker_dead_letters_total",
        "Deliveries this worker parked in the dead-letter queue.",
        &stats.dead_lettered,
    )?;
    let last = register(
        &registry,
        Gauge::with_opts(Opts::new(
            "archiver_worker_last_settled_timestamp_seconds",
            "Unix time this worker last settled a delivery (0: none yet).",
        ))
        .map_err(metric_error)?,
    )?;
    last.set(stats.last_settled_ms.load(Ordering::Relaxed) as f64 / 1000.0);
    register(&registry, stats.durations.clone())?;
    let seconds = register(
        &registry,
        CounterVec::new(
            Opts::new(
                "archiver_worker_throttled_seconds_total",
                "Seconds this worker's batches waited before chunks, by reason (replica_lag, active_sessions, probe, wal_rate, window).",
            ),
            &["reason"],
        )
        .map_err(metric_error)?,
    )?;
    let waits = register(
        &registry,
        IntCounterVec::new(
            Opts::new(
                "archiver_worker_throttle_waits_total",
                "Times this worker waited before a chunk, by reason.",
            ),
            &["reason"],
        )
        .map_err(metric_error)?,
    )?;
    for r in Reason::ALL {
        seconds
            .with_label_values(&[r.as_str()])
            .inc_by(throttled.seconds(r));
        waits
            .with_label_values(&[r.as_str()])
            .inc_by(throttled.waits(r));
    }

    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .map_err(metric_error)?;
    String::from_utf8(out).map_err(|e| Error::JobFailed(format!("encoding metrics: {e}")))
}

/// Serves the endpoint on `listener` until `stop` is cancelled (after the
/// worker has drained, so that `/readyz` says draining meanwhile).
pub async fn serve(listener: TcpListener, probe: Arc<Probe>, stop: CancellationToken) {
    crate::http::serve(listener, stop, "worker endpoint", move |req| {
        respond(probe.clone(), req)
    })
    .await;
}

async fn respond(probe: Arc<Probe>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path();
    if !matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz or /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header("allow", "GET, HEAD")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from("GET or HEAD only\n")));
    }
    match path {
        "/healthz" => {
            let (status, why) = probe.health().await;
            reply(status, "text/plain", why)
        }
        "/readyz" => {
            let (status, why) = probe.readiness().await;
            if status != StatusCode::OK {
                tracing::debug!("not ready: {why}");
            }
            reply(status, "text/plain", format!("{}\n", why.trim_end()))
        }
        _ => match probe.metrics() {
            Ok(text) => reply(StatusCode::OK, CONTENT_TYPE, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_there_before_the_first_batch() {
        let throttled = Throttled::default();
        throttled.add(Reason::ReplicaLag, Duration::from_millis(1500));
        let text = render(&WorkerStats::default(), 0, &throttled).unwrap();
        for want in [
            "archiver_worker_batches_in_flight 0",
            "archiver_worker_db_connections_in_use 0",
            "archiver_worker_rows_total{kind=\"logs\"} 0",
            "archiver_worker_bytes_total{kind=\"reports\"} 0",
            "archiver_worker_retries_total 0",
            "archiver_worker_hand_backs_total 0",
            "archiver_worker_dead_letters_total 0",
            "archiver_worker_last_settled_timestamp_seconds 0",
            "archiver_worker_batch_duration_seconds_count{kind=\"logs\",outcome=\"done\"} 0",
            "# TYPE archiver_worker_batch_duration_seconds histogram",
            "archiver_worker_throttled_seconds_total{reason=\"replica_lag\"} 1.5",
            "archiver_worker_throttle_waits_total{reason=\"replica_lag\"} 1",
            "archiver_worker_throttled_seconds_total{reason=\"window\"} 0",
            "archiver_worker_throttle_waits_total{reason=\"wal_rate\"} 0",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} in\n{text}");
        }
    }

    #[test]
    fn a_loop_starting_or_just_turned_is_alive() {
        let stats = WorkerStats::default();
        let limit = Duration::from_secs(60);
        // Not started yet (waiting for the database): alive.
        assert_eq!(health(&stats.heartbeat, limit, &stats).0, StatusCode::OK);
        stats.heartbeat.beat();
        assert_eq!(health(&stats.heartbeat, limit, &stats).0, StatusCode::OK);
    }
}
