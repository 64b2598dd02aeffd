//! The planner's core: find eligible rows, cut them into keyset batches,
//! record each batch in the ledger, create the partitions they need, and
//! publish one message per batch. Also the dry run, which only reads.

use crate::config::Policy;
use crate::error::{Error, Result};
use crate::ledger::{self, Key, Kind, NewBatch};
use crate::partitions;
use crate::transport::{BatchMessage, Publisher};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Batches recorded and published together.
const CHUNK: usize = 200;

/// What a run plans.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Rows per batch.
    pub batch_size: i64,
    /// Policy ages.
    pub policy: Policy,
    /// Recorded in `archive_jobs.transport`.
    pub transport: &'static str,
}

/// Which kinds this version can plan.
pub fn is_built(kind: Kind) -> bool {
    matches!(kind, Kind::Logs)
}

/// What a dry run found for one kind.
#[derive(Debug, Clone)]
pub struct Eligible {
    /// The kind.
    pub kind: Kind,
    /// Rows older than this are eligible.
    pub cutoff: DateTime<Utc>,
    /// Eligible rows (outside unfinished batches).
    pub rows: i64,
    /// Their bytes (`size_bytes`).
    pub bytes: i64,
    /// Oldest eligible time.
    pub oldest: Option<DateTime<Utc>>,
    /// Newest eligible time.
    pub newest: Option<DateTime<Utc>>,
    /// Batches a run would make.
    pub batches: i64,
    /// Unfinished batches of earlier runs: their count, and the bound above
    /// which this run plans.
    pub pending: Option<(i64, Key)>,
}

/// The cut-off for a policy age, by the database's clock.
pub async fn cutoff(pool: &PgPool, age_days: u32) -> Result<DateTime<Utc>> {
    Ok(
        sqlx::query_scalar("SELECT now() - make_interval(days => $1)")
            .bind(age_days as i32)
            .fetch_one(pool)
            .await?,
    )
}

/// Counts what a run of `kind` would archive, changing nothing.
pub async fn dry_run(pool: &PgPool, kind: Kind, opts: &PlanOptions) -> Result<Eligible> {
    match kind {
        Kind::Logs => {}
        other => {
            return Err(Error::config(
                "--dry-run",
                format!("{other} planning is not built yet"),
            ));
        }
    }
    let cutoff = cutoff(pool, opts.policy.logs_age_days).await?;
    let pending = ledger::open_high_water(pool, kind).await?;
    let after = pending.map(|(k, _)| k);
    let row = sqlx::query(
        "SELECT count(*) AS n, COALESCE(sum(size_bytes), 0)::bigint AS bytes,
                min(received_at) AS oldest, max(received_at) AS newest
         FROM scenario_logs
         WHERE (received_at, id) > (COALESCE($1, '-infinity'::timestamptz),
                                    COALESCE($2, '00000000-0000-0000-0000-000000000000'::uuid))
           AND received_at < $3",
    )
    .bind(after.map(|k| k.ts))
    .bind(after.map(|k| k.id))
    .bind(cutoff)
    .fetch_one(pool)
    .await?;
    let rows: i64 = row.get("n");
    Ok(Eligible {
        kind,
        cutoff,
        rows,
        bytes: row.get("bytes"),
        oldest: row.get("oldest"),
        newest: row.get("newest"),
        batches: (rows + opts.batch_size - 1) / opts.batch_size,
        pending: pending.map(|(k, n)| (n, k)),
    })
}

/// What a run planned for one kind.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The kind.
    pub kind: Kind,
    /// Its `archive_jobs` row.
    pub job: Uuid,
    /// Rows older than this were eligible.
    pub cutoff: DateTime<Utc>,
    /// Batches recorded and published.
    pub batches: usize,
    /// Rows in them, as counted when planning.
    pub rows: i64,
    /// Unfinished batches of earlier runs that this run planned above.
    pub pending_before: Option<(i64, Key)>,
}

/// Plans one kind: one job, its batches recorded and published. On failure
/// the job is marked failed with the reason.
pub async fn plan(
    pool: &PgPool,
    kind: Kind,
    opts: &PlanOptions,
    publisher: &dyn Publisher,
) -> Result<Planned> {
    if kind != Kind::Logs {
        return Err(Error::config(
            "--all",
            format!("{kind} planning is not built yet"),
        ));
    }
    let cutoff = cutoff(pool, opts.policy.logs_age_days).await?;
    let pending = ledger::open_high_water(pool, kind).await?;
    let job = ledger::create_job(pool, kind, cutoff, opts.batch_size, opts.transport).await?;
    ledger::start_job(pool, job).await?;
    let cut = LogsCut {
        pool,
        job,
        cutoff,
        opts,
        publisher,
    };
    match cut.run(pending.map(|(k, _)| k)).await {
        Ok((batches, rows)) => {
            ledger::finish_planning(pool, job).await?;
            Ok(Planned {
                kind,
                job,
                cutoff,
                batches,
                rows,
                pending_before: pending.map(|(k, n)| (n, k)),
            })
        }
        Err(e) => {
            if let Err(e2) = ledger::fail_job(pool, job, &format!("planning failed: {e}")).await {
                tracing::error!("could not mark job {job} failed: {e2}");
            }
            Err(e)
        }
    }
}

struct LogsCut<'a> {
    pool: &'a PgPool,
    job: Uuid,
    cutoff: DateTime<Utc>,
    opts: &'a PlanOptions,
    publisher: &'a dyn Publisher,
}

impl LogsCut<'_> {
    /// Walks the (received_at, id) index once, in steps of `batch_size`.
    async fn run(&self, after: Option<Key>) -> Result<(usize, i64)> {
        let Some(first) = self.edge(after, "ASC").await? else {
            return Ok((0, 0));
        };
        partitions::ensure_months(self.pool, "scenario_logs_archive", first.ts, self.cutoff)
            .await?;
        // The first batch starts just below the oldest eligible row, so a
        // late row older than every partition can never fall into it.
        let mut lo = after.unwrap_or(Key {
            ts: first.ts - ChronoDuration::microseconds(1),
            id: Uuid::max(),
        });
        let (mut total, mut rows, mut chunk) = (0usize, 0i64, Vec::with_capacity(CHUNK));
        loop {
            let (hi, n) = match self.boundary(lo).await? {
                Some(hi) => (hi, self.opts.batch_size),
                None => match self.tail(lo).await? {
                    Some(tail) => tail,
                    None => break,
                },
            };
            chunk.push(NewBatch {
                id: Uuid::new_v4(),
                lo,
                hi,
                planned_rows: n,
            });
            rows += n;
            lo = hi;
            if chunk.len() == CHUNK {
                self.flush(total, &mut chunk).await?;
                total += CHUNK;
            }
            if n < self.opts.batch_size {
                break;
            }
        }
        let last = chunk.len();
        self.flush(total, &mut chunk).await?;
        Ok((total + last, rows))
    }

    /// The oldest (ASC) or newest (DESC) eligible key above `after`.
    async fn edge(&self, after: Option<Key>, order: &str) -> Result<Option<Key>> {
        let sql = format!(
            "SELECT received_at, id FROM scenario_logs
             WHERE (received_at, id) > (COALESCE($1, '-infinity'::timestamptz),
                                        COALESCE($2, '00000000-0000-0000-0000-000000000000'::uuid))
               AND received_at < $3
             ORDER BY received_at {order}, id {order} LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after.map(|k| k.ts))
            .bind(after.map(|k| k.id))
            .bind(self.cutoff)
            .fetch_optional(self.pool)
            .await?;
        Ok(row.map(|r| Key {
            ts: r.get(0),
            id: r.get(1),
        }))
    }

    /// The key of the `batch_size`-th eligible row above `lo`, if there is one.
    async fn boundary(&self, lo: Key) -> Result<Option<Key>> {
        let row = sqlx::query(
            "SELECT received_at, id FROM scenario_logs
             WHERE (received_at, id) > ($1, $2) AND received_at < $3
             ORDER BY received_at, id OFFSET $4 LIMIT 1",
        )
        .bind(lo.ts)
        .bind(lo.id)
        .bind(self.cutoff)
        .bind(self.opts.batch_size - 1)
        .fetch_optional(self.pool)
        .await?;
        Ok(row.map(|r| Key {
            ts: r.get(0),
            id: r.get(1),
        }))
    }

    /// The last eligible key above `lo` and the rows up to it (fewer than a batch).
    async fn tail(&self, lo: Key) -> Result<Option<(Key, i64)>> {
        let row = sqlx::query(
            "SELECT received_at, id, count(*) OVER () AS n FROM scenario_logs
             WHERE (received_at, id) > ($1, $2) AND received_at < $3
             ORDER BY received_at DESC, id DESC LIMIT 1",
        )
        .bind(lo.ts)
        .bind(lo.id)
        .bind(self.cutoff)
        .fetch_optional(self.pool)
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

    /// Records a chunk of batches, then publishes them: a message never
    /// names a batch the ledger does not have.
    async fn flush(&self, first_seq: usize, chunk: &mut Vec<NewBatch>) -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        ledger::record_batches(self.pool, self.job, Kind::Logs, first_seq as i32, chunk).await?;
        let messages: Vec<BatchMessage> = chunk
            .iter()
            .map(|b| BatchMessage::new(b.id, Kind::Logs))
            .collect();
        self.publisher.publish(&messages).await?;
        let ids: Vec<Uuid> = chunk.iter().map(|b| b.id).collect();
        ledger::mark_published(self.pool, &ids).await?;
        tracing::debug!(job = %self.job, batches = chunk.len(), "published");
        chunk.clear();
        Ok(())
    }
}
