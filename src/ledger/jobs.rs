//! A job's life in `archive_jobs`: created by a planner run, running once
//! planned, completed with its last batch or failed with a dead one; jobs a
//! dead planner left are adopted; retention runs are jobs too.

use crate::error::Result;
use crate::vocabulary::{JobStatus, JobType, Kind};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

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

/// What `planner restore` brings back, recorded in `archive_restores`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreScope {
    /// The scenario.
    pub scenario: Uuid,
    /// Inclusive; `None`: from its oldest archived row.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive; `None`: to its newest.
    pub to: Option<DateTime<Utc>>,
}

/// Creates a restore job (`pending`, job type `restore`) and records its
/// scope and hold in `archive_restores` in the same transaction, so the
/// hold is in force before any of its batches runs: `hold_until` is now
/// (the database's clock) plus `hold_days` (0: no hold). The job's cut-off
/// is the scope's end (`to`), or now: no archived row is newer. Returns
/// the job, its cut-off and `hold_until`. With no `to`, the hold ends its range at
/// now: logs of the scenario that arrive later are archived as usual.
pub async fn create_restore_job(
    pool: &PgPool,
    scope: RestoreScope,
    hold_days: u32,
    batch_size: i64,
    transport: &str,
) -> Result<(Uuid, DateTime<Utc>, DateTime<Utc>)> {
    let mut tx = pool.begin().await?;
    let (id, cutoff): (Uuid, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO archive_jobs (job_type, status, cutoff, batch_size, transport)
         VALUES ($1, 'pending', COALESCE($2, now()), $3, $4) RETURNING id, cutoff",
    )
    .bind(JobType::Restore)
    .bind(scope.to)
    .bind(i32::try_from(batch_size).unwrap_or(i32::MAX))
    .bind(transport)
    .fetch_one(&mut *tx)
    .await?;
    let hold_until: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO archive_restores (job_id, kind, scenario_id, from_ts, to_ts, hold_until)
         VALUES ($1, 'logs', $2, $3, COALESCE($4, GREATEST(now(), $3 + interval '1 microsecond')),
                 now() + make_interval(days => $5))
         RETURNING hold_until",
    )
    .bind(id)
    .bind(scope.scenario)
    .bind(scope.from)
    .bind(scope.to)
    .bind(i32::try_from(hold_days).unwrap_or(i32::MAX))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((id, cutoff, hold_until))
}

/// The scenario a restore job brings back (`None`: not a restore job).
pub async fn restore_scenario(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job: Uuid,
) -> Result<Option<Uuid>> {
    Ok(
        sqlx::query_scalar("SELECT scenario_id FROM archive_restores WHERE job_id = $1")
            .bind(job)
            .fetch_optional(&mut **tx)
            .await?,
    )
}

/// `pending → running`.
pub async fn start_job(pool: &PgPool, job: Uuid) -> Result<()> {
    sqlx::query("UPDATE archive_jobs SET status = 'running', started_at = now() WHERE id = $1")
        .bind(job)
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

/// Notes on a job what went wrong with part of it, in the caller's
/// transaction; the first note stays (a job keeps the first reason).
pub async fn note_job_error(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job: Uuid,
    note: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE archive_jobs SET error_message = COALESCE(error_message, $2) WHERE id = $1",
    )
    .bind(job)
    .bind(note)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
