//! Executing one batch: its data change and its ledger row flip to done
//! commit in one transaction, so a batch has its effect exactly once however
//! often its message is delivered.

pub mod logs;
pub mod metrics;
pub mod reports;

use crate::error::{Error, Result};
use crate::ledger::{self, Kind};
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
}

impl From<&PgPool> for Executor {
    fn from(pool: &PgPool) -> Self {
        Executor {
            pool: pool.clone(),
            reports: None,
        }
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
    if kind == Kind::Reports {
        let ctx = exec.reports.as_ref().ok_or_else(|| {
            Error::config(
                "REPORTS_ROOT",
                "this process is not set up to archive reports (REPORTS_ROOT unset)",
            )
        })?;
        let batch = ledger::peek_batch(&exec.pool, id).await?;
        check_kind(&batch, kind)?;
        return reports::execute(exec, ctx, batch).await;
    }
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
    if batch.status == "done" {
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
