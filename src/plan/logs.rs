//! Logs: one index-only walk of `scenario_logs (received_at, id)` in steps
//! of `batch_size` rows.

use super::{Eligible, Sink};
use crate::error::Result;
use crate::ledger::{Key, Kind};
use crate::partitions;
use chrono::{DateTime, Duration, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Lower bound used when there is none: below every key.
const FROM_START: &str = "(COALESCE($1, '-infinity'::timestamptz), COALESCE($2, '00000000-0000-0000-0000-000000000000'::uuid))";

pub(super) async fn eligible(
    pool: &PgPool,
    after: Option<Key>,
    cutoff: DateTime<Utc>,
    batch_size: i64,
) -> Result<Eligible> {
    let sql = format!(
        "SELECT count(*) AS n, COALESCE(sum(size_bytes), 0)::bigint AS bytes,
                min(received_at) AS oldest, max(received_at) AS newest
         FROM scenario_logs WHERE (received_at, id) > {FROM_START} AND received_at < $3"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(after.map(|k| k.ts))
        .bind(after.map(|k| k.id))
        .bind(cutoff)
        .fetch_one(pool)
        .await?;
    let rows: i64 = row.get("n");
    Ok(Eligible {
        kind: Kind::Logs,
        cutoff,
        rows,
        bytes: Some(row.get("bytes")),
        groups: None,
        oldest: row.get("oldest"),
        newest: row.get("newest"),
        batches: (rows + batch_size - 1) / batch_size,
        pending: None,
    })
}

pub(super) async fn cut(
    pool: &PgPool,
    after: Option<Key>,
    cutoff: DateTime<Utc>,
    batch_size: i64,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let Some(first) = first(pool, after, cutoff).await? else {
        return Ok(());
    };
    partitions::ensure_months(pool, "scenario_logs_archive", first.ts, cutoff).await?;
    // The first batch starts just below the oldest eligible row, so a late
    // row older than every partition can never fall into it.
    let mut lo = after.unwrap_or(Key {
        ts: first.ts - Duration::microseconds(1),
        id: Uuid::max(),
    });
    loop {
        if let Some(hi) = boundary(pool, lo, cutoff, batch_size).await? {
            sink.push(lo, hi, batch_size).await?;
            lo = hi;
            continue;
        }
        if let Some((hi, n)) = tail(pool, lo, cutoff).await? {
            sink.push(lo, hi, n).await?;
        }
        return Ok(());
    }
}

/// The oldest eligible key above `after`.
async fn first(pool: &PgPool, after: Option<Key>, cutoff: DateTime<Utc>) -> Result<Option<Key>> {
    let sql = format!(
        "SELECT received_at, id FROM scenario_logs
         WHERE (received_at, id) > {FROM_START} AND received_at < $3
         ORDER BY received_at, id LIMIT 1"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(after.map(|k| k.ts))
        .bind(after.map(|k| k.id))
        .bind(cutoff)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| Key {
        ts: r.get(0),
        id: r.get(1),
    }))
}

/// The key of the `batch_size`-th eligible row above `lo`, if there is one.
async fn boundary(
    pool: &PgPool,
    lo: Key,
    cutoff: DateTime<Utc>,
    batch_size: i64,
) -> Result<Option<Key>> {
    let row = sqlx::query(
        "SELECT received_at, id FROM scenario_logs
         WHERE (received_at, id) > ($1, $2) AND received_at < $3
         ORDER BY received_at, id OFFSET $4 LIMIT 1",
    )
    .bind(lo.ts)
    .bind(lo.id)
    .bind(cutoff)
    .bind(batch_size - 1)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Key {
        ts: r.get(0),
        id: r.get(1),
    }))
}

/// The last eligible key above `lo` and the rows up to it (fewer than a batch).
async fn tail(pool: &PgPool, lo: Key, cutoff: DateTime<Utc>) -> Result<Option<(Key, i64)>> {
    let row = sqlx::query(
        "SELECT received_at, id, count(*) OVER () AS n FROM scenario_logs
         WHERE (received_at, id) > ($1, $2) AND received_at < $3
         ORDER BY received_at DESC, id DESC LIMIT 1",
    )
    .bind(lo.ts)
    .bind(lo.id)
    .bind(cutoff)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| {
        (
            Key {
                ts: r.get(0),
                id: r.get(1),
            },
            r.get(2),
        )
    }))
}
