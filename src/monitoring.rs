//! Monitoring (R9): Prometheus metrics read from the ledger.
//!
//! The ledger (`archive_jobs`, `archive_batches`) is the authority on what
//! every planner and worker did, so the metrics are computed from it at
//! each scrape rather than counted in any one process: a fleet of workers
//! and a planner that lives only while cron runs it report once, exactly,
//! whichever process serves them. `planner metrics` prints them once (for
//! node_exporter's textfile collector); `planner metrics --listen ADDR`
//! serves them at `/metrics` for Prometheus to scrape.
//!
//! The names are those of the spec's alert rules
//! (`deploy/prometheus/archive-alerts.yml`):
//! - `archive_job_failures_total{job_type}`: times a job went `failed`
//!   (counted in `archive_jobs.failures`, so a redriven job that then
//!   completes still counts once, and the counter never falls);
//! - `archive_job_last_success_timestamp{job_type}`: Unix time the newest
//!   `completed` job of that type completed (absent until one has);
//! - `archive_bytes_total{job_type}`: bytes archived (job counters);
//!
//! and, for the operator: `archive_rows_archived_total{job_type}`,
//! `archive_jobs_running{job_type}`, `archive_batches{status}` (batches
//! not done: `pending`, or `dead` in the dead-letter queue awaiting
//! `planner redrive`), the same by kind in `archive_batches_by_kind{kind,
//! status}` (the backlog per kind), and `archive_batch_last_completed_timestamp` (0 until
//! a batch completes; with pending batches, it tells whether workers make
//! progress, or never started). Counters of every job type are present from the
//! start, at 0, so that `increase()` sees the first failure.

use crate::error::{Error, Result};
use crate::http::{Reply, reply};
use crate::ledger::{self, Figures};
use crate::vocabulary::{BatchStatus, JobType, Kind};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use prometheus::core::Collector;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use sqlx::PgPool;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// The text exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metrics library error as ours.
pub(crate) fn metric_error(e: prometheus::Error) -> Error {
    Error::JobFailed(format!("encoding metrics: {e}"))
}

/// Adds `metric` to `registry`; returns it for setting values.
pub(crate) fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M> {
    registry
        .register(Box::new(metric.clone()))
        .map_err(metric_error)?;
    Ok(metric)
}

/// A metric with one label, added to `registry`.
fn labelled<M: Collector + Clone + 'static>(
    registry: &Registry,
    new: fn(Opts, &[&str]) -> prometheus::Result<M>,
    name: &str,
    help: &str,
    label: &str,
) -> Result<M> {
    register(
        registry,
        new(Opts::new(name, help), &[label]).map_err(metric_error)?,
    )
}

/// Reads the ledger and renders every metric in the text exposition format.
pub async fn gather(pool: &PgPool) -> Result<String> {
    render(&ledger::figures(pool).await?)
}

/// Every series served, registered in one registry.
struct Series {
    registry: Registry,
    failures: IntCounterVec,
    last_success: GaugeVec,
    archived_bytes: IntCounterVec,
    archived_rows: IntCounterVec,
    running: IntGaugeVec,
    open: IntGaugeVec,
    open_by_kind: IntGaugeVec,
    last_batch_done: prometheus::Gauge,
}

impl Series {
    fn new() -> Result<Series> {
        let registry = Registry::new();
        let failures = labelled(
            &registry,
            IntCounterVec::new,
            "archive_job_failures_total",
            "Times an archive job of this type failed (a redriven job that then completed still counts).",
            "job_type",
        )?;
        let last_success = labelled(
            &registry,
            GaugeVec::new,
            "archive_job_last_success_timestamp",
            "Unix time the newest completed archive job of this type completed.",
            "job_type",
        )?;
        let archived_bytes = labelled(
            &registry,
            IntCounterVec::new,
            "archive_bytes_total",
            "Bytes archived by all jobs of this type (reports: original file bytes).",
            "job_type",
        )?;
        let archived_rows = labelled(
            &registry,
            IntCounterVec::new,
            "archive_rows_archived_total",
            "Rows written to the archive by all jobs of this type (metrics: daily aggregates; reports: files).",
            "job_type",
        )?;
        let running = labelled(
            &registry,
            IntGaugeVec::new,
            "archive_jobs_running",
            "Archive jobs of this type now running.",
            "job_type",
        )?;
        let open = labelled(
            &registry,
            IntGaugeVec::new,
            "archive_batches",
            "Batches not done: pending, or dead (parked in the dead-letter queue).",
            "status",
        )?;
        let open_by_kind = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "archive_batches_by_kind",
                    "Batches not done, by kind: pending (the backlog) or dead.",
                ),
                &["kind", "status"],
            )
            .map_err(metric_error)?,
        )?;
        let last_batch_done = register(
            &registry,
            prometheus::Gauge::with_opts(Opts::new(
                "archive_batch_last_completed_timestamp",
                "Unix time the newest batch of any kind was completed (0: none yet).",
            ))
            .map_err(metric_error)?,
        )?;
        Ok(Series {
            failures,
            last_success,
            archived_bytes,
            archived_rows,
            running,
            open,
            open_by_kind,
            last_batch_done,
            registry,
        })
    }
}

/// Renders the ledger's figures in the text exposition format.
pub fn render(figures: &Figures) -> Result<String> {
    let Series {
        registry,
        failures,
        last_success,
        archived_bytes,
        archived_rows,
        running,
        open,
        open_by_kind,
        last_batch_done,
    } = Series::new()?;
    last_batch_done.set(figures.last_batch_done.unwrap_or(0.0));

    // Every job type from the start, at zero.
    for t in JobType::ALL.map(JobType::as_str) {
        for c in [&failures, &archived_bytes, &archived_rows] {
            c.with_label_values(&[t]);
        }
        running.with_label_values(&[t]);
    }
    for s in [BatchStatus::Pending, BatchStatus::Dead] {
        open.with_label_values(&[s.as_str()]);
        for k in Kind::ALL {
            open_by_kind.with_label_values(&[k.as_str(), s.as_str()]);
        }
    }
    for j in &figures.jobs {
        let t = [j.job_type.as_str()];
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        failures.with_label_values(&t).inc_by(count(j.failures));
        archived_bytes.with_label_values(&t).inc_by(count(j.bytes));
        archived_rows.with_label_values(&t).inc_by(count(j.rows));
        running.with_label_values(&t).set(j.running);
        if let Some(ts) = j.last_success {
            last_success.with_label_values(&t).set(ts);
        }
    }
    for (kind, status, n) in &figures.open_batches {
        open.with_label_values(&[status.as_str()]).add(*n);
        open_by_kind
            .with_label_values(&[kind.as_str(), status.as_str()])
            .set(*n);
    }

    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .map_err(metric_error)?;
    String::from_utf8(out).map_err(|e| Error::JobFailed(format!("encoding metrics: {e}")))
}

/// Serves `GET /metrics` on `addr` until `stop` is cancelled. Each scrape
/// reads the ledger; a database failure answers 503 (Prometheus then records
/// the target as down). `ready` receives the bound address (useful with
/// port 0).
pub async fn serve(
    pool: PgPool,
    addr: SocketAddr,
    stop: CancellationToken,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let listener = crate::http::bind(addr).await?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::config("--listen", format!("{addr}: {e}")))?;
    ready(bound);
    crate::http::serve(listener, stop, "metrics", move |req| {
        respond(pool.clone(), req)
    })
    .await;
    Ok(())
}

async fn respond(pool: PgPool, req: Request<Incoming>) -> Reply {
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".into(),
        );
    }
    match gather(&pool).await {
        Ok(text) => reply(StatusCode::OK, CONTENT_TYPE, text),
        Err(e) => {
            tracing::warn!("metrics scrape: {e}");
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("cannot read the ledger: {e}\n"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::JobTypeFigures;

    fn line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(name))
    }

    #[test]
    fn an_empty_ledger_shows_every_job_type_at_zero() {
        let text = render(&Figures::default()).unwrap();
        for t in ["logs", "metrics", "reports", "retention"] {
            let name = format!("archive_job_failures_total{{job_type=\"{t}\"}} 0");
            assert!(line(&text, &name).is_some(), "{name} in\n{text}");
        }
        assert!(
            line(&text, "archive_batches{status=\"dead\"} 0").is_some(),
            "{text}"
        );
        assert!(
            line(&text, "archive_batch_last_completed_timestamp 0").is_some(),
            "{text}"
        );
        // No success yet: absent, so an alert on its age cannot fire early.
        assert!(
            line(&text, "archive_job_last_success_timestamp{").is_none(),
            "{text}"
        );
    }

    #[test]
    fn figures_become_the_named_series() {
        let figures = Figures {
            jobs: vec![JobTypeFigures {
                job_type: JobType::Logs,
                failures: 2,
                running: 1,
                last_success: Some(1_700_000_000.0),
                bytes: 4096,
                rows: 5000,
            }],
            open_batches: vec![
                (Kind::Logs, BatchStatus::Pending, 5),
                (Kind::Metrics, BatchStatus::Pending, 2),
                (Kind::Logs, BatchStatus::Dead, 1),
            ],
            last_batch_done: Some(1_700_000_100.0),
        };
        let text = render(&figures).unwrap();
        for want in [
            "archive_job_failures_total{job_type=\"logs\"} 2",
            "archive_jobs_running{job_type=\"logs\"} 1",
            "archive_job_last_success_timestamp{job_type=\"logs\"} 1700000000",
            "archive_bytes_total{job_type=\"logs\"} 4096",
            "archive_rows_archived_total{job_type=\"logs\"} 5000",
            "archive_batches{status=\"pending\"} 7",
            "archive_batches{status=\"dead\"} 1",
            "archive_batches_by_kind{kind=\"logs\",status=\"pending\"} 5",
            "archive_batches_by_kind{kind=\"metrics\",status=\"pending\"} 2",
            "archive_batches_by_kind{kind=\"reports\",status=\"pending\"} 0",
            "archive_batch_last_completed_timestamp 1700000100",
            "archive_job_failures_total{job_type=\"metrics\"} 0",
        ] {
            assert!(line(&text, want).is_some(), "{want} in\n{text}");
        }
    }
}
