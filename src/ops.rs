//! The operator's commands beside the planner run: `migrate`, `status`,
//! `redrive`, `retention`, `metrics`, `lifecycle`, `restore` and
//! `restore-report`.
//! Each takes the resolved [`App`] and says what it found or did; `Ok(false)`
//! is a run that went through but did not succeed (exit status 1).

use crate::app::App;
use crate::config::Policy;
use crate::db;
use crate::error::{Error, Result};
use crate::ledger;
use crate::transport::BatchMessage;
use crate::vocabulary::Kind;
use crate::{lock, monitoring, objects, plan, progress, retention, shutdown, summary, worker};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

/// Applies the schema migrations, waiting at most `index_wait` for each
/// concurrent index build (unset: as long as it takes).
pub async fn migrate(app: &App, index_wait: Option<Duration>) -> Result<bool> {
    let pool = app.pool(2).await?;
    db::migrate_with(&pool, db::MigrateOptions { index_wait }).await?;
    println!(
        "schema is up to date ({})",
        crate::config::describe(&app.database)
    );
    Ok(true)
}

/// Jobs, open batches by status, pending work per kind, dead batches with
/// their reasons, rows out of range, archived reports whose local file was
/// left in place, and, with `--window`, whether the window is open and
/// when it next opens.
pub async fn status(app: &App, json: bool, policy: &Policy) -> Result<bool> {
    let pool = app.pool(2).await?;
    let jobs = ledger::recent_jobs(&pool, 10).await?;
    let counts = ledger::open_batch_counts(&pool).await?;
    let dead = ledger::dead_batches(&pool, None).await?;
    let mut out_of_range = Vec::new();
    for kind in Kind::ALL {
        let o = plan::out_of_range(&pool, kind, policy).await?;
        if o.rows > 0 {
            out_of_range.push(o);
        }
    }
    let (left_total, left) = crate::execute::reports::left_files(&pool, 20).await?;
    let pending = ledger::pending_work(&pool).await?;
    let window = app.settings().governor.window.clone();
    let now = chrono::Utc::now();
    if json {
        let window = window.map(|w| {
            serde_json::json!({
                "window": w.to_string(), "open": w.contains(now),
                "closes_at": w.closes_at(now),
                "next_opens_at": w.opening_after(now),
            })
        });
        let v = serde_json::json!({
            "jobs": jobs, "open_batches": counts, "dead_batches": dead,
            "pending": pending, "window": window,
            "out_of_range": out_of_range,
            "local_files_left": { "total": left_total, "oldest": left },
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        );
    } else {
        println!("{}", summary::status(&jobs, &counts, &dead));
        println!("{}", summary::pending(&pending));
        if let Some(w) = &window {
            println!("{}", w.describe(now));
        }
        for o in &out_of_range {
            println!("{}", summary::out_of_range(o));
        }
        println!("{}", summary::left_files(left_total, &left));
    }
    Ok(true)
}

/// `planner status --watch`: reads the ledger every `every` and shows each
/// job with work left (and those seen before) as [`progress`] renders it,
/// until no job is pending or running and no batch is pending (the last
/// block shows how they ended), or SIGINT/SIGTERM. On a terminal each block
/// replaces the one before; otherwise blocks follow one another, as plain
/// text or (`json`) one JSON object a line.
pub async fn watch(app: &App, every: Duration, json: bool) -> Result<bool> {
    let pool = app.pool(2).await?;
    let stop = shutdown::on_signal_quietly();
    let redraw = !json && std::io::stdout().is_terminal();
    let mut watch = progress::Watch::default();
    let mut drawn = 0;
    loop {
        let snap = watch.read(&pool).await?;
        let frame = if json {
            format!("{}\n", snap.json())
        } else if redraw {
            let text = snap.text();
            // Back to the first line of the block before, clearing down.
            let back = match drawn {
                0 => String::new(),
                n => format!("\x1b[{n}F\x1b[J"),
            };
            drawn = text.lines().count();
            format!("{back}{text}")
        } else {
            format!("{}\n", snap.text())
        };
        let mut out = std::io::stdout().lock();
        if out
            .write_all(frame.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // Whoever read it is gone (`| head`): nothing more to show.
            return Ok(true);
        }
        drop(out);
        if snap.active() == 0 {
            return Ok(true);
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return Ok(true),
        }
    }
}

/// Which dead batches to put back.
#[derive(Debug, Clone, Copy)]
pub enum Redrive {
    /// One batch (left alone, and said so, when it is not dead).
    Batch(uuid::Uuid),
    /// Every dead batch.
    All,
}

/// Puts dead batches back on the work queue, or runs them here with no
/// broker; lists them only with `dry_run`. `Ok(false)`: run here, some died
/// again.
pub async fn redrive(app: &App, which: Redrive, dry_run: bool) -> Result<bool> {
    let pool = app.migrated_pool(app.planning_sessions()).await?;
    let batch = match which {
        Redrive::Batch(id) => Some(id),
        Redrive::All => None,
    };
    let dead = ledger::dead_batches(&pool, batch).await?;
    if let (Some(id), true) = (batch, dead.is_empty()) {
        match ledger::batch_status(&pool, id).await? {
            Some(s) => println!("batch {id} is {s}, not dead: nothing to redrive"),
            None => {
                return Err(Error::config(
                    "--batch",
                    format!("batch {id} is not in the ledger"),
                ));
            }
        }
        return Ok(true);
    }
    for d in &dead {
        println!(
            "{} {} ({} attempts): {}",
            d.kind,
            d.id,
            d.attempts,
            d.last_error.as_deref().unwrap_or("-")
        );
    }
    if dry_run || dead.is_empty() {
        let note = if dry_run {
            " would be redriven (dry run)"
        } else {
            ""
        };
        println!("{} dead batch(es){note}", dead.len());
        return Ok(true);
    }
    let _lock = lock::take(&app.database).await?;
    let ids: Vec<uuid::Uuid> = dead.iter().map(|d| d.id).collect();
    let revived = ledger::revive(&pool, &ids).await?;
    let messages: Vec<BatchMessage> = revived
        .iter()
        .map(|&(id, kind)| BatchMessage::new(id, kind))
        .collect();
    if let Some(publisher) = app.publisher().await? {
        publisher.publish(&messages).await?;
        ledger::mark_published(&pool, &ids).await?;
        publisher.close().await?;
        println!(
            "redrove {} batch(es) to {}",
            messages.len(),
            app.queue.queue_name()
        );
        return Ok(true);
    }
    let exec = app.executor(&pool).await?;
    worker::run_inline(&exec, app.worker_options(), async |p| {
        crate::transport::Publisher::publish(p, &messages).await
    })
    .await?;
    let still = ledger::dead_batches(&pool, None).await?;
    let again = still.iter().filter(|d| ids.contains(&d.id)).count();
    println!("ran {} batch(es) here; {again} dead again", messages.len());
    Ok(again == 0)
}

/// Drops what is past its retention period (under the planner lock unless
/// `dry_run`), after checking each period outlasts its kind's archive age.
pub async fn retention(
    app: &App,
    periods: &retention::Periods,
    policy: &Policy,
    dry_run: bool,
) -> Result<bool> {
    periods.check(policy)?;
    let pool = app.migrated_pool(2).await?;
    let _lock = if dry_run {
        None
    } else {
        Some(lock::take(&app.database).await?)
    };
    let found = retention::run(&pool, periods, dry_run).await?;
    println!("{}", summary::retention(&found, dry_run));
    Ok(true)
}

/// Prints the Prometheus metrics read from the ledger once, or serves them
/// at `listen` until SIGTERM or SIGINT.
pub async fn metrics(app: &App, listen: Option<std::net::SocketAddr>) -> Result<bool> {
    let pool = app.migrated_pool(4).await?;
    let Some(addr) = listen else {
        print!("{}", monitoring::gather(&pool).await?);
        return Ok(true);
    };
    monitoring::serve(pool, addr, shutdown::on_signal(), |bound| {
        println!("serving metrics at http://{bound}/metrics");
    })
    .await?;
    Ok(true)
}

/// The bucket lifecycle rule for archived reports.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    /// Move objects to Glacier after this many days.
    pub glacier_after_days: i32,
    /// Delete objects after this many days.
    pub expire_after_days: i32,
}

/// Applies and verifies the lifecycle rule (shows it only, with `dry_run`).
pub async fn lifecycle(app: &App, rule: Lifecycle, dry_run: bool) -> Result<bool> {
    let store = app.object_store().await?;
    let said = store
        .apply_lifecycle(
            objects::REPORTS_PREFIX,
            rule.glacier_after_days,
            rule.expire_after_days,
            dry_run,
        )
        .await?;
    println!("{said}");
    Ok(true)
}

/// Downloads archived report `id` to `to` (which must not exist),
/// decompressing it and checking its size and SHA-256 against the record.
pub async fn restore_report(app: &App, id: uuid::Uuid, to: &Path) -> Result<bool> {
    let pool = app.pool(2).await?;
    let Some((key, expected)) = crate::execute::reports::archived_object(&pool, id).await? else {
        return Err(Error::config(
            "restore-report",
            format!(
                "report {id} is not in reports_archive (or has no object key, size and SHA-256)"
            ),
        ));
    };
    if to.exists() {
        return Err(Error::config(
            "--to",
            format!("{} exists; not overwriting it", to.display()),
        ));
    }
    let store = app.object_store().await?;
    let n = store.restore_checked(&key, to, Some(&expected)).await?;
    println!(
        "restored report {id} from {} to {} ({} bytes, SHA-256 verified against reports_archive)",
        store.location(&key),
        to.display(),
        n
    );
    Ok(true)
}

/// What `planner restore --logs` is asked to bring back.
#[derive(Debug, Clone, Copy)]
pub struct Restore {
    /// The scenario and the range.
    pub scope: ledger::RestoreScope,
    /// Days the restored rows are kept out of archiving (0: no hold).
    pub hold_days: u32,
    /// Rows per batch.
    pub batch_size: i64,
    /// Say what would be restored; change nothing.
    pub dry_run: bool,
}

/// `planner restore --logs`: a scenario's archived logs in a range back
/// into `scenario_logs`, as a job of type `restore` whose batches go
/// through the queue (or run here with no broker), with a hold that keeps
/// them out of the nightly run. `Ok(false)`: the job did not complete.
pub async fn restore(app: &App, r: Restore) -> Result<bool> {
    let pool = app.migrated_pool(app.planning_sessions()).await?;
    let preview = plan::restore::preview(&pool, r.scope, r.batch_size).await?;
    if preview.scenario_archived == 0 && preview.scenario_live == 0 {
        return Err(Error::config(
            "--scenario",
            format!(
                "no logs of scenario {}, archived or live: nothing to restore (check the id)",
                r.scope.scenario
            ),
        ));
    }
    if r.dry_run {
        println!("DRY RUN: nothing is changed and nothing is published");
        println!(
            "{}",
            summary::restore_preview(&r.scope, &preview, r.batch_size, r.hold_days)
        );
        return Ok(true);
    }
    if preview.rows == 0 {
        println!(
            "restore: nothing to restore: no archived rows of {} ({} archived in all, {} live)",
            summary::restore_scope(&r.scope),
            preview.scenario_archived,
            preview.scenario_live
        );
        return Ok(true);
    }
    let _lock = lock::take(&app.database).await?;
    let transport = app.queue.name();
    if let Some(publisher) = app.publisher().await? {
        let planned = plan::restore::plan(
            &pool,
            r.scope,
            r.hold_days,
            r.batch_size,
            transport,
            publisher.as_ref(),
        )
        .await?;
        publisher.close().await?;
        println!(
            "{}",
            summary::restore_published(&planned, app.queue.queue_name())
        );
        println!("restore: {}", summary::restore_scope(&r.scope));
        println!(
            "{}",
            summary::restore_hold(r.hold_days, Some(planned.hold_until))
        );
        return Ok(true);
    }
    let exec = app.inline_executor().await?;
    let started = std::time::Instant::now();
    let ran = worker::run_inline(&exec, app.worker_options(), async |publisher| {
        // Restore batches an earlier inline restore left (it died, or its
        // window closed) run first: their rows are not in this one's.
        let left = ledger::abandoned_inline_batches(&pool, Kind::Restore).await?;
        if !left.is_empty() {
            println!(
                "restore: resuming {} unfinished batch(es) of an earlier restore that stopped",
                left.len()
            );
            let messages: Vec<BatchMessage> = left
                .into_iter()
                .map(|id| BatchMessage::new(id, Kind::Restore))
                .collect();
            crate::transport::Publisher::publish(publisher, &messages).await?;
        }
        plan::restore::plan(
            &pool,
            r.scope,
            r.hold_days,
            r.batch_size,
            transport,
            publisher,
        )
        .await
    })
    .await?;
    let planned = ran.fed;
    let job = ledger::job(&pool, planned.planned.job).await?;
    println!("{}", summary::finished(&job, started.elapsed()));
    println!("restore: {}", summary::restore_scope(&r.scope));
    println!(
        "{}",
        summary::restore_hold(r.hold_days, Some(planned.hold_until))
    );
    for (payload, reason) in &ran.dead {
        eprintln!(
            "planner: dead batch {}: {reason}",
            String::from_utf8_lossy(payload)
        );
    }
    Ok(job.status == crate::vocabulary::JobStatus::Completed && ran.dead.is_empty())
}

/// `planner restore-report --scenario ID --to DIR`: every archived report
/// of the scenario into `dir` (created if missing), each as `<id>.<format>`
/// (`<id>` when the format is not a plain word), checked as
/// [`restore_report`] checks one. A file already there is never
/// overwritten: that report fails with the reason and the others go on.
/// `Ok(false)` (exit 1) when any failed.
pub async fn restore_reports(app: &App, scenario: uuid::Uuid, dir: &Path) -> Result<bool> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::config(
            "--to",
            format!("{} exists and is not a directory", dir.display()),
        ));
    }
    let pool = app.pool(2).await?;
    let reports = crate::execute::reports::archived_of_scenario(&pool, scenario).await?;
    if reports.is_empty() {
        println!("restore-report: scenario {scenario} has no archived reports: nothing to restore");
        return Ok(true);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::config("--to", format!("cannot create {}: {e}", dir.display())))?;
    let store = app.object_store().await?;
    let (mut restored, mut bytes, mut failed) = (0u64, 0u64, 0u64);
    for (id, format) in &reports {
        let plain = !format.is_empty()
            && format.len() <= 10
            && format.chars().all(|c| c.is_ascii_alphanumeric());
        let name = if plain {
            format!("{id}.{}", format.to_ascii_lowercase())
        } else {
            id.to_string()
        };
        let to = dir.join(name);
        let outcome = async {
            let Some((key, expected)) =
                crate::execute::reports::archived_object(&pool, *id).await?
            else {
                return Err(Error::Refused(
                    "reports_archive has no object key, size and SHA-256 for it".into(),
                ));
            };
            if to.symlink_metadata().is_ok() {
                return Err(Error::Refused(format!(
                    "{} exists; not overwriting it",
                    to.display()
                )));
            }
            store.restore_checked(&key, &to, Some(&expected)).await
        }
        .await;
        match outcome {
            Ok(n) => {
                restored += 1;
                bytes += n;
                println!(
                    "restored report {id} to {} ({n} bytes, SHA-256 verified)",
                    to.display()
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("planner: report {id}: {e}");
            }
        }
    }
    println!(
        "restore-report: scenario {scenario}: {restored} of {} report(s) restored to {} ({}), SHA-256 verified; {failed} failed",
        reports.len(),
        dir.display(),
        crate::human::bytes(i64::try_from(bytes).unwrap_or(i64::MAX)),
    );
    Ok(failed == 0)
}
