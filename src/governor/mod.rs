//! The live-traffic governor: what a worker checks before each chunk of a
//! batch (see `execute`), outside any transaction, so that the application
//! keeps its database. Every worker applies it on its own readings of the
//! database, so it holds for the fleet together:
//! - [`window`]: the maintenance window (`--window`) and the run's deadline
//!   (`--max-runtime`): outside them no chunk starts, and the batch in hand
//!   is handed back with its cursor saved;
//! - [`replica`]: streaming replicas' lag (`--max-replica-lag`,
//!   `--replica-url`): wait while any lags, hand back after `--max-lag-wait`;
//! - [`load`]: other sessions active (`--max-active-sessions`) and the
//!   round trip of a trivial statement against its idle baseline
//!   (`--probe-factor`);
//! - [`wal`]: the server's WAL rate (`--max-wal-rate`).
//!
//! What it spent waiting, and why, is counted in [`Throttled`] (the worker's
//! `/metrics`).

pub mod load;
pub mod reading;
pub mod replica;
pub mod wal;
pub mod window;

use crate::error::Result;
use sqlx::PgPool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The chunk time when none is given: pt-online-schema-change's 0.5 s is
/// for one process; a fleet shares the database, so each of its
/// transactions is kept shorter.
pub const DEFAULT_CHUNK_TIME: Duration = Duration::from_millis(100);

/// How long a worker waits for lagging replicas before handing its batch
/// back, when `--max-lag-wait` is not given.
pub const DEFAULT_MAX_LAG_WAIT: Duration = Duration::from_secs(600);

/// The governor's settings (flags and environment; see `cli`).
#[derive(Debug, Clone)]
pub struct GovernorOptions {
    /// Target duration of one chunk's transaction; zero: a batch is one
    /// transaction, as before chunks.
    pub chunk_time: Duration,
    /// Wait while any streaming replica lags more than this.
    pub max_replica_lag: Option<Duration>,
    /// Replicas read directly (behind a cascade), besides `pg_stat_replication`.
    pub replicas: replica::Replicas,
    /// Waiting longer than this for replicas hands the batch back.
    pub max_lag_wait: Duration,
    /// Wait while more sessions than this, other than the archiver's, are active.
    pub max_active_sessions: Option<u32>,
    /// Slow down while a trivial statement's round trip is over this many
    /// times its idle baseline.
    pub probe_factor: Option<f64>,
    /// Wait while the server writes WAL faster than this (bytes a second).
    pub max_wal_rate: Option<f64>,
    /// Chunks start only inside this window.
    pub window: Option<window::Window>,
    /// No chunk starts after this instant (`--max-runtime`).
    pub deadline: Option<Instant>,
}

impl Default for GovernorOptions {
    fn default() -> Self {
        GovernorOptions {
            chunk_time: DEFAULT_CHUNK_TIME,
            max_replica_lag: None,
            replicas: replica::Replicas::default(),
            max_lag_wait: DEFAULT_MAX_LAG_WAIT,
            max_active_sessions: None,
            probe_factor: None,
            max_wal_rate: None,
            window: None,
            deadline: None,
        }
    }
}

/// Why a worker waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A replica lagged (or stopped reporting).
    ReplicaLag,
    /// Too many other sessions were active.
    ActiveSessions,
    /// The round-trip probe was slow.
    Probe,
    /// The server's WAL rate was over the limit.
    WalRate,
    /// Outside the maintenance window.
    Window,
}

impl Reason {
    /// Every reason, in [`Throttled`]'s order.
    pub const ALL: [Reason; 5] = [
        Reason::ReplicaLag,
        Reason::ActiveSessions,
        Reason::Probe,
        Reason::WalRate,
        Reason::Window,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ReplicaLag => "replica_lag",
            Reason::ActiveSessions => "active_sessions",
            Reason::Probe => "probe",
            Reason::WalRate => "wal_rate",
            Reason::Window => "window",
        }
    }

    fn index(self) -> usize {
        Reason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Time spent waiting, by reason (microseconds), and how often.
#[derive(Debug, Default)]
pub struct Throttled {
    micros: [AtomicU64; 5],
    waits: [AtomicU64; 5],
}

impl Throttled {
    /// Adds a wait of `d` for `why`.
    pub fn add(&self, why: Reason, d: Duration) {
        self.spent(why, d);
        self.waits[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `d` to the time spent waiting for `why`, not counting a new
    /// wait (a long wait is counted as it goes, so `/metrics` shows it
    /// growing).
    pub fn spent(&self, why: Reason, d: Duration) {
        let i = why.index();
        self.micros[i].fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Seconds spent waiting for `why`.
    pub fn seconds(&self, why: Reason) -> f64 {
        self.micros[why.index()].load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Waits for `why` (each a run of waiting before one chunk).
    pub fn waits(&self, why: Reason) -> u64 {
        self.waits[why.index()].load(Ordering::Relaxed)
    }
}

/// The governor of one process: its settings, what it measured, and what
/// it spent waiting.
#[derive(Debug, Default)]
pub struct Governor {
    /// The settings.
    pub opts: GovernorOptions,
    /// Time spent waiting, by reason.
    pub throttled: Throttled,
    /// The last reading and the WAL positions seen (see [`reading`]).
    memory: tokio::sync::Mutex<reading::Memory>,
    /// Sessions to `--replica-url`s.
    direct: replica::Direct,
    /// The round-trip probe's baseline and recent samples.
    probe: std::sync::Mutex<load::Probe>,
    /// Batches waiting before a chunk now.
    waiting: AtomicU64,
}

impl Governor {
    /// A governor with these settings.
    pub fn new(opts: GovernorOptions) -> Governor {
        Governor {
            opts,
            ..Governor::default()
        }
    }

    /// Waits until the next chunk may start, never inside a transaction.
    /// `Err(Error::HandBack(why))`: the batch is to be handed back (outside
    /// the window, past the deadline, replicas lagging past
    /// `--max-lag-wait`); `Err(Error::ShuttingDown)` when `stop` fires.
    pub async fn before_chunk(&self, pool: &PgPool, stop: &CancellationToken) -> Result<()> {
        window::check(self)?;
        if !self.reads_database() {
            return Ok(());
        }
        replica::wait(self, pool, stop).await?;
        load::wait(self, pool, stop).await?;
        wal::wait(self, pool, stop).await?;
        Ok(())
    }

    /// How many batches are waiting before a chunk now (a worker whose
    /// batches all wait is throttled, not stuck).
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether any control that reads the database is on (a governor with
    /// none costs a chunk nothing).
    pub fn reads_database(&self) -> bool {
        let o = &self.opts;
        o.max_replica_lag.is_some()
            || o.max_active_sessions.is_some()
            || o.probe_factor.is_some()
            || o.max_wal_rate.is_some()
    }
}

/// `Err(Error::HandBack)` once `wait` has lasted `--max-lag-wait`: no
/// control holds a batch forever (a broker would take the message back, and
/// a cron run would not end); `what` says what it waited for.
pub(crate) fn give_up_after(
    wait: &Wait<'_>,
    g: &Governor,
    what: impl FnOnce() -> String,
) -> Result<()> {
    if wait.elapsed() < g.opts.max_lag_wait {
        return Ok(());
    }
    wait.done("gave up waiting");
    Err(crate::error::Error::HandBack(format!(
        "{} after waiting {:?} (--max-lag-wait)",
        what(),
        g.opts.max_lag_wait
    )))
}

/// One run of waiting before a chunk, for one reason: counted in
/// [`Throttled`] as it goes, logged when it ends.
#[derive(Debug)]
pub struct Wait<'a> {
    g: &'a Governor,
    why: Reason,
    since: Option<Instant>,
    first: bool,
}

impl<'a> Wait<'a> {
    /// Not waiting yet.
    pub fn new(g: &'a Governor, why: Reason) -> Wait<'a> {
        Wait {
            g,
            why,
            since: None,
            first: true,
        }
    }

    /// True once, when the first pause is about to start (to log why).
    pub fn started(&mut self) -> bool {
        std::mem::replace(&mut self.first, false)
    }

    /// How long this run has waited so far.
    pub fn elapsed(&self) -> Duration {
        self.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Sleeps `d` (counted), or `Err(ShuttingDown)` when `stop` fires.
    pub async fn pause(&mut self, d: Duration, stop: &CancellationToken) -> Result<()> {
        let t = Instant::now();
        let first = self.since.is_none();
        if first {
            self.g.waiting.fetch_add(1, Ordering::Relaxed);
        }
        self.since.get_or_insert(t);
        let stopped = tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stop.cancelled() => true,
        };
        let spent = t.elapsed();
        if first {
            self.g.throttled.add(self.why, spent);
        } else {
            self.g.throttled.spent(self.why, spent);
        }
        if stopped {
            return Err(crate::error::Error::ShuttingDown);
        }
        Ok(())
    }

    /// The run ended (`how`): logged if it waited at all (also counted as
    /// ended when dropped).
    pub fn done(&self, how: &str) {
        if let Some(s) = self.since {
            tracing::info!(
                reason = self.why.as_str(),
                "{how}: waited {:.1}s before the chunk",
                s.elapsed().as_secs_f64()
            );
        }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if self.since.is_some() {
            self.g.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_counts_as_it_goes_and_ends_when_dropped() {
        let g = Governor::default();
        let stop = CancellationToken::new();
        {
            let mut w = Wait::new(&g, Reason::WalRate);
            assert!(w.started());
            assert!(!w.started());
            w.pause(Duration::from_millis(5), &stop).await.unwrap();
            assert_eq!(g.waiting(), 1);
            w.pause(Duration::from_millis(5), &stop).await.unwrap();
            assert_eq!(g.throttled.waits(Reason::WalRate), 1);
            assert!(g.throttled.seconds(Reason::WalRate) >= 0.01);
            stop.cancel();
            assert!(matches!(
                w.pause(Duration::from_secs(60), &stop).await,
                Err(crate::error::Error::ShuttingDown)
            ));
        }
        assert_eq!(g.waiting(), 0);
    }

    #[tokio::test]
    async fn no_control_reads_no_database() {
        // A pool to nowhere: before_chunk must not touch it.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgresql://nobody@127.0.0.1:1/none")
            .unwrap();
        let g = Governor::default();
        assert!(!g.reads_database());
        g.before_chunk(&pool, &CancellationToken::new())
            .await
            .unwrap();
    }
}
