//! The facts the planner and the executor share, so neither imports the
//! other: the hot and archive table names, the metrics day expression, a
//! batch's lower bound and how its range is bound, and where report files
//! may live.

use crate::ledger::{Batch, Key};
use sqlx::Postgres;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;

/// Hot logs, walked by `(received_at, id)`.
pub const LOGS: &str = "scenario_logs";
/// Archived logs: every column of [`LOGS`], month-partitioned.
pub const LOGS_ARCHIVE: &str = "scenario_logs_archive";
/// Hot metric samples, walked by `(METRICS_DAY, scenario_id)`.
pub const METRICS: &str = "scenario_metrics";
/// One row per (scenario, type, name, unit, UTC day), month-partitioned.
pub const METRICS_ARCHIVE: &str = "scenario_metrics_archive";
/// Hot reports (metadata; the file is on disk), walked by `(created_at, id)`.
pub const REPORTS: &str = "reports";
/// Archived reports' metadata and where their file went.
pub const REPORTS_ARCHIVE: &str = "reports_archive";

/// One log row's digest: a 64-bit hash of every column the application
/// wrote (not `archived_at` or `archive_batch_id`), over the values
/// themselves (`hash_record_extended`: no text form, so no TimeZone or
/// DateStyle in it; ~0.2 µs a row). It reads the same columns from
/// `scenario_logs` and `scenario_logs_archive`, so the statement that moves a
/// row, `planner verify` and a restore all compute the same value. A batch's
/// digest (`archive_batches.content_digest`) is the exact (NUMERIC) sum of
/// its rows'.
pub const LOGS_ROW_DIGEST: &str = "hash_record_extended(ROW(id, scenario_id, received_at, message_hash, \
     message_preview, source, size_bytes, has_pii, token_count, sqs_blocks), 0)";

/// Whether any restore's hold is in force: one probe of
/// `archive_restores_hold_idx`. A logs chunk reads it first and adds
/// [`LOGS_HOLD`] to its move only when it is true, so the common path's
/// statement (and plan) stays as it is.
pub const LOGS_HOLD_ACTIVE: &str = "SELECT EXISTS (SELECT 1 FROM archive_restores \
     WHERE kind = 'logs' AND hold_until > now())";

/// The rows of `scenario_logs` no restore's hold covers: `planner restore`
/// brought them back, and they stay hot until its `hold_until` (from_ts
/// inclusive, to_ts exclusive, NULL: open). A condition on the row of
/// `scenario_logs` being read (it names the table, so it fits a `DELETE`'s
/// or a `SELECT`'s `WHERE`).
pub const LOGS_HOLD: &str = "NOT EXISTS (SELECT 1 FROM archive_restores r \
     WHERE r.kind = 'logs' AND r.scenario_id = scenario_logs.scenario_id \
     AND (r.from_ts IS NULL OR scenario_logs.received_at >= r.from_ts) \
     AND (r.to_ts IS NULL OR scenario_logs.received_at < r.to_ts) \
     AND r.hold_until > now())";

/// A restore batch's rows in the archive: scenario `$6`, keyset range
/// `(received_at, id)` in `($1, $2) .. ($3, $4)]` bound by [`bind_range`]
/// with the job's cut-off (the restore's `--to`) as `$5`. The plain
/// `received_at` bounds let PostgreSQL prune the months outside the range.
pub const RESTORE_RANGE: &str = "scenario_id = $6 \
     AND (received_at, id) > (COALESCE($1, '-infinity'::timestamptz), COALESCE($2, '00000000-0000-0000-0000-000000000000'::uuid)) \
     AND (received_at, id) <= ($3, $4) AND received_at < $5 \
     AND received_at >= COALESCE($1, '-infinity'::timestamptz) AND received_at <= $3";

/// One metrics aggregate row's digest, as [`LOGS_ROW_DIGEST`] is a log
/// row's: a 64-bit hash of every column of `scenario_metrics_archive` but
/// the archive's bookkeeping (`archived_at`, `archive_batch_id`), over the
/// values themselves. Unqualified column names: use it where the aggregate
/// row is the only relation in scope (an `INSERT`'s `RETURNING`, a
/// `SELECT` from the archive alone). A metrics batch's `content_digest` is
/// the exact sum of the digests of the aggregate rows carrying its id (a
/// merge of late samples moves a row's digest from the batch that wrote it
/// to the one that merged into it).
pub const METRICS_AGG_DIGEST: &str = "hash_record_extended(ROW(id, scenario_id, \"timestamp\", metric_type, \
     metric_name, value, unit, extra_data, is_aggregated, aggregation_period, sample_count, value_sum, \
     value_min, value_max), 0)";

/// The UTC day of a metric sample: the indexed expression its batches'
/// (day, scenario_id) keys are read off.
pub const METRICS_DAY: &str = r#"date_trunc('day', "timestamp" AT TIME ZONE 'UTC')"#;

/// The exclusive lower bound of a `(time, id)` keyset range: the key
/// `($1, $2)`, or below every key when both are NULL (a first batch, a walk
/// from the start). COALESCE bounds, not an IS NULL test: generic plans
/// keep the index range.
pub const FROM_START: &str = "(COALESCE($1, '-infinity'::timestamptz), COALESCE($2, '00000000-0000-0000-0000-000000000000'::uuid))";

/// [`FROM_START`] for metrics' `(METRICS_DAY, scenario_id)` keys, whose day
/// is a UTC `timestamp`.
pub const DAY_FROM_START: &str = "(COALESCE($1 AT TIME ZONE 'UTC', '-infinity'), COALESCE($2, '00000000-0000-0000-0000-000000000000'::uuid))";

/// Binds `batch`'s range and cut-off as `$1..$5`: its lower bound (`NULL`s
/// from the start, see [`FROM_START`]), its upper bound, and its job's
/// cut-off.
pub fn bind_batch<'q>(
    q: Query<'q, Postgres, PgArguments>,
    batch: &Batch,
) -> Query<'q, Postgres, PgArguments> {
    bind_range(q, batch.lo, batch.hi, batch.cutoff)
}

/// Binds an explicit range `(from, upto]` (a chunk of a batch) and a
/// cut-off as `$1..$5`, as [`bind_batch`] binds a whole batch's.
pub fn bind_range<'q>(
    q: Query<'q, Postgres, PgArguments>,
    from: Option<Key>,
    upto: Key,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Query<'q, Postgres, PgArguments> {
    q.bind(from.map(|k| k.ts))
        .bind(from.map(|k| k.id))
        .bind(upto.ts)
        .bind(upto.id)
        .bind(cutoff)
}

/// How a chunked kind's hot rows are ordered and bounded: its keyset
/// expression and the rows of a range `(from, upto]` older than the cut-off,
/// with the range and cut-off bound as `$1..$5` by [`bind_range`]. The one
/// home of the WHERE clause that both finding a chunk's end and moving the
/// chunk use.
#[derive(Debug, Clone, Copy)]
pub struct Keyed {
    /// The hot table.
    pub table: &'static str,
    /// The keyset expression, in index order (`ORDER BY` it).
    pub key: &'static str,
    /// The key's two columns as a `SELECT` list, `ts` then `id`, each a
    /// `timestamptz` and a `uuid`.
    pub select: &'static str,
    /// The exclusive lower bound (`FROM_START` or `DAY_FROM_START`).
    from: &'static str,
    /// The inclusive upper bound.
    upto: &'static str,
    /// The cut-off test.
    older: &'static str,
}

impl Keyed {
    /// `key > from AND key <= upto AND older than the cut-off`.
    pub fn range(&self) -> String {
        format!(
            "({key}) > {from} AND ({key}) <= {upto} AND {older}",
            key = self.key,
            from = self.from,
            upto = self.upto,
            older = self.older
        )
    }
}

/// Logs, by `(received_at, id)`.
pub const LOGS_KEYED: Keyed = Keyed {
    table: LOGS,
    key: "received_at, id",
    select: "received_at AS ts, id",
    from: FROM_START,
    upto: "($3, $4)",
    older: "received_at < $5",
};

/// Metric samples, by `(METRICS_DAY, scenario_id)`: whole groups.
pub const METRICS_KEYED: Keyed = Keyed {
    table: METRICS,
    key: r#"date_trunc('day', "timestamp" AT TIME ZONE 'UTC'), scenario_id"#,
    select: r#"date_trunc('day', "timestamp" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS ts, scenario_id AS id"#,
    from: DAY_FROM_START,
    upto: "($3 AT TIME ZONE 'UTC', $4)",
    older: "\"timestamp\" < $5",
};

/// Where report files must live (`REPORTS_ROOT`): the checks both the
/// dry run and archiving make. The error is the reason, as it is reported.
pub mod reports_root {
    use std::path::{Path, PathBuf};

    /// Canonicalizes the reports root and refuses the filesystem's root: with
    /// `REPORTS_ROOT=/` every file on the machine would pass the root check,
    /// and a stray `file_path` could archive and delete anything.
    pub fn check(root: &Path) -> Result<PathBuf, String> {
        let canon = root
            .canonicalize()
            .map_err(|e| format!("{}: {e}", root.display()))?;
        if canon.parent().is_none() {
            return Err(format!(
                "{} is the filesystem root: every file on the machine would count as a report file; \
                 set it to the directory reports are written under",
                root.display()
            ));
        }
        Ok(canon)
    }

    /// Resolves a report's `file_path` (relative paths against `canon_root`,
    /// the root as [`check`] returns it) and refuses anything that is not a
    /// regular file under it once every symlink is followed. (The dry run's check; archiving opens the file
    /// with `execute::reports::open_under`.)
    pub fn resolve(canon_root: &Path, file_path: &str) -> Result<PathBuf, String> {
        let path = canon_root.join(file_path);
        let canon = path
            .canonicalize()
            .map_err(|e| format!("{file_path}: {e}"))?;
        if !canon.starts_with(canon_root) {
            return Err(format!(
                "{file_path} resolves to {} outside REPORTS_ROOT {}: refused",
                canon.display(),
                canon_root.display()
            ));
        }
        if !canon.is_file() {
            return Err(format!("{file_path}: not a regular file"));
        }
        Ok(canon)
    }
}
