//! The worker: take a delivery, execute its batch, settle the delivery.
//! [`process`] is the unit of work (tests call it directly); [`run`] is the
//! loop around it with bounded concurrency and clean shutdown: on
//! cancellation no new delivery is taken and in-flight batches finish.
//! [`run_inline`] is the same loop with no broker, over an in-process queue.
//! [`WorkerStats`] counts what the loop settles, and carries its heartbeat
//! (what the worker's `/healthz` and `/metrics` read).

use crate::error::{Class, Error, Result};
use crate::execute::{self, Executor, Outcome};
use crate::ledger;
use crate::transport::inline::{self, InlinePublisher};
use crate::transport::{BatchMessage, Consumer, Delivery, Publisher};
use crate::vocabulary::Kind;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use prometheus::{HistogramOpts, HistogramVec};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a worker behaves.
#[derive(Debug, Clone, Copy)]
pub struct WorkerOptions {
    /// Batches executed at once (and the broker prefetch).
    pub concurrency: usize,
    /// Attempts after which a batch is parked in the dead-letter queue.
    pub delivery_limit: u32,
    /// Transient failures retried in place before handing the message back.
    pub transient_tries: u32,
    /// After each batch, its slot rests this many times what the batch kept
    /// the database busy (`Outcome::Done::busy`, not its waits) before
    /// taking the next: 0 runs flat out, 1 halves the load
    /// the archiver puts on the database (and its speed).
    pub rest_ratio: f64,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 2,
            delivery_limit: 5,
            transient_tries: 4,
            rest_ratio: 0.0,
        }
    }
}

/// What to do with a delivery after processing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Committed (or already done): acknowledge.
    Ack(Outcome),
    /// Cannot succeed: park it with the reason.
    DeadLetter(String),
    /// Failed for now: deliver again later.
    Retry(String),
    /// Not processed because we are shutting down.
    HandBack,
    /// Not ours to run (a kind this worker does not serve): give it back,
    /// after a pause so another worker can take it, spending no attempt.
    Decline(String),
}

impl Disposition {
    /// The `outcome` label of the duration histogram: `done`,
    /// `already_done`, `retry`, `dead`, `hand_back` or `decline`.
    pub fn label(&self) -> &'static str {
        match self {
            Disposition::Ack(Outcome::Done { .. }) => "done",
            Disposition::Ack(Outcome::AlreadyDone) => "already_done",
            Disposition::DeadLetter(_) => "dead",
            Disposition::Retry(_) => "retry",
            Disposition::HandBack => "hand_back",
            Disposition::Decline(_) => "decline",
        }
    }
}

/// How long a declined delivery is held before it is handed back, so that a
/// worker that cannot run it does not spin on it while others could.
pub const DECLINE_PAUSE: Duration = Duration::from_secs(5);

/// Decodes a payload and executes its batch, retrying transient failures in
/// place and waiting out an unreachable database until `shutdown`.
pub async fn process(
    exec: impl Into<Executor>,
    payload: &[u8],
    opts: WorkerOptions,
    shutdown: &CancellationToken,
) -> Disposition {
    let exec: Executor = exec.into();
    let msg = match BatchMessage::decode(payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("dead-lettering: {e}");
            return Disposition::DeadLetter(e.to_string());
        }
    };
    let err = match execute_with_retry(&exec, msg, opts, shutdown).await {
        Ok(outcome) => return Disposition::Ack(outcome),
        Err(Error::ShuttingDown) => return Disposition::HandBack,
        Err(Error::HandBack(why)) => {
            tracing::warn!(
                archive_batch_id = %msg.batch_id,
                "handing the batch back (no attempt spent; its cursor keeps what was done): {why}"
            );
            return Disposition::HandBack;
        }
        Err(e @ Error::Declined { .. }) => {
            tracing::error!(
                archive_batch_id = %msg.batch_id,
                "{e}; handing the message back for a worker that serves it (no attempt spent). \
                 If no worker serves this kind, its batches wait: start one, or fix the setting"
            );
            return Disposition::Decline(e.to_string());
        }
        Err(e) => e,
    };
    let reason = err.to_string();
    if err.blames_message() {
        tracing::error!(archive_batch_id = %msg.batch_id, "dead-lettering the message: {reason}");
        return Disposition::DeadLetter(reason);
    }
    let permanent = err.class() == Class::Permanent;
    let limit = i32::try_from(opts.delivery_limit).unwrap_or(i32::MAX);
    let recorded = ledger::record_failure(&exec.pool, msg.batch_id, &reason, permanent, limit);
    // Bounded as a batch's own work is (`execute::on_session`): a database
    // that went silent is waited out, with the message handed back.
    let recorded = match exec.deadline {
        Some(d) => tokio::time::timeout(d, recorded)
            .await
            .unwrap_or_else(|_| Err(Error::Timeout("recording the failure"))),
        None => recorded.await,
    };
    match recorded {
        Ok(Some(true)) if permanent => {
            tracing::error!(archive_batch_id = %msg.batch_id, "dead-lettering: {reason}");
            Disposition::DeadLetter(reason)
        }
        Ok(Some(true)) => {
            tracing::error!(archive_batch_id = %msg.batch_id, "attempts exhausted, dead-lettering: {reason}");
            Disposition::DeadLetter(reason)
        }
        Ok(_) => {
            tracing::warn!(archive_batch_id = %msg.batch_id, "will retry later: {reason}");
            Disposition::Retry(reason)
        }
        Err(e) => {
            // The ledger is unreachable too: never park a batch we could not
            // record; hand it back for a later try.
            tracing::warn!(archive_batch_id = %msg.batch_id, "could not record failure ({e}): {reason}");
            Disposition::Retry(reason)
        }
    }
}

async fn execute_with_retry(
    exec: &Executor,
    msg: BatchMessage,
    opts: WorkerOptions,
    shutdown: &CancellationToken,
) -> Result<Outcome> {
    let mut delays = ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
        .build();
    let mut transient = 0;
    loop {
        // A panic (say, an application-owned column of a type we cannot
        // decode) fails this batch for good; the delivery is still settled
        // and the worker goes on.
        let attempt = AssertUnwindSafe(execute::execute_batch(
            exec,
            msg.batch_id,
            msg.kind,
            shutdown,
        ))
        .catch_unwind()
        .await;
        let err = match attempt {
            Ok(Ok(o)) => return Ok(o),
            Ok(Err(e)) => e,
            Err(panic) => Error::Panicked(panic_message(panic.as_ref())),
        };
        crate::db::discard_stale(&err);
        // Stopped between chunks: hand back now, whatever the class.
        if matches!(err, Error::HandBack(_) | Error::ShuttingDown) {
            return Err(err);
        }
        match err.class() {
            Class::Permanent => return Err(err),
            Class::Transient if transient >= opts.transient_tries => return Err(err),
            Class::Transient => transient += 1,
            // The database is down: pause this batch until it is back.
            Class::Unavailable => {}
        }
        let d = delays.next().unwrap_or(Duration::from_secs(30));
        tracing::warn!(archive_batch_id = %msg.batch_id, "{err}; retrying in {d:?}");
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
        }
    }
}

/// The text a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// Counters of one worker's run.
#[derive(Debug)]
pub struct WorkerStats {
    /// Batches executed.
    pub done: AtomicU64,
    /// Deliveries of batches that were already done.
    pub already_done: AtomicU64,
    /// Rows archived.
    pub rows: AtomicU64,
    /// Deliveries dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Deliveries handed back for a later retry.
    pub retried: AtomicU64,
    /// Deliveries of kinds this worker does not serve, handed back.
    pub declined: AtomicU64,
    /// Deliveries given back without spending an attempt: not run because
    /// the worker is stopping, or declined (a kind it does not serve).
    pub handed_back: AtomicU64,
    /// Deliveries being handled now (taken, not yet settled).
    pub in_flight: AtomicI64,
    /// Rows and bytes archived, by kind (in [`Kind::ALL`]'s order).
    pub by_kind: [KindCounts; 3],
    /// Unix time, in milliseconds, a delivery was last settled; 0: never.
    pub last_settled_ms: AtomicU64,
    /// Seconds from taking a delivery to settling it, by `kind` (`unknown`
    /// for a message that does not parse) and `outcome` (see
    /// [`Disposition::label`]).
    pub durations: HistogramVec,
    /// When the loop last turned (see [`Heartbeat`]).
    pub heartbeat: Heartbeat,
}

/// Rows and bytes archived of one kind.
#[derive(Debug, Default)]
pub struct KindCounts {
    /// Rows written to the archive (metrics: daily aggregates; reports: files).
    pub rows: AtomicU64,
    /// Bytes archived (logs: `size_bytes`; reports: original file bytes).
    pub bytes: AtomicU64,
}

/// The name the duration histogram is exposed under.
pub const DURATION_METRIC: &str = "archiver_worker_batch_duration_seconds";

/// From a no-op redelivery (milliseconds) to a reports batch of large files
/// or a batch waiting out row locks (minutes).
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

impl Default for WorkerStats {
    fn default() -> Self {
        let durations = HistogramVec::new(
            HistogramOpts::new(
                DURATION_METRIC,
                "Seconds from taking a delivery to settling it, by kind and outcome.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["kind", "outcome"],
        )
        .expect("the histogram's options are valid");
        // Present from the start, so that the series exist before any batch.
        for k in Kind::ALL {
            durations.with_label_values(&[k.as_str(), "done"]);
        }
        WorkerStats {
            done: AtomicU64::default(),
            already_done: AtomicU64::default(),
            rows: AtomicU64::default(),
            dead_lettered: AtomicU64::default(),
            retried: AtomicU64::default(),
            declined: AtomicU64::default(),
            handed_back: AtomicU64::default(),
            in_flight: AtomicI64::default(),
            by_kind: Default::default(),
            last_settled_ms: AtomicU64::default(),
            durations,
            heartbeat: Heartbeat::default(),
        }
    }
}

impl WorkerStats {
    /// The counts of `kind`.
    pub fn of(&self, kind: Kind) -> &KindCounts {
        let i = Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        &self.by_kind[i]
    }
}

/// When the worker loop last turned. The loop beats while it waits on the
/// broker (every [`HEARTBEAT_TICK`], even on an empty queue), when it takes
/// a delivery, and when a batch is settled. It stops beating only when every
/// slot holds a batch and none of them settles: a loop that has not beaten
/// for long is stuck, while one long batch among others that settle, or a
/// worker waiting for a broker that is down (which `/readyz` reports), is not.
#[derive(Debug)]
pub struct Heartbeat {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last beat; `u64::MAX`: the loop
    /// has not started.
    last_ms: AtomicU64,
}

/// How often the loop beats while it waits on the broker.
pub const HEARTBEAT_TICK: Duration = Duration::from_millis(250);

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(u64::MAX),
        }
    }
}

impl Heartbeat {
    /// The loop turned now.
    pub fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the loop last turned; `None` before it has started.
    pub fn since(&self) -> Option<Duration> {
        match self.last_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }
}

/// Consumes until `shutdown` (or until the consumer has no more), executing
/// at most `opts.concurrency` batches at once; then waits for in-flight ones.
pub async fn run<C: Consumer + ?Sized>(
    exec: impl Into<Executor>,
    consumer: &mut C,
    opts: WorkerOptions,
    shutdown: CancellationToken,
) -> Result<Arc<WorkerStats>> {
    let stats = Arc::new(WorkerStats::default());
    run_counting(exec, consumer, opts, shutdown, stats.clone()).await?;
    Ok(stats)
}

/// [`run`], counting into `stats` as it goes (readable while it runs).
pub async fn run_counting<C: Consumer + ?Sized>(
    exec: impl Into<Executor>,
    consumer: &mut C,
    opts: WorkerOptions,
    shutdown: CancellationToken,
    stats: Arc<WorkerStats>,
) -> Result<()> {
    let exec: Executor = exec.into();
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let tracker = TaskTracker::new();
    let mut failure = None;
    let mut tick = tokio::time::interval(HEARTBEAT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    stats.heartbeat.beat();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        stats.heartbeat.beat();
        // The receive is not restarted at each tick (a connect in progress
        // would start over): it is polled alongside the ticks until it ends.
        let receiving = consumer.receive();
        tokio::pin!(receiving);
        let delivery = loop {
            tokio::select! {
                d = &mut receiving => break Some(d),
                _ = tick.tick() => stats.heartbeat.beat(),
                _ = shutdown.cancelled() => break None,
            }
        };
        let Some(delivery) = delivery else { break };
        stats.heartbeat.beat();
        let delivery = match delivery {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        let (exec, stats, token) = (exec.clone(), stats.clone(), shutdown.clone());
        tracker.spawn(async move {
            let busy = handle(&exec, delivery, opts, &stats, &token).await;
            rest(busy, opts.rest_ratio, &token).await;
            drop(permit);
        });
    }
    consumer.stop().await;
    tracker.close();
    tracker.wait().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What an inline run leaves: what the feed returned, the worker's
/// counters, and the messages dead-lettered, with their reasons.
#[derive(Debug)]
pub struct InlineRun<T> {
    /// The feed's own result.
    pub fed: T,
    /// What the worker loop did.
    pub stats: Arc<WorkerStats>,
    /// Payloads dead-lettered, with reasons (the in-process DLQ).
    pub dead: Vec<(Vec<u8>, String)>,
}

/// Runs batches with no broker: the worker loop over an in-process queue
/// that `feed` publishes into, as the planner does with no broker (and
/// redrive, the tests and the benchmarks). Returns once `feed` is done and
/// every message it published is settled; when `feed` fails, what it
/// published still runs before its error is returned.
pub async fn run_inline<T>(
    exec: impl Into<Executor>,
    opts: WorkerOptions,
    feed: impl AsyncFnOnce(&InlinePublisher) -> Result<T>,
) -> Result<InlineRun<T>> {
    run_inline_until(exec, opts, CancellationToken::new(), feed).await
}

/// [`run_inline`] that stops taking batches when `stop` fires (the batches
/// in hand are handed back at their next chunk, and what was not taken
/// stays pending in the ledger); `feed` must then publish no more. A batch
/// handed back (by the governor) cancels `stop`: with no broker, nobody
/// else would take it.
pub async fn run_inline_until<T>(
    exec: impl Into<Executor>,
    opts: WorkerOptions,
    stop: CancellationToken,
    feed: impl AsyncFnOnce(&InlinePublisher) -> Result<T>,
) -> Result<InlineRun<T>> {
    let exec: Executor = exec.into();
    // A hand-back (the window, the deadline, lagging replicas) stops the run.
    let (publisher, mut consumer) = inline::queue(stop.clone());
    let executors = tokio::spawn(async move { run(exec, &mut consumer, opts, stop).await });
    let fed = feed(&publisher).await;
    publisher.close().await?;
    let stats = executors
        .await
        .map_err(|e| Error::JobFailed(format!("executor task: {e}")))??;
    Ok(InlineRun {
        fed: fed?,
        stats,
        dead: publisher.dead_letters().await,
    })
}

/// Leaves the database alone for `ratio` times what the last batch kept it
/// busy (`Outcome::Done::busy`): not the time it waited for the database,
/// so that a batch that waited out a partition or a restart does not rest
/// its slot for that long times the ratio.
async fn rest(took: Duration, ratio: f64, shutdown: &CancellationToken) {
    if ratio <= 0.0 {
        return;
    }
    let pause = took.mul_f64(ratio.min(100.0));
    tokio::select! {
        _ = tokio::time::sleep(pause) => {}
        _ = shutdown.cancelled() => {}
    }
}

async fn handle(
    exec: &Executor,
    d: Delivery,
    opts: WorkerOptions,
    stats: &WorkerStats,
    shutdown: &CancellationToken,
) -> Duration {
    let started = Instant::now();
    stats.in_flight.fetch_add(1, Ordering::Relaxed);
    // Only for the counters: `process` decodes (and judges) it again.
    let kind = BatchMessage::decode(&d.payload).ok().map(|m| m.kind);
    let disposition = process(exec, &d.payload, opts, shutdown).await;
    let outcome = disposition.label();
    // What the slot rests on: a batch run now; a no-op, a retry or a
    // message handed back rest nothing.
    let busy = match disposition {
        Disposition::Ack(Outcome::Done { busy, .. }) => busy,
        _ => Duration::ZERO,
    };
    let settled = match disposition {
        Disposition::Ack(Outcome::Done { counts, .. }) => {
            stats.done.fetch_add(1, Ordering::Relaxed);
            let archived = u64::try_from(counts.archived).unwrap_or(0);
            stats.rows.fetch_add(archived, Ordering::Relaxed);
            if let Some(kind) = kind {
                let of = stats.of(kind);
                of.rows.fetch_add(archived, Ordering::Relaxed);
                let bytes = u64::try_from(counts.bytes).unwrap_or(0);
                of.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            d.acker.ack().await
        }
        Disposition::Ack(Outcome::AlreadyDone) => {
            stats.already_done.fetch_add(1, Ordering::Relaxed);
            d.acker.ack().await
        }
        Disposition::DeadLetter(reason) => {
            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            d.acker.dead_letter(&reason).await
        }
        Disposition::Retry(_) => {
            stats.retried.fetch_add(1, Ordering::Relaxed);
            d.acker.retry_later().await
        }
        Disposition::HandBack => {
            stats.handed_back.fetch_add(1, Ordering::Relaxed);
            d.acker.hand_back().await
        }
        Disposition::Decline(_) => {
            stats.declined.fetch_add(1, Ordering::Relaxed);
            stats.handed_back.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(DECLINE_PAUSE) => {}
                _ = shutdown.cancelled() => {}
            }
            d.acker.hand_back().await
        }
    };
    let kind = kind.map_or("unknown", Kind::as_str);
    stats
        .durations
        .with_label_values(&[kind, outcome])
        .observe(started.elapsed().as_secs_f64());
    match settled {
        Ok(()) => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
            stats.last_settled_ms.store(ms, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!("settling a delivery failed: {e}"),
    }
    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    stats.heartbeat.beat();
    busy
}
