//! Logs (R1): move a chunk of a batch's rows, every column unchanged, from
//! `scenario_logs` into `scenario_logs_archive` in one statement; and find
//! where a chunk of N rows ends.

use crate::error::Result;
use crate::ledger::{Batch, Counts, Key};
use crate::schema::{FROM_START, LOGS, LOGS_ARCHIVE, bind_range};
use sqlx::{Postgres, Row, Transaction};

/// The `(received_at, id)` key of the `n`-th row of `batch` after its
/// cursor (older than the cut-off), read off the `(received_at, id)` index;
/// `None` when fewer remain.
pub async fn nth_key(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    n: i64,
) -> Result<Option<Key>> {
    let sql = format!(
        "SELECT received_at, id FROM {LOGS}
         WHERE (received_at, id) > {FROM_START}
           AND (received_at, id) <= ($3, $4)
           AND received_at < $5
         ORDER BY received_at, id OFFSET $6 LIMIT 1"
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
        ts: r.get("received_at"),
        id: r.get("id"),
    }))
}

/// Moves the rows of `batch`'s range `(from, upto]` that are older than its
/// job's cut-off, stamping `archived_at` and `archive_batch_id`. Rows that
/// arrived in the range after planning move too; rows already gone are
/// simply not there.
pub async fn archive(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    from: Option<Key>,
    upto: Key,
) -> Result<Counts> {
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
    })
}
