//! Executing one batch: its data change and its ledger row flip to done
//! commit in one transaction, so a batch has its effect exactly once however
//! often its message is delivered.

pub mod logs;
pub mod metrics;
pub mod reports;

use crate::error::{Error, Result};
use crate::governor::Governor;
use crate::ledger;
use crate::vocabulary::BatchStatus;
use crate::vocabulary::Kind;
use reports::ReportsContext;
use sqlx::PgPool;
use std::sync::Arc;
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
}

impl From<&PgPool> for Executor {
    fn from(pool: &PgPool) -> Self {
        Executor {
            pool: pool.clone(),
            reports: None,
            kinds: None,
            governor: Arc::default(),
        }
    }
}

impl Executor {
    /// Why this process cannot execute batches of `kind`, if it cannot:
    /// not among its `--kinds`, or reports without `REPORTS_ROOT`.
    pub fn declines(&self, kind: Kind) -> Option<String> {
        if let Some(kinds) = &self.kinds
            && !kinds.contains(&kind)
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
    },
    /// The batch had already run: nothing was changed.
    AlreadyDone,
}

/// Executes batch `id`, which a message says is of `kind`.
#[tracing::instrument(skip_all, fields(archive_batch_id = %id, kind = %kind))]
pub async fn execute_batch(exec: &Executor, id: Uuid, kind: Kind) -> Result<Outcome> {
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
    // Until batches run as chunks, the governor is asked once per batch.
    exec.governor
        .before_chunk(&exec.pool, &tokio_util::sync::CancellationToken::new())
        .await?;
    let mut tx = exec.pool.begin().await?;
    // A batch statement is costed high (jsonb_each, big ranges) and would be
    // JIT-compiled on every run, taking longer than the work itself; and a
    // metrics batch's grouping spills to disk at the default work_mem.
    sqlx::query("SELECT set_config('jit', 'off', true), set_config('work_mem', $1, true)")
        .bind(BATCH_WORK_MEM)
        .execute(&mut *tx)
        .await?;
    let batch = ledger::lock_batch(&mut tx, id).await?;
    check_kind(&batch, kind)?;
    if batch.status == BatchStatus::Done {
        tx.rollback().await?;
        tracing::debug!("already done; acknowledging without effect");
        return Ok(Outcome::AlreadyDone);
    }
    let counts = match batch.kind {
        Kind::Logs => logs::archive(&mut tx, &batch).await?,
        Kind::Metrics => metrics::archive(&mut tx, &batch).await?,
        Kind::Reports => unreachable!("reports are executed above"),
    };
    let job_completed = ledger::complete_batch(&mut tx, &batch, counts).await?;
    tx.commit().await?;
    tracing::debug!(
        rows = counts.archived,
        bytes = counts.bytes,
        job_completed,
        "batch done"
    );
    Ok(Outcome::Done {
        counts,
        job_completed,
    })
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
