//! What people and monitoring read from the ledger: batch counts, dead
//! batches and why, one batch's status, what done batches recorded for
//! `planner verify`, the figures `planner metrics` renders, and the
//! progress `planner status --watch` shows.

use crate::error::Result;
use crate::vocabulary::{BatchStatus, JobType, Kind};
use chrono::{DateTime, Utc};
use sqlx::types::BigDecimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

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

/// A done batch as `planner verify` checks it: what it recorded having put
/// in the archive, and what a restore took back out of it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Recorded {
    /// Batch id (`archive_batch_id` of its rows).
    pub id: Uuid,
    /// Its job.
    pub job_id: Uuid,
    /// Its kind.
    pub kind: Kind,
    /// Exclusive lower bound's time; `None`: from the start.
    pub lo_ts: Option<DateTime<Utc>>,
    /// Inclusive upper bound's time.
    pub hi_ts: DateTime<Utc>,
    /// When it was done.
    pub completed_at: Option<DateTime<Utc>>,
    /// Rows it wrote (aggregate rows, files).
    pub rows_archived: i64,
    /// Rows (samples) it deleted from the hot table.
    pub rows_deleted: i64,
    /// Rows a restore took back out of the archive.
    pub restored_rows: i64,
    /// Sum of its rows' digests; `None`: recorded before digests were.
    pub content_digest: Option<BigDecimal>,
    /// Sum of the restored rows' digests.
    pub restored_digest: BigDecimal,
    /// Metrics: its aggregates' sample count; `None`: recorded before.
    pub samples_count: Option<i64>,
    /// Metrics: its aggregates' value sum; `None`: recorded before.
    pub samples_value_sum: Option<BigDecimal>,
}

/// Which done batches `planner verify` checks.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Of these kinds.
    pub kinds: Vec<Kind>,
    /// Of this job only.
    pub job: Option<Uuid>,
    /// Completed at or after this.
    pub since: Option<DateTime<Utc>>,
    /// This many in 10,000 of them, picked by a hash of their id and
    /// `seed` (the same batches for the same seed).
    pub sample: Option<(i64, i64)>,
}

/// The done batches `sel` picks, oldest first, in the caller's
/// transaction (so that what they recorded and what the archive holds are
/// read from one snapshot).
pub async fn done_batches(conn: &mut PgConnection, sel: &Selection) -> Result<Vec<Recorded>> {
    let kinds: Vec<&str> = sel.kinds.iter().map(|k| k.as_str()).collect();
    let (per_10k, seed) = sel.sample.unwrap_or((10_000, 0));
    Ok(sqlx::query_as(
        "SELECT id, job_id, kind, lo_ts, hi_ts, completed_at, rows_archived, rows_deleted,
                restored_rows, content_digest, restored_digest, samples_count, samples_value_sum
         FROM archive_batches
         WHERE status = 'done' AND kind = ANY($1)
           AND ($2::uuid IS NULL OR job_id = $2)
           AND ($3::timestamptz IS NULL OR completed_at >= $3)
           AND ($4 >= 10000 OR abs(mod(hashtextextended(id::text, $5), 10000)) < $4)
         ORDER BY completed_at, job_id, seq",
    )
    .bind(&kinds)
    .bind(sel.job)
    .bind(sel.since)
    .bind(per_10k)
    .bind(seed)
    .fetch_all(conn)
    .await?)
}

/// A job's type as the ledger spells it; `None`: no such job.
pub async fn job_type(pool: &PgPool, id: Uuid) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT job_type FROM archive_jobs WHERE id = $1")
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
    /// Batches not done, by kind and status.
    pub open_batches: Vec<(Kind, BatchStatus, i64)>,
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
        "SELECT kind, status, count(*) AS n FROM archive_batches
         WHERE status <> 'done' GROUP BY kind, status",
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

/// Pending batches of one kind and the rows they were planned with: the
/// work left for workers or the next inline run.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct PendingWork {
    /// Kind.
    pub kind: String,
    /// Pending batches.
    pub batches: i64,
    /// Rows they were planned with, less what their chunks already moved
    /// (metrics: samples; reports: files).
    pub rows: i64,
}

/// Pending batches and their planned rows, per kind (kinds with none are
/// left out).
pub async fn pending_work(pool: &PgPool) -> Result<Vec<PendingWork>> {
    Ok(sqlx::query_as(
        "SELECT kind, count(*) AS batches, COALESCE(sum(GREATEST(planned_rows - rows_deleted, 0)), 0)::bigint AS rows
         FROM archive_batches WHERE status = 'pending' GROUP BY kind ORDER BY kind",
    )
    .fetch_all(pool)
    .await?)
}

/// One job's progress as a person watching reads it: its batches done of
/// those recorded, and its rows, counting the chunks already committed of
/// batches still running (their cursor's work).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct JobProgress {
    /// Job id.
    pub id: Uuid,
    /// `archive_jobs.job_type`: the kind it archives, or `retention`.
    pub kind: String,
    /// `pending`, `running`, `completed` or `failed`.
    pub status: String,
    /// Every batch is recorded (the total below will not grow).
    pub planning_done: bool,
    /// Batches recorded so far.
    pub batches_total: i64,
    /// Batches done.
    pub batches_done: i64,
    /// Batches still to run (a failed job's too: workers go on with the
    /// batches of a job one of whose batches died).
    pub batches_pending: i64,
    /// Of those, batches with some chunks committed (being run, or handed
    /// back part way).
    pub batches_started: i64,
    /// Batches parked in the dead-letter queue.
    pub batches_dead: i64,
    /// Rows deleted from the hot table so far (metrics: samples; reports:
    /// files), the committed chunks of unfinished batches included.
    pub rows_done: i64,
    /// Rows the pending batches were planned with, less what their chunks
    /// already moved.
    pub rows_left: i64,
}

/// The progress of every job pending or running or with batches pending,
/// of those created since `since` (a watcher's start: a job may come and go
/// between two readings), and of the jobs `also` (ones a watcher saw
/// before, to show how they ended), oldest first. Only unfinished batches are read (the partial index
/// on them): a done batch's rows are in its job's counters already.
pub async fn job_progress(
    pool: &PgPool,
    since: Option<DateTime<Utc>>,
    also: &[Uuid],
) -> Result<Vec<JobProgress>> {
    Ok(sqlx::query_as(
        "WITH jobs AS (
             SELECT id, job_type, status, planning_done, batches_planned, batches_done,
                    COALESCE(records_deleted, 0) AS records_deleted, created_at
             FROM archive_jobs
             WHERE status IN ('pending', 'running') OR id = ANY($1) OR created_at >= $2
                OR id IN (SELECT job_id FROM archive_batches WHERE status = 'pending')
         ), open AS (
             SELECT b.job_id,
                    count(*) FILTER (WHERE b.status = 'pending') AS pending,
                    count(*) FILTER (WHERE b.status = 'pending' AND b.chunks > 0) AS started,
                    count(*) FILTER (WHERE b.status = 'dead') AS dead,
                    COALESCE(sum(b.rows_deleted), 0) AS moved,
                    COALESCE(sum(GREATEST(b.planned_rows - b.rows_deleted, 0))
                             FILTER (WHERE b.status = 'pending'), 0) AS left_rows
             FROM archive_batches b JOIN jobs j ON j.id = b.job_id
             WHERE b.status <> 'done'
             GROUP BY b.job_id
         )
         SELECT j.id, j.job_type::text AS kind, j.status::text AS status, j.planning_done,
                j.batches_planned::bigint AS batches_total, j.batches_done::bigint AS batches_done,
                COALESCE(o.pending, 0)::bigint AS batches_pending,
                COALESCE(o.started, 0)::bigint AS batches_started,
                COALESCE(o.dead, 0)::bigint AS batches_dead,
                (j.records_deleted + COALESCE(o.moved, 0))::bigint AS rows_done,
                COALESCE(o.left_rows, 0)::bigint AS rows_left
         FROM jobs j LEFT JOIN open o ON o.job_id = j.id
         ORDER BY j.created_at, j.id",
    )
    .bind(also)
    .bind(since)
    .fetch_all(pool)
    .await?)
}

/// The database's clock now: where a watcher starts from.
pub async fn now(pool: &PgPool) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(pool).await?)
}
