//! Logs (R1): move a batch's rows, every column unchanged, from
//! `scenario_logs` into `scenario_logs_archive` in one statement.

use crate::error::Result;
use crate::ledger::{Batch, Counts};
use crate::schema::{FROM_START, LOGS, LOGS_ARCHIVE, bind_batch};
use sqlx::{Postgres, Row, Transaction};

/// Moves the rows of `batch`'s range that are older than its job's cut-off,
/// stamping `archived_at` and `archive_batch_id`. Rows that arrived in the
/// range after planning move too; rows already gone are simply not there.
pub async fn archive(tx: &mut Transaction<'_, Postgres>, batch: &Batch) -> Result<Counts> {
    let sql = format!(
        "WITH moved AS (
             DELETE FROM {LOGS}
             WHERE (received_at, id) > {FROM_START}
               AND (received_at, id) <= ($3, $4)
               AND received_at < $5
             RETURNING id, scenario_id, received_at, message_hash, message_preview, source,
                       size_bytes, has_pii, token_count, sqs_blocks
         ), ins AS (
             INSERT INTO {LOGS_ARCHIVE} (id, scenario_id, received_at, message_hash,
                 message_preview, source, size_bytes, has_pii, token_count, sqs_blocks,
                 archived_at, archive_batch_id)
             SELECT id, scenario_id, received_at, message_hash, message_preview, source,
                    size_bytes, has_pii, token_count, sqs_blocks, now(), $6
             FROM moved
             RETURNING size_bytes
         )
         SELECT count(*) AS n, COALESCE(sum(size_bytes), 0)::bigint AS bytes FROM ins"
    );
    let row = bind_batch(sqlx::query(sqlx::AssertSqlSafe(sql)), batch)
        .bind(batch.id)
        .fetch_one(&mut **tx)
        .await?;
    let n: i64 = row.get("n");
    Ok(Counts {
        processed: n,
        archived: n,
        deleted: n,
        bytes: row.get("bytes"),
    })
}
