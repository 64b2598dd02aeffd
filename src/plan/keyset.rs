//! Keyset kinds (logs, reports): one index-only walk of `(time, id)` in
//! steps of `batch_size` rows.

use super::{Eligible, Sink};
use crate::error::Result;
use crate::ledger::Key;
use crate::partitions;
use crate::schema::{self, FROM_START};
use crate::vocabulary::Kind;
use chrono::{DateTime, Duration, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// A hot table walked by (time column, id).
#[derive(Debug, Clone, Copy)]
pub(super) struct Table {
    kind: Kind,
    name: &'static str,
    ts: &'static str,
    /// Column summed as "bytes" in a dry run.
    bytes: &'static str,
    /// Month-partitioned archive whose partitions the batches need.
    archive: Option<&'static str>,
}

pub(super) const LOGS: Table = Table {
    kind: Kind::Logs,
    name: schema::LOGS,
    ts: "received_at",
    bytes: "size_bytes",
    archive: Some(schema::LOGS_ARCHIVE),
};

pub(super) const REPORTS: Table = Table {
    kind: Kind::Reports,
    name: schema::REPORTS,
    ts: "created_at",
    bytes: "file_size_bytes",
    archive: None,
};

pub(super) async fn eligible(
    pool: &PgPool,
    t: Table,
    after: Option<Key>,
    cutoff: DateTime<Utc>,
    batch_size: i64,
) -> Result<Eligible> {
    let (name, ts, bytes) = (t.name, t.ts, t.bytes);
    let hold = hold(pool, t).await?;
    let sql = format!(
        "SELECT count(*) AS n, COALESCE(sum({bytes}), 0)::bigint AS bytes,
                min({ts}) AS oldest, max({ts}) AS newest
         FROM {name} WHERE ({ts}, id) > {FROM_START} AND {ts} < $3{hold}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(after.map(|k| k.ts))
        .bind(after.map(|k| k.id))
        .bind(cutoff)
        .fetch_one(pool)
        .await?;
    let rows: i64 = row.get("n");
    Ok(Eligible {
        kind: t.kind,
        cutoff,
        rows,
        bytes: Some(row.get("bytes")),
        groups: None,
        missing: None,
        oldest: row.get("oldest"),
        newest: row.get("newest"),
        batches: (rows + batch_size - 1) / batch_size,
        pending: None,
        out_of_range: None,
    })
}

/// Logs a restore holds are neither eligible nor cut into batches: the
/// condition to add to a walk of `t`'s rows while a hold is in force, and
/// nothing otherwise (the common path's statements stay as they are).
async fn hold(pool: &PgPool, t: Table) -> Result<String> {
    let held = t.kind == Kind::Logs
        && sqlx::query_scalar::<_, bool>(schema::LOGS_HOLD_ACTIVE)
            .fetch_one(pool)
            .await?;
    Ok(if held {
        format!(" AND {}", schema::LOGS_HOLD)
    } else {
        String::new()
    })
}

pub(super) async fn cut(
    pool: &PgPool,
    t: Table,
    after: Option<Key>,
    floor: Key,
    cutoff: DateTime<Utc>,
    batch_size: i64,
    sink: &mut Sink,
) -> Result<()> {
    let hold = hold(pool, t).await?;
    let Some(first) = first(pool, t, Some(super::start(after, floor)), cutoff, &hold).await? else {
        return Ok(());
    };
    // The first batch starts where earlier runs' batches end, or, with none
    // above the floor, just below the oldest eligible row, so a late row
    // older than every partition (or the floor) never falls into it.
    let mut lo = super::resume(after, floor).unwrap_or(Key {
        ts: first.ts - Duration::microseconds(1),
        id: Uuid::max(),
    });
    if let Some(archive) = t.archive {
        // Every month the batches' ranges span, from their lower bound:
        // a late row in a month between an earlier run's batches and this
        // run's first row must find its partition.
        partitions::ensure_months(pool, archive, lo.ts.max(floor.ts), cutoff).await?;
    }
    loop {
        if let Some(hi) = boundary(pool, t, lo, cutoff, batch_size, &hold).await? {
            sink.push(lo, hi, batch_size).await?;
            lo = hi;
            continue;
        }
        if let Some((hi, n)) = tail(pool, t, lo, cutoff, &hold).await? {
            sink.push(lo, hi, n).await?;
        }
        return Ok(());
    }
}

/// The oldest eligible key above `after`.
async fn first(
    pool: &PgPool,
    t: Table,
    after: Option<Key>,
    cutoff: DateTime<Utc>,
    hold: &str,
) -> Result<Option<Key>> {
    let (name, ts) = (t.name, t.ts);
    let sql = format!(
        "SELECT {ts}, id FROM {name}
         WHERE ({ts}, id) > {FROM_START} AND {ts} < $3{hold}
         ORDER BY {ts}, id LIMIT 1"
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
    t: Table,
    lo: Key,
    cutoff: DateTime<Utc>,
    batch_size: i64,
    hold: &str,
) -> Result<Option<Key>> {
    let (name, ts) = (t.name, t.ts);
    let sql = format!(
        "SELECT {ts}, id FROM {name}
         WHERE ({ts}, id) > ($1, $2) AND {ts} < $3{hold}
         ORDER BY {ts}, id OFFSET $4 LIMIT 1"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
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
async fn tail(
    pool: &PgPool,
    t: Table,
    lo: Key,
    cutoff: DateTime<Utc>,
    hold: &str,
) -> Result<Option<(Key, i64)>> {
    let (name, ts) = (t.name, t.ts);
    let sql = format!(
        "SELECT {ts}, id, count(*) OVER () AS n FROM {name}
         WHERE ({ts}, id) > ($1, $2) AND {ts} < $3{hold}
         ORDER BY {ts} DESC, id DESC LIMIT 1"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
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
