//! What the planner prints: one line per kind that a person reads at a
//! glance, and what `planner retention` and `planner status` print.

use crate::governor::{Reason, Throttled};
use crate::human::{bytes, count, time};
use crate::ledger::RestoreScope;
use crate::ledger::{BatchCount, DeadBatch, JobRow, PendingWork};
use crate::plan::restore::{RestorePlanned, RestorePreview};
use crate::plan::{Eligible, OutOfRange, Planned};
use crate::retention::Findings;
use crate::vocabulary::JobType;
use crate::vocabulary::Kind;
use std::time::Duration;

/// A dry run's finding.
pub fn eligible(e: &Eligible, batch_size: i64) -> String {
    let what = match e.kind {
        Kind::Metrics => "samples",
        Kind::Reports => "reports",
        Kind::Logs | Kind::Restore => "rows",
    };
    let mut size = Vec::new();
    if let Some(b) = e.bytes {
        size.push(bytes(b));
    }
    if let Some(g) = e.groups {
        size.push(format!("{} daily groups", count(g)));
    }
    if let Some(m) = e.missing {
        size.push(format!("{} with a missing or refused file", count(m)));
    }
    let mut s = format!(
        "{}: {} eligible {what}{}, oldest {}, newest {}; {} batch(es) of up to {} (cut-off {})",
        e.kind,
        count(e.rows),
        if size.is_empty() {
            String::new()
        } else {
            format!(" ({})", size.join(", "))
        },
        time(e.oldest),
        time(e.newest),
        count(e.batches),
        count(batch_size),
        time(Some(e.cutoff)),
    );
    if let Some((n, _)) = e.pending {
        s.push_str(&format!(
            "; {n} unfinished batch(es) of earlier runs are not counted"
        ));
    }
    if let Some(o) = &e.out_of_range {
        s.push('\n');
        s.push_str(&out_of_range(o));
    }
    s
}

/// Rows never archived because their time is before the floor or infinite.
pub fn out_of_range(o: &OutOfRange) -> String {
    let named: Vec<String> = o
        .examples
        .iter()
        .map(|(id, ts)| format!("{id} at {ts}"))
        .collect();
    format!(
        "{}: {} row(s) with a time before the floor or infinite are never archived (fix them, or lower --timestamp-floor): {}{}",
        o.kind,
        count(o.rows),
        named.join(", "),
        if o.rows > named.len() as i64 {
            ", …"
        } else {
            ""
        }
    )
}

/// A kind planned onto a broker.
pub fn published(p: &Planned, queue: &str) -> String {
    format!(
        "{}: job {} planned {} rows in {} batch(es) (cut-off {}); published to {queue}",
        p.kind,
        p.job,
        count(p.rows),
        count(p.batches as i64),
        time(Some(p.cutoff)),
    )
}

/// A job run to its end inline.
pub fn finished(job: &JobRow, elapsed: Duration) -> String {
    let moved = job.records_deleted.unwrap_or(0);
    let secs = elapsed.as_secs_f64().max(0.001);
    let what = if job.job_type == JobType::Reports {
        format!(
            "{} of {} reports archived ({})",
            count(job.records_archived.unwrap_or(0)),
            count(job.records_processed.unwrap_or(0)),
            bytes(job.bytes_archived.unwrap_or(0))
        )
    } else if job.job_type == JobType::Restore {
        format!(
            "{} rows restored from the archive to scenario_logs",
            count(moved)
        )
    } else if job.job_type == JobType::Metrics {
        format!(
            "{} samples reduced to {} daily aggregates",
            count(moved),
            count(job.records_archived.unwrap_or(0))
        )
    } else {
        format!(
            "{} rows archived ({})",
            count(moved),
            bytes(job.bytes_archived.unwrap_or(0))
        )
    };
    let mut s = format!(
        "{}: job {} {}: {what} in {}/{} batches, {:.1} s ({} rows/s)",
        job.job_type,
        job.id,
        job.status,
        job.batches_done,
        job.batches_planned,
        secs,
        count((moved as f64 / secs) as i64),
    );
    if let Some(err) = &job.error_message {
        s.push_str(&format!("; error: {err}"));
    }
    s
}

/// What a restore covers: the scenario and the range, as the operator
/// gave them.
pub fn restore_scope(scope: &RestoreScope) -> String {
    let bound = |t: Option<chrono::DateTime<chrono::Utc>>, open: &str| {
        t.map_or(open.to_string(), |t| time(Some(t)))
    };
    format!(
        "scenario {}, received_at from {} (inclusive) to {} (exclusive)",
        scope.scenario,
        bound(scope.from, "its oldest archived row"),
        bound(scope.to, "its newest"),
    )
}

/// What the hold means for the next nightly run: until when the restored
/// rows stay hot, or, with no hold, that the next run archives them again.
pub fn restore_hold(hold_days: u32, hold_until: Option<chrono::DateTime<chrono::Utc>>) -> String {
    if hold_days == 0 {
        return "hold: none (--hold-days 0): these rows are older than the logs cut-off, so the \
                next nightly `planner --logs` run will archive them again"
            .to_string();
    }
    let until = hold_until.map_or_else(|| format!("now + {hold_days} day(s)"), |t| time(Some(t)));
    format!(
        "hold: {hold_days} day(s), until {until}: `planner --logs` leaves these rows in \
         scenario_logs until then; the first run after it archives them again"
    )
}

/// `planner restore --dry-run`: rows and batches per month, and the hold.
pub fn restore_preview(
    scope: &RestoreScope,
    p: &RestorePreview,
    batch_size: i64,
    hold_days: u32,
) -> String {
    let mut s = format!(
        "restore: {} archived rows ({}) of {}, oldest {}, newest {}; {} batch(es) of up to {}",
        count(p.rows),
        bytes(p.bytes),
        restore_scope(scope),
        time(p.oldest),
        time(p.newest),
        count(p.batches),
        count(batch_size),
    );
    for (month, rows) in &p.months {
        s.push_str(&format!(
            "\n  {}: {} rows, {} batch(es)",
            month.format("%Y-%m"),
            count(*rows),
            count((rows + batch_size - 1) / batch_size)
        ));
    }
    s.push('\n');
    s.push_str(&restore_hold(hold_days, None));
    s
}

/// A restore planned onto a broker.
pub fn restore_published(r: &RestorePlanned, queue: &str) -> String {
    format!(
        "restore: job {} planned {} rows in {} batch(es); published to {queue}",
        r.planned.job,
        count(r.planned.rows),
        count(r.planned.batches as i64),
    )
}

/// `planner status`: recent jobs, open batches, dead batches and why.
pub fn status(jobs: &[JobRow], counts: &[BatchCount], dead: &[DeadBatch]) -> String {
    let mut s = String::from("recent jobs (newest first):\n");
    if jobs.is_empty() {
        s.push_str("  none\n");
    }
    for j in jobs {
        let done = if j.job_type == JobType::Retention {
            format!("removed {}", count(j.records_deleted.unwrap_or(0)))
        } else {
            format!("archived {}", count(j.records_archived.unwrap_or(0)))
        };
        s.push_str(&format!(
            "  {:<9} {:<9} started {}  batches {}/{}  {done}{}\n",
            j.job_type,
            j.status,
            time(j.started_at),
            j.batches_done,
            j.batches_planned,
            j.error_message
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default(),
        ));
    }
    s.push_str("batches of unfinished jobs:\n");
    if counts.is_empty() {
        s.push_str("  none\n");
    }
    for c in counts {
        s.push_str(&format!(
            "  {:<8} {:<8} {}\n",
            c.kind,
            c.status,
            count(c.batches)
        ));
    }
    s.push_str(&format!("dead batches: {}\n", dead.len()));
    for d in dead {
        s.push_str(&format!(
            "  {} {} job {} ({} attempts): {}\n",
            d.kind,
            d.id,
            d.job_id,
            d.attempts,
            d.last_error.as_deref().unwrap_or("-")
        ));
    }
    if !dead.is_empty() {
        s.push_str("  fix the cause, then: planner redrive --all (or --batch ID)\n");
    }
    s.trim_end().to_string()
}

/// The work left pending in the ledger, per kind, on one line.
pub fn left(pending: &[PendingWork]) -> String {
    if pending.is_empty() {
        return "left pending: nothing".into();
    }
    let per_kind: Vec<String> = pending
        .iter()
        .map(|p| {
            format!(
                "{}: {} batch(es) planned with {} rows",
                p.kind,
                count(p.batches),
                count(p.rows)
            )
        })
        .collect();
    format!("left pending for the next run: {}", per_kind.join("; "))
}

/// `planner status`: the work pending, per kind.
pub fn pending(pending: &[PendingWork]) -> String {
    let mut s = String::from("pending work:");
    if pending.is_empty() {
        s.push_str(" none");
    }
    for p in pending {
        s.push_str(&format!(
            "\n  {:<8} {} batch(es) planned with {} rows",
            p.kind,
            count(p.batches),
            count(p.rows)
        ));
    }
    s
}

/// One archived report whose local file is still on disk, and why.
pub fn left_file(f: &crate::execute::reports::LeftFile) -> String {
    format!(
        "report {} archived {}, file left in place: {}: {}",
        f.id,
        time(f.archived_at),
        f.file_path,
        f.reason
            .as_deref()
            .unwrap_or("never tried (its worker stopped after the commit)")
    )
}

/// `planner status`: archived reports whose local file is still there.
pub fn left_files(total: i64, oldest: &[crate::execute::reports::LeftFile]) -> String {
    let mut s = format!("archived reports with their local file left in place: {total}");
    for f in oldest {
        s.push_str(&format!("\n  {}", left_file(f)));
    }
    if total > oldest.len() as i64 {
        s.push_str(&format!("\n  … and {} more", total - oldest.len() as i64));
    }
    if total > 0 {
        s.push_str("\n  fix the cause (or remove the file), then: planner --reports retries them");
    }
    s
}

/// The lines `planner retention` prints.
pub fn retention(found: &Findings, dry_run: bool) -> String {
    let verb = if dry_run { "would drop" } else { "dropped" };
    let mut s = String::new();
    if dry_run {
        s.push_str("DRY RUN: nothing is changed\n");
    }
    for (table, years, cutoff) in &found.cutoffs {
        s.push_str(&format!(
            "{table}: keeps {years} years (everything from {} on)\n",
            cutoff.format("%Y-%m-%d %H:%M UTC")
        ));
    }
    if found.expired.is_empty() {
        s.push_str("no partition is past retention\n");
    }
    for e in &found.expired {
        s.push_str(&format!(
            "  {verb} {} ({} rows, {})\n",
            e.name,
            count(e.rows),
            bytes(e.bytes)
        ));
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    s.push_str(&format!(
        "reports_archive: {verb} {} metadata rows past retention",
        count(found.report_rows)
    ));
    if found.report_rows_held > 0 {
        s.push_str(&format!(
            "; kept {} whose local file is not deleted yet",
            count(found.report_rows_held)
        ));
    }
    s.push('\n');
    for h in &found.held {
        s.push_str(&format!("held: {h}\n"));
    }
    if dry_run {
        s.push_str(&format!(
            "in all: {} rows would be removed\n",
            count(found.rows())
        ));
    }
    if let Some(job) = found.job {
        s.push_str(&format!(
            "retention job {job}: {} rows removed",
            count(found.removed)
        ));
    }
    s.trim_end().to_owned()
}

/// What the governor made a run wait before chunks, by reason (`None`
/// when it never waited): `throttled 12.5s before chunks: replica_lag 10.0s
/// (2 waits), wal_rate 2.5s (5 waits)`.
pub fn throttled(t: &Throttled) -> Option<String> {
    let parts: Vec<String> = Reason::ALL
        .iter()
        .filter(|r| t.waits(**r) > 0)
        .map(|r| {
            format!(
                "{} {:.1}s ({} waits)",
                r.as_str(),
                t.seconds(*r),
                t.waits(*r)
            )
        })
        .collect();
    if parts.is_empty() {
        return None;
    }
    let total: f64 = Reason::ALL.iter().map(|r| t.seconds(*r)).sum();
    Some(format!(
        "throttled {total:.1}s before chunks: {}",
        parts.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_at_a_glance() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(-1000), "-1,000");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn throttling_is_said_only_when_it_happened() {
        let t = Throttled::default();
        assert_eq!(throttled(&t), None);
        t.add(Reason::ReplicaLag, Duration::from_secs(10));
        t.add(Reason::WalRate, Duration::from_millis(2500));
        assert_eq!(
            throttled(&t).unwrap(),
            "throttled 12.5s before chunks: replica_lag 10.0s (1 waits), wal_rate 2.5s (1 waits)"
        );
    }
}
