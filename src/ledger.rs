//! The ledger: `archive_jobs` (one row per kind per planner run) and
//! `archive_batches` (one row per batch). It is the authority on what a
//! message may do: a worker executes only what the planner recorded here.

use crate::error::{Error, Result};
use crate::vocabulary::{BatchStatus, JobStatus, JobType, Kind};
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

/// A point in a kind's keyset order: (time, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// The time column (`received_at`, `created_at`, or a day).
    pub ts: DateTime<Utc>,
    /// The tie-breaker (`id`, or `scenario_id` for metrics).
    pub id: Uuid,
}

/// A batch as the planner cuts it, before it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBatch {
    /// Becomes `archive_batch_id` on every row the batch archives.
    pub id: Uuid,
    /// Exclusive lower bound.
    pub lo: Key,
    /// Inclusive upper bound.
    pub hi: Key,
    /// Rows in (lo, hi] when the planner counted them.
    pub planned_rows: i64,
}

/// A batch as a worker loads it, locked for the length of its transaction.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The batch id.
    pub id: Uuid,
    /// The job it belongs to.
    pub job_id: Uuid,
    /// What it archives.
    pub kind: Kind,
    /// Exclusive lower bound; `None`: from the start.
    pub lo: Option<Key>,
    /// Inclusive upper bound.
    pub hi: Key,
    /// Whether it is still to run.
    pub status: BatchStatus,
    /// The job's policy cut-off: only rows older than it move.
    pub cutoff: DateTime<Utc>,
}

/// Creates a job row (`pending`) for one kind of one planner run.
pub async fn create_job(
    pool: &PgPool,
    kind: Kind,
    cutoff: DateTime<Utc>,
    batch_size: i64,
    transport: &str,
) -> Result<Uuid> {
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO archive_jobs (job_type, status, cutoff, batch_size, transport)
         VALUES ($1, 'pending', $2, $3, $4) RETURNING id",
    )
    .bind(kind.as_str())
    .bind(cutoff)
    .bind(i32::try_from(batch_size).unwrap_or(i32::MAX))
    .bind(transport)
    .fetch_one(pool)
    .await?;
    Ok(id)
}

/// `pending → running`.
pub async fn start_job(pool: &PgPool, job: Uuid) -> Result<()> {
    sqlx::query("UPDATE archive_jobs SET status = 'running', started_at = now() WHERE id = $1")
        .bind(job)
        .execute(pool)
        .await?;
    Ok(())
}

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

/// Ends planning. The job completes now if every batch is already done (or
/// there were none); otherwise the last batch to finish completes it.
pub async fn finish_planning(pool: &PgPool, job: Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE archive_jobs SET planning_done = true,
            status = CASE WHEN status = 'running' AND batches_done >= batches_planned THEN 'completed' ELSE status END,
            completed_at = CASE WHEN status = 'running' AND batches_done >= batches_planned THEN now() ELSE completed_at END
         WHERE id = $1",
    )
    .bind(job)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks a job `failed` with the reason (the first reason wins), counting
/// the failure once per fall into `failed`; on its own or inside a caller's
/// transaction.
pub async fn fail_job<'e>(db: impl sqlx::PgExecutor<'e>, job: Uuid, reason: &str) -> Result<()> {
    sqlx::query(
        "UPDATE archive_jobs SET status = 'failed', completed_at = now(),
            error_message = COALESCE(error_message, $2),
            failures = failures + CASE WHEN status = 'failed' THEN 0 ELSE 1 END
         WHERE id = $1 AND status <> 'completed'",
    )
    .bind(job)
    .bind(reason)
    .execute(db)
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

/// A job an earlier broker-mode planner started and died in while planning.
#[derive(Debug, Clone)]
pub struct Adopted {
    /// The job.
    pub job: Uuid,
    /// The status it was left in (`pending` or `running`).
    pub status: JobStatus,
    /// Batches it had recorded.
    pub batches: i32,
    /// Its pending batches whose message was never confirmed: publish
    /// them again.
    pub unpublished: Vec<Uuid>,
}

/// Closes the planning of `kind`'s jobs that a broker-mode planner left
/// unfinished (the caller holds the planner lock, so that planner is
/// gone): a job with batches is adopted (it completes when its batches do,
/// at once if they all are), a job without any is marked failed. Returns
/// them, with the batches to publish again.
pub async fn adopt_abandoned_jobs(pool: &PgPool, kind: Kind) -> Result<Vec<Adopted>> {
    let mut tx = pool.begin().await?;
    let jobs: Vec<(Uuid, JobStatus, i32)> = sqlx::query_as(
        "SELECT id, status, batches_planned FROM archive_jobs
         WHERE job_type = $1 AND transport IS DISTINCT FROM 'inline' AND NOT planning_done
           AND status IN ('pending', 'running')
         ORDER BY created_at FOR UPDATE",
    )
    .bind(kind.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let mut adopted = Vec::with_capacity(jobs.len());
    for (job, status, batches) in jobs {
        if batches == 0 {
            fail_job(
                &mut *tx,
                job,
                "planner stopped before recording any batch; closed by a later run",
            )
            .await?;
            sqlx::query("UPDATE archive_jobs SET planning_done = true WHERE id = $1")
                .bind(job)
                .execute(&mut *tx)
                .await?;
            adopted.push(Adopted {
                job,
                status,
                batches,
                unpublished: Vec::new(),
            });
            continue;
        }
        let unpublished = sqlx::query_scalar(
            "SELECT id FROM archive_batches WHERE job_id = $1 AND status = 'pending'
               AND published_at IS NULL ORDER BY seq",
        )
        .bind(job)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE archive_jobs j SET planning_done = true, status = 'running',
                started_at = COALESCE(started_at, now()),
                error_message = COALESCE(error_message,
                    'planner stopped while planning; adopted by a later run (batches recorded before it stopped are kept)')
             WHERE id = $1",
        )
        .bind(job)
        .execute(&mut *tx)
        .await?;
        // Every batch may be done already: complete the job now.
        sqlx::query(
            "UPDATE archive_jobs j SET status = 'completed', completed_at = now()
             WHERE id = $1 AND batches_done >= batches_planned
               AND NOT EXISTS (SELECT 1 FROM archive_batches b WHERE b.job_id = j.id AND b.status <> 'done')",
        )
        .bind(job)
        .execute(&mut *tx)
        .await?;
        adopted.push(Adopted {
            job,
            status,
            batches,
            unpublished,
        });
    }
    tx.commit().await?;
    Ok(adopted)
}

const BATCH_SQL: &str =
    "SELECT b.job_id, b.kind, b.lo_ts, b.lo_id, b.hi_ts, b.hi_id, b.status, j.cutoff
     FROM archive_batches b JOIN archive_jobs j ON j.id = b.job_id WHERE b.id = $1";

/// Loads and locks a batch with its job's cut-off. Concurrent deliveries of
/// the same batch queue up here; the second sees the first's result.
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
    Ok(Batch {
        id,
        job_id: row.get("job_id"),
        kind: kind.parse().map_err(|e: String| bad(&e))?,
        lo,
        hi: Key {
            ts: row.get("hi_ts"),
            id: row
                .get::<Option<Uuid>, _>("hi_id")
                .ok_or_else(|| bad("no upper id"))?,
        },
        status: row.get("status"),
        cutoff: row
            .get::<Option<DateTime<Utc>>, _>("cutoff")
            .ok_or_else(|| bad("job has no cut-off"))?,
    })
}

/// What executing a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows examined.
    pub processed: i64,
    /// Rows written to the archive.
    pub archived: i64,
    /// Rows deleted from the hot table.
    pub deleted: i64,
    /// Bytes archived (`size_bytes` for logs).
    pub bytes: i64,
}

/// Marks a batch done and adds its counts to the job, inside the batch's
/// transaction. Returns whether this batch completed its job. The job row is
/// locked last, so concurrent batches hold it only for their commit.
pub async fn complete_batch(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    c: Counts,
) -> Result<bool> {
    sqlx::query(
        "UPDATE archive_batches SET status = 'done', attempts = attempts + 1, last_error = NULL,
            rows_archived = $2, rows_deleted = $3, bytes_archived = $4, completed_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(batch.id)
    .bind(c.archived)
    .bind(c.deleted)
    .bind(c.bytes)
    .execute(&mut **tx)
    .await?;
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
    .bind(c.processed)
    .bind(c.archived)
    .bind(c.deleted)
    .bind(c.bytes)
    .fetch_one(&mut **tx)
    .await?;
    Ok(status == JobStatus::Completed)
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

/// A job's row as reports show it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct JobRow {
    /// Job id.
    pub id: Uuid,
    /// What it does.
    pub job_type: JobType,
    /// Where it is.
    pub status: JobStatus,
    /// Rows archived so far (aggregate rows, for metrics).
    pub records_archived: Option<i64>,
    /// Rows deleted from the hot table so far.
    pub records_deleted: Option<i64>,
    /// Rows examined so far.
    pub records_processed: Option<i64>,
    /// Bytes archived so far.
    pub bytes_archived: Option<i64>,
    /// Batches recorded.
    pub batches_planned: i32,
    /// Batches done.
    pub batches_done: i32,
    /// Why it failed.
    pub error_message: Option<String>,
    /// When planning started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed or failed.
    pub completed_at: Option<DateTime<Utc>>,
}

/// Loads a job.
pub async fn job(pool: &PgPool, id: Uuid) -> Result<JobRow> {
    Ok(sqlx::query_as(
        "SELECT id, job_type, status, records_archived, records_deleted, records_processed, bytes_archived, batches_planned, batches_done,
                error_message, started_at, completed_at
         FROM archive_jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

/// Batches per kind and status, over jobs not yet completed.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct BatchCount {
    /// Kind.
    pub kind: String,
    /// `pending`, `done` or `dead`.
    pub status: BatchStatus,
    /// How many.
    pub batches: i64,
}

/// A parked batch and why.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct DeadBatch {
    /// Batch id.
    pub id: Uuid,
    /// Its job.
    pub job_id: Uuid,
    /// Kind.
    pub kind: String,
    /// Attempts so far.
    pub attempts: i32,
    /// The last error.
    pub last_error: Option<String>,
    /// Rows it was planned with.
    pub planned_rows: i64,
}

/// Batch counts of unfinished jobs.
pub async fn open_batch_counts(pool: &PgPool) -> Result<Vec<BatchCount>> {
    Ok(sqlx::query_as(
        "SELECT b.kind, b.status, count(*) AS batches
         FROM archive_batches b JOIN archive_jobs j ON j.id = b.job_id
         WHERE j.status <> 'completed'
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?)
}

/// A batch's status; `None` when the ledger does not have it.
pub async fn batch_status(pool: &PgPool, id: Uuid) -> Result<Option<BatchStatus>> {
    Ok(
        sqlx::query_scalar("SELECT status FROM archive_batches WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

/// Dead batches, or one batch by id (whatever its status, for redrive).
pub async fn dead_batches(pool: &PgPool, only: Option<Uuid>) -> Result<Vec<DeadBatch>> {
    Ok(sqlx::query_as(
        "SELECT id, job_id, kind, attempts, last_error, planned_rows FROM archive_batches
         WHERE status = 'dead' AND ($1::uuid IS NULL OR id = $1) ORDER BY created_at, seq",
    )
    .bind(only)
    .fetch_all(pool)
    .await?)
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

/// Recent jobs, newest first.
pub async fn recent_jobs(pool: &PgPool, limit: i64) -> Result<Vec<JobRow>> {
    Ok(sqlx::query_as(
        "SELECT id, job_type, status, records_archived, records_deleted, records_processed, bytes_archived,
                batches_planned, batches_done, error_message, started_at, completed_at
         FROM archive_jobs ORDER BY created_at DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
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

/// Jobs of `job_type` left `pending` or `running` by a run that died: the
/// caller holds the planner lock, so no other run is alive. They are marked
/// failed (and counted as failures).
pub async fn close_interrupted(pool: &PgPool, job_type: JobType) -> Result<()> {
    let stale: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM archive_jobs WHERE job_type = $1 AND status IN ('pending', 'running')",
    )
    .bind(job_type)
    .fetch_all(pool)
    .await?;
    for job in stale {
        tracing::warn!(%job, "an earlier {job_type} run ended before it finished; marking it failed");
        fail_job(pool, job, "interrupted: the run ended before it finished").await?;
    }
    Ok(())
}

/// Records a retention run starting (`running`).
pub async fn start_retention_job(pool: &PgPool) -> Result<Uuid> {
    Ok(sqlx::query_scalar(
        "INSERT INTO archive_jobs (job_type, status, started_at) VALUES ($1, 'running', now())
         RETURNING id",
    )
    .bind(JobType::Retention)
    .fetch_one(pool)
    .await?)
}

/// Records a retention run's end: `rows` removed, and `completed`, or
/// `failed` with `error` (counted as a failure).
pub async fn finish_retention_job(
    pool: &PgPool,
    job: Uuid,
    rows: i64,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE archive_jobs SET status = CASE WHEN $3::text IS NULL THEN 'completed' ELSE 'failed' END,
             completed_at = clock_timestamp(), records_processed = $2, records_deleted = $2,
             error_message = $3, failures = CASE WHEN $3::text IS NULL THEN 0 ELSE 1 END
         WHERE id = $1",
    )
    .bind(job)
    .bind(rows)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// One job type's figures, summed over every job of that type.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct JobTypeFigures {
    /// `archive_jobs.job_type`.
    pub job_type: JobType,
    /// Times a job of this type went `failed`.
    pub failures: i64,
    /// Jobs now running.
    pub running: i64,
    /// Unix time the newest completed job completed.
    pub last_success: Option<f64>,
    /// Bytes archived.
    pub bytes: i64,
    /// Rows archived.
    pub rows: i64,
}

/// What monitoring shows, read from the ledger in one go.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Per job type that has jobs.
    pub jobs: Vec<JobTypeFigures>,
    /// Batches not done, by status.
    pub open_batches: Vec<(BatchStatus, i64)>,
    /// Unix time the newest batch of any kind was completed.
    pub last_batch_done: Option<f64>,
}

/// Reads the figures monitoring renders.
pub async fn figures(pool: &PgPool) -> Result<Figures> {
    let jobs = sqlx::query_as(
        "SELECT job_type::text AS job_type,
                COALESCE(sum(failures), 0)::bigint AS failures,
                count(*) FILTER (WHERE status = 'running') AS running,
                extract(epoch FROM max(completed_at) FILTER (WHERE status = 'completed'))::float8
                    AS last_success,
                COALESCE(sum(bytes_archived), 0)::bigint AS bytes,
                COALESCE(sum(records_archived), 0)::bigint AS rows
         FROM archive_jobs GROUP BY job_type ORDER BY job_type",
    )
    .fetch_all(pool)
    .await?;
    let open_batches = sqlx::query_as(
        "SELECT status::text AS status, count(*) AS n FROM archive_batches
         WHERE status <> 'done' GROUP BY status",
    )
    .fetch_all(pool)
    .await?;
    // Index-only (archive_batches_completed_idx).
    let last_batch_done = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(completed_at))::float8 FROM archive_batches
         WHERE status = 'done'",
    )
    .fetch_one(pool)
    .await?;
    Ok(Figures {
        jobs,
        open_batches,
        last_batch_done,
    })
}
