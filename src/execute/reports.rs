//! Reports (R3): each report's file is compressed and uploaded, its metadata
//! row moves to `reports_archive`, and only then is the local file deleted.
//!
//! Order, each step repairable by redelivery:
//! 1. upload under a deterministic key (a retry overwrites the same object),
//!    verified by the store (size, metadata);
//! 2. one transaction: `reports_archive` rows in, `reports` rows out, failures
//!    recorded, the ledger row done, the job's counters;
//! 3. delete the local files and set `deleted_locally`.
//!
//! A crash before 2 re-uploads the same objects; a crash between 2 and 3
//! finds the batch done and finishes step 3. No upload happens inside the
//! transaction, so no lock is held while bytes travel.

use super::{Executor, Outcome};
use crate::error::{Class, Error, Result};
use crate::ledger::{self, Batch, Counts};
use crate::objects::{self, Compression, ObjectStore, Stored};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// What a worker needs to archive reports.
#[derive(Debug)]
pub struct ReportsContext {
    /// Report files must resolve (symlinks included) under this directory.
    pub root: PathBuf,
    /// Where archived files go.
    pub store: Box<dyn ObjectStore>,
    /// zstd (default) or gzip.
    pub compression: Compression,
}

/// Resolves a report's `file_path` (relative paths against `root`) and
/// refuses anything that is not a regular file under `root` once every
/// symlink is followed. The error is the reason, for the ledger.
pub fn resolve_under(root: &Path, file_path: &str) -> std::result::Result<PathBuf, String> {
    let canon_root = root
        .canonicalize()
        .map_err(|e| format!("REPORTS_ROOT {}: {e}", root.display()))?;
    let path = canon_root.join(file_path);
    let canon = path
        .canonicalize()
        .map_err(|e| format!("{file_path}: {e}"))?;
    if !canon.starts_with(&canon_root) {
        return Err(format!(
            "{file_path} resolves to {} outside REPORTS_ROOT {}: refused",
            canon.display(),
            canon_root.display()
        ));
    }
    if !canon.is_file() {
        return Err(format!("{file_path}: not a regular file"));
    }
    Ok(canon)
}

#[derive(Debug)]
struct Report {
    id: Uuid,
    scenario_id: Uuid,
    format: String,
    file_path: String,
    generated_by: Option<String>,
    extra_data: Option<serde_json::Value>,
    created_at: DateTime<Utc>,
}

/// Archives the reports of `batch`, as loaded (unlocked) by the caller.
pub(super) async fn execute(
    exec: &Executor,
    ctx: &ReportsContext,
    batch: Batch,
) -> Result<Outcome> {
    let id = batch.id;
    if batch.status == "done" {
        delete_local(exec, ctx, id).await?;
        return Ok(Outcome::AlreadyDone);
    }
    let reports = load(exec, &batch).await?;
    let (stored, failed) = upload(ctx, &reports).await?;
    if stored.is_empty() && !failed.is_empty() {
        record_failures(exec, id, &failed).await?;
        return Err(Error::Refused(format!(
            "no report of the batch could be archived; first: {}",
            failed[0].1
        )));
    }
    let mut tx = exec.pool.begin().await?;
    let batch = ledger::lock_batch(&mut tx, id).await?;
    if batch.status == "done" {
        tx.rollback().await?;
        delete_local(exec, ctx, id).await?;
        return Ok(Outcome::AlreadyDone);
    }
    for (r, s) in &stored {
        insert_archive_row(&mut tx, r, s, id).await?;
    }
    let ids: Vec<Uuid> = stored.iter().map(|(r, _)| r.id).collect();
    sqlx::query("DELETE FROM reports WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    for (item, reason) in &failed {
        insert_failure(&mut tx, id, *item, reason).await?;
    }
    if !failed.is_empty() {
        sqlx::query(
            "UPDATE archive_jobs SET error_message = COALESCE(error_message,
                 'some reports were not archived; see archive_item_failures') WHERE id = $1",
        )
        .bind(batch.job_id)
        .execute(&mut *tx)
        .await?;
    }
    let n = stored.len() as i64;
    let bytes = stored
        .iter()
        .map(|(_, s)| s.meta.original_size as i64)
        .sum();
    let counts = Counts {
        processed: reports.len() as i64,
        archived: n,
        deleted: n,
        bytes,
    };
    let job_completed = ledger::complete_batch(&mut tx, &batch, counts).await?;
    tx.commit().await?;
    delete_local(exec, ctx, id).await?;
    Ok(Outcome::Done {
        counts,
        job_completed,
    })
}

async fn load(exec: &Executor, batch: &Batch) -> Result<Vec<Report>> {
    let rows = sqlx::query(
        "SELECT id, scenario_id, format, file_path, generated_by, extra_data, created_at FROM reports
         WHERE (created_at, id) > (COALESCE($1, '-infinity'::timestamptz),
                                   COALESCE($2, '00000000-0000-0000-0000-000000000000'::uuid))
           AND (created_at, id) <= ($3, $4) AND created_at < $5
         ORDER BY created_at, id",
    )
    .bind(batch.lo.map(|k| k.ts))
    .bind(batch.lo.map(|k| k.id))
    .bind(batch.hi.ts)
    .bind(batch.hi.id)
    .bind(batch.cutoff)
    .fetch_all(&exec.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Report {
            id: r.get("id"),
            scenario_id: r.get("scenario_id"),
            format: r.get("format"),
            file_path: r.get("file_path"),
            generated_by: r.get("generated_by"),
            extra_data: r.get("extra_data"),
            created_at: r.get("created_at"),
        })
        .collect())
}

type Uploaded<'a> = (Vec<(&'a Report, Stored)>, Vec<(Uuid, String)>);

/// Uploads every report it can. A refused or missing file fails that report
/// only; a transient store error fails the batch (it will be retried, and
/// uploads already done are simply overwritten).
async fn upload<'a>(ctx: &ReportsContext, reports: &'a [Report]) -> Result<Uploaded<'a>> {
    let (mut stored, mut failed) = (Vec::new(), Vec::new());
    for r in reports {
        let path = match resolve_under(&ctx.root, &r.file_path) {
            Ok(p) => p,
            Err(reason) => {
                tracing::warn!(report = %r.id, "not archived: {reason}");
                failed.push((r.id, reason));
                continue;
            }
        };
        let key = objects::report_key_base(r.created_at, r.id, &r.format);
        match ctx.store.put_file(&path, &key, ctx.compression).await {
            Ok(s) => stored.push((r, s)),
            Err(e) if e.class() == Class::Permanent => failed.push((r.id, e.to_string())),
            Err(e) => return Err(e),
        }
    }
    Ok((stored, failed))
}

async fn insert_archive_row(
    tx: &mut sqlx::PgConnection,
    r: &Report,
    s: &Stored,
    batch: Uuid,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO reports_archive (id, scenario_id, format, file_path, file_size_bytes, generated_by,
             extra_data, created_at, archived_at, s3_location, deleted_locally, archive_batch_id,
             object_key, stored_size_bytes, sha256, encoding)
         VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, '{}'::jsonb), $8, now(), $9, false, $10, $11, $12, $13, $14)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(r.id)
    .bind(r.scenario_id)
    .bind(&r.format)
    .bind(&r.file_path)
    .bind(s.meta.original_size as i64)
    .bind(&r.generated_by)
    .bind(&r.extra_data)
    .bind(r.created_at)
    .bind(&s.location)
    .bind(batch)
    .bind(&s.key)
    .bind(s.stored_size as i64)
    .bind(&s.meta.original_sha256)
    .bind(s.meta.encoding.as_str())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn insert_failure(
    tx: &mut sqlx::PgConnection,
    batch: Uuid,
    item: Uuid,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO archive_item_failures (batch_id, item_id, reason) VALUES ($1, $2, $3)
         ON CONFLICT (batch_id, item_id) DO UPDATE SET reason = EXCLUDED.reason, failed_at = now()",
    )
    .bind(batch)
    .bind(item)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn record_failures(exec: &Executor, batch: Uuid, failed: &[(Uuid, String)]) -> Result<()> {
    let mut tx = exec.pool.begin().await?;
    for (item, reason) in failed {
        insert_failure(&mut tx, batch, *item, reason).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Step 3: deletes the local files of the batch's committed reports, each
/// only once its object is confirmed present, and records it.
async fn delete_local(exec: &Executor, ctx: &ReportsContext, batch: Uuid) -> Result<()> {
    let rows = sqlx::query(
        "SELECT id, file_path, object_key FROM reports_archive
         WHERE archive_batch_id = $1 AND NOT deleted_locally",
    )
    .bind(batch)
    .fetch_all(&exec.pool)
    .await?;
    for row in rows {
        let (id, file_path, key): (Uuid, String, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        let key = key.ok_or_else(|| Error::BadBatch {
            id: batch,
            reason: format!("report {id} has no object key"),
        })?;
        if ctx.store.head(&key).await?.is_none() {
            return Err(Error::Storage(format!(
                "object {key} of report {id} is missing: not deleting its file"
            )));
        }
        match resolve_under(&ctx.root, &file_path) {
            Ok(path) => match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::Storage(format!("deleting {}: {e}", path.display()))),
            },
            // Already gone: nothing to delete.
            Err(_) if !ctx.root.join(&file_path).exists() => {}
            Err(reason) => {
                tracing::warn!(report = %id, "archived, but its file is left in place: {reason}");
                continue;
            }
        }
        sqlx::query("UPDATE reports_archive SET deleted_locally = true WHERE id = $1")
            .bind(id)
            .execute(&exec.pool)
            .await?;
    }
    Ok(())
}
