//! Reports (R3): each report's file is compressed and uploaded, its metadata
//! row moves to `reports_archive`, and only then is the local file deleted.
//!
//! Order, each step repairable by redelivery:
//! 1. upload under a deterministic key (a retry overwrites the same object),
//!    verified by the store (size, metadata);
//! 2. one transaction: `reports_archive` rows in, `reports` rows out, failures
//!    recorded, the ledger row done, the job's counters;
//! 3. delete each local file that is still exactly what was archived (size
//!    and SHA-256) and whose object holds it, and set `deleted_locally`; a
//!    file that cannot or must not go stays, its reason on its row. This
//!    step never fails the batch (it is done): `planner status` lists what
//!    was left and the next `planner --reports` run retries it.
//!
//! Each file is opened once, safely ([`open_under`]), and every read of the
//! upload uses that descriptor. A crash before 2 re-uploads the same
//! objects; a crash between 2 and 3 finds the batch done and finishes step 3. No upload happens inside the
//! transaction, so no lock is held while bytes travel.

use super::{Executor, Outcome};
use crate::error::{Class, Error, Result};
use crate::ledger::{self, Batch, Counts};
use crate::objects::{self, Compression, ObjectStore, Source, Stored};
use crate::schema::{FROM_START, REPORTS, REPORTS_ARCHIVE, bind_batch, reports_root};
use crate::vocabulary::BatchStatus;
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

/// Why a report's file was not opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotOpened {
    /// There is no file at the path (nothing to archive, or nothing left to
    /// delete).
    Gone(String),
    /// There is something, but it must not be touched: outside the root, a
    /// symlink or directory swapped in, not a regular file, unreadable.
    Refused(String),
}

impl NotOpened {
    /// The reason, as recorded in the ledger.
    pub fn reason(&self) -> &str {
        match self {
            NotOpened::Gone(r) | NotOpened::Refused(r) => r,
        }
    }
}

/// A report's file, opened once and checked by its descriptor.
#[derive(Debug)]
pub struct Opened {
    /// The resolved path it was opened at (under the root).
    pub path: PathBuf,
    /// The open file.
    pub source: Source,
}

/// Opens a report's file safely: resolves `file_path` under `root`
/// (symlinks followed, as configured), then opens the resolved path without
/// following a symlink in its last component (`O_NOFOLLOW`) and without
/// blocking on a FIFO (`O_NONBLOCK`), and re-checks by the open descriptor
/// that the file it got is still that path under the root (a directory
/// swapped for a symlink after the check is caught here) and a regular file.
/// Every later read uses this descriptor, never the path.
pub fn open_under(root: &Path, file_path: &str) -> std::result::Result<Opened, NotOpened> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let refused = NotOpened::Refused;
    let canon_root = reports_root::check(root).map_err(|e| refused(format!("REPORTS_ROOT {e}")))?;
    let canon = match canon_root.join(file_path).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NotOpened::Gone(format!("{file_path}: {e}")));
        }
        Err(e) => return Err(refused(format!("{file_path}: {e}"))),
    };
    if !canon.starts_with(&canon_root) {
        return Err(refused(format!(
            "{file_path} resolves to {} outside REPORTS_ROOT {}: refused",
            canon.display(),
            canon_root.display()
        )));
    }
    let file = match Source::open_nofollow(&canon) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refused(format!(
                "{file_path}: {} became a symbolic link after it was checked: refused",
                canon.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NotOpened::Gone(format!("{file_path}: {e}")));
        }
        Err(e) => return Err(refused(format!("{file_path}: {e}"))),
    };
    // Which file the descriptor really is: /proc names it by its current
    // path; without /proc, compare device and inode with the path's.
    let by_fd = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let same = match by_fd {
        Ok(actual) => actual == canon,
        Err(_) => match (file.metadata(), std::fs::symlink_metadata(&canon)) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        },
    };
    if !same {
        return Err(refused(format!(
            "{file_path}: {} was replaced while it was opened (a directory swapped for a symlink?): refused",
            canon.display()
        )));
    }
    let source = Source::from_file(file, &canon).map_err(|e| match e {
        Error::Refused(m) => refused(m),
        other => refused(other.to_string()),
    })?;
    Ok(Opened {
        path: canon,
        source,
    })
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
    let started = std::time::Instant::now();
    if batch.status == BatchStatus::Done {
        delete_local(exec, ctx, id).await;
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
    if batch.status == BatchStatus::Done {
        tx.rollback().await?;
        delete_local(exec, ctx, id).await;
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
        ledger::note_job_error(
            &mut tx,
            batch.job_id,
            "some reports were not archived; see archive_item_failures",
        )
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
        ..Counts::default()
    };
    let job_completed = ledger::complete_batch(&mut tx, &batch, counts).await?;
    tx.commit().await?;
    delete_local(exec, ctx, id).await;
    Ok(Outcome::Done {
        counts,
        job_completed,
        busy: started.elapsed(),
    })
}

async fn load(exec: &Executor, batch: &Batch) -> Result<Vec<Report>> {
    let sql = format!(
        "SELECT id, scenario_id, format, file_path, generated_by, extra_data, created_at FROM {REPORTS}
         WHERE (created_at, id) > {FROM_START}
           AND (created_at, id) <= ($3, $4) AND created_at < $5
         ORDER BY created_at, id"
    );
    let rows = bind_batch(sqlx::query(sqlx::AssertSqlSafe(sql)), batch)
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
        let (root, file_path) = (ctx.root.clone(), r.file_path.clone());
        let opened = tokio::task::spawn_blocking(move || open_under(&root, &file_path))
            .await
            .map_err(|e| Error::Storage(format!("opening {}: {e}", r.file_path)))?;
        let opened = match opened {
            Ok(o) => o,
            Err(why) => {
                let reason = why.reason().to_owned();
                tracing::warn!(report = %r.id, "not archived: {reason}");
                failed.push((r.id, reason));
                continue;
            }
        };
        let key = objects::report_key_base(r.created_at, r.id, &r.format);
        match ctx
            .store
            .put_source(&opened.source, &key, ctx.compression)
            .await
        {
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

/// An archived report whose local file is still to be deleted.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Archived {
    id: Uuid,
    file_path: String,
    object_key: Option<String>,
    file_size_bytes: Option<i64>,
    sha256: Option<String>,
}

const ARCHIVED_SQL: &str =
    "SELECT id, file_path, object_key, file_size_bytes, sha256 FROM reports_archive";

impl Archived {
    /// Where its object is, and what the original file was (to check a
    /// download or a local file against); `None` when a column is missing.
    fn object(&self) -> Option<(&str, objects::Original)> {
        let (Some(key), Some(size), Some(sha256)) =
            (&self.object_key, self.file_size_bytes, &self.sha256)
        else {
            return None;
        };
        let original = objects::Original {
            size: size.max(0) as u64,
            sha256: sha256.clone(),
        };
        Some((key, original))
    }
}

/// Archived reports whose file was left in place: a cleanup tried and kept
/// it, or none has run an hour after the commit (a worker that died between
/// its commit and its cleanup). Files of batches being archived right now
/// are not counted.
const LEFT_WHERE: &str = "NOT deleted_locally
    AND (local_delete_tried_at IS NOT NULL OR archived_at < now() - interval '1 hour')";

/// What cleaning up one archived file came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cleaned {
    /// Deleted now.
    Deleted,
    /// Nothing was there to delete.
    Gone,
    /// Left in place, and why.
    Kept(String),
}

/// Step 3, a step of its own: deletes the local files of the batch's
/// committed reports, each only when its object holds the archived file and
/// the file on disk is still exactly what was archived (size and SHA-256
/// equal to `reports_archive`). A file that cannot or must not be deleted
/// stays, with the reason recorded on its row; the batch is done whatever
/// happens here (a later `planner --reports` retries). Returns how many
/// files were left.
async fn delete_local(exec: &Executor, ctx: &ReportsContext, batch: Uuid) {
    let rows = sqlx::query_as::<_, Archived>(sqlx::AssertSqlSafe(format!(
        "{ARCHIVED_SQL} WHERE archive_batch_id = $1 AND NOT deleted_locally"
    )))
    .bind(batch)
    .fetch_all(&exec.pool)
    .await;
    match rows {
        Ok(rows) => {
            clean_up(exec, ctx, rows).await;
        }
        Err(e) => tracing::warn!(
            archive_batch_id = %batch,
            "could not list the batch's files to delete ({e}); a later run retries"
        ),
    }
}

/// How a retry of left files went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retried {
    /// Files tried.
    pub tried: usize,
    /// Of those, deleted now (or found already gone).
    pub deleted: usize,
    /// Of those, still left in place.
    pub left: usize,
}

/// Retries deleting the local files that earlier cleanups left in place
/// (those with a recorded attempt, and any whose batch committed over an
/// hour ago without one: a worker that died between commit and cleanup).
pub async fn retry_left_files(exec: &Executor, ctx: &ReportsContext) -> Result<Retried> {
    let rows = sqlx::query_as::<_, Archived>(sqlx::AssertSqlSafe(format!(
        "{ARCHIVED_SQL} WHERE {LEFT_WHERE}
         ORDER BY local_delete_tried_at NULLS FIRST, archived_at, id LIMIT 10000"
    )))
    .fetch_all(&exec.pool)
    .await?;
    let tried = rows.len();
    let (deleted, left) = clean_up(exec, ctx, rows).await;
    Ok(Retried {
        tried,
        deleted,
        left,
    })
}

/// Cleans up each row; returns (deleted or gone, left). Never fails: a row
/// whose outcome cannot be recorded stays as it was, for a later retry.
async fn clean_up(exec: &Executor, ctx: &ReportsContext, rows: Vec<Archived>) -> (usize, usize) {
    let (mut deleted, mut left) = (0, 0);
    for row in rows {
        let outcome = clean_one(ctx, &row).await;
        let recorded = match &outcome {
            Cleaned::Deleted | Cleaned::Gone => {
                deleted += 1;
                sqlx::query(
                    "UPDATE reports_archive SET deleted_locally = true, local_delete_error = NULL,
                         local_delete_tried_at = now() WHERE id = $1",
                )
                .bind(row.id)
                .execute(&exec.pool)
                .await
            }
            Cleaned::Kept(reason) => {
                left += 1;
                tracing::warn!(report = %row.id, path = %row.file_path, "archived, but its file is left in place: {reason}");
                sqlx::query(
                    "UPDATE reports_archive SET local_delete_error = $2, local_delete_tried_at = now()
                     WHERE id = $1",
                )
                .bind(row.id)
                .bind(reason)
                .execute(&exec.pool)
                .await
            }
        };
        if let Err(e) = recorded {
            tracing::warn!(report = %row.id, "could not record the cleanup of its file ({e}); a later run retries");
        }
    }
    (deleted, left)
}

/// Decides, and if safe does, the delete of one archived file.
async fn clean_one(ctx: &ReportsContext, row: &Archived) -> Cleaned {
    let Some((key, want)) = row.object() else {
        return Cleaned::Kept("reports_archive has no object key, size or SHA-256 for it".into());
    };
    match ctx.store.head(key).await {
        Ok(Some((_, meta)))
            if meta.original_size == want.size && meta.original_sha256 == want.sha256 => {}
        Ok(Some((_, meta))) => {
            return Cleaned::Kept(format!(
                "object {} holds another file ({} bytes, SHA-256 {}), not the archived one",
                ctx.store.location(key),
                meta.original_size,
                meta.original_sha256
            ));
        }
        Ok(None) => {
            return Cleaned::Kept(format!(
                "object {} is missing (or lacks its metadata)",
                ctx.store.location(key)
            ));
        }
        Err(e) => return Cleaned::Kept(format!("checking its object: {e}")),
    }
    let (root, file_path) = (ctx.root.clone(), row.file_path.clone());
    tokio::task::spawn_blocking(move || delete_if_archived(&root, &file_path, &want))
        .await
        .unwrap_or_else(|e| Cleaned::Kept(format!("checking the file: {e}")))
}

/// Deletes the file at `file_path` only if it is, byte for byte, the file
/// that was archived, and is still the file at that path when it goes.
fn delete_if_archived(root: &Path, file_path: &str, want: &objects::Original) -> Cleaned {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let opened = match open_under(root, file_path) {
        Ok(o) => o,
        Err(NotOpened::Gone(_)) => return Cleaned::Gone,
        Err(NotOpened::Refused(reason)) => return Cleaned::Kept(reason),
    };
    let stamp = |m: &std::fs::Metadata| (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
    let before = match opened.source.file().metadata() {
        Ok(m) => stamp(&m),
        Err(e) => return Cleaned::Kept(format!("{file_path}: {e}")),
    };
    let mut reader = opened.source.reader();
    let (mut hasher, mut size, mut buf) = (Sha256::new(), 0u64, vec![0; 1 << 20]);
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Cleaned::Kept(format!("{file_path}: reading it: {e}")),
        }
    }
    let sha256 = hex::encode(hasher.finalize());
    if size != want.size || sha256 != want.sha256 {
        return Cleaned::Kept(format!(
            "{file_path} changed since it was archived (now {size} bytes, SHA-256 {sha256}; \
             archived {} bytes, SHA-256 {}): kept",
            want.size, want.sha256
        ));
    }
    // Still the same, unmodified file, and still the one at the path?
    let after = opened.source.file().metadata().map(|m| stamp(&m));
    let at_path = std::fs::symlink_metadata(&opened.path).map(|m| stamp(&m));
    match (after, at_path) {
        (Ok(a), Ok(p)) if a == before && p == before => {}
        (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Cleaned::Gone,
        _ => {
            return Cleaned::Kept(format!(
                "{file_path} was modified or replaced while it was checked: kept"
            ));
        }
    }
    match std::fs::remove_file(&opened.path) {
        Ok(()) => Cleaned::Deleted,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Cleaned::Gone,
        Err(e) => Cleaned::Kept(format!("deleting {}: {e}", opened.path.display())),
    }
}

/// An archived report whose local file is still on disk.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct LeftFile {
    /// The report.
    pub id: Uuid,
    /// Its `file_path`.
    pub file_path: String,
    /// Why it is still there (`None`: never tried: its worker died between
    /// commit and cleanup).
    pub reason: Option<String>,
    /// When it was archived.
    pub archived_at: Option<DateTime<Utc>>,
    /// When deleting it was last tried.
    pub tried_at: Option<DateTime<Utc>>,
}

/// How many archived reports were left with their local file in place (see
/// `LEFT_WHERE`), and the oldest `limit` of them.
pub async fn left_files(pool: &sqlx::PgPool, limit: i64) -> Result<(i64, Vec<LeftFile>)> {
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {REPORTS_ARCHIVE} WHERE {LEFT_WHERE}"
    )))
    .fetch_one(pool)
    .await?;
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, file_path, local_delete_error AS reason, archived_at, local_delete_tried_at AS tried_at
         FROM {REPORTS_ARCHIVE} WHERE {LEFT_WHERE} ORDER BY archived_at, id LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok((total, rows))
}

/// A scenario's archived reports: id and format, oldest first.
pub async fn archived_of_scenario(
    pool: &sqlx::PgPool,
    scenario: Uuid,
) -> Result<Vec<(Uuid, String)>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, format FROM {REPORTS_ARCHIVE} WHERE scenario_id = $1 ORDER BY created_at, id"
    )))
    .bind(scenario)
    .fetch_all(pool)
    .await?)
}

/// Where archived report `id` is, and what its original was (size and
/// SHA-256, to check a restore against); `None` when `reports_archive` does
/// not have it with all three.
pub async fn archived_object(
    pool: &sqlx::PgPool,
    id: Uuid,
) -> Result<Option<(String, objects::Original)>> {
    let row: Option<Archived> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{ARCHIVED_SQL} WHERE id = $1")))
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(row
        .as_ref()
        .and_then(Archived::object)
        .map(|(key, original)| (key.to_owned(), original)))
}
