//! The worker: take a delivery, execute its batch, settle the delivery.
//! [`process`] is the unit of work (tests call it directly); [`run`] is the
//! loop around it with bounded concurrency and clean shutdown: on
//! cancellation no new delivery is taken and in-flight batches finish.
//! [`run_inline`] is the same loop with no broker, over an in-process queue.

use crate::error::{Class, Error, Result};
use crate::execute::{self, Executor, Outcome};
use crate::ledger;
use crate::transport::inline::{self, InlinePublisher};
use crate::transport::{BatchMessage, Consumer, Delivery, Publisher};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
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
    /// After each batch, its slot rests this many times the batch's own
    /// duration before taking the next: 0 runs flat out, 1 halves the load
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
    match ledger::record_failure(&exec.pool, msg.batch_id, &reason, permanent, limit).await {
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
        let attempt = AssertUnwindSafe(execute::execute_batch(exec, msg.batch_id, msg.kind))
            .catch_unwind()
            .await;
        let err = match attempt {
            Ok(Ok(o)) => return Ok(o),
            Ok(Err(e)) => e,
            Err(panic) => Error::Panicked(panic_message(panic.as_ref())),
        };
        crate::db::discard_stale(&err);
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
#[derive(Debug, Default)]
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
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let delivery = tokio::select! {
            d = consumer.receive() => d,
            _ = shutdown.cancelled() => break,
        };
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
            let started = std::time::Instant::now();
            handle(&exec, delivery, opts, &stats, &token).await;
            rest(started.elapsed(), opts.rest_ratio, &token).await;
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
    let exec: Executor = exec.into();
    let (publisher, mut consumer) = inline::queue();
    let executors =
        tokio::spawn(async move { run(exec, &mut consumer, opts, CancellationToken::new()).await });
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

/// Leaves the database alone for `ratio` times what the last batch took.
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
) {
    let disposition = process(exec, &d.payload, opts, shutdown).await;
    let settled = match disposition {
        Disposition::Ack(Outcome::Done { counts, .. }) => {
            stats.done.fetch_add(1, Ordering::Relaxed);
            stats
                .rows
                .fetch_add(counts.archived as u64, Ordering::Relaxed);
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
        Disposition::HandBack => d.acker.hand_back().await,
        Disposition::Decline(_) => {
            stats.declined.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(DECLINE_PAUSE) => {}
                _ = shutdown.cancelled() => {}
            }
            d.acker.hand_back().await
        }
    };
    if let Err(e) = settled {
        tracing::warn!("settling a delivery failed: {e}");
    }
}
