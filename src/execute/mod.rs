//! Executing one batch, as one or more chunks (logs and metrics) or in one
//! go (reports, and restores: [`restore`]). Each chunk is a transaction that moves the rows of a slice
//! of the batch's range and, in the same commit, advances the batch's cursor
//! and adds to its counts and its job's (the last chunk marks it done); so a
//! batch has its effect exactly once however often its message is
//! delivered, and a worker killed mid-batch leaves it resumable at the
//! cursor. Chunks are sized to `--chunk-time` ([`chunk`]); the governor is
//! asked before each one, outside any transaction.

pub mod chunk;
pub mod logs;
pub mod metrics;
pub mod reports;
pub mod restore;

use crate::error::{Error, Result};
use crate::governor::Governor;
use crate::ledger::{self, Key};
use crate::schema::{Keyed, LOGS_KEYED, METRICS_KEYED, bind_range};
use crate::vocabulary::BatchStatus;
use crate::vocabulary::Kind;
use chunk::ChunkSizer;
use reports::ReportsContext;
use sqlx::{PgConnection, PgPool, Row};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Memory a batch's sorts and hashes may use before spilling to disk (per
/// executing batch): a 5,000-sample metrics batch's grouping needs ~8 MB.
const BATCH_WORK_MEM: &str = "64MB";

/// What executing batches needs: the database, and for reports the object
/// store and the reports root.
#[derive(Debug, Clone)]
pub struct Executor {
    /// The database.
    pub pool: PgPool,
    /// Set when this process archives reports.
    pub reports: Option<Arc<ReportsContext>>,
    /// The kinds this process serves (`worker --kinds`); `None`: every kind
    /// it is set up for. A batch of another kind is declined, never failed.
    pub kinds: Option<Vec<Kind>>,
    /// What is checked before each chunk, and the chunk time.
    pub governor: Arc<Governor>,
    /// The chunk sizes, learnt from the chunks this process ran.
    pub chunks: Arc<ChunkSizer>,
    /// How long one transaction of a batch may wait for the database to
    /// answer before its session is given up as lost ([`on_session`]);
    /// `None`: as long as the network lets it.
    pub deadline: Option<Duration>,
}

impl From<&PgPool> for Executor {
    fn from(pool: &PgPool) -> Self {
        Executor {
            pool: pool.clone(),
            reports: None,
            kinds: None,
            governor: Arc::default(),
            chunks: Arc::default(),
            deadline: crate::config::BatchTimeouts::default().client_deadline(),
        }
    }
}

impl Executor {
    /// Why this process cannot execute batches of `kind`, if it cannot:
    /// not among its `--kinds`, or reports without `REPORTS_ROOT`.
    pub fn declines(&self, kind: Kind) -> Option<String> {
        // Restore batches touch the logs tables: a worker serving logs
        // serves them too.
        if let Some(kinds) = &self.kinds
            && !kinds.contains(&kind)
            && !(kind == Kind::Restore && kinds.contains(&Kind::Logs))
        {
            let served: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            return Some(format!(
                "this worker serves only {} (--kinds / ARCHIVER_KINDS)",
                served.join(",")
            ));
        }
        if kind == Kind::Reports && self.reports.is_none() {
            return Some(
                "this worker is not set up to archive reports (REPORTS_ROOT unset)".into(),
            );
        }
        None
    }
}

impl From<&Executor> for Executor {
    fn from(e: &Executor) -> Self {
        e.clone()
    }
}

/// What executing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The batch ran now.
    Done {
        /// Its counts.
        counts: ledger::Counts,
        /// It was the last batch of its job.
        job_completed: bool,
        /// How long this delivery kept the database busy with it: its
        /// transactions (its file work, for reports), not the time spent
        /// waiting for a session, a retry or the governor. What a worker's
        /// rest ratio is a multiple of.
        busy: Duration,
    },
    /// The batch had already run: nothing was changed.
    AlreadyDone,
}

/// Executes batch `id`, which a message says is of `kind`: a logs or
/// metrics batch chunk by chunk from its cursor until the cursor reaches its
/// upper bound, a reports batch in one go. `stop` cancelled between chunks:
/// `Err(Error::ShuttingDown)`, the chunks done so far committed and the rest
/// left for a redelivery.
#[tracing::instrument(skip_all, fields(archive_batch_id = %id, kind = %kind))]
pub async fn execute_batch(
    exec: &Executor,
    id: Uuid,
    kind: Kind,
    stop: &CancellationToken,
) -> Result<Outcome> {
    // The ledger, not the message, says what the batch is: a message naming
    // the wrong kind is the message's fault, whatever this process serves.
    if let Some(why) = exec.declines(kind) {
        let batch = ledger::peek_batch(&exec.pool, id).await?;
        check_kind(&batch, kind)?;
        if batch.status == BatchStatus::Done {
            tracing::debug!("already done; acknowledging without effect");
            return Ok(Outcome::AlreadyDone);
        }
        return Err(Error::Declined { kind, why });
    }
    if kind == Kind::Reports {
        let ctx = exec.reports.as_ref().expect("declines() checked reports");
        let batch = ledger::peek_batch(&exec.pool, id).await?;
        check_kind(&batch, kind)?;
        return reports::execute(exec, ctx, batch).await;
    }
    if kind == Kind::Restore {
        // One transaction, whatever its size: the governor is asked once.
        exec.governor.before_chunk(&exec.pool, stop).await?;
        return on_session(exec, "a restore batch", async |c| {
            restore::execute(c, id).await
        })
        .await;
    }
    let mut ran = ledger::Counts::default();
    let mut busy = Duration::ZERO;
    let mut chunks = 0;
    loop {
        if chunks > 0 && stop.is_cancelled() {
            tracing::info!(
                chunks,
                rows = ran.processed,
                "stopping between chunks; the batch's cursor keeps what was done"
            );
            return Err(Error::ShuttingDown);
        }
        exec.governor.before_chunk(&exec.pool, stop).await?;
        let chunk = on_session(exec, "a chunk", async |c| {
            run_chunk(c, exec, id, kind).await
        });
        let Some(chunk) = chunk.await? else {
            if chunks == 0 {
                tracing::debug!("already done; acknowledging without effect");
                return Ok(Outcome::AlreadyDone);
            }
            // Another delivery of the batch ran its last chunk.
            tracing::debug!(chunks, "finished by another delivery");
            return Ok(Outcome::Done {
                counts: ran,
                job_completed: false,
                busy,
            });
        };
        ran += chunk.counts;
        busy += chunk.took;
        chunks += 1;
        if let Some(job_completed) = chunk.last {
            tracing::debug!(
                rows = ran.archived,
                bytes = ran.bytes,
                chunks,
                job_completed,
                "batch done"
            );
            return Ok(Outcome::Done {
                counts: ran,
                job_completed,
                busy,
            });
        }
    }
}

/// What one chunk did.
struct Chunk {
    counts: ledger::Counts,
    /// Its work, from holding the batch's lock to its commit.
    took: Duration,
    /// `Some(job_completed)`: it was the batch's last.
    last: Option<bool>,
}

/// Runs `work` (one transaction of a batch) on a session of `exec`'s pool,
/// given up past `exec.deadline` without an answer ([`db::on_session`]):
/// the batch then waits for the database as when it is down. Whether a
/// COMMIT sent before a cut took effect is then unknown here, and need not
/// be known: the ledger commits with the work, so the next try finds the
/// batch's cursor where the database left it.
async fn on_session<T>(
    exec: &Executor,
    what: &str,
    work: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    crate::db::on_session(&exec.pool, exec.deadline, what, work).await
}

/// Runs the next chunk of batch `id` in a transaction of its own on
/// `session`: locks the batch, moves the rows from its cursor up to the
/// chunk's end, and records them with the new cursor. `None`: the batch is
/// already done.
async fn run_chunk(
    session: &mut PgConnection,
    exec: &Executor,
    id: Uuid,
    kind: Kind,
) -> Result<Option<Chunk>> {
    let chunk_time = exec.governor.opts.chunk_time;
    let size = exec.chunks.size(kind, chunk_time);
    let mut tx = sqlx::Connection::begin(session).await?;
    batch_settings(&mut tx).await?;
    let batch = ledger::lock_batch(&mut tx, id).await?;
    check_kind(&batch, kind)?;
    if batch.status == BatchStatus::Done {
        tx.rollback().await?;
        return Ok(None);
    }
    // From here: the chunk's own work, not a wait for the batch's lock.
    let started = Instant::now();
    let upto = chunk_end(&mut tx, &batch, size).await?;
    let counts = match batch.kind {
        Kind::Logs => logs::archive(&mut tx, &batch, batch.cursor, upto).await?,
        Kind::Metrics => metrics::archive(&mut tx, &batch, batch.cursor, upto).await?,
        Kind::Reports | Kind::Restore => unreachable!("executed in one go"),
    };
    let last = upto >= batch.hi;
    let job_completed = ledger::record_chunk(&mut tx, &batch, counts, upto, last).await?;
    tx.commit().await?;
    let took = started.elapsed();
    exec.chunks.record(kind, counts.processed, took, chunk_time);
    tracing::debug!(
        chunk = batch.chunks + 1,
        rows = counts.processed,
        ms = took.as_millis() as u64,
        last,
        "chunk done"
    );
    Ok(Some(Chunk {
        counts,
        took,
        last: last.then_some(job_completed),
    }))
}

/// Sets a batch transaction's settings, first thing in it.
async fn batch_settings(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<()> {
    // A batch statement is costed high (jsonb_each, big ranges) and would be
    // JIT-compiled on every run, taking longer than the work itself; and a
    // metrics batch's grouping spills to disk at the default work_mem.
    // Generic plans: a custom plan of a range at the low end of the hot
    // table's index has the planner read the index's actual lowest key, past
    // every entry the chunks before it deleted (dead until vacuumed): ~20 ms
    // of planning per statement (PostgreSQL 15), for a chunk whose work
    // takes 4; and custom plans look cheaper than the generic one, so the
    // plan cache never switches by itself.
    sqlx::query(
        "SELECT set_config('jit', 'off', true), set_config('work_mem', $1, true),
                set_config('plan_cache_mode', 'force_generic_plan', true)",
    )
    .bind(BATCH_WORK_MEM)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The inclusive upper key of the next chunk of `batch`: the key of the
/// `size`-th row after its cursor, or its upper bound when no more than
/// `size` rows remain or chunks are off (`size` is `None`). Always read off
/// the index (one probe), never guessed from the planner's count: rows that
/// arrived in the range after planning would otherwise make the last chunk
/// as long as they are many.
async fn chunk_end(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    batch: &ledger::Batch,
    size: Option<i64>,
) -> Result<Key> {
    let Some(n) = size else {
        return Ok(batch.hi);
    };
    let keyed = match batch.kind {
        Kind::Logs => LOGS_KEYED,
        Kind::Metrics => METRICS_KEYED,
        Kind::Reports | Kind::Restore => return Ok(batch.hi),
    };
    let end = nth_key(tx, &keyed, batch, n).await?;
    Ok(end.map_or(batch.hi, |k| k.min(batch.hi)))
}

/// The key of the `n`-th row of `batch` after its cursor (older than the
/// cut-off), read off the index of `keyed`'s key; `None` when fewer remain.
/// For metrics the key is a group's (day, scenario_id): a chunk ending there
/// takes every sample of it, so it may exceed `n`.
async fn nth_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    keyed: &Keyed,
    batch: &ledger::Batch,
    n: i64,
) -> Result<Option<Key>> {
    let sql = format!(
        "SELECT {select} FROM {table} WHERE {range} ORDER BY {key} OFFSET $6 LIMIT 1",
        select = keyed.select,
        table = keyed.table,
        range = keyed.range(),
        key = keyed.key,
    );
    let row = bind_range(
        sqlx::query(sqlx::AssertSqlSafe(sql)),
        batch.cursor,
        batch.hi,
        batch.cutoff,
    )
    .bind(n.max(1) - 1)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|r| Key {
        ts: r.get("ts"),
        id: r.get("id"),
    }))
}

/// A whole NUMERIC as its statement returned it in text (a sum of digests,
/// or of values in millionths): exact in an `i128`.
fn numeric(text: String) -> Result<i128> {
    text.parse()
        .map_err(|e| Error::Schema(format!("{text:?} is not a whole number: {e}")))
}

fn check_kind(batch: &ledger::Batch, kind: Kind) -> Result<()> {
    if batch.kind == kind {
        return Ok(());
    }
    Err(Error::WrongKind {
        id: batch.id,
        message: kind.to_string(),
        ledger: batch.kind.to_string(),
    })
}
