//! Batches in `archive_batches`: recorded by the planner (in cut order,
//! then marked published), locked and advanced by the worker that executes
//! one (chunk by chunk, each chunk's rows and cursor in one transaction,
//! the last chunk completing it), or charged a failed attempt; dead ones
//! revived; lost messages found.

use super::{Batch, Counts, Key, NewBatch, fail_job};
use crate::error::{Error, Result};
use crate::vocabulary::{BatchStatus, JobStatus, Kind};
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

/// Records batches and counts them into their job, in one transaction.
pub async fn record_batches(
    pool: &PgPool,
    job: Uuid,
    kind: Kind,
    first_seq: i32,
    batches: &[NewBatch],
) -> Result<()> {
    let mut tx = pool.begin().await?;
    let ids: Vec<Uuid> = batches.iter().map(|b| b.id).collect();
    let seqs: Vec<i32> = (0..batches.len()).map(|i| first_seq + i as i32).collect();
    let lo_ts: Vec<DateTime<Utc>> = batches.iter().map(|b| b.lo.ts).collect();
    let lo_id: Vec<Uuid> = batches.iter().map(|b| b.lo.id).collect();
    let hi_ts: Vec<DateTime<Utc>> = batches.iter().map(|b| b.hi.ts).collect();
    let hi_id: Vec<Uuid> = batches.iter().map(|b| b.hi.id).collect();
    let planned: Vec<i64> = batches.iter().map(|b| b.planned_rows).collect();
    sqlx::query(
        "INSERT INTO archive_batches (id, job_id, kind, seq, lo_ts, lo_id, hi_ts, hi_id, planned_rows)
         SELECT id, $2, $3, seq, lo_ts, lo_id, hi_ts, hi_id, planned
         FROM UNNEST($1::uuid[], $4::int[], $5::timestamptz[], $6::uuid[], $7::timestamptz[], $8::uuid[], $9::bigint[])
              AS t(id, seq, lo_ts, lo_id, hi_ts, hi_id, planned)",
    )
    .bind(&ids)
    .bind(job)
    .bind(kind.as_str())
    .bind(&seqs)
    .bind(&lo_ts)
    .bind(&lo_id)
    .bind(&hi_ts)
    .bind(&hi_id)
    .bind(&planned)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE archive_jobs SET batches_planned = batches_planned + $2 WHERE id = $1")
        .bind(job)
        .bind(batches.len() as i32)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Notes that the broker confirmed these batches' messages.
pub async fn mark_published(pool: &PgPool, ids: &[Uuid]) -> Result<()> {
    // SKIP LOCKED: a batch already running holds its row; planning must
    // not wait for it (its published_at stays unset, which rescue treats
    // like its creation time).
    sqlx::query(
        "UPDATE archive_batches SET published_at = now() WHERE id IN
             (SELECT id FROM archive_batches WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)",
    )
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// The highest upper bound among this kind's unfinished batches, and how many
/// there are: a new run plans only rows above it, never rows a pending batch
/// already covers.
pub async fn open_high_water(pool: &PgPool, kind: Kind) -> Result<Option<(Key, i64)>> {
    let row = sqlx::query(
        "SELECT hi_ts, hi_id, count(*) OVER () AS n FROM archive_batches
         WHERE kind = $1 AND status <> 'done'
         ORDER BY hi_ts DESC, hi_id DESC LIMIT 1",
    )
    .bind(kind.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| {
        let key = Key {
            ts: r.get("hi_ts"),
            id: r.get::<Option<Uuid>, _>("hi_id").unwrap_or(Uuid::max()),
        };
        (key, r.get("n"))
    }))
}

/// Unfinished batches of earlier *inline* runs of `kind`. Only a planner ran
/// them, and the advisory lock says no other planner is running, so they were
/// abandoned (the process died) and are safe to run again. Jobs whose planning
/// was cut short are closed, so their last batch can complete them.
pub async fn abandoned_inline_batches(pool: &PgPool, kind: Kind) -> Result<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE archive_jobs SET planning_done = true,
            error_message = COALESCE(error_message, 'planner stopped while planning; resumed by a later run')
         WHERE job_type = $1 AND transport = 'inline' AND NOT planning_done AND status IN ('pending', 'running', 'failed')",
    )
    .bind(kind.as_str())
    .execute(&mut *tx)
    .await?;
    let ids = sqlx::query_scalar(
        "SELECT b.id FROM archive_batches b JOIN archive_jobs j ON j.id = b.job_id
         WHERE b.kind = $1 AND b.status = 'pending' AND j.transport = 'inline'
         ORDER BY b.hi_ts, b.hi_id",
    )
    .bind(kind.as_str())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(ids)
}

const BATCH_SQL: &str =
    "SELECT b.job_id, b.kind, b.lo_ts, b.lo_id, b.hi_ts, b.hi_id, b.cursor_ts, b.cursor_id,
            b.chunks, b.planned_rows, b.rows_deleted, b.status, j.cutoff
     FROM archive_batches b JOIN archive_jobs j ON j.id = b.job_id WHERE b.id = $1";

/// Loads and locks a batch with its job's cut-off, for one chunk's
/// transaction. Concurrent deliveries of the same batch queue up here, chunk
/// by chunk; each sees the other's cursor (or result).
pub async fn lock_batch(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<Batch> {
    let sql = format!("{BATCH_SQL} FOR UPDATE OF b");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    batch_from(id, row)
}

/// Loads a batch without locking it (for work done before its transaction).
pub async fn peek_batch(pool: &PgPool, id: Uuid) -> Result<Batch> {
    let row = sqlx::query(BATCH_SQL).bind(id).fetch_optional(pool).await?;
    batch_from(id, row)
}

fn batch_from(id: Uuid, row: Option<sqlx::postgres::PgRow>) -> Result<Batch> {
    let row = row.ok_or(Error::UnknownBatch(id))?;
    let bad = |reason: &str| Error::BadBatch {
        id,
        reason: reason.into(),
    };
    let kind: String = row.get("kind");
    let lo = match (
        row.get::<Option<DateTime<Utc>>, _>("lo_ts"),
        row.get::<Option<Uuid>, _>("lo_id"),
    ) {
        (Some(ts), Some(id)) => Some(Key { ts, id }),
        (None, None) => None,
        _ => return Err(bad("half a lower bound")),
    };
    let hi = Key {
        ts: row.get("hi_ts"),
        id: row
            .get::<Option<Uuid>, _>("hi_id")
            .ok_or_else(|| bad("no upper id"))?,
    };
    let cursor = match (
        row.get::<Option<DateTime<Utc>>, _>("cursor_ts"),
        row.get::<Option<Uuid>, _>("cursor_id"),
    ) {
        (Some(ts), Some(id)) => Some(Key { ts, id }),
        (None, None) => None,
        (ts, id) => {
            return Err(bad(&format!(
                "half a cursor (cursor_ts {ts:?}, cursor_id {id:?}): cannot tell where its \
                 committed chunks ended; refusing to run it"
            )));
        }
    };
    if let Some(c) = cursor {
        if lo.is_some_and(|lo| c < lo) {
            return Err(bad(&format!(
                "cursor ({}, {}) is below the batch's lower bound: refusing to run it",
                c.ts, c.id
            )));
        }
        if c > hi {
            return Err(bad(&format!(
                "cursor ({}, {}) is above the batch's upper bound ({}, {}): refusing to run it",
                c.ts, c.id, hi.ts, hi.id
            )));
        }
    }
    Ok(Batch {
        id,
        job_id: row.get("job_id"),
        kind: kind.parse().map_err(|e: String| bad(&e))?,
        lo,
        hi,
        cursor: cursor.or(lo),
        chunks: row.get("chunks"),
        planned_rows: row.get("planned_rows"),
        moved: row.get("rows_deleted"),
        status: row.get("status"),
        cutoff: row
            .get::<Option<DateTime<Utc>>, _>("cutoff")
            .ok_or_else(|| bad("job has no cut-off"))?,
    })
}

/// Records one committed chunk of a batch, inside the chunk's transaction:
/// adds its counts to the batch row (so the batch's counters always equal
/// what it put in the archive), its digest to `content_digest` and, for
/// metrics, its aggregates' sample count and value sum (a batch's first
/// chunk starts them from 0: a batch recorded before they existed, NULL,
/// becomes verifiable if none of its chunks ran before), and moves the batch's cursor to `upto` (the
/// chunk's inclusive upper key). With `last` (the cursor reached the batch's
/// upper bound) the batch is also marked done and its totals are counted
/// into the job, which completes if it was its last batch; returns whether
/// it did.
///
/// The job row is touched only by a batch's last chunk: every executor of
/// the job updates that one row, and holds its lock until its commit is
/// flushed, so updating it on every chunk serialized the fleet on the WAL
/// flush (measured: 25 ms chunks ran at half the speed of whole batches).
pub async fn record_chunk(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    c: Counts,
    upto: Key,
    last: bool,
) -> Result<bool> {
    let totals = sqlx::query(
        "UPDATE archive_batches SET
            rows_archived = rows_archived + $2, rows_deleted = rows_deleted + $3,
            bytes_archived = bytes_archived + $4, chunks = chunks + 1,
            content_digest = CASE WHEN chunks = 0 THEN 0 ELSE content_digest END + $8::numeric,
            samples_count = CASE WHEN chunks = 0 THEN 0 ELSE samples_count END + $9,
            samples_value_sum = CASE WHEN chunks = 0 THEN 0 ELSE samples_value_sum END
                                + $10::numeric * 0.000001,
            cursor_ts = $5, cursor_id = $6,
            status = CASE WHEN $7 THEN 'done' ELSE status END,
            attempts = attempts + CASE WHEN $7 THEN 1 ELSE 0 END,
            last_error = CASE WHEN $7 THEN NULL ELSE last_error END,
            completed_at = CASE WHEN $7 THEN clock_timestamp() ELSE completed_at END
         WHERE id = $1
         RETURNING rows_archived, rows_deleted, bytes_archived",
    )
    .bind(batch.id)
    .bind(c.archived)
    .bind(c.deleted)
    .bind(c.bytes)
    .bind(upto.ts)
    .bind(upto.id)
    .bind(last)
    .bind(c.digest.to_string())
    .bind(c.samples)
    .bind(c.value_sum_micros.to_string())
    .fetch_one(&mut **tx)
    .await?;
    if !last {
        return Ok(false);
    }
    // The batch's whole counts: its earlier chunks' (rows examined are rows
    // deleted for chunked kinds; a reports batch has no earlier chunk) and
    // this one's.
    let whole = Counts {
        processed: batch.moved + c.processed,
        archived: totals.get("rows_archived"),
        deleted: totals.get("rows_deleted"),
        bytes: totals.get("bytes_archived"),
        ..Counts::default()
    };
    let status: JobStatus = sqlx::query_scalar(
        "UPDATE archive_jobs SET
            records_processed = records_processed + $2, records_archived = records_archived + $3,
            records_deleted = records_deleted + $4, bytes_archived = bytes_archived + $5,
            batches_done = batches_done + 1,
            status = CASE WHEN planning_done AND status IN ('running', 'failed')
                               AND batches_done + 1 >= batches_planned
                               AND NOT EXISTS (SELECT 1 FROM archive_batches
                                               WHERE job_id = $1 AND status = 'dead')
                          THEN 'completed' ELSE status END,
            completed_at = CASE WHEN planning_done AND batches_done + 1 >= batches_planned
                                THEN clock_timestamp() ELSE completed_at END
         WHERE id = $1 RETURNING status",
    )
    .bind(batch.job_id)
    .bind(whole.processed)
    .bind(whole.archived)
    .bind(whole.deleted)
    .bind(whole.bytes)
    .fetch_one(&mut **tx)
    .await?;
    Ok(status == JobStatus::Completed)
}

/// What a metrics aggregate row held when a later batch merged late samples
/// into it, summed per batch that had written it: the row, and with it this
/// much, now belongs to the merging batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergedAway {
    /// The batch that wrote the rows.
    pub batch: Uuid,
    /// Their sample count.
    pub samples: i64,
    /// Their value sum, in millionths.
    pub value_sum_micros: i128,
    /// Their digests' sum.
    pub digest: i128,
}

/// Takes aggregate rows merged into by the current chunk off the batches
/// that wrote them (inside the chunk's transaction; the merging batch adds
/// the merged rows whole through [`record_chunk`]), so that each batch's
/// `samples_count`, `samples_value_sum` and `content_digest` stay the sums
/// over the aggregate rows carrying its id. A batch recorded before these
/// were (NULL) stays NULL.
pub async fn move_merged(tx: &mut Transaction<'_, Postgres>, away: &[MergedAway]) -> Result<()> {
    if away.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = away.iter().map(|m| m.batch).collect();
    let samples: Vec<i64> = away.iter().map(|m| m.samples).collect();
    let sums: Vec<String> = away
        .iter()
        .map(|m| m.value_sum_micros.to_string())
        .collect();
    let digests: Vec<String> = away.iter().map(|m| m.digest.to_string()).collect();
    sqlx::query(
        "UPDATE archive_batches b SET
            samples_count = b.samples_count - t.n,
            samples_value_sum = b.samples_value_sum - t.s * 0.000001,
            content_digest = b.content_digest - t.d
         FROM UNNEST($1::uuid[], $2::bigint[], $3::text[]::numeric[], $4::text[]::numeric[]) AS t(id, n, s, d)
         WHERE b.id = t.id",
    )
    .bind(&ids)
    .bind(&samples)
    .bind(&sums)
    .bind(&digests)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Marks a batch done in one step (a reports batch, which is not cut into
/// chunks: its files have their own progress): [`record_chunk`] of the
/// whole range, the last.
pub async fn complete_batch(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    c: Counts,
) -> Result<bool> {
    record_chunk(tx, batch, c, batch.hi, true).await
}

/// Records a failed attempt (outside the failed transaction). The batch is
/// parked (`dead`) when the failure is permanent or it has had `limit`
/// attempts; its job is then marked failed. Returns whether it is dead, or
/// `None` when there is no such unfinished batch.
pub async fn record_failure(
    pool: &PgPool,
    id: Uuid,
    reason: &str,
    permanent: bool,
    limit: i32,
) -> Result<Option<bool>> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "UPDATE archive_batches SET attempts = attempts + 1, last_error = $2,
            status = CASE WHEN $3 OR attempts + 1 >= $4 THEN 'dead' ELSE status END
         WHERE id = $1 AND status <> 'done' RETURNING job_id, status",
    )
    .bind(id)
    .bind(reason)
    .bind(permanent)
    .bind(limit)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        tx.commit().await?;
        return Ok(None);
    };
    let dead = row.get::<BatchStatus, _>("status") == BatchStatus::Dead;
    if dead {
        let job = row.get::<Uuid, _>("job_id");
        fail_job(&mut *tx, job, &format!("batch {id} dead: {reason}")).await?;
    }
    tx.commit().await?;
    Ok(Some(dead))
}

/// Puts dead batches back to `pending` (attempts start again) and their jobs
/// back to `running` when no dead batch is left in them. Returns the batches
/// actually revived; a batch that is not dead is left alone.
pub async fn revive(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<(Uuid, Kind)>> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "UPDATE archive_batches SET status = 'pending', attempts = 0
         WHERE id = ANY($1) AND status = 'dead' RETURNING id, kind, job_id",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    let jobs: Vec<Uuid> = rows.iter().map(|r| r.get("job_id")).collect();
    sqlx::query(
        "UPDATE archive_jobs j SET status = 'running', completed_at = NULL, error_message = NULL
         WHERE j.id = ANY($1) AND j.status = 'failed'
           AND NOT EXISTS (SELECT 1 FROM archive_batches b WHERE b.job_id = j.id AND b.status = 'dead')",
    )
    .bind(&jobs)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    rows.iter()
        .map(|r| {
            let kind: String = r.get("kind");
            Ok((
                r.get("id"),
                kind.parse().map_err(|e: String| Error::BadBatch {
                    id: r.get("id"),
                    reason: e,
                })?,
            ))
        })
        .collect()
}

/// Pending batches of `kind` whose message was published (or recorded)
/// longer ago than `age` and that are still not done: their message may
/// have been lost. Republishing them is safe: a batch runs once.
pub async fn stale_batches(
    pool: &PgPool,
    kind: Kind,
    age: std::time::Duration,
) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM archive_batches
         WHERE kind = $1 AND status = 'pending'
           AND COALESCE(published_at, created_at) < now() - make_interval(secs => $2)
         ORDER BY hi_ts, hi_id",
    )
    .bind(kind.as_str())
    .bind(age.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// Counts pending batches of a kind, or of every kind (`None`).
pub async fn pending_count(pool: &PgPool, kind: Option<Kind>) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM archive_batches
         WHERE status = 'pending' AND ($1::text IS NULL OR kind = $1)",
    )
    .bind(kind.map(|k| k.as_str()))
    .fetch_one(pool)
    .await?)
}

/// Batches of `kind` that are planned but not done: pending, or dead and
/// waiting for a redrive. Either may still write into an old month.
pub async fn unfinished_batches(pool: &PgPool, kind: Kind) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM archive_batches WHERE kind = $1 AND status <> 'done'",
    )
    .bind(kind.as_str())
    .fetch_one(pool)
    .await?)
}
