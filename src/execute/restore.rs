//! A restore batch (`planner restore --logs`, R16): its rows of one
//! scenario taken out of `scenario_logs_archive` and put back into
//! `scenario_logs`, every application column equal (`archived_at` and
//! `archive_batch_id` dropped), in one transaction with the batch's
//! completion and the credit of the archive batches they came from
//! (`restored_rows`, `restored_digest`: `planner verify` expects each
//! archive batch to hold what it wrote less what was restored from it).
//! A redelivered done batch is a no-op; a row whose id is already in the
//! hot table fails the batch for good, naming the id, and rolls back
//! (nothing is lost: the archived row stays where it was).

use super::{Outcome, batch_settings, check_kind};
use crate::error::{Error, Result};
use crate::ledger::{self, Counts};
use crate::schema::{LOGS, LOGS_ARCHIVE, LOGS_ROW_DIGEST, RESTORE_RANGE, bind_batch};
use crate::vocabulary::{BatchStatus, Kind};
use sqlx::Row;
use uuid::Uuid;

/// The application's columns of a log row, in both tables.
const COLUMNS: &str = "id, scenario_id, received_at, message_hash, message_preview, source, \
     size_bytes, has_pii, token_count, sqs_blocks";

/// Ids named in a collision error, at most.
const NAMED: i64 = 5;

/// Executes restore batch `id` in one transaction on `session` (see the
/// module's doc).
pub async fn execute(session: &mut sqlx::PgConnection, id: Uuid) -> Result<Outcome> {
    let started = std::time::Instant::now();
    let mut tx = sqlx::Connection::begin(session).await?;
    batch_settings(&mut tx).await?;
    let batch = ledger::lock_batch(&mut tx, id).await?;
    check_kind(&batch, Kind::Restore)?;
    if batch.status == BatchStatus::Done {
        tx.rollback().await?;
        return Ok(Outcome::AlreadyDone);
    }
    let scenario = ledger::restore_scenario(&mut tx, batch.job_id)
        .await?
        .ok_or_else(|| Error::BadBatch {
            id,
            reason: format!(
                "its job {} has no row in archive_restores: cannot tell which scenario to restore",
                batch.job_id
            ),
        })?;
    // The insert skips ids already in the hot table (rather than failing
    // with a message that does not say which): they are named below and
    // the transaction is rolled back.
    let sql = format!(
        "WITH moved AS (
             DELETE FROM {LOGS_ARCHIVE} WHERE {RESTORE_RANGE}
             RETURNING {COLUMNS}, archive_batch_id, {LOGS_ROW_DIGEST} AS digest
         ), ins AS (
             INSERT INTO {LOGS} ({COLUMNS}) SELECT {COLUMNS} FROM moved
             ON CONFLICT DO NOTHING
             RETURNING id
         ), credit AS (
             UPDATE archive_batches b
             SET restored_rows = b.restored_rows + c.n,
                 restored_digest = b.restored_digest + c.digest
             FROM (SELECT archive_batch_id, count(*) AS n, sum(digest) AS digest
                   FROM moved WHERE archive_batch_id IS NOT NULL
                   GROUP BY archive_batch_id) c
             WHERE b.id = c.archive_batch_id
             RETURNING b.id
         )
         SELECT (SELECT count(*) FROM moved) AS n,
                (SELECT COALESCE(sum(size_bytes), 0) FROM moved)::bigint AS bytes,
                (SELECT count(*) FROM moved WHERE id NOT IN (SELECT id FROM ins)) AS collided,
                ARRAY(SELECT id FROM moved WHERE id NOT IN (SELECT id FROM ins)
                      ORDER BY id LIMIT {NAMED}) AS collided_ids,
                (SELECT count(*) FROM credit) AS credited"
    );
    let row = bind_batch(sqlx::query(sqlx::AssertSqlSafe(sql)), &batch)
        .bind(scenario)
        .fetch_one(&mut *tx)
        .await?;
    let collided: i64 = row.get("collided");
    if collided > 0 {
        let ids: Vec<Uuid> = row.get("collided_ids");
        let named: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        tx.rollback().await?;
        return Err(Error::Refused(format!(
            "restore batch {id}: {collided} row(s) of scenario {scenario} already in {LOGS} \
             under the same id (an id collision), e.g. id {}: nothing of this batch was \
             restored (the archived rows stay in {LOGS_ARCHIVE}); remove or rename the hot \
             row(s), then `planner redrive --batch {id}`",
            named.join(", id ")
        )));
    }
    let n: i64 = row.get("n");
    // Rows taken out of the archive and written back: counted as processed
    // and deleted (from the archive), never as archived rows or bytes, so
    // the archive's figures and alerts do not count a restore as growth.
    let counts = Counts {
        processed: n,
        archived: 0,
        deleted: n,
        bytes: 0,
        ..Counts::default()
    };
    let job_completed = ledger::complete_batch(&mut tx, &batch, counts).await?;
    tx.commit().await?;
    tracing::debug!(
        rows = n,
        bytes = row.get::<i64, _>("bytes"),
        credited = row.get::<i64, _>("credited"),
        job_completed,
        "restore batch done"
    );
    Ok(Outcome::Done {
        counts,
        job_completed,
        busy: started.elapsed(),
    })
}
