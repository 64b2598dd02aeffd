//! The planner run (`planner --all`, `--logs`, …): under the planner lock,
//! plan each kind's eligible rows into batches and either publish them to
//! the broker — first adopting jobs a dead planner left and republishing
//! batches whose messages may have been lost — or, with no broker, execute
//! them here ([`worker::run_inline`]), with a progress bar per kind on an
//! interactive terminal ([`progress::Bars`]). Says what it did, kind by kind.

use crate::app::App;
use crate::error::{Error, Result};
use crate::execute::Executor;
use crate::governor::window;
use crate::ledger;
use crate::lock::{self, LockWatch};
use crate::plan::{self, Eligible, PlanOptions, Planned};
use crate::summary;
use crate::transport::{BatchMessage, Publisher};
use crate::vocabulary::JobStatus;
use crate::vocabulary::Kind;
use crate::worker;
use crate::{progress, telemetry};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What a planner run is asked to do, besides the kinds.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How to cut batches, and the policy.
    pub plan: PlanOptions,
    /// Republish pending batches whose message went out longer ago.
    pub rescue_after: Duration,
    /// Say what would be archived; change nothing.
    pub dry_run: bool,
    /// `--reports` was asked for by name (not only through `--all`): a
    /// missing `REPORTS_ROOT` is then an error, not a note.
    pub explicit_reports: bool,
}

/// Plans (and, inline, executes) `kinds`. `Ok(false)`: a kind failed, or a
/// job did not complete; each is said on stderr.
pub async fn run(app: &App, kinds: &[Kind], opts: &RunOptions) -> Result<bool> {
    let pool = app.migrated_pool(app.planning_sessions()).await?;
    let mut selected = Vec::new();
    for &kind in kinds {
        if wanted(kind, &opts.plan, opts.explicit_reports)? {
            selected.push(kind);
        }
    }
    let kinds = selected;
    if opts.dry_run {
        return dry_run(&pool, &kinds, &opts.plan).await;
    }
    let lock = LockWatch::start(lock::take(&app.database).await?);
    let reports = kinds.contains(&Kind::Reports);
    let work = async {
        if reports {
            retry_left_files(&app.executor(&pool).await?).await?;
        }
        match app.publisher().await? {
            None => inline(app, &pool, &kinds, &opts.plan).await,
            Some(publisher) => {
                for kind in tended(&kinds) {
                    adopt_abandoned(&pool, publisher.as_ref(), kind).await?;
                    rescue(&pool, publisher.as_ref(), kind, opts.rescue_after).await?;
                }
                let (planned, ok) = plan_kinds(&pool, &kinds, &opts.plan, publisher.as_ref()).await;
                publisher.close().await?;
                for p in &planned {
                    println!("{}", summary::published(p, app.queue.queue_name()));
                }
                Ok(ok)
            }
        }
    };
    // Losing the lock's session stops the run wherever it is (publishing
    // included): another planner may hold the lock by now.
    let ok = tokio::select! {
        r = work => r?,
        e = lock.lost() => return Err(e),
    };
    lock.still_held().await?;
    if ok && reports {
        check_left_files(&pool).await?;
    }
    Ok(ok)
}

/// No broker: resume what an earlier inline run left, plan, and execute
/// every batch here; then say how each job ended. Outside the maintenance
/// window nothing is planned or run; at its close (or past
/// `--max-runtime`) no new batch starts, the batches in hand are handed
/// back at their next chunk, and the rest stays pending for the next run.
async fn inline(app: &App, pool: &PgPool, kinds: &[Kind], opts: &PlanOptions) -> Result<bool> {
    let gov = app.governor();
    if let Some(why) = window::closed(&gov) {
        println!("{why}: nothing planned or run now");
        println!("{}", summary::left(&ledger::pending_work(pool).await?));
        return Ok(true);
    }
    // Batches run on sessions of their own, with the batch timeouts;
    // planning keeps `pool`.
    let exec = app.inline_executor().await?;
    let started = Instant::now();
    // On an interactive terminal, a bar per kind; nothing otherwise.
    let bars = progress::Bars::on_terminal(pool.clone(), kinds);
    let stop = CancellationToken::new();
    let timer = {
        let (gov, stop) = (gov.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                why = window::until_stop(&gov) => {
                    stop.cancel();
                    why
                }
                // A chunk may see the deadline (or the window's close) a
                // moment before this timer does: name it, not the hand-back.
                () = stop.cancelled() => window::closed(&gov).unwrap_or_else(|| {
                    "a batch was handed back (the line above says why)".to_string()
                }),
            }
        })
    };
    let ran = worker::run_inline_until(
        &exec,
        app.worker_options(),
        stop.clone(),
        async |publisher| {
            for &kind in kinds {
                let ids = ledger::abandoned_inline_batches(pool, kind).await?;
                if !ids.is_empty() {
                    say(format!(
                        "{kind}: resuming {} unfinished batch(es) of an earlier run that stopped",
                        ids.len()
                    ));
                    let messages: Vec<BatchMessage> = ids
                        .into_iter()
                        .map(|id| BatchMessage::new(id, kind))
                        .collect();
                    publisher.publish(&messages).await?;
                }
            }
            let (mut planned, mut ok) = (Vec::new(), true);
            for &kind in kinds {
                if stop.is_cancelled() {
                    say(format!("{kind}: not planned: the run stopped"));
                    continue;
                }
                let (p, k) = plan_kinds(pool, &[kind], opts, publisher).await;
                planned.extend(p);
                ok &= k;
            }
            Ok((planned, ok))
        },
    )
    .await;
    if let Some(bars) = bars {
        bars.finish().await;
    }
    let ran = ran?;
    let stopped = if stop.is_cancelled() {
        timer.await.ok()
    } else {
        timer.abort();
        None
    };
    let (planned, mut ok) = ran.fed;
    let elapsed = started.elapsed();
    for p in &planned {
        let job = ledger::job(pool, p.job).await?;
        println!("{}", summary::finished(&job, elapsed));
        // Stopped by the window or the deadline, a job left running is
        // not a failure: the next run resumes it.
        ok &= job.status == JobStatus::Completed
            || (stopped.is_some() && job.status == JobStatus::Running);
    }
    if let Some(line) = summary::throttled(&exec.governor.throttled) {
        println!("{line}");
    }
    for (payload, reason) in &ran.dead {
        eprintln!(
            "planner: dead batch {}: {reason}",
            String::from_utf8_lossy(payload)
        );
    }
    if let Some(why) = stopped {
        println!("stopped: {why}; no new batch started, the batches in hand were handed back");
        println!("{}", summary::left(&ledger::pending_work(pool).await?));
    }
    Ok(ok)
}

/// Before planning reports: retries deleting the local files earlier runs
/// left in place, and says how that went.
async fn retry_left_files(exec: &Executor) -> Result<()> {
    let Some(ctx) = &exec.reports else {
        return Ok(());
    };
    let r = crate::execute::reports::retry_left_files(exec, ctx).await?;
    if r.tried > 0 {
        println!(
            "reports: retried {} local file(s) left in place by earlier runs: {} deleted, {} still left",
            r.tried, r.deleted, r.left
        );
    }
    Ok(())
}

/// After a run with reports: archived reports whose local file is still on
/// disk make the exit status 4, with the first few named.
async fn check_left_files(pool: &PgPool) -> Result<()> {
    let (total, left) = crate::execute::reports::left_files(pool, 5).await?;
    if total == 0 {
        return Ok(());
    }
    for f in &left {
        eprintln!("planner: {}", summary::left_file(f));
    }
    Err(Error::LeftInPlace(format!(
        "reports: {total} archived report(s) still have their local file in place (listed by `planner status`); the next run retries them"
    )))
}

async fn dry_run(pool: &PgPool, kinds: &[Kind], opts: &PlanOptions) -> Result<bool> {
    println!("DRY RUN: nothing is changed and nothing is published");
    for &kind in kinds {
        let e: Eligible = plan::dry_run(pool, kind, opts).await?;
        let size = if kind == Kind::Reports {
            opts.reports_batch_size
        } else {
            opts.batch_size
        };
        println!("{}", summary::eligible(&e, size));
        if kind == Kind::Reports {
            let (left, _) = crate::execute::reports::left_files(pool, 0).await?;
            if left > 0 {
                println!(
                    "reports: {left} archived report(s) still have their local file in place; a run retries deleting them (see planner status)"
                );
            }
        }
    }
    Ok(true)
}

/// Whether to plan `kind` now: reports need `REPORTS_ROOT`. Under `--all`
/// a deployment without reports is told so and goes on; `--reports` alone
/// is an error.
fn wanted(kind: Kind, opts: &PlanOptions, explicit_reports: bool) -> Result<bool> {
    if kind == Kind::Reports && opts.reports_root.is_none() {
        if explicit_reports {
            return Err(Error::config(
                "REPORTS_ROOT",
                "not set: the directory report files must live under",
            ));
        }
        println!("reports: skipped: REPORTS_ROOT is not set (nothing changed)");
        return Ok(false);
    }
    Ok(true)
}

/// The kinds whose abandoned jobs and lost messages a broker-mode run over
/// `kinds` tends: those kinds, and restore batches (`planner restore
/// --logs`) with logs, since the logs workers run them. Restores are never
/// planned by the nightly run (not in [`Kind::ALL`]), but a restore whose
/// planner died or whose messages the broker lost is finished by it.
fn tended(kinds: &[Kind]) -> Vec<Kind> {
    let mut tended = kinds.to_vec();
    if kinds.contains(&Kind::Logs) {
        tended.push(Kind::Restore);
    }
    tended
}

/// Adopts the jobs of `kind` that an earlier broker-mode planner started and
/// died in while planning (the advisory lock says no planner is running
/// now): their batches are all recorded; those whose message may not have
/// gone out are published again (a batch runs once however often it is
/// delivered), and each job completes when its batches do. A job that died
/// before recording any batch is marked failed. Says what it did.
async fn adopt_abandoned(pool: &PgPool, publisher: &dyn Publisher, kind: Kind) -> Result<()> {
    for a in ledger::adopt_abandoned_jobs(pool, kind).await? {
        if a.batches == 0 {
            println!(
                "{kind}: job {} was left {} by a planner that stopped before recording any batch: marked failed",
                a.job, a.status
            );
            continue;
        }
        let messages: Vec<BatchMessage> = a
            .unpublished
            .iter()
            .map(|&id| BatchMessage::new(id, kind))
            .collect();
        if !messages.is_empty() {
            publisher.publish(&messages).await?;
            ledger::mark_published(pool, &a.unpublished).await?;
        }
        println!(
            "{kind}: job {} was left {} by a planner that stopped while planning: adopted ({} batch(es) recorded, {} republished); it completes when its batches do",
            a.job,
            a.status,
            a.batches,
            messages.len()
        );
    }
    Ok(())
}

/// Republishes pending batches of `kind` older than `age`, unless the queue
/// already holds a message for every pending batch (a long backlog draining
/// must not be duplicated). The queue is shared by every kind, so its depth
/// is compared with the pending batches of every kind: compared with one
/// kind's alone, a backlog of another kind would hide lost messages. A
/// republished batch that also arrives the first way runs once: the ledger
/// makes the second delivery a no-op. A queue that cannot tell its depth
/// counts as empty.
async fn rescue(pool: &PgPool, publisher: &dyn Publisher, kind: Kind, age: Duration) -> Result<()> {
    let stale = ledger::stale_batches(pool, kind, age).await?;
    if stale.is_empty() {
        return Ok(());
    }
    let (pending, ready) = (
        ledger::pending_count(pool, None).await?,
        publisher.backlog().await?.unwrap_or(0),
    );
    if i64::from(ready) >= pending {
        println!(
            "{kind}: {} pending batch(es) older than the rescue age, but the queue holds {ready} message(s) for {pending} pending of all kinds: none lost",
            stale.len()
        );
        return Ok(());
    }
    let messages: Vec<BatchMessage> = stale
        .iter()
        .map(|&id| BatchMessage::new(id, kind))
        .collect();
    publisher.publish(&messages).await?;
    ledger::mark_published(pool, &stale).await?;
    println!(
        "{kind}: republished {} batch(es) whose messages may have been lost (pending {pending} of all kinds, queue holds {ready})",
        stale.len()
    );
    Ok(())
}

/// Plans each kind; a failure of one kind does not stop the others.
async fn plan_kinds(
    pool: &PgPool,
    kinds: &[Kind],
    opts: &PlanOptions,
    publisher: &dyn Publisher,
) -> (Vec<Planned>, bool) {
    let (mut planned, mut ok) = (Vec::new(), true);
    for &kind in kinds {
        match plan::plan(pool, kind, opts, publisher).await {
            Ok(p) => {
                match plan::out_of_range(pool, kind, &opts.policy).await {
                    Ok(o) if o.rows > 0 => say(summary::out_of_range(&o)),
                    Ok(_) => {}
                    Err(e) => say_err(format!("planner: {kind}: counting out-of-range rows: {e}")),
                }
                if let Some((n, _)) = p.pending_before {
                    say(format!(
                        "{kind}: {n} unfinished batch(es) of earlier runs; planned only rows after them"
                    ));
                }
                planned.push(p);
            }
            Err(e) => {
                say_err(format!("planner: {kind}: {e}"));
                ok = false;
            }
        }
    }
    (planned, ok)
}

/// Prints a line on stdout, above the progress bars if they are shown.
fn say(line: impl std::fmt::Display) {
    telemetry::above_bars(|| println!("{line}"));
}

/// Prints a line on stderr, above the progress bars if they are shown.
fn say_err(line: impl std::fmt::Display) {
    telemetry::above_bars(|| eprintln!("{line}"));
}
