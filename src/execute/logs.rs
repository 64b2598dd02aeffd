//! Logs (R1): move a batch's rows, every column unchanged, from
//! `scenario_logs` into `scenario_logs_archive` in one statement.

use crate::error::Result;
use crate::ledger::{Batch, Counts};
use sqlx::{Postgres, Row, Transaction};

/// Moves the rows of `batch`'s range that are older than its job's cut-off,
/// stamping `archived_at` and `archive_batch_id`. Rows that arrived in the
/// range after planning move too; rows already gone are simply not there.
pub async fn archive(tx: &mut Transaction<'_, Postgres>, batch: &Batch) -> Result<Counts> {
    let row = sqlx::query(
        "WITH moved AS (
             DELETE FROM scenario_logs
             WHERE (received_at, id) > (COALESCE($1, '-infinity'::timestamptz),
                                        COALESCE($2, '00000000-0000-0000-0000-000000000000'::uuid))
               AND (received_at, id) <= ($3, $4)
               AND received_at < $5
             RETURNING id, scenario_id, received_at, message_hash, message_preview, source,
                       size_bytes, has_pii, token_count, sqs_blocks
         ), ins AS (
             INSERT INTO scenario_logs_archive (id, scenario_id, received_at, message_hash,
                 message_preview, source, size_bytes, has_pii, token_count, sqs_blocks,
                 archived_at, archive_batch_id)
             SELECT id, scenario_id, received_at, message_hash, message_preview, source,
                    size_bytes, has_pii, token_count, sqs_blocks, now(), $6
             FROM moved
             RETURNING size_bytes
         )
         SELECT count(*) AS n, COALESCE(sum(size_bytes), 0)::bigint AS bytes FROM ins",
    )
    .bind(batch.lo.map(|k| k.ts))
    .bind(batch.lo.map(|k| k.id))
    .bind(batch.hi.ts)
    .bind(batch.hi.id)
    .bind(batch.cutoff)
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
