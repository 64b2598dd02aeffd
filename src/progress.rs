//! Progress for a person watching a long run, read from the ledger: per
//! job, batches done of those recorded, rows moved (the committed chunks of
//! running batches included), rows a second over the last minute of the
//! watcher's own readings, and the time left at that pace.
//!
//! - [`Watch`] turns successive ledger readings into [`Snapshot`]s, which
//!   render as a plain text block ([`Snapshot::text`]) or one JSON object
//!   ([`Snapshot::json`]): what `planner status --watch` prints.
//! - [`Bars`]: the inline planner's progress bar per kind on an interactive
//!   stderr (`indicatif`), fed by polling the ledger; nothing at all when
//!   stderr is not a terminal. Log lines go above the bars meanwhile
//!   ([`telemetry::above_bars`]).

use crate::human::count;
use crate::ledger::{self, JobProgress};
use crate::telemetry;
use crate::vocabulary::Kind;
use chrono::{DateTime, Utc};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;
use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The span of readings the rate is computed over.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Successive readings of the ledger, remembered per job for the rates,
/// and every job seen (to show how it ended once it is no longer running).
#[derive(Debug, Default)]
pub struct Watch {
    readings: HashMap<Uuid, VecDeque<(Instant, i64)>>,
    seen: Vec<Uuid>,
    /// The database's clock at the first reading: jobs created since are
    /// shown even if they came and went between two readings.
    since: Option<DateTime<Utc>>,
}

/// One job as a watcher shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// What the ledger says.
    pub job: JobProgress,
    /// Rows a second over the last minute of readings; `None` until two
    /// readings are apart.
    pub rows_per_s: Option<f64>,
    /// Time left for the rows planned so far at that pace; `None` when
    /// nothing moved over the last minute (or too early to tell).
    pub eta: Option<Duration>,
}

impl JobView {
    /// Pending or running, or with batches still to run (a job one of whose
    /// batches died is `failed`, while the fleet goes on with the others).
    pub fn active(&self) -> bool {
        matches!(self.job.status.as_str(), "pending" | "running") || self.job.batches_pending > 0
    }
}

/// What one reading of the ledger shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// When it was read.
    pub at: DateTime<Utc>,
    /// Jobs pending or running or with batches pending, those created
    /// since the first reading, and those seen before; oldest first.
    pub jobs: Vec<JobView>,
}

impl Watch {
    /// Jobs seen so far.
    pub fn seen(&self) -> &[Uuid] {
        &self.seen
    }

    /// Reads the ledger once: the jobs with work left, those created
    /// since the first reading, and those seen before.
    pub async fn read(&mut self, pool: &PgPool) -> crate::Result<Snapshot> {
        if self.since.is_none() {
            self.since = Some(ledger::now(pool).await?);
        }
        let jobs = ledger::job_progress(pool, self.since, &self.seen).await?;
        Ok(self.observe(Instant::now(), Utc::now(), jobs))
    }

    /// Adds a reading taken at `now` and returns what it shows.
    pub fn observe(&mut self, now: Instant, at: DateTime<Utc>, jobs: Vec<JobProgress>) -> Snapshot {
        let mut views = Vec::with_capacity(jobs.len());
        for job in jobs {
            if !self.seen.contains(&job.id) {
                self.seen.push(job.id);
            }
            let r = self.readings.entry(job.id).or_default();
            r.push_back((now, job.rows_done));
            // Keep the readings of the last minute, and the one just before
            // it, so that the rate spans a whole minute once it can.
            while r.len() > 2 && now.duration_since(r[1].0) >= RATE_WINDOW {
                r.pop_front();
            }
            let rows_per_s = rate(r);
            let eta = match rows_per_s {
                _ if job.rows_left == 0 => Some(Duration::ZERO),
                Some(v) if v > 0.0 => {
                    Some(Duration::from_secs_f64((job.rows_left as f64 / v).min(1e9)))
                }
                _ => None,
            };
            views.push(JobView {
                job,
                rows_per_s,
                eta,
            });
        }
        Snapshot { at, jobs: views }
    }
}

/// Rows a second between the first and the last reading.
fn rate(r: &VecDeque<(Instant, i64)>) -> Option<f64> {
    let (&(t0, n0), &(t1, n1)) = (r.front()?, r.back()?);
    let secs = t1.duration_since(t0).as_secs_f64();
    (secs > 0.0).then(|| (n1 - n0).max(0) as f64 / secs)
}

impl Snapshot {
    /// Jobs still pending or running, or with batches pending.
    pub fn active(&self) -> usize {
        self.jobs.iter().filter(|j| j.active()).count()
    }

    /// A plain text block, one line per job, no control characters.
    pub fn text(&self) -> String {
        let active = self.active();
        let mut s = format!(
            "{}: {}\n",
            self.at.format("%Y-%m-%d %H:%M:%S UTC"),
            if active == 0 {
                "no job pending or running, no batch pending".to_string()
            } else {
                format!("{active} job(s) with work left")
            }
        );
        for v in &self.jobs {
            let j = &v.job;
            s.push_str(&format!(
                "  {:<9} {:<9} job {}  batches {}/{}{}",
                j.kind,
                j.status,
                j.id,
                count(j.batches_done),
                count(j.batches_total),
                if j.planning_done || !v.active() {
                    ""
                } else {
                    " (planning)"
                },
            ));
            if j.batches_started > 0 {
                s.push_str(&format!(", {} in progress", count(j.batches_started)));
            }
            if j.batches_dead > 0 {
                s.push_str(&format!(", {} dead", count(j.batches_dead)));
            }
            s.push_str(&format!("  {} {} done", noun(&j.kind), count(j.rows_done)));
            if v.active() {
                s.push_str(&format!(
                    ", {} left  {}  ETA {}",
                    count(j.rows_left),
                    per_second(v.rows_per_s, noun(&j.kind)),
                    eta(v.eta)
                ));
            }
            s.push('\n');
        }
        if self.jobs.iter().any(|v| v.job.batches_dead > 0) {
            s.push_str("  dead batches: see planner status; after fixing the cause: planner redrive --all\n");
        }
        s
    }

    /// One JSON object: `at`, `active`, and per job its figures (`rows_per_s`
    /// and `eta_s` are `null` until known).
    pub fn json(&self) -> serde_json::Value {
        let jobs: Vec<serde_json::Value> = self
            .jobs
            .iter()
            .map(|v| {
                let j = &v.job;
                serde_json::json!({
                    "id": j.id,
                    "kind": j.kind,
                    "status": j.status,
                    "planning_done": j.planning_done,
                    "batches_done": j.batches_done,
                    "batches_total": j.batches_total,
                    "batches_pending": j.batches_pending,
                    "batches_in_progress": j.batches_started,
                    "batches_dead": j.batches_dead,
                    "rows_done": j.rows_done,
                    "rows_left": j.rows_left,
                    "rows_per_s": v.rows_per_s.map(|r| (r * 10.0).round() / 10.0),
                    "eta_s": v.eta.map(|d| d.as_secs()),
                })
            })
            .collect();
        serde_json::json!({
            "at": self.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "active": self.active(),
            "jobs": jobs,
        })
    }
}

/// What a job's rows are: log rows, metric samples, report files.
fn noun(kind: &str) -> &'static str {
    match kind {
        "metrics" => "samples",
        "reports" => "reports",
        _ => "rows",
    }
}

fn per_second(r: Option<f64>, noun: &str) -> String {
    match r {
        Some(r) => format!("{} {noun}/s", count(r.round() as i64)),
        None => format!("- {noun}/s"),
    }
}

/// `2h 05m`, `3m 07s`, `12s`; `-` when unknown.
fn eta(d: Option<Duration>) -> String {
    let Some(d) = d else { return "-".into() };
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// How often the inline planner's bars read the ledger.
const BAR_POLL: Duration = Duration::from_millis(500);

/// The inline planner's progress bars, one per kind, updated from the
/// ledger until [`Bars::finish`].
#[derive(Debug)]
pub struct Bars {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Bars {
    /// Shows a bar per kind on stderr and keeps them up to date from
    /// `pool`, when stderr is a terminal; `None` (nothing shown, nothing
    /// read) otherwise.
    pub fn on_terminal(pool: PgPool, kinds: &[Kind]) -> Option<Bars> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let bars: Vec<(Kind, ProgressBar)> = kinds
            .iter()
            .map(|&k| {
                let bar = multi.add(ProgressBar::new(0).with_style(waiting_style()));
                bar.set_prefix(k.as_str());
                bar.set_message("planning");
                (k, bar)
            })
            .collect();
        telemetry::show_bars(Some(multi));
        let stop = CancellationToken::new();
        let task = tokio::spawn(poll(pool, bars, stop.clone()));
        Some(Bars { stop, task })
    }

    /// Reads the ledger a last time, leaves the bars as they ended, and
    /// lets lines go straight to stderr again.
    pub async fn finish(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

/// Dropped unfinished (the run was cut short): the bars stay as they were
/// last drawn, and lines go straight to stderr again.
impl Drop for Bars {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
        telemetry::show_bars(None);
    }
}

/// A kind being planned, no batch recorded yet.
fn waiting_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>8} {msg}").expect("the template is valid")
}

/// A kind with batches.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} batches  {msg}")
        .expect("the template is valid")
        .progress_chars("=> ")
}

async fn poll(pool: PgPool, bars: Vec<(Kind, ProgressBar)>, stop: CancellationToken) {
    let mut watch = Watch::default();
    loop {
        let last = stop.is_cancelled();
        match watch.read(&pool).await {
            Ok(snap) => {
                for (kind, bar) in &bars {
                    update(bar, *kind, &snap);
                }
            }
            // The bars are only a view: the run goes on without them.
            Err(e) => tracing::debug!("progress bars: reading the ledger: {e}"),
        }
        if last {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(BAR_POLL) => {}
            _ = stop.cancelled() => {}
        }
    }
    for (_, bar) in &bars {
        bar.abandon();
    }
}

/// One kind's bar: the sum of its jobs in the snapshot.
fn update(bar: &ProgressBar, kind: Kind, snap: &Snapshot) {
    let jobs: Vec<&JobView> = snap
        .jobs
        .iter()
        .filter(|v| v.job.kind == kind.as_str())
        .collect();
    if jobs.is_empty() {
        return;
    }
    let sum = |f: fn(&JobProgress) -> i64| jobs.iter().map(|v| f(&v.job)).sum::<i64>();
    let (total, done) = (sum(|j| j.batches_total), sum(|j| j.batches_done));
    let (rows, left) = (sum(|j| j.rows_done), sum(|j| j.rows_left));
    let rate: Option<f64> = jobs.iter().map(|v| v.rows_per_s).sum();
    let planning = jobs.iter().any(|v| v.active() && !v.job.planning_done);
    if total == 0 {
        bar.set_message(if planning {
            "planning"
        } else {
            "nothing to archive"
        });
        return;
    }
    let eta_left = match rate {
        _ if left == 0 => Some(Duration::ZERO),
        Some(r) if r > 0.0 => Some(Duration::from_secs_f64((left as f64 / r).min(1e9))),
        _ => None,
    };
    if bar.length() == Some(0) {
        bar.set_style(bar_style());
    }
    bar.set_length(u64::try_from(total).unwrap_or(0));
    bar.set_position(u64::try_from(done).unwrap_or(0));
    let noun = noun(kind.as_str());
    bar.set_message(format!(
        "{} {noun}, {}, ETA {}{}",
        count(rows),
        per_second(rate, noun),
        eta(eta_left),
        if planning { " (planning)" } else { "" }
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(rows_done: i64, rows_left: i64) -> JobProgress {
        JobProgress {
            id: Uuid::nil(),
            kind: "logs".into(),
            status: "running".into(),
            planning_done: true,
            batches_total: 10,
            batches_done: 2,
            batches_pending: 8,
            batches_started: 1,
            batches_dead: 0,
            rows_done,
            rows_left,
        }
    }

    #[test]
    fn the_rate_spans_the_last_minute_of_readings() {
        let (mut w, t0, at) = (Watch::default(), Instant::now(), Utc::now());
        let s = w.observe(t0, at, vec![job(0, 1000)]);
        assert_eq!(s.jobs[0].rows_per_s, None);
        assert_eq!(s.jobs[0].eta, None);
        let s = w.observe(t0 + Duration::from_secs(10), at, vec![job(100, 900)]);
        assert_eq!(s.jobs[0].rows_per_s, Some(10.0));
        assert_eq!(s.jobs[0].eta, Some(Duration::from_secs(90)));
        // Two minutes on, at 1 row a second: the first minute's fast start
        // no longer counts.
        for i in 1..=12 {
            w.observe(
                t0 + Duration::from_secs(10 + 10 * i),
                at,
                vec![job(100 + 10 * i as i64, 10)],
            );
        }
        let s = w.observe(t0 + Duration::from_secs(140), at, vec![job(230, 0)]);
        let r = s.jobs[0].rows_per_s.unwrap();
        assert!((0.9..=1.2).contains(&r), "{r}");
        assert_eq!(s.jobs[0].eta, Some(Duration::ZERO));
        assert_eq!(w.seen(), &[Uuid::nil()]);
    }

    #[test]
    fn text_has_no_control_characters_and_json_every_field() {
        let mut w = Watch::default();
        let s = w.observe(Instant::now(), Utc::now(), vec![job(5, 5)]);
        let t = s.text();
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert!(
            t.contains("batches 2/10, 1 in progress  rows 5 done, 5 left"),
            "{t}"
        );
        let j = s.json();
        for f in [
            "id",
            "kind",
            "status",
            "planning_done",
            "batches_done",
            "batches_total",
            "batches_pending",
            "batches_in_progress",
            "batches_dead",
            "rows_done",
            "rows_left",
            "rows_per_s",
            "eta_s",
        ] {
            assert!(j["jobs"][0].get(f).is_some(), "{f} in {j}");
        }
        assert_eq!(j["active"], 1);
    }

    #[test]
    fn eta_reads_at_a_glance() {
        assert_eq!(eta(None), "-");
        assert_eq!(eta(Some(Duration::from_secs(12))), "12s");
        assert_eq!(eta(Some(Duration::from_secs(187))), "3m 07s");
        assert_eq!(eta(Some(Duration::from_secs(7500))), "2h 05m");
    }
}
