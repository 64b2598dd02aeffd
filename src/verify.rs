//! `planner verify` (R16): proof, after the fact, that the archive holds
//! what each done batch recorded having moved into it.
//!
//! - Logs: one grouped scan of `scenario_logs_archive` (row count and the
//!   sum of [`schema::LOGS_ROW_DIGEST`] per `archive_batch_id`) against each
//!   batch's `rows_archived` and `content_digest`, less what a restore took
//!   back out of it (`restored_rows`, `restored_digest`).
//! - Metrics: one grouped scan of `scenario_metrics_archive` (sample count,
//!   value sum and [`schema::METRICS_AGG_DIGEST`] sum per batch) against the
//!   batch's `samples_count`, `samples_value_sum` and `content_digest`.
//! - Reports: each archived file's object is HEAD-ed (at most
//!   [`IN_FLIGHT`] at once) and its stored size and metadata compared with
//!   `reports_archive`; with `--deep` it is downloaded, decoded and its
//!   SHA-256 checked (`ObjectStore::verify_content`, the restore's check).
//!
//! What the ledger recorded and what the archive holds are read in one
//! REPEATABLE READ, READ ONLY transaction, so a batch or a restore
//! committing meanwhile cannot show as a mismatch. Batches recorded before
//! digests were (`content_digest` NULL) are "not verifiable", counted
//! apart (a logs batch's row count is still checked). A batch whose key
//! range touches a month retention dropped (`archive_dropped_partitions`)
//! is "dropped by retention", not compared.

use crate::app::App;
use crate::error::{Error, Result};
use crate::human;
use crate::ledger::{self, Recorded, Selection};
use crate::objects::{self, ObjectStore, Original};
use crate::partitions::{month_start, next_month, partition_name};
use crate::schema::{
    LOGS_ARCHIVE, LOGS_ROW_DIGEST, METRICS_AGG_DIGEST, METRICS_ARCHIVE, REPORTS_ARCHIVE,
};
use crate::vocabulary::Kind;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use futures::StreamExt;
use serde::Serialize;
use sqlx::types::BigDecimal;
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use std::str::FromStr;
use uuid::Uuid;

/// Objects checked at once.
pub const IN_FLIGHT: usize = 8;

/// What `planner verify` checks, from its flags.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Batches completed on or after this UTC day.
    pub since: Option<NaiveDate>,
    /// One job's batches.
    pub job: Option<Uuid>,
    /// These kinds; empty: every kind (or the job's).
    pub kinds: Vec<Kind>,
    /// A share of the batches.
    pub sample: Option<Percent>,
    /// Download report objects and check their SHA-256.
    pub deep: bool,
    /// One JSON object instead of lines.
    pub json: bool,
}

/// A share of batches, `0 < N <= 100` percent (`10%`, `10`, `0.5%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(f64);

impl Percent {
    /// Batches in 10,000 (at least 1).
    fn per_10k(self) -> i64 {
        ((self.0 * 100.0).round() as i64).clamp(1, 10_000)
    }
}

impl FromStr for Percent {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let n = s.trim().strip_suffix('%').unwrap_or(s.trim());
        match n.parse::<f64>() {
            Ok(p) if p > 0.0 && p <= 100.0 => Ok(Percent(p)),
            _ => Err(format!(
                "{s:?} is not a share of batches: give a percentage above 0 and at most 100 (10%, 0.5%)"
            )),
        }
    }
}

impl std::fmt::Display for Percent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// One difference between what a batch recorded and what the archive holds.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// The batch.
    pub batch: Uuid,
    /// Its job.
    pub job: Uuid,
    /// Its kind.
    pub kind: Kind,
    /// What differs: `rows`, `digest`, `samples`, `value_sum`, `object`.
    pub what: &'static str,
    /// What the ledger recorded (for an object: its key).
    pub expected: String,
    /// What was found.
    pub found: String,
    /// The line printed for it.
    pub message: String,
}

/// Batches whose rows were in a month retention dropped.
#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    /// The archive table.
    pub table: String,
    /// The month, `YYYY-MM`.
    pub month: String,
    /// Batches reported dropped for it.
    pub batches: i64,
}

/// What a verify run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Done batches selected.
    pub batches: i64,
    /// Of them, per kind.
    pub by_kind: HashMap<Kind, i64>,
    /// Log rows and aggregate rows found for the batches compared.
    pub rows: i64,
    /// Metric samples the aggregates found hold.
    pub samples: i64,
    /// Report objects checked.
    pub objects: i64,
    /// Their stored bytes (as found).
    pub bytes: i64,
    /// Differences found (one per line below).
    pub mismatches: i64,
    /// Batches with at least one difference.
    pub batches_mismatched: i64,
    /// Batches recorded before digests were: nothing to compare but a
    /// logs batch's row count (which matched).
    pub not_verifiable: i64,
    /// Batches whose range touches a month retention dropped.
    pub dropped: i64,
    /// Objects `--deep` could not read: in an archive storage class
    /// (HEAD's checks passed; their content waits for a restore).
    pub in_archive_tier: i64,
    /// Objects gone, archived longer ago than the bucket's lifecycle rule
    /// keeps them: expired by it, not missing.
    pub expired: i64,
    /// Whether everything compared matched.
    pub ok: bool,
}

/// A run's whole result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The figures.
    pub summary: Summary,
    /// Each difference.
    pub mismatches: Vec<Mismatch>,
    /// Batches dropped by retention, per month.
    pub dropped: Vec<Dropped>,
}

/// `planner verify`: checks, prints, and says whether all matched
/// (`Ok(false)`: exit status 1). Bad flags are `Error::Config` (exit 2).
pub async fn run(app: &App, opts: &Options) -> Result<bool> {
    let pool = app.migrated_pool(2).await?;
    let mut kinds = opts.kinds.clone();
    check_flags(opts, &kinds)?;
    if let Some(job) = opts.job {
        let kind = job_kind(&pool, job, &kinds).await?;
        kinds = vec![kind];
        check_flags(opts, &kinds)?;
    }
    if kinds.is_empty() {
        kinds = Kind::ALL.to_vec();
    }
    let since = opts
        .since
        .map(|d| Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN)));
    let sel = Selection {
        kinds,
        job: opts.job,
        since,
        sample: opts
            .sample
            .map(|p| (p.per_10k(), i64::from(Utc::now().num_days_from_ce()))),
    };
    // The store only when reports are checked (a local one is a directory
    // made on opening).
    let store = match sel.kinds.contains(&Kind::Reports) {
        true => Some(app.object_store().await?),
        false => None,
    };
    let report = verify(&pool, &sel, opts.deep, store.as_deref()).await?;
    if opts.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report serializes")
        );
    } else {
        print!("{}", text(&report, opts));
    }
    Ok(report.summary.ok)
}

/// Refuses flags that cannot go together.
fn check_flags(opts: &Options, kinds: &[Kind]) -> Result<()> {
    if let Some(k) = kinds.iter().find(|k| !Kind::ALL.contains(k)) {
        return Err(Error::config(
            "--kind",
            format!("{k} batches put nothing in the archive; verify checks logs, metrics, reports"),
        ));
    }
    if opts.deep && !kinds.is_empty() && !kinds.contains(&Kind::Reports) {
        return Err(Error::config(
            "--deep",
            "downloads report objects to check their SHA-256; it needs --kind reports (or no --kind)",
        ));
    }
    if let Some(since) = opts.since
        && since > Utc::now().date_naive()
    {
        return Err(Error::config(
            "--since",
            format!("{since} is in the future: no batch has completed since then"),
        ));
    }
    Ok(())
}

/// The kind of archive job `job`, refused when there is no such job, it is
/// not an archive job, or `--kind` names another kind.
async fn job_kind(pool: &sqlx::PgPool, job: Uuid, kinds: &[Kind]) -> Result<Kind> {
    let Some(job_type) = ledger::job_type(pool, job).await? else {
        return Err(Error::config(
            "--job",
            format!("no job {job} in the ledger (archive_jobs)"),
        ));
    };
    // Archive jobs only (a restore's batches are keyset ranges of the
    // archive, with nothing of their own in it).
    let Some(kind) = job_type
        .parse::<Kind>()
        .ok()
        .filter(|k| Kind::ALL.contains(k))
    else {
        return Err(Error::config(
            "--job",
            format!(
                "job {job} is a {job_type} job; verify checks archive jobs (logs, metrics, reports)"
            ),
        ));
    };
    if !kinds.is_empty() && !kinds.contains(&kind) {
        let asked: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        return Err(Error::config(
            "--job",
            format!(
                "job {job} archives {kind}, not {} (--kind)",
                asked.join(",")
            ),
        ));
    }
    Ok(kind)
}

/// Checks the batches `sel` picks: reads them and what the archive holds
/// for them in one snapshot, then checks report objects in `store` (with
/// `deep`, their contents too). What `planner verify` prints, and what the
/// benchmark times.
pub async fn verify(
    pool: &sqlx::PgPool,
    sel: &Selection,
    deep: bool,
    store: Option<&dyn ObjectStore>,
) -> Result<Report> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // The scans are long; this session is not a batch's.
    sqlx::query("SET LOCAL statement_timeout = 0")
        .execute(&mut *tx)
        .await?;
    let batches = ledger::done_batches(&mut tx, sel).await?;
    let dropped_months = dropped_months(&mut tx, &batches).await?;
    let filtered = sel.job.is_some() || sel.since.is_some() || sel.sample.is_some();
    let mut check = Check::default();
    check.summary.batches = batches.len() as i64;
    let mut compare: HashMap<Kind, Vec<&Recorded>> = HashMap::new();
    for b in &batches {
        *check.summary.by_kind.entry(b.kind).or_default() += 1;
        match dropped_month(b, &dropped_months) {
            Some((table, month)) => check.dropped(table, month),
            None => compare.entry(b.kind).or_default().push(b),
        }
    }
    if let Some(logs) = compare.get(&Kind::Logs) {
        let found = scan_logs(&mut tx, logs, filtered).await?;
        for b in logs {
            check.logs(b, found.get(&b.id));
        }
    }
    if let Some(metrics) = compare.get(&Kind::Metrics) {
        let found = scan_metrics(&mut tx, metrics, filtered).await?;
        for b in metrics {
            check.metrics(b, found.get(&b.id));
        }
    }
    let files = match compare.get(&Kind::Reports) {
        Some(reports) => report_files(&mut tx, reports).await?,
        None => Vec::new(),
    };
    tx.commit().await?;
    if !files.is_empty() {
        let store = store.ok_or_else(|| {
            Error::config(
                "REPORTS_ARCHIVE_BUCKET",
                "report objects to check, and no object store to check them in",
            )
        })?;
        check_store_is_theirs(store, &files)?;
        // Objects the bucket's lifecycle rule deleted are expired, not
        // missing: those archived longer ago than its expiry (less an hour:
        // an object is written just before its row is stamped).
        let expired_before = store.expiry_days(objects::REPORTS_PREFIX).await?.map(|d| {
            Utc::now() - chrono::Duration::days(i64::from(d)) + chrono::Duration::hours(1)
        });
        let jobs: HashMap<Uuid, Uuid> = batches.iter().map(|b| (b.id, b.job_id)).collect();
        let results: Vec<_> = futures::stream::iter(&files)
            .map(|f| check_object(store, f, deep, expired_before))
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for r in results {
            let (file, found) = r?;
            check.object(file, jobs[&file.batch], found);
        }
    }
    Ok(check.finish())
}

/// A month of an archive table that retention dropped.
#[derive(Debug, Clone)]
struct Gone {
    table: String,
    month: DateTime<Utc>,
    /// When, as `archive_dropped_partitions` recorded it; `None`: before
    /// drops were recorded (its partition is simply no longer there).
    at: Option<DateTime<Utc>>,
}

/// The months retention dropped, per archive table: those it recorded, and
/// those a batch of `batches` touches whose partition no longer exists
/// (dropped by a retention run from before drops were recorded: without
/// them, every batch of such a month would read as missing its rows).
async fn dropped_months(conn: &mut PgConnection, batches: &[Recorded]) -> Result<Vec<Gone>> {
    let rows = sqlx::query(
        "SELECT table_name::text AS t, (month::timestamp AT TIME ZONE 'UTC') AS m, dropped_at
         FROM archive_dropped_partitions ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut gone: Vec<Gone> = rows
        .iter()
        .map(|r| Gone {
            table: r.get("t"),
            month: r.get("m"),
            at: Some(r.get("dropped_at")),
        })
        .collect();
    let present: std::collections::HashSet<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent IN ($1::regclass, $2::regclass)",
    )
    .bind(LOGS_ARCHIVE)
    .bind(METRICS_ARCHIVE)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    for b in batches {
        let Some(table) = archive_table(b.kind) else {
            continue;
        };
        let mut m = month_start(b.lo_ts.unwrap_or(b.hi_ts));
        while m <= b.hi_ts {
            if !present.contains(&partition_name(table, m))
                && !gone.iter().any(|g| g.table == table && g.month == m)
            {
                gone.push(Gone {
                    table: table.to_owned(),
                    month: m,
                    at: None,
                });
            }
            m = next_month(m);
        }
    }
    Ok(gone)
}

/// The archive table a batch of `kind` writes rows to (none for reports).
fn archive_table(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Logs => Some(LOGS_ARCHIVE),
        Kind::Metrics => Some(METRICS_ARCHIVE),
        _ => None,
    }
}

/// The first dropped month of `b`'s archive table that its key range
/// `(lo, hi]` touches, dropped after `b` was done (a batch done after a
/// drop wrote to a partition made again for it, and is compared).
fn dropped_month<'a>(b: &Recorded, dropped: &'a [Gone]) -> Option<(&'a str, DateTime<Utc>)> {
    let table = archive_table(b.kind)?;
    dropped
        .iter()
        .find(|g| {
            g.table == table
                && b.lo_ts.is_none_or(|lo| lo < next_month(g.month))
                && b.hi_ts >= g.month
                && match (g.at, b.completed_at) {
                    (Some(at), Some(done)) => done <= at,
                    _ => true,
                }
        })
        .map(|g| (g.table.as_str(), g.month))
}

/// What the archive holds for one batch.
#[derive(Debug, Default)]
struct Found {
    rows: i64,
    samples: i64,
    value_sum: BigDecimal,
    digest: BigDecimal,
}

/// The time bounds of `batches`' ranges, for partition pruning: `ts >= $1`
/// (when every batch has a lower bound) and `ts <= $2`.
fn bounds(batches: &[&Recorded]) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let lo = batches
        .iter()
        .map(|b| b.lo_ts)
        .try_fold(DateTime::<Utc>::MAX_UTC, |acc, lo| lo.map(|lo| acc.min(lo)));
    let hi = batches.iter().map(|b| b.hi_ts).max();
    (lo, hi)
}

/// The scan's filter: the batches' time bounds on `time`, and, when only
/// some batches are checked, their ids (a hashed semi-join, not a list
/// compared row by row).
fn scan_filter(time: &str, filtered: bool) -> String {
    let ids = if filtered {
        " AND archive_batch_id IN (SELECT unnest($3::uuid[]))"
    } else {
        ""
    };
    format!(
        "WHERE ($1::timestamptz IS NULL OR {time} >= $1) AND {time} <= $2 \
         AND archive_batch_id IS NOT NULL{ids}"
    )
}

/// One grouped scan of the logs archive over `batches`' range.
async fn scan_logs(
    conn: &mut PgConnection,
    batches: &[&Recorded],
    filtered: bool,
) -> Result<HashMap<Uuid, Found>> {
    let (lo, hi) = bounds(batches);
    let ids: Vec<Uuid> = batches.iter().map(|b| b.id).collect();
    let sql = format!(
        "SELECT archive_batch_id AS id, count(*) AS n, COALESCE(sum({LOGS_ROW_DIGEST}), 0) AS d
         FROM {LOGS_ARCHIVE} {filter} GROUP BY archive_batch_id",
        filter = scan_filter("received_at", filtered)
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(lo)
        .bind(hi)
        .bind(&ids)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let found = Found {
                rows: r.get("n"),
                digest: r.get("d"),
                ..Found::default()
            };
            (r.get("id"), found)
        })
        .collect())
}

/// One grouped scan of the metrics archive over `batches`' range.
async fn scan_metrics(
    conn: &mut PgConnection,
    batches: &[&Recorded],
    filtered: bool,
) -> Result<HashMap<Uuid, Found>> {
    let (lo, hi) = bounds(batches);
    let ids: Vec<Uuid> = batches.iter().map(|b| b.id).collect();
    // A day's key is its start: the batch's bounds are days, the rows'
    // "timestamp" their day's start.
    let sql = format!(
        "SELECT archive_batch_id AS id, count(*) AS n,
                COALESCE(sum(sample_count), 0)::bigint AS samples,
                COALESCE(sum(value_sum), 0) AS s, COALESCE(sum({METRICS_AGG_DIGEST}), 0) AS d
         FROM {METRICS_ARCHIVE} {filter} GROUP BY archive_batch_id",
        filter = scan_filter("\"timestamp\"", filtered)
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(lo)
        .bind(hi)
        .bind(&ids)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let found = Found {
                rows: r.get("n"),
                samples: r.get("samples"),
                value_sum: r.get("s"),
                digest: r.get("d"),
            };
            (r.get("id"), found)
        })
        .collect())
}

/// An archived report file as `reports_archive` recorded it.
#[derive(Debug, Clone)]
struct File {
    batch: Uuid,
    key: Option<String>,
    location: Option<String>,
    stored_size: Option<i64>,
    original: Option<Original>,
    /// When it was archived (a column with a default, not NOT NULL).
    archived_at: Option<DateTime<Utc>>,
}

/// The archived files of `batches`.
async fn report_files(conn: &mut PgConnection, batches: &[&Recorded]) -> Result<Vec<File>> {
    let ids: Vec<Uuid> = batches.iter().map(|b| b.id).collect();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT archive_batch_id, object_key, s3_location, stored_size_bytes, file_size_bytes, sha256,
                archived_at
         FROM {REPORTS_ARCHIVE} WHERE archive_batch_id = ANY($1) ORDER BY archived_at, id"
    )))
    .bind(&ids)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let size: Option<i64> = r.get("file_size_bytes");
            let sha256: Option<String> = r.get("sha256");
            File {
                batch: r.get("archive_batch_id"),
                key: r.get("object_key"),
                location: r.get("s3_location"),
                stored_size: r.get("stored_size_bytes"),
                archived_at: r.get("archived_at"),
                original: size.zip(sha256).map(|(size, sha256)| Original {
                    size: size.max(0) as u64,
                    sha256,
                }),
            }
        })
        .collect())
}

/// Refuses to call every object missing when the store these settings
/// open is not the one the files were archived to (no file's recorded
/// location is where this store would put it).
fn check_store_is_theirs(store: &dyn ObjectStore, files: &[File]) -> Result<()> {
    let mut recorded = files
        .iter()
        .filter_map(|f| Some((f.key.as_deref()?, f.location.as_deref()?)));
    let Some((key, location)) = recorded.next() else {
        return Ok(());
    };
    let ours = |key: &str, location: &str| store.location(key) == location;
    if ours(key, location) || recorded.any(|(k, l)| ours(k, l)) {
        return Ok(());
    }
    Err(Error::config(
        "REPORTS_ARCHIVE_BUCKET",
        format!(
            "the reports were archived to {location}, but these settings read {}: \
             set REPORTS_ARCHIVE_BUCKET (or REPORTS_ARCHIVE_DIR) as the archiver had them",
            store.location(key)
        ),
    ))
}

/// What checking one object found.
#[derive(Debug)]
enum ObjectFound {
    /// Recorded before object keys were: nothing to look up.
    NoKey,
    /// Present: its stored size; and a difference, if any.
    Checked(u64, Option<(&'static str, String, String)>),
    /// Not there (or without the archiver's metadata).
    Missing,
    /// Not there, and archived longer ago than the bucket's lifecycle rule
    /// keeps objects: deleted by it.
    Expired,
    /// Present (its stored size) and matching what HEAD tells, but in an
    /// archive storage class: its content cannot be read (`--deep`) until
    /// it is restored from there.
    InArchiveTier(u64),
}

/// HEADs `file`'s object (and with `deep` downloads and checks it).
async fn check_object<'f>(
    store: &dyn ObjectStore,
    file: &'f File,
    deep: bool,
    expired_before: Option<DateTime<Utc>>,
) -> Result<(&'f File, ObjectFound)> {
    let Some(key) = &file.key else {
        return Ok((file, ObjectFound::NoKey));
    };
    let Some((size, meta)) = store.head(key).await? else {
        if file
            .archived_at
            .zip(expired_before)
            .is_some_and(|(a, t)| a < t)
        {
            return Ok((file, ObjectFound::Expired));
        }
        return Ok((file, ObjectFound::Missing));
    };
    let recorded = file.stored_size.map(|s| s.max(0) as u64);
    if recorded.is_some_and(|r| r != size) {
        let diff = (
            "size",
            recorded.unwrap_or_default().to_string(),
            size.to_string(),
        );
        return Ok((file, ObjectFound::Checked(size, Some(diff))));
    }
    if let Some(want) = &file.original
        && (want.size != meta.original_size || want.sha256 != meta.original_sha256)
    {
        let diff = (
            "metadata",
            format!("{} bytes, SHA-256 {}", want.size, want.sha256),
            format!(
                "{} bytes, SHA-256 {}",
                meta.original_size, meta.original_sha256
            ),
        );
        return Ok((file, ObjectFound::Checked(size, Some(diff))));
    }
    if deep {
        match store.verify_content(key, file.original.as_ref()).await {
            Ok(_) => {}
            Err(Error::InArchiveTier(_)) => return Ok((file, ObjectFound::InArchiveTier(size))),
            Err(Error::Refused(why)) => {
                let diff = ("content", "the archived file".to_owned(), why);
                return Ok((file, ObjectFound::Checked(size, Some(diff))));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((file, ObjectFound::Checked(size, None)))
}

/// The comparisons' tally.
#[derive(Debug, Default)]
struct Check {
    summary: Summary,
    mismatches: Vec<Mismatch>,
    dropped: Vec<Dropped>,
    not_verifiable: std::collections::HashSet<Uuid>,
}

impl Check {
    fn dropped(&mut self, table: &str, month: DateTime<Utc>) {
        self.summary.dropped += 1;
        let month = month.format("%Y-%m").to_string();
        match self
            .dropped
            .iter_mut()
            .find(|d| d.table == table && d.month == month)
        {
            Some(d) => d.batches += 1,
            None => self.dropped.push(Dropped {
                table: table.to_owned(),
                month,
                batches: 1,
            }),
        }
    }

    fn differs(&mut self, b: &Recorded, what: &'static str, expected: String, found: String) {
        let message = match what {
            "digest" => "digest differs".to_owned(),
            "value_sum" => format!("value sum {expected} vs {found}"),
            _ => format!("{what} {expected} vs {found}"),
        };
        self.push(b.id, b.job_id, b.kind, what, expected, found, message);
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        batch: Uuid,
        job: Uuid,
        kind: Kind,
        what: &'static str,
        expected: String,
        found: String,
        message: String,
    ) {
        self.mismatches.push(Mismatch {
            batch,
            job,
            kind,
            what,
            expected,
            found,
            message,
        });
    }

    fn logs(&mut self, b: &Recorded, found: Option<&Found>) {
        let empty = Found::default();
        let found = found.unwrap_or(&empty);
        self.summary.rows += found.rows;
        let rows = b.rows_archived - b.restored_rows;
        if rows != found.rows {
            self.differs(b, "rows", rows.to_string(), found.rows.to_string());
        }
        match &b.content_digest {
            None => {
                self.not_verifiable.insert(b.id);
            }
            Some(d) if (d - &b.restored_digest) != found.digest => {
                self.differs(
                    b,
                    "digest",
                    (d - &b.restored_digest).to_string(),
                    found.digest.to_string(),
                );
            }
            Some(_) => {}
        }
    }

    fn metrics(&mut self, b: &Recorded, found: Option<&Found>) {
        let empty = Found::default();
        let found = found.unwrap_or(&empty);
        self.summary.rows += found.rows;
        self.summary.samples += found.samples;
        let (Some(samples), Some(sum), Some(digest)) =
            (b.samples_count, &b.samples_value_sum, &b.content_digest)
        else {
            self.not_verifiable.insert(b.id);
            return;
        };
        if samples != found.samples {
            self.differs(b, "samples", samples.to_string(), found.samples.to_string());
        }
        if sum != &found.value_sum {
            self.differs(
                b,
                "value_sum",
                sum.normalized().to_string(),
                found.value_sum.normalized().to_string(),
            );
        }
        if digest != &found.digest {
            self.differs(b, "digest", digest.to_string(), found.digest.to_string());
        }
    }

    fn object(&mut self, file: &File, job: Uuid, found: ObjectFound) {
        let key = file.key.clone().unwrap_or_default();
        let (what, expected, found, message) = match found {
            ObjectFound::NoKey => {
                self.not_verifiable.insert(file.batch);
                return;
            }
            ObjectFound::Checked(size, diff) => {
                self.summary.objects += 1;
                self.summary.bytes += size as i64;
                let Some((what, expected, found)) = diff else {
                    return;
                };
                let message = match what {
                    "size" => format!("object {key}: size {expected} vs {found}"),
                    "metadata" => format!(
                        "object {key}: its metadata says {found}, reports_archive recorded {expected}"
                    ),
                    _ => format!(
                        "object {key}: {}",
                        found.strip_prefix(&format!("{key} ")).unwrap_or(&found)
                    ),
                };
                (what, expected, found, message)
            }
            ObjectFound::InArchiveTier(size) => {
                self.summary.objects += 1;
                self.summary.bytes += size as i64;
                self.summary.in_archive_tier += 1;
                return;
            }
            ObjectFound::Expired => {
                self.summary.expired += 1;
                return;
            }
            ObjectFound::Missing => (
                "object",
                key.clone(),
                "missing".to_owned(),
                format!("object {key} missing"),
            ),
        };
        self.push(
            file.batch,
            job,
            Kind::Reports,
            what,
            expected,
            found,
            message,
        );
    }

    fn finish(mut self) -> Report {
        let bad: std::collections::HashSet<Uuid> =
            self.mismatches.iter().map(|m| m.batch).collect();
        // A batch with a difference is a mismatch, whatever else it is.
        self.not_verifiable.retain(|b| !bad.contains(b));
        self.summary.mismatches = self.mismatches.len() as i64;
        self.summary.batches_mismatched = bad.len() as i64;
        self.summary.not_verifiable = self.not_verifiable.len() as i64;
        self.summary.ok = self.mismatches.is_empty();
        Report {
            summary: self.summary,
            mismatches: self.mismatches,
            dropped: self.dropped,
        }
    }
}

/// The report as lines: the summary, then one line per difference and per
/// dropped month.
fn text(r: &Report, opts: &Options) -> String {
    let s = &r.summary;
    let mut kinds: Vec<_> = s.by_kind.iter().collect();
    kinds.sort();
    let by_kind: Vec<String> = kinds
        .iter()
        .map(|(k, n)| format!("{k} {}", human::count(**n)))
        .collect();
    let mut out = format!(
        "verify: {} done batch(es) checked{}{}: {} row(s), {} sample(s), {} object(s) ({}){}\n",
        human::count(s.batches),
        if by_kind.is_empty() {
            String::new()
        } else {
            format!(" ({})", by_kind.join(", "))
        },
        opts.sample
            .map(|p| format!(", a {p} sample"))
            .unwrap_or_default(),
        human::count(s.rows),
        human::count(s.samples),
        human::count(s.objects),
        human::bytes(s.bytes),
        if opts.deep { ", contents checked" } else { "" },
    );
    out += &format!(
        "  {} mismatch(es) in {} batch(es); {} not verifiable (archived before digests were recorded); {} dropped by retention\n",
        human::count(s.mismatches),
        human::count(s.batches_mismatched),
        human::count(s.not_verifiable),
        human::count(s.dropped),
    );
    if s.expired > 0 {
        out += &format!(
            "  {} object(s) gone, archived longer ago than the bucket's lifecycle rule keeps them: \
             expired by it, not missing\n",
            human::count(s.expired)
        );
    }
    if s.in_archive_tier > 0 {
        out += &format!(
            "  {} object(s) in an archive storage class (Glacier): size and metadata checked, \
             content not read (restore them from the archive tier to check it)\n",
            human::count(s.in_archive_tier)
        );
    }
    // One line per batch, its differences in the order found.
    let mut seen = std::collections::HashSet::new();
    for m in &r.mismatches {
        if !seen.insert(m.batch) {
            continue;
        }
        let what: Vec<&str> = r
            .mismatches
            .iter()
            .filter(|o| o.batch == m.batch)
            .map(|o| o.message.as_str())
            .collect();
        out += &format!(
            "mismatch: {} batch {} (job {}): {}\n",
            m.kind,
            m.batch,
            m.job,
            what.join("; ")
        );
    }
    for d in &r.dropped {
        out += &format!(
            "dropped by retention {}: {} batch(es) of {} (not compared)\n",
            d.month,
            human::count(d.batches),
            d.table
        );
    }
    out += if s.ok {
        "all match\n"
    } else {
        "MISMATCH: the archive does not hold what the batches above recorded\n"
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_a_percentage_above_zero_and_at_most_a_hundred() {
        assert_eq!("10%".parse::<Percent>().unwrap().per_10k(), 1_000);
        assert_eq!("100".parse::<Percent>().unwrap().per_10k(), 10_000);
        assert_eq!("0.5%".parse::<Percent>().unwrap().per_10k(), 50);
        assert_eq!("0.001%".parse::<Percent>().unwrap().per_10k(), 1);
        for bad in ["0", "0%", "101", "-5", "abc", "", "%", "NaN", "inf"] {
            assert!(bad.parse::<Percent>().is_err(), "{bad}");
        }
    }

    fn batch(kind: Kind, lo: Option<&str>, hi: &str) -> Recorded {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        Recorded {
            id: Uuid::new_v4(),
            job_id: Uuid::new_v4(),
            kind,
            lo_ts: lo.map(t),
            hi_ts: t(hi),
            completed_at: None,
            rows_archived: 0,
            rows_deleted: 0,
            restored_rows: 0,
            content_digest: None,
            restored_digest: BigDecimal::from(0),
            samples_count: None,
            samples_value_sum: None,
        }
    }

    #[test]
    fn a_batch_touching_a_dropped_month_of_its_table_is_dropped() {
        let m = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let gone = |table: &str, month: &str| Gone {
            table: table.to_owned(),
            month: m(month),
            at: Some(m("2020-01-01T00:00:00Z")),
        };
        let dropped = vec![
            gone(LOGS_ARCHIVE, "2019-03-01T00:00:00Z"),
            gone(METRICS_ARCHIVE, "2019-05-01T00:00:00Z"),
        ];
        let inside = batch(
            Kind::Logs,
            Some("2019-03-02T00:00:00Z"),
            "2019-03-05T00:00:00Z",
        );
        let across = batch(
            Kind::Logs,
            Some("2019-02-20T00:00:00Z"),
            "2019-03-01T00:00:00Z",
        );
        let after = batch(
            Kind::Logs,
            Some("2019-04-01T00:00:00Z"),
            "2019-04-05T00:00:00Z",
        );
        let before = batch(
            Kind::Logs,
            Some("2019-02-01T00:00:00Z"),
            "2019-02-28T23:59:59Z",
        );
        let from_start = batch(Kind::Logs, None, "2019-04-05T00:00:00Z");
        let other_table = batch(
            Kind::Metrics,
            Some("2019-03-02T00:00:00Z"),
            "2019-03-05T00:00:00Z",
        );
        assert!(dropped_month(&inside, &dropped).is_some());
        assert!(dropped_month(&across, &dropped).is_some());
        assert!(dropped_month(&after, &dropped).is_none());
        assert!(dropped_month(&before, &dropped).is_none());
        assert!(dropped_month(&from_start, &dropped).is_some());
        assert!(dropped_month(&other_table, &dropped).is_none());
        // Done after the drop: it wrote to a partition made again, and is
        // compared.
        let mut later = batch(
            Kind::Logs,
            Some("2019-03-02T00:00:00Z"),
            "2019-03-05T00:00:00Z",
        );
        later.completed_at = Some(m("2021-01-01T00:00:00Z"));
        assert!(dropped_month(&later, &dropped).is_none());
        later.completed_at = Some(m("2019-12-01T00:00:00Z"));
        assert!(dropped_month(&later, &dropped).is_some());
    }
}
