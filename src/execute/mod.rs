//! Executing one batch: its data change and its ledger row flip to done
//! commit in one transaction, so a batch has its effect exactly once however
//! often its message is delivered.

pub mod logs;
pub mod metrics;

use crate::error::{Error, Result};
use crate::ledger::{self, Kind};
use sqlx::PgPool;
use uuid::Uuid;

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
pub async fn execute_batch(pool: &PgPool, id: Uuid, kind: Kind) -> Result<Outcome> {
    let mut tx = pool.begin().await?;
    let batch = ledger::lock_batch(&mut tx, id).await?;
    if batch.kind != kind {
        return Err(Error::WrongKind {
            id,
            message: kind.to_string(),
            ledger: batch.kind.to_string(),
        });
    }
    if batch.status == "done" {
        tx.rollback().await?;
        tracing::debug!("already done; acknowledging without effect");
        return Ok(Outcome::AlreadyDone);
    }
    let counts = match batch.kind {
        Kind::Logs => logs::archive(&mut tx, &batch).await?,
        Kind::Metrics => metrics::archive(&mut tx, &batch).await?,
        other => {
            return Err(Error::BadBatch {
                id,
                reason: format!("{other} batches are not supported by this worker version"),
            });
        }
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
