//! Logs (R1): move a chunk of a batch's rows, every column unchanged, from
//! `scenario_logs` into `scenario_logs_archive` in one statement, which
//! also sums the moved rows' digests (`schema::LOGS_ROW_DIGEST`) for the
//! batch's `content_digest`: no extra pass.

use super::numeric;
use crate::error::Result;
use crate::ledger::{Batch, Counts, Key};
use crate::schema::{
    LOGS, LOGS_ARCHIVE, LOGS_HOLD, LOGS_HOLD_ACTIVE, LOGS_KEYED, LOGS_ROW_DIGEST, bind_range,
};
use sqlx::{Postgres, Row, Transaction};

/// Moves the rows of `batch`'s range `(from, upto]` that are older than its
/// job's cut-off, stamping `archived_at` and `archive_batch_id`. Rows that
/// arrived in the range after planning move too; rows already gone are
/// simply not there; rows a restore holds ([`LOGS_HOLD`]) stay.
pub async fn archive(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    from: Option<Key>,
    upto: Key,
) -> Result<Counts> {
    // Rows a restore brought back stay hot until its hold ends: the
    // condition is added only while a hold is in force, so the common
    // path's statement (and plan) is unchanged.
    let held: bool = sqlx::query_scalar(LOGS_HOLD_ACTIVE)
        .fetch_one(&mut **tx)
        .await?;
    let hold = if held {
        format!(" AND {LOGS_HOLD}")
    } else {
        String::new()
    };
    let range = LOGS_KEYED.range();
    let sql = format!(
        "WITH moved AS (
             DELETE FROM {LOGS} WHERE {range}{hold}
             RETURNING id, scenario_id, received_at, message_hash, message_preview, source,
                       size_bytes, has_pii, token_count, sqs_blocks
         ), ins AS (
             INSERT INTO {LOGS_ARCHIVE} (id, scenario_id, received_at, message_hash,
                 message_preview, source, size_bytes, has_pii, token_count, sqs_blocks,
                 archived_at, archive_batch_id)
             SELECT id, scenario_id, received_at, message_hash, message_preview, source,
                    size_bytes, has_pii, token_count, sqs_blocks, now(), $6
             FROM moved
             RETURNING size_bytes, {LOGS_ROW_DIGEST} AS digest
         )
         SELECT count(*) AS n, COALESCE(sum(size_bytes), 0)::bigint AS bytes,
                COALESCE(sum(digest), 0)::text AS digest FROM ins"
    );
    let row = bind_range(
        sqlx::query(sqlx::AssertSqlSafe(sql)),
        from,
        upto,
        batch.cutoff,
    )
    .bind(batch.id)
    .fetch_one(&mut **tx)
    .await?;
    let n: i64 = row.get("n");
    Ok(Counts {
        processed: n,
        archived: n,
        deleted: n,
        bytes: row.get("bytes"),
        digest: numeric(row.get("digest"))?,
        ..Counts::default()
    })
}
