//! The planner's core: find eligible rows, cut them into keyset batches,
//! record each batch in the ledger, create the partitions they need, and
//! publish one message per batch. Also the dry run, which only reads.
//! One submodule per kind does the cutting into a [`Sink`]; recording and
//! publishing run beside the cut (a bounded pipeline: cut → record in
//! order → publish a few chunks at once → mark published).

mod keyset;
mod metrics;
pub mod restore;

use crate::config::Policy;
use crate::error::{Error, Result};
use crate::ledger::{self, Key, NewBatch};
use crate::schema::{self, FROM_START, METRICS_DAY};
use crate::transport::{BatchMessage, Publisher};
use crate::vocabulary::Kind;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

/// What a run plans.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Rows (samples) per batch.
    pub batch_size: i64,
    /// Reports per batch (each report is a file).
    pub reports_batch_size: i64,
    /// Where report files must live; needed to plan or preview reports.
    pub reports_root: Option<std::path::PathBuf>,
    /// Policy ages.
    pub policy: Policy,
    /// Recorded in `archive_jobs.transport`.
    pub transport: &'static str,
}

/// What a dry run found for one kind.
#[derive(Debug, Clone)]
pub struct Eligible {
    /// The kind.
    pub kind: Kind,
    /// Rows older than this are eligible.
    pub cutoff: DateTime<Utc>,
    /// Eligible rows (outside unfinished batches).
    pub rows: i64,
    /// Their bytes (`size_bytes`; logs only).
    pub bytes: Option<i64>,
    /// Aggregate groups they make (metrics only).
    pub groups: Option<i64>,
    /// Eligible reports whose file is missing or outside the reports root.
    pub missing: Option<i64>,
    /// Oldest eligible time.
    pub oldest: Option<DateTime<Utc>>,
    /// Newest eligible time.
    pub newest: Option<DateTime<Utc>>,
    /// Batches a run would make.
    pub batches: i64,
    /// Unfinished batches of earlier runs: their count, and the bound above
    /// which this run plans.
    pub pending: Option<(i64, Key)>,
    /// Rows never archived: their time is before the floor, or infinite.
    pub out_of_range: Option<OutOfRange>,
}

/// The key just below the floor: rows older than `policy.floor` (and rows
/// at ±infinity) are never archived, only counted and named.
pub(crate) fn floor_key(policy: &Policy) -> Key {
    Key {
        ts: policy.floor_time() - chrono::Duration::microseconds(1),
        id: Uuid::max(),
    }
}

/// The earlier runs' high water to go on from, unless it is at or below
/// the floor (then a run starts afresh just below its first row).
pub(crate) fn resume(after: Option<Key>, floor: Key) -> Option<Key> {
    after.filter(|a| *a > floor)
}

/// Where a walk starts: above `after`, and never below the floor.
pub(crate) fn start(after: Option<Key>, floor: Key) -> Key {
    resume(after, floor).unwrap_or(floor)
}

/// Rows a run will never archive because their time is before the floor
/// or infinite: how many, and a few of them by id.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutOfRange {
    /// The kind.
    pub kind: Kind,
    /// How many rows.
    pub rows: i64,
    /// Up to five of them: (id, time as PostgreSQL prints it).
    pub examples: Vec<(Uuid, String)>,
}

impl OutOfRange {
    fn into_option(self) -> Option<Self> {
        (self.rows > 0).then_some(self)
    }
}

/// Counts and names `kind`'s rows whose time is before the floor or
/// infinite (read off the keyset index; nothing is decoded as a time).
pub async fn out_of_range(pool: &PgPool, kind: Kind, policy: &Policy) -> Result<OutOfRange> {
    let (table, ts, indexed) = match kind {
        Kind::Logs | Kind::Restore => (schema::LOGS, "received_at", "received_at"),
        Kind::Reports => (schema::REPORTS, "created_at", "created_at"),
        Kind::Metrics => (schema::METRICS, "\"timestamp\"", METRICS_DAY),
    };
    let (floor, at_infinity) = match kind {
        Kind::Metrics => ("($1 AT TIME ZONE 'UTC')", "'infinity'::timestamp"),
        _ => ("$1", "'infinity'::timestamptz"),
    };
    // One pass: the window counts every matching row before LIMIT.
    let found: Vec<(i64, Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) OVER (), id, {ts}::text FROM {table}
         WHERE {indexed} < {floor} OR {indexed} = {at_infinity}
         ORDER BY id LIMIT 5"
    )))
    .bind(policy.floor_time())
    .fetch_all(pool)
    .await?;
    Ok(OutOfRange {
        kind,
        rows: found.first().map_or(0, |f| f.0),
        examples: found.into_iter().map(|(_, id, ts)| (id, ts)).collect(),
    })
}

/// The cut-off for a policy age, by the database's clock.
async fn cutoff(pool: &PgPool, kind: Kind, policy: &Policy) -> Result<DateTime<Utc>> {
    let sql = match kind {
        // Metrics: whole UTC days only, so the cut-off never splits a day.
        Kind::Metrics => {
            "SELECT date_trunc('day', (now() - make_interval(days => $1)) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        }
        _ => "SELECT now() - make_interval(days => $1)",
    };
    let days = match kind {
        Kind::Logs | Kind::Restore => policy.logs_age_days,
        Kind::Metrics => policy.metrics_age_days,
        Kind::Reports => policy.reports_age_days,
    };
    Ok(sqlx::query_scalar(sql)
        .bind(days as i32)
        .fetch_one(pool)
        .await?)
}

/// Counts what a run of `kind` would archive, changing nothing.
pub async fn dry_run(pool: &PgPool, kind: Kind, opts: &PlanOptions) -> Result<Eligible> {
    let cutoff = cutoff(pool, kind, &opts.policy).await?;
    let pending = ledger::open_high_water(pool, kind).await?;
    let floor = floor_key(&opts.policy);
    let after = pending.map(|(k, _)| k);
    let from = Some(start(after, floor));
    let mut e = match kind {
        Kind::Logs => keyset::eligible(pool, keyset::LOGS, from, cutoff, opts.batch_size).await?,
        Kind::Metrics => metrics::eligible(pool, after, floor, cutoff, opts.batch_size).await?,
        Kind::Reports => {
            let mut e =
                keyset::eligible(pool, keyset::REPORTS, from, cutoff, opts.reports_batch_size)
                    .await?;
            e.missing = Some(missing_reports(pool, from, cutoff, &reports_root(opts)?).await?);
            e
        }
        Kind::Restore => return Err(not_archived()),
    };
    e.pending = pending.map(|(k, n)| (n, k));
    e.out_of_range = out_of_range(pool, kind, &opts.policy).await?.into_option();
    Ok(e)
}

/// A restore is planned by [`restore::plan`], never as an archive kind.
fn not_archived() -> Error {
    Error::config(
        "--kinds",
        "restore is not a kind to archive: it is planned by `planner restore`",
    )
}

/// The reports root, checked and canonical.
fn reports_root(opts: &PlanOptions) -> Result<std::path::PathBuf> {
    let root = opts.reports_root.as_deref().ok_or_else(|| {
        Error::config(
            "REPORTS_ROOT",
            "not set: the directory report files must live under",
        )
    })?;
    schema::reports_root::check(root).map_err(|r| Error::config("REPORTS_ROOT", r))
}

/// Eligible reports whose file is missing, unreadable or outside `root`
/// (canonical: the root is resolved once, not once per report).
async fn missing_reports(
    pool: &PgPool,
    after: Option<Key>,
    cutoff: DateTime<Utc>,
    root: &std::path::Path,
) -> Result<i64> {
    let paths: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT file_path FROM {table} WHERE (created_at, id) > {FROM_START} AND created_at < $3",
        table = schema::REPORTS
    )))
    .bind(after.map(|k| k.ts))
    .bind(after.map(|k| k.id))
    .bind(cutoff)
    .fetch_all(pool)
    .await?;
    let mut missing = 0;
    for p in paths {
        if schema::reports_root::resolve(root, &p).is_err() {
            missing += 1;
        }
    }
    Ok(missing)
}

/// What a run planned for one kind.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The kind.
    pub kind: Kind,
    /// Its `archive_jobs` row.
    pub job: Uuid,
    /// Rows older than this were eligible.
    pub cutoff: DateTime<Utc>,
    /// Batches recorded and published.
    pub batches: usize,
    /// Rows in them, as counted when planning.
    pub rows: i64,
    /// Unfinished batches of earlier runs that this run planned above.
    pub pending_before: Option<(i64, Key)>,
}

/// Plans one kind: one job, its batches recorded and published. On failure
/// the job is marked failed with the reason.
pub async fn plan(
    pool: &PgPool,
    kind: Kind,
    opts: &PlanOptions,
    publisher: &dyn Publisher,
) -> Result<Planned> {
    if kind == Kind::Reports {
        reports_root(opts)?;
    }
    if kind == Kind::Restore {
        return Err(not_archived());
    }
    let cutoff = cutoff(pool, kind, &opts.policy).await?;
    let pending = ledger::open_high_water(pool, kind).await?;
    let job = ledger::create_job(pool, kind, cutoff, opts.batch_size, opts.transport).await?;
    ledger::start_job(pool, job).await?;
    let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
    let mut sink = Sink::new(tx);
    let after = pending.map(|(k, _)| k);
    // The cut runs ahead of recording and publishing, bounded by the channel.
    let cutting = async {
        cut(pool, kind, opts, after, cutoff, &mut sink).await?;
        sink.finish().await
    };
    let published = record_and_publish(pool, job, kind, publisher, rx);
    match tokio::try_join!(cutting, published) {
        Ok(((), published)) => {
            debug_assert_eq!(published, sink.cut);
            ledger::finish_planning(pool, job).await?;
            Ok(Planned {
                kind,
                job,
                cutoff,
                batches: published,
                rows: sink.rows,
                pending_before: pending.map(|(k, n)| (n, k)),
            })
        }
        Err(e) => Err(planning_failed(pool, job, e).await),
    }
}

/// Marks `job` failed with why its planning did (logging, not returning, a
/// failure to do so), and gives the planning error back.
async fn planning_failed(pool: &PgPool, job: Uuid, e: Error) -> Error {
    if let Err(e2) = ledger::fail_job(pool, job, &format!("planning failed: {e}")).await {
        tracing::error!("could not mark job {job} failed: {e2}");
    }
    e
}

/// Walks `kind`'s eligible rows above `after` into `sink`.
async fn cut(
    pool: &PgPool,
    kind: Kind,
    opts: &PlanOptions,
    after: Option<Key>,
    cutoff: DateTime<Utc>,
    sink: &mut Sink,
) -> Result<()> {
    let floor = floor_key(&opts.policy);
    match kind {
        Kind::Logs => {
            keyset::cut(
                pool,
                keyset::LOGS,
                after,
                floor,
                cutoff,
                opts.batch_size,
                sink,
            )
            .await
        }
        Kind::Metrics => metrics::cut(pool, after, floor, cutoff, opts.batch_size, sink).await,
        Kind::Restore => Err(not_archived()),
        Kind::Reports => {
            keyset::cut(
                pool,
                keyset::REPORTS,
                after,
                floor,
                cutoff,
                opts.reports_batch_size,
                sink,
            )
            .await
        }
    }
}

/// Batches cut and handed on together (at most; the first chunks are smaller).
const CHUNK: usize = 200;
/// Chunks cut and waiting to be recorded: how far the cut runs ahead.
const CHUNKS_AHEAD: usize = 2;
/// Chunks being published (and then marked published) at once.
const CHUNKS_PUBLISHING: usize = 4;

/// Consecutive batches, numbered from `first_seq` within their job.
struct Chunk {
    first_seq: i32,
    batches: Vec<NewBatch>,
}

/// Takes cut batches and hands them on a chunk at a time to
/// [`record_and_publish`], which runs beside the cut.
struct Sink {
    /// `None` once finished: no more chunks.
    tx: Option<mpsc::Sender<Chunk>>,
    /// Batches cut so far.
    cut: usize,
    rows: i64,
    chunk: Vec<NewBatch>,
}

impl Sink {
    fn new(tx: mpsc::Sender<Chunk>) -> Self {
        Sink {
            tx: Some(tx),
            cut: 0,
            rows: 0,
            chunk: Vec::with_capacity(CHUNK),
        }
    }

    /// A batch (lo, hi] holding `rows` rows when counted.
    async fn push(&mut self, lo: Key, hi: Key, rows: i64) -> Result<()> {
        self.chunk.push(NewBatch {
            id: Uuid::new_v4(),
            lo,
            hi,
            planned_rows: rows,
        });
        self.rows += rows;
        // Chunks double from one batch up to CHUNK, so workers start on
        // the first batch while the planner is still cutting the rest.
        if self.chunk.len() >= self.cut.clamp(1, CHUNK) {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let batches = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        let chunk = Chunk {
            first_seq: i32::try_from(self.cut).unwrap_or(i32::MAX),
            batches,
        };
        self.cut += chunk.batches.len();
        if let Some(tx) = &self.tx {
            // Closed only when recording or publishing failed: try_join
            // reports that error, not this one.
            tx.send(chunk)
                .await
                .map_err(|_| Error::Broker("publishing stopped".into()))?;
        }
        Ok(())
    }

    /// Hands on the last chunk and says there will be no more.
    async fn finish(&mut self) -> Result<()> {
        self.flush().await?;
        self.tx = None;
        Ok(())
    }
}

/// Records chunks in the ledger one after another, in the order they were
/// cut, and publishes up to [`CHUNKS_PUBLISHING`] recorded chunks at once,
/// marking each published once the broker has confirmed it. A message never
/// names a batch the ledger does not have: a chunk is published only after
/// its recording committed. Returns the batches published.
async fn record_and_publish(
    pool: &PgPool,
    job: Uuid,
    kind: Kind,
    publisher: &dyn Publisher,
    rx: mpsc::Receiver<Chunk>,
) -> Result<usize> {
    let chunks = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    chunks
        // `then` runs one recording at a time, in order; `try_buffered`
        // keeps pulling recorded chunks while earlier ones are publishing.
        .then(|chunk| async move {
            ledger::record_batches(pool, job, kind, chunk.first_seq, &chunk.batches).await?;
            Ok::<_, Error>(chunk.batches)
        })
        .map_ok(|batches| async move {
            let messages: Vec<BatchMessage> = batches
                .iter()
                .map(|b| BatchMessage::new(b.id, kind))
                .collect();
            publisher.publish(&messages).await?;
            let ids: Vec<Uuid> = batches.iter().map(|b| b.id).collect();
            ledger::mark_published(pool, &ids).await?;
            tracing::debug!(%job, batches = ids.len(), "published");
            Ok(ids.len())
        })
        .try_buffered(CHUNKS_PUBLISHING)
        .try_fold(0, |n, published| async move { Ok(n + published) })
        .await
}
