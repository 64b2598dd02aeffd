//! Planning `planner restore --logs`: a scenario's archived rows in a time
//! range, cut into keyset batches of `(received_at, id)` over
//! `scenario_logs_archive` (read off its `(scenario_id, received_at DESC)`
//! index: a further `(scenario_id, received_at, id)` one would save ~10 %
//! of a restore, measured, for an index on every archived row), recorded as a job of type `restore` with its hold, and published
//! through the same pipeline as the archive jobs ([`super::Sink`],
//! [`super::record_and_publish`]). Also its dry run.

use super::{Planned, Sink, record_and_publish};
use crate::error::Result;
use crate::ledger::{self, Key, RestoreScope};
use crate::schema::LOGS_ARCHIVE;
use crate::transport::Publisher;
use crate::vocabulary::Kind;
use chrono::{DateTime, Duration, Utc};
use sqlx::{PgPool, Row};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Rows of the scope's scenario in the archive, in its range: `$1` the
/// scenario, `$2` from (inclusive, NULL: open), `$3` to (exclusive, NULL:
/// open).
const IN_SCOPE: &str = "scenario_id = $1 AND received_at >= COALESCE($2, '-infinity'::timestamptz) \
     AND received_at < COALESCE($3, 'infinity'::timestamptz)";

/// One month of a preview: its first day, rows, bytes, oldest, newest.
type Month = (DateTime<Utc>, i64, i64, DateTime<Utc>, DateTime<Utc>);

/// What a restore would bring back, per month.
#[derive(Debug, Clone, Default)]
pub struct RestorePreview {
    /// Archived rows in the scope.
    pub rows: i64,
    /// Their `size_bytes`.
    pub bytes: i64,
    /// Batches a run would make.
    pub batches: i64,
    /// Per UTC month (its first day), the rows.
    pub months: Vec<(DateTime<Utc>, i64)>,
    /// Oldest row in the scope.
    pub oldest: Option<DateTime<Utc>>,
    /// Newest row in the scope.
    pub newest: Option<DateTime<Utc>>,
    /// The scenario's archived rows, whatever the range.
    pub scenario_archived: i64,
    /// The scenario's live rows (in `scenario_logs`).
    pub scenario_live: i64,
}

/// Counts what restoring `scope` would bring back, changing nothing.
pub async fn preview(
    pool: &PgPool,
    scope: RestoreScope,
    batch_size: i64,
) -> Result<RestorePreview> {
    let months: Vec<Month> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT date_trunc('month', received_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS month,
                    count(*), COALESCE(sum(size_bytes), 0)::bigint, min(received_at), max(received_at)
             FROM {LOGS_ARCHIVE} WHERE {IN_SCOPE} GROUP BY 1 ORDER BY 1"
        )))
        .bind(scope.scenario)
        .bind(scope.from)
        .bind(scope.to)
        .fetch_all(pool)
        .await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM {LOGS_ARCHIVE} WHERE scenario_id = $1) AS archived,
                (SELECT count(*) FROM {logs} WHERE scenario_id = $1) AS live",
        logs = crate::schema::LOGS
    )))
    .bind(scope.scenario)
    .fetch_one(pool)
    .await?;
    let rows: i64 = months.iter().map(|m| m.1).sum();
    Ok(RestorePreview {
        rows,
        bytes: months.iter().map(|m| m.2).sum(),
        batches: (rows + batch_size - 1) / batch_size,
        oldest: months.iter().map(|m| m.3).min(),
        newest: months.iter().map(|m| m.4).max(),
        months: months.into_iter().map(|m| (m.0, m.1)).collect(),
        scenario_archived: row.get("archived"),
        scenario_live: row.get("live"),
    })
}

/// A restore as planned.
#[derive(Debug, Clone)]
pub struct RestorePlanned {
    /// The job, its batches and rows (kind [`Kind::Restore`]).
    pub planned: Planned,
    /// Until when the restored rows are kept out of archiving.
    pub hold_until: DateTime<Utc>,
}

/// Plans a restore of `scope`: one job of type `restore` with its hold
/// recorded first, its batches recorded and published. On failure the job
/// is marked failed with the reason.
pub async fn plan(
    pool: &PgPool,
    scope: RestoreScope,
    hold_days: u32,
    batch_size: i64,
    transport: &str,
    publisher: &dyn Publisher,
) -> Result<RestorePlanned> {
    let (job, cutoff, hold_until) =
        ledger::create_restore_job(pool, scope, hold_days, batch_size, transport).await?;
    ledger::start_job(pool, job).await?;
    let (tx, rx) = mpsc::channel(super::CHUNKS_AHEAD);
    let mut sink = Sink::new(tx);
    let cutting = async {
        cut(pool, scope, cutoff, batch_size, &mut sink).await?;
        sink.finish().await
    };
    let published = record_and_publish(pool, job, Kind::Restore, publisher, rx);
    match tokio::try_join!(cutting, published) {
        Ok(((), published)) => {
            ledger::finish_planning(pool, job).await?;
            Ok(RestorePlanned {
                planned: Planned {
                    kind: Kind::Restore,
                    job,
                    cutoff,
                    batches: published,
                    rows: sink.rows,
                    pending_before: None,
                },
                hold_until,
            })
        }
        Err(e) => Err(super::planning_failed(pool, job, e).await),
    }
}

/// Walks the scope's archived rows (from `scope.from`, below `cutoff`) in
/// steps of `batch_size` into `sink`; the first batch starts just below
/// the oldest row, so its range holds nothing older than `scope.from`.
async fn cut(
    pool: &PgPool,
    scope: RestoreScope,
    cutoff: DateTime<Utc>,
    batch_size: i64,
    sink: &mut Sink,
) -> Result<()> {
    let first: Option<(DateTime<Utc>, Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT received_at, id FROM {LOGS_ARCHIVE}
         WHERE scenario_id = $1 AND received_at >= COALESCE($2, '-infinity'::timestamptz)
           AND received_at < $3
         ORDER BY received_at, id LIMIT 1"
    )))
    .bind(scope.scenario)
    .bind(scope.from)
    .bind(cutoff)
    .fetch_optional(pool)
    .await?;
    let Some((ts, _)) = first else {
        return Ok(());
    };
    let mut lo = Key {
        ts: ts - Duration::microseconds(1),
        id: Uuid::max(),
    };
    loop {
        let next: Option<(DateTime<Utc>, Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT received_at, id FROM {LOGS_ARCHIVE}
             WHERE scenario_id = $1 AND (received_at, id) > ($2, $3) AND received_at >= $2
               AND received_at < $4
             ORDER BY received_at, id OFFSET $5 LIMIT 1"
        )))
        .bind(scope.scenario)
        .bind(lo.ts)
        .bind(lo.id)
        .bind(cutoff)
        .bind(batch_size - 1)
        .fetch_optional(pool)
        .await?;
        if let Some((ts, id)) = next {
            let hi = Key { ts, id };
            sink.push(lo, hi, batch_size).await?;
            lo = hi;
            continue;
        }
        let tail: Option<(DateTime<Utc>, Uuid, i64)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT received_at, id, count(*) OVER () FROM {LOGS_ARCHIVE}
                 WHERE scenario_id = $1 AND (received_at, id) > ($2, $3) AND received_at >= $2
               AND received_at < $4
                 ORDER BY received_at DESC, id DESC LIMIT 1"
            )))
            .bind(scope.scenario)
            .bind(lo.ts)
            .bind(lo.id)
            .bind(cutoff)
            .fetch_optional(pool)
            .await?;
        if let Some((ts, id, n)) = tail {
            sink.push(lo, Key { ts, id }, n).await?;
        }
        return Ok(());
    }
}
