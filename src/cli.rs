//! The two commands' flags, and what each does with them. The binaries only
//! call [`planner_main`] and [`worker_main`]; flags are parsed and checked
//! first, heavy objects built second, and every error becomes one line and a
//! documented exit status: 0 done, 1 failed, 2 bad flag or setting,
//! 3 another planner is running, 4 done but archived reports' local files
//! were left in place (each with its reason: `planner status`; the next
//! `planner --reports` run retries them).

use crate::config::{self, Policy, QueueConfig};
use crate::error::{Error, Result};
use crate::execute::Executor;
use crate::execute::reports::ReportsContext;
use crate::ledger::Kind;
use crate::objects::{self, Compression, ObjectStore};
use crate::plan::{self, Eligible, PlanOptions, Planned};
use crate::transport::amqp::{AmqpConfig, AmqpConsumer, AmqpPublisher};
use crate::transport::sqs::{SqsConfig, SqsConsumer, SqsPublisher};
use crate::transport::{BatchMessage, Publisher, inline};
use crate::worker::{self, WorkerOptions};
use crate::{db, ledger, monitoring, report, retention, telemetry};
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Settings both commands share.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// PostgreSQL URL (`postgresql+asyncpg://` accepted).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = secret)]
    pub database_url: Option<SecretString>,
    /// Broker URL: `amqp://…` for RabbitMQ; an SQS queue URL
    /// (`https://sqs.<region>.amazonaws.com/<account>/<name>`, or
    /// `http://host:port/<account>/<name>` for an SQS-compatible server) or
    /// `sqs://<name>` for SQS; unset for inline (no broker).
    #[arg(long, env = "QUEUE_URL", hide_env_values = true, value_parser = secret)]
    pub queue_url: Option<SecretString>,
    /// RabbitMQ work queue name (with `<name>.dlx` and `<name>.dead`); an
    /// SQS queue is named by QUEUE_URL (with `<name>-dead`).
    #[arg(long, env = "ARCHIVER_QUEUE", default_value = "archiver.batches")]
    pub queue: String,
    /// Deliveries of a failing batch before it is dead-lettered.
    #[arg(long, env = "ARCHIVER_DELIVERY_LIMIT", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub delivery_limit: u32,
    /// Batches executed at once (worker; and the planner when inline).
    #[arg(long, env = "ARCHIVER_CONCURRENCY", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// After each batch, rest this many times its duration (0: flat out;
    /// 1: half the load on the database, and half the speed).
    #[arg(long, env = "ARCHIVER_REST_RATIO", default_value_t = 0.0, value_parser = rest_ratio)]
    pub rest_ratio: f64,
    /// Debug logging (RUST_LOG overrides).
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Log lines as text (coloured only on a terminal) or JSON, one object
    /// per line, for log shippers.
    #[arg(long, env = "ARCHIVER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: telemetry::LogFormat,
    /// Directory every report file must resolve under (symlinks followed).
    #[arg(long, env = "REPORTS_ROOT")]
    pub reports_root: Option<PathBuf>,
    /// S3 bucket for archived reports (AWS settings from the standard
    /// variables; AWS_ENDPOINT_URL for S3-compatible stores).
    #[arg(long, env = "REPORTS_ARCHIVE_BUCKET")]
    pub reports_bucket: Option<String>,
    /// Local directory for archived reports when no bucket is set.
    #[arg(long, env = "REPORTS_ARCHIVE_DIR", default_value = "reports-archive")]
    pub reports_archive_dir: PathBuf,
    /// Compression of archived reports: zstd or gzip.
    #[arg(long, env = "ARCHIVER_REPORTS_COMPRESSION", default_value = "zstd")]
    pub compression: Compression,
    /// Longest a batch's SQL statement may run before the server cancels
    /// it (500ms, 60s, 2min; 0: no limit). A batch that times out is
    /// retried, and parked after the delivery limit if it always does.
    #[arg(long, env = "ARCHIVER_STATEMENT_TIMEOUT", default_value = "60s",
          value_parser = config::parse_timeout)]
    pub statement_timeout: Duration,
    /// Longest a batch's session may sit idle inside its transaction before
    /// the server ends it, releasing its row locks (0: no limit).
    #[arg(long, env = "ARCHIVER_IDLE_IN_TRANSACTION_TIMEOUT", default_value = "30s",
          value_parser = config::parse_timeout)]
    pub idle_in_transaction_timeout: Duration,
}

/// URLs that may hold a password are kept as secrets from the start.
fn secret(s: &str) -> std::result::Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s))
}

fn rest_ratio(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=100.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a number from 0 to 100")),
    }
}

impl Common {
    /// The object store for archived reports: S3 when a bucket is set,
    /// otherwise the local directory.
    pub async fn object_store(&self) -> Result<Box<dyn ObjectStore>> {
        let bucket = self.reports_bucket.as_deref().filter(|b| !b.is_empty());
        objects::open(bucket, &self.reports_archive_dir).await
    }

    /// What executing batches needs; reports only when `REPORTS_ROOT` is set.
    pub async fn executor(&self, pool: &PgPool) -> Result<Executor> {
        let Some(root) = &self.reports_root else {
            return Ok(Executor::from(pool));
        };
        if !root.is_dir() {
            return Err(Error::config(
                "REPORTS_ROOT",
                format!("{} is not a directory", root.display()),
            ));
        }
        crate::execute::reports::check_root(root).map_err(|r| Error::config("REPORTS_ROOT", r))?;
        let ctx = ReportsContext {
            root: root.clone(),
            store: self.object_store().await?,
            compression: self.compression,
        };
        Ok(Executor {
            pool: pool.clone(),
            reports: Some(Arc::new(ctx)),
            kinds: None,
        })
    }

    fn worker_options(&self) -> WorkerOptions {
        WorkerOptions {
            concurrency: self.concurrency.into(),
            delivery_limit: self.delivery_limit,
            rest_ratio: self.rest_ratio,
            ..Default::default()
        }
    }

    fn queue(&self) -> Result<QueueConfig> {
        QueueConfig::parse(
            self.queue_url.as_ref().map(|u| u.expose_secret()),
            &self.queue,
            self.delivery_limit,
        )
    }

    fn database_url(&self) -> Option<&str> {
        self.database_url.as_ref().map(|u| u.expose_secret())
    }

    /// Connection options for sessions that execute batches.
    fn batch_options(&self, opts: &PgConnectOptions) -> PgConnectOptions {
        config::batch_options(
            opts,
            config::BatchTimeouts {
                statement: self.statement_timeout,
                idle_in_transaction: self.idle_in_transaction_timeout,
            },
        )
    }
}

/// `planner`: plans archive batches and publishes them (or runs them inline).
#[derive(Debug, Parser)]
#[command(
    name = "planner",
    version,
    about = "Plans archive batches and enqueues them (or runs them itself with no broker)."
)]
pub struct PlannerCli {
    /// Maintenance commands.
    #[command(subcommand)]
    pub command: Option<PlannerCommand>,
    /// Archive every kind.
    #[arg(long)]
    pub all: bool,
    /// Archive logs older than the logs policy age.
    #[arg(long)]
    pub logs: bool,
    /// Aggregate metric samples older than the metrics policy age.
    #[arg(long)]
    pub metrics: bool,
    /// Move reports older than the reports policy age to the object store.
    #[arg(long)]
    pub reports: bool,
    /// Say what would be archived; change nothing, publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Rows per batch.
    #[arg(long, env = "ARCHIVER_BATCH_SIZE", default_value_t = 5000,
          value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub batch_size: i64,
    /// Logs older than this many days are archived.
    #[arg(long, env = "ARCHIVER_LOGS_AGE_DAYS", default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub logs_age_days: u32,
    /// Metric samples older than this many days are aggregated.
    #[arg(long, env = "ARCHIVER_METRICS_AGE_DAYS", default_value_t = 730,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub metrics_age_days: u32,
    /// Republish pending batches whose message went out longer ago than
    /// this (minutes) and may have been lost; skipped while the queue holds
    /// at least as many messages as there are pending batches of all kinds.
    #[arg(long, env = "ARCHIVER_RESCUE_AFTER_MINUTES", default_value_t = 1440,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub rescue_after_minutes: u64,
    /// Reports per batch (each is a file to compress and upload).
    #[arg(long, env = "ARCHIVER_REPORTS_BATCH_SIZE", default_value_t = 20,
          value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub reports_batch_size: i64,
    /// Reports older than this many days are archived.
    #[arg(long, env = "ARCHIVER_REPORTS_AGE_DAYS", default_value_t = 180,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub reports_age_days: u32,
    /// Rows whose time is before this day (UTC, YYYY-MM-DD) or infinite are
    /// never archived, only counted and named (dry run, status): sentinel
    /// times are the application's bug, not months to make partitions for.
    #[arg(long, env = "ARCHIVER_TIMESTAMP_FLOOR", default_value = "2000-01-01",
          value_parser = config::timestamp_floor)]
    pub timestamp_floor: chrono::NaiveDate,
    /// Shared settings.
    #[command(flatten)]
    pub common: Common,
}

/// Planner subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum PlannerCommand {
    /// Apply the schema migrations and exit. Index builds wait for older
    /// transactions (a running pg_dump) with no lock timeout, saying what
    /// they wait for; INVALID indexes of ours are rebuilt.
    Migrate {
        /// Give up an index build after waiting this long for older
        /// transactions (the migration is then not recorded; run again).
        /// Unset: wait as long as it takes.
        #[arg(long, env = "ARCHIVER_MIGRATE_INDEX_WAIT", value_name = "SECONDS",
              value_parser = clap::value_parser!(u64).range(1..))]
        index_wait: Option<u64>,
    },
    /// Download an archived report, decompress it and verify its SHA-256.
    RestoreReport {
        /// The report's id.
        id: uuid::Uuid,
        /// Where to write the file (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Jobs, batches by status, dead batches with their reasons, and
    /// archived reports whose local file was left in place (and why).
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Put dead batches back on the work queue (inline: run them here),
    /// once their cause is fixed. A batch that is not dead is left alone.
    Redrive {
        /// One batch.
        #[arg(long, conflicts_with = "all")]
        batch: Option<uuid::Uuid>,
        /// Every dead batch.
        #[arg(long)]
        all: bool,
        /// List what would be redriven; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop what is past its retention period: whole monthly partitions of
    /// the logs and metrics archives, and archived reports' metadata rows
    /// whose local file is gone. Run it from cron (monthly is enough).
    Retention {
        /// Say what would be dropped; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long each archive keeps its rows.
        #[command(flatten)]
        periods: retention::Periods,
    },
    /// Print the Prometheus metrics read from the ledger, or serve them at
    /// `/metrics` with `--listen` (until SIGTERM).
    Metrics {
        /// Serve `GET /metrics` on this address (e.g. 0.0.0.0:9187) instead
        /// of printing once.
        #[arg(long, env = "ARCHIVER_METRICS_LISTEN")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Apply and verify the bucket's lifecycle rule for archived reports.
    Lifecycle {
        /// Show the current rule and what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Move objects to Glacier after this many days.
        #[arg(long, default_value_t = 90)]
        glacier_after_days: i32,
        /// Delete objects after this many days (3 years).
        #[arg(long, default_value_t = 1095)]
        expire_after_days: i32,
    },
}

impl PlannerCli {
    fn kinds(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| {
                self.all
                    || match k {
                        Kind::Logs => self.logs,
                        Kind::Metrics => self.metrics,
                        Kind::Reports => self.reports,
                    }
            })
            .collect()
    }

    fn options(&self, queue: &QueueConfig) -> PlanOptions {
        PlanOptions {
            batch_size: self.batch_size,
            policy: Policy {
                logs_age_days: self.logs_age_days,
                metrics_age_days: self.metrics_age_days,
                reports_age_days: self.reports_age_days,
                floor: self.timestamp_floor,
            },
            transport: queue.name(),
            reports_batch_size: self.reports_batch_size,
            reports_root: self.common.reports_root.clone(),
        }
    }
}

/// Maps an error to its exit status, printing it on one line.
fn fail(format: telemetry::LogFormat, program: &str, e: &Error) -> ExitCode {
    let code = match e {
        Error::Config { .. } => 2,
        Error::Locked(_) => 3,
        Error::LeftInPlace(_) => 4,
        _ => 1,
    };
    telemetry::fatal(format, program, &e.to_string(), code);
    ExitCode::from(code)
}

/// Runs the planner command line.
pub async fn planner_main(cli: PlannerCli) -> ExitCode {
    telemetry::init(cli.common.verbose, cli.common.log_format);
    match run_planner(&cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => fail(cli.common.log_format, "planner", &e),
    }
}

/// The planner's advisory-lock key: "archiver" in ASCII.
pub const PLANNER_LOCK: i64 = 0x6172_6368_6976_6572;

async fn run_planner(cli: &PlannerCli) -> Result<bool> {
    let opts = config::database_options(cli.common.database_url(), "archiver-planner")?;
    let queue = cli.common.queue()?;
    match &cli.command {
        Some(PlannerCommand::Migrate { index_wait }) => {
            let pool = db::connect(&opts, 2, Duration::from_secs(30)).await?;
            let index_wait = index_wait.map(Duration::from_secs);
            db::migrate_with(&pool, db::MigrateOptions { index_wait }).await?;
            println!("schema is up to date ({})", config::describe(&opts));
            return Ok(true);
        }
        Some(PlannerCommand::RestoreReport { id, to }) => {
            let pool = db::connect(&opts, 2, Duration::from_secs(30)).await?;
            return restore_report(&pool, &cli.common, *id, to).await;
        }
        Some(PlannerCommand::Status { json }) => {
            let pool = db::connect(&opts, 2, Duration::from_secs(30)).await?;
            return status(&pool, *json, &cli.options(&queue).policy).await;
        }
        Some(PlannerCommand::Redrive {
            batch,
            all,
            dry_run,
        }) => {
            let pool = db::connect(
                &opts,
                u32::from(cli.common.concurrency) + 3,
                Duration::from_secs(30),
            )
            .await?;
            db::check_migrated(&pool).await?;
            return redrive(&pool, &cli.common, &queue, *batch, *all, *dry_run).await;
        }
        Some(PlannerCommand::Retention { dry_run, periods }) => {
            check_retention(cli, periods)?;
            let pool = db::connect(&opts, 2, Duration::from_secs(30)).await?;
            db::check_migrated(&pool).await?;
            let _lock = if *dry_run {
                None
            } else {
                Some(take_lock(&opts).await?)
            };
            let found = retention::run(&pool, periods, *dry_run).await?;
            println!("{}", found.describe(*dry_run));
            return Ok(true);
        }
        Some(PlannerCommand::Metrics { listen }) => {
            let pool = db::connect(&opts, 4, Duration::from_secs(30)).await?;
            db::check_migrated(&pool).await?;
            let Some(addr) = listen else {
                print!("{}", monitoring::gather(&pool).await?);
                return Ok(true);
            };
            let stop = CancellationToken::new();
            tokio::spawn(cancel_on_signal(stop.clone()));
            monitoring::serve(pool, *addr, stop, |bound| {
                println!("serving metrics at http://{bound}/metrics");
            })
            .await?;
            return Ok(true);
        }
        Some(PlannerCommand::Lifecycle {
            dry_run,
            glacier_after_days,
            expire_after_days,
        }) => {
            let store = cli.common.object_store().await?;
            let prefix = objects::REPORTS_PREFIX;
            println!(
                "{}",
                store
                    .apply_lifecycle(prefix, *glacier_after_days, *expire_after_days, *dry_run)
                    .await?
            );
            return Ok(true);
        }
        None => {}
    }
    let kinds = cli.kinds();
    if kinds.is_empty() {
        return Err(Error::config(
            "--all",
            "say what to archive: --all, --logs, --metrics and/or --reports",
        ));
    }
    let pool = db::connect(
        &opts,
        u32::from(cli.common.concurrency) + 3,
        Duration::from_secs(30),
    )
    .await?;
    db::check_migrated(&pool).await?;
    let plan_opts = cli.options(&queue);
    let explicit_reports = cli.reports && !cli.all;
    let mut selected = Vec::new();
    for kind in kinds {
        if wanted(kind, &plan_opts, explicit_reports)? {
            selected.push(kind);
        }
    }
    let kinds = selected;
    if cli.dry_run {
        return dry_run(&pool, &kinds, &plan_opts).await;
    }
    let lock = LockWatch::start(take_lock(&opts).await?);
    let reports = kinds.contains(&Kind::Reports);
    let work = async {
        if reports {
            retry_left_files(&cli.common.executor(&pool).await?).await?;
        }
        match broker(&queue).await? {
            None => {
                // Batches run on sessions of their own, with the batch
                // timeouts; planning keeps `pool`.
                let batch_pool = db::connect(
                    &cli.common.batch_options(&opts),
                    u32::from(cli.common.concurrency) + 1,
                    Duration::from_secs(30),
                )
                .await?;
                let exec = cli.common.executor(&batch_pool).await?;
                run_inline(
                    &pool,
                    &exec,
                    &kinds,
                    &plan_opts,
                    cli.common.worker_options(),
                )
                .await
            }
            Some((publisher, name)) => {
                let age = Duration::from_secs(cli.rescue_after_minutes * 60);
                for &kind in &kinds {
                    adopt_abandoned(&pool, publisher.as_ref(), kind).await?;
                    rescue(&pool, publisher.as_ref(), kind, age).await?;
                }
                let (planned, ok) = plan_kinds(&pool, &kinds, &plan_opts, publisher.as_ref()).await;
                publisher.close().await?;
                for p in &planned {
                    println!("{}", report::published(p, &name));
                }
                Ok(ok)
            }
        }
    };
    // Losing the lock's session stops the run wherever it is (publishing
    // included): another planner may hold the lock by now.
    let ok = tokio::select! {
        r = work => r?,
        e = lock.lost() => return Err(e),
    };
    lock.still_held().await?;
    if ok && reports {
        check_left_files(&pool).await?;
    }
    Ok(ok)
}

/// How often the planner checks the session holding its advisory lock, and
/// how long it waits for an answer. Their sum (12 s) is well under the time
/// the server takes to notice a vanished client and release the lock (TCP
/// keepalives: 30 s idle at least, see `config::database_options`), so a
/// planner cut off from the database stops before another can start.
const LOCK_HEARTBEAT: Duration = Duration::from_secs(2);
const LOCK_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// The planner lock's session, checked every [`LOCK_HEARTBEAT`] by a task
/// of its own.
struct LockWatch {
    lost: tokio::sync::watch::Receiver<Option<String>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl LockWatch {
    fn start(mut conn: PgConnection) -> Self {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_HEARTBEAT).await;
                let check = sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                       AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = $1)",
                )
                .bind(PLANNER_LOCK)
                .fetch_one(&mut conn);
                let why = match tokio::time::timeout(LOCK_HEARTBEAT_TIMEOUT, check).await {
                    Ok(Ok(true)) => continue,
                    Ok(Ok(false)) => "the session no longer holds it".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {LOCK_HEARTBEAT_TIMEOUT:?}"),
                };
                let _ = tx.send(Some(why));
                return;
            }
        });
        LockWatch {
            lost: rx,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// Resolves once the lock's session is lost, with the error to exit on.
    async fn lost(&self) -> Error {
        let mut rx = self.lost.clone();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "the lock watcher stopped".to_string(),
        };
        Error::LockLost(why)
    }

    /// Fails if the lock's session was lost at any point of the run.
    async fn still_held(&self) -> Result<()> {
        match self.lost.borrow().clone() {
            Some(why) => Err(Error::LockLost(why)),
            None => Ok(()),
        }
    }
}

/// Before planning reports: retries deleting the local files earlier runs
/// left in place, and says how that went.
async fn retry_left_files(exec: &Executor) -> Result<()> {
    let Some(ctx) = &exec.reports else {
        return Ok(());
    };
    let r = crate::execute::reports::retry_left_files(exec, ctx).await?;
    if r.tried > 0 {
        println!(
            "reports: retried {} local file(s) left in place by earlier runs: {} deleted, {} still left",
            r.tried, r.deleted, r.left
        );
    }
    Ok(())
}

/// After a run with reports: archived reports whose local file is still on
/// disk make the exit status 4, with the first few named.
async fn check_left_files(pool: &PgPool) -> Result<()> {
    let (total, left) = crate::execute::reports::left_files(pool, 5).await?;
    if total == 0 {
        return Ok(());
    }
    for f in &left {
        eprintln!("planner: {}", report::left_file(f));
    }
    Err(Error::LeftInPlace(format!(
        "reports: {total} archived report(s) still have their local file in place (listed by `planner status`); the next run retries them"
    )))
}

/// A retention period must outlast the archive age of its kind, or rows
/// would be dropped as soon as they are archived.
fn check_retention(cli: &PlannerCli, p: &retention::Periods) -> Result<()> {
    let checks = [
        (
            "--logs-years",
            p.logs_years,
            "--logs-age-days",
            cli.logs_age_days,
        ),
        (
            "--metrics-years",
            p.metrics_years,
            "--metrics-age-days",
            cli.metrics_age_days,
        ),
        (
            "--reports-metadata-years",
            p.reports_metadata_years,
            "--reports-age-days",
            cli.reports_age_days,
        ),
    ];
    for (flag, years, age_flag, age_days) in checks {
        if i64::from(years) * 365 <= i64::from(age_days) {
            return Err(Error::config(
                flag,
                format!(
                    "{years} year(s) does not outlast {age_flag} {age_days}: rows would be dropped as soon as they are archived"
                ),
            ));
        }
    }
    Ok(())
}

/// Holds the planner lock on a connection of its own for the whole run;
/// the server releases it if the planner dies.
async fn take_lock(opts: &PgConnectOptions) -> Result<PgConnection> {
    let mut conn = PgConnection::connect_with(opts).await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(PLANNER_LOCK)
        .fetch_one(&mut conn)
        .await?;
    if got {
        Ok(conn)
    } else {
        Err(Error::Locked(PLANNER_LOCK))
    }
}

async fn dry_run(pool: &PgPool, kinds: &[Kind], opts: &PlanOptions) -> Result<bool> {
    println!("DRY RUN: nothing is changed and nothing is published");
    for &kind in kinds {
        let e: Eligible = plan::dry_run(pool, kind, opts).await?;
        let size = if kind == Kind::Reports {
            opts.reports_batch_size
        } else {
            opts.batch_size
        };
        println!("{}", report::eligible(&e, size));
        if kind == Kind::Reports {
            let (left, _) = crate::execute::reports::left_files(pool, 0).await?;
            if left > 0 {
                println!(
                    "reports: {left} archived report(s) still have their local file in place; a run retries deleting them (see planner status)"
                );
            }
        }
    }
    Ok(true)
}

/// Whether to plan `kind` now: reports need `REPORTS_ROOT`. Under `--all`
/// a deployment without reports is told so and goes on; `--reports` alone
/// is an error.
fn wanted(kind: Kind, opts: &PlanOptions, explicit_reports: bool) -> Result<bool> {
    if !plan::is_built(kind) {
        println!("{}", report::not_built(kind));
        return Ok(false);
    }
    if kind == Kind::Reports && opts.reports_root.is_none() {
        if explicit_reports {
            return Err(Error::config(
                "REPORTS_ROOT",
                "not set: the directory report files must live under",
            ));
        }
        println!("reports: skipped: REPORTS_ROOT is not set (nothing changed)");
        return Ok(false);
    }
    Ok(true)
}

async fn restore_report(pool: &PgPool, common: &Common, id: uuid::Uuid, to: &Path) -> Result<bool> {
    let row: Option<(Option<String>, Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT object_key, file_size_bytes, sha256 FROM reports_archive WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let (Some(key), Some(size), Some(sha256)) = row.unwrap_or_default() else {
        return Err(Error::config(
            "restore-report",
            format!(
                "report {id} is not in reports_archive (or has no object key, size and SHA-256)"
            ),
        ));
    };
    let expected = objects::Original {
        size: size.max(0) as u64,
        sha256,
    };
    if to.exists() {
        return Err(Error::config(
            "--to",
            format!("{} exists; not overwriting it", to.display()),
        ));
    }
    let store = common.object_store().await?;
    let n = store.restore_checked(&key, to, Some(&expected)).await?;
    println!(
        "restored report {id} from {} to {} ({} bytes, SHA-256 verified against reports_archive)",
        store.location(&key),
        to.display(),
        n
    );
    Ok(true)
}

/// Connects a publisher to the configured broker, with the queue's name;
/// `None` when there is no broker (inline).
async fn broker(queue: &QueueConfig) -> Result<Option<(Box<dyn Backlog>, String)>> {
    Ok(match queue {
        QueueConfig::Inline => None,
        QueueConfig::Amqp {
            url,
            queue,
            delivery_limit,
        } => {
            let cfg = AmqpConfig {
                url: url.clone(),
                queue: queue.clone(),
                delivery_limit: *delivery_limit,
            };
            Some((Box::new(AmqpPublisher::connect(cfg).await?), queue.clone()))
        }
        QueueConfig::Sqs {
            queue_url_or_name,
            delivery_limit,
        } => {
            let cfg = SqsConfig::new(queue_url_or_name, *delivery_limit)?;
            Some((
                Box::new(SqsPublisher::connect(&cfg).await?),
                cfg.name.clone(),
            ))
        }
    })
}

/// A publisher whose broker can say how many messages wait in its queue.
#[async_trait::async_trait]
trait Backlog: Publisher {
    async fn ready(&self) -> Result<u32>;
}

#[async_trait::async_trait]
impl Backlog for AmqpPublisher {
    async fn ready(&self) -> Result<u32> {
        AmqpPublisher::ready(self).await
    }
}

#[async_trait::async_trait]
impl Backlog for SqsPublisher {
    async fn ready(&self) -> Result<u32> {
        SqsPublisher::ready(self).await
    }
}

/// Adopts the jobs of `kind` that an earlier broker-mode planner started and
/// died in while planning (the advisory lock says no planner is running
/// now): their batches are all recorded; those whose message may not have
/// gone out are published again (a batch runs once however often it is
/// delivered), and each job completes when its batches do. A job that died
/// before recording any batch is marked failed. Says what it did.
async fn adopt_abandoned(pool: &PgPool, publisher: &dyn Backlog, kind: Kind) -> Result<()> {
    for a in ledger::adopt_abandoned_jobs(pool, kind).await? {
        if a.batches == 0 {
            println!(
                "{kind}: job {} was left {} by a planner that stopped before recording any batch: marked failed",
                a.job, a.status
            );
            continue;
        }
        let messages: Vec<BatchMessage> = a
            .unpublished
            .iter()
            .map(|&id| BatchMessage::new(id, kind))
            .collect();
        if !messages.is_empty() {
            publisher.publish(&messages).await?;
            ledger::mark_published(pool, &a.unpublished).await?;
        }
        println!(
            "{kind}: job {} was left {} by a planner that stopped while planning: adopted ({} batch(es) recorded, {} republished); it completes when its batches do",
            a.job,
            a.status,
            a.batches,
            messages.len()
        );
    }
    Ok(())
}

/// Republishes pending batches of `kind` older than `age`, unless the queue
/// already holds a message for every pending batch (a long backlog draining
/// must not be duplicated). The queue is shared by every kind, so its depth
/// is compared with the pending batches of every kind: compared with one
/// kind's alone, a backlog of another kind would hide lost messages. A
/// republished batch that also arrives the first way runs once: the ledger
/// makes the second delivery a no-op.
async fn rescue(pool: &PgPool, publisher: &dyn Backlog, kind: Kind, age: Duration) -> Result<()> {
    let stale = ledger::stale_batches(pool, kind, age).await?;
    if stale.is_empty() {
        return Ok(());
    }
    let (pending, ready) = (
        ledger::pending_count(pool, None).await?,
        publisher.ready().await?,
    );
    if i64::from(ready) >= pending {
        println!(
            "{kind}: {} pending batch(es) older than the rescue age, but the queue holds {ready} message(s) for {pending} pending of all kinds: none lost",
            stale.len()
        );
        return Ok(());
    }
    let messages: Vec<BatchMessage> = stale
        .iter()
        .map(|&id| BatchMessage::new(id, kind))
        .collect();
    publisher.publish(&messages).await?;
    ledger::mark_published(pool, &stale).await?;
    println!(
        "{kind}: republished {} batch(es) whose messages may have been lost (pending {pending} of all kinds, queue holds {ready})",
        stale.len()
    );
    Ok(())
}

async fn status(pool: &PgPool, json: bool, policy: &Policy) -> Result<bool> {
    let jobs = ledger::recent_jobs(pool, 10).await?;
    let counts = ledger::open_batch_counts(pool).await?;
    let dead = ledger::dead_batches(pool, None).await?;
    let mut out_of_range = Vec::new();
    for kind in Kind::ALL {
        let o = plan::out_of_range(pool, kind, policy).await?;
        if o.rows > 0 {
            out_of_range.push(o);
        }
    }
    let (left_total, left) = crate::execute::reports::left_files(pool, 20).await?;
    if json {
        let v = serde_json::json!({
            "jobs": jobs, "open_batches": counts, "dead_batches": dead,
            "out_of_range": out_of_range,
            "local_files_left": { "total": left_total, "oldest": left },
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        );
    } else {
        println!("{}", report::status(&jobs, &counts, &dead));
        for o in &out_of_range {
            println!("{}", report::out_of_range(o));
        }
        println!("{}", report::left_files(left_total, &left));
    }
    Ok(true)
}

async fn redrive(
    pool: &PgPool,
    common: &Common,
    queue: &QueueConfig,
    batch: Option<uuid::Uuid>,
    all: bool,
    dry_run: bool,
) -> Result<bool> {
    if batch.is_none() && !all {
        return Err(Error::config(
            "--all",
            "say what to redrive: --batch ID or --all",
        ));
    }
    let dead = ledger::dead_batches(pool, batch).await?;
    if let (Some(id), true) = (batch, dead.is_empty()) {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM archive_batches WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?;
        match status {
            Some(s) => println!("batch {id} is {s}, not dead: nothing to redrive"),
            None => {
                return Err(Error::config(
                    "--batch",
                    format!("batch {id} is not in the ledger"),
                ));
            }
        }
        return Ok(true);
    }
    for d in &dead {
        println!(
            "{} {} ({} attempts): {}",
            d.kind,
            d.id,
            d.attempts,
            d.last_error.as_deref().unwrap_or("-")
        );
    }
    if dry_run || dead.is_empty() {
        println!(
            "{} dead batch(es){}",
            dead.len(),
            if dry_run {
                " would be redriven (dry run)"
            } else {
                ""
            }
        );
        return Ok(true);
    }
    let _lock = take_lock(&config::database_options(
        common.database_url(),
        "archiver-planner",
    )?)
    .await?;
    let ids: Vec<uuid::Uuid> = dead.iter().map(|d| d.id).collect();
    let revived = ledger::revive(pool, &ids).await?;
    let messages: Vec<BatchMessage> = revived
        .iter()
        .map(|&(id, kind)| BatchMessage::new(id, kind))
        .collect();
    match broker(queue).await? {
        Some((publisher, name)) => {
            publisher.publish(&messages).await?;
            ledger::mark_published(pool, &ids).await?;
            publisher.close().await?;
            println!("redrove {} batch(es) to {name}", messages.len());
            Ok(true)
        }
        None => {
            let exec = common.executor(pool).await?;
            let (publisher, mut consumer) = inline::queue();
            publisher.publish(&messages).await?;
            publisher.close().await?;
            worker::run(
                &exec,
                &mut consumer,
                common.worker_options(),
                CancellationToken::new(),
            )
            .await?;
            let still = ledger::dead_batches(pool, None).await?;
            let again: Vec<_> = still.iter().filter(|d| ids.contains(&d.id)).collect();
            println!(
                "ran {} batch(es) here; {} dead again",
                messages.len(),
                again.len()
            );
            Ok(again.is_empty())
        }
    }
}

/// Plans each kind; a failure of one kind does not stop the others.
async fn plan_kinds(
    pool: &PgPool,
    kinds: &[Kind],
    opts: &PlanOptions,
    publisher: &dyn Publisher,
) -> (Vec<Planned>, bool) {
    let (mut planned, mut ok) = (Vec::new(), true);
    for &kind in kinds {
        match plan::plan(pool, kind, opts, publisher).await {
            Ok(p) => {
                match plan::out_of_range(pool, kind, &opts.policy).await {
                    Ok(o) if o.rows > 0 => println!("{}", report::out_of_range(&o)),
                    Ok(_) => {}
                    Err(e) => eprintln!("planner: {kind}: counting out-of-range rows: {e}"),
                }
                if let Some((n, _)) = p.pending_before {
                    println!(
                        "{kind}: {n} unfinished batch(es) of earlier runs; planned only rows after them"
                    );
                }
                planned.push(p);
            }
            Err(e) => {
                eprintln!("planner: {kind}: {e}");
                ok = false;
            }
        }
    }
    (planned, ok)
}

async fn run_inline(
    pool: &PgPool,
    exec: &Executor,
    kinds: &[Kind],
    opts: &PlanOptions,
    wopts: WorkerOptions,
) -> Result<bool> {
    let (publisher, mut consumer) = inline::queue();
    let started = std::time::Instant::now();
    let executors = {
        let exec = exec.clone();
        tokio::spawn(async move {
            worker::run(&exec, &mut consumer, wopts, CancellationToken::new()).await
        })
    };
    for &kind in kinds {
        let ids = ledger::abandoned_inline_batches(pool, kind).await?;
        if !ids.is_empty() {
            println!(
                "{kind}: resuming {} unfinished batch(es) of an earlier run that stopped",
                ids.len()
            );
            let messages: Vec<BatchMessage> = ids
                .into_iter()
                .map(|id| BatchMessage::new(id, kind))
                .collect();
            publisher.publish(&messages).await?;
        }
    }
    let (planned, mut ok) = plan_kinds(pool, kinds, opts, &publisher).await;
    publisher.close().await?;
    executors
        .await
        .map_err(|e| Error::JobFailed(format!("executor task: {e}")))??;
    let elapsed = started.elapsed();
    for p in &planned {
        let job = ledger::job(pool, p.job).await?;
        println!("{}", report::finished(&job, elapsed));
        ok &= job.status == "completed";
    }
    for (payload, reason) in publisher.dead_letters().await {
        eprintln!(
            "planner: dead batch {}: {reason}",
            String::from_utf8_lossy(&payload)
        );
    }
    Ok(ok)
}

/// `worker`: executes batches from the broker until SIGTERM or SIGINT.
#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "Executes archive batches from the queue; SIGTERM finishes in-flight batches and exits."
)]
pub struct WorkerCli {
    /// The kinds this worker executes, comma-separated (logs,metrics,reports).
    /// Unset: every kind, and then reports need REPORTS_ROOT. A batch of a
    /// kind it does not serve is handed back for another worker, never failed.
    #[arg(long, env = "ARCHIVER_KINDS", value_delimiter = ',')]
    pub kinds: Vec<Kind>,
    /// Shared settings.
    #[command(flatten)]
    pub common: Common,
}

impl WorkerCli {
    /// The kinds served, checked against what the settings provide: a worker
    /// that would receive reports without REPORTS_ROOT refuses to start
    /// rather than decline every reports batch.
    fn served(&self) -> Result<Option<Vec<Kind>>> {
        let reports_root = self.common.reports_root.is_some();
        if self.kinds.is_empty() {
            if !reports_root {
                return Err(Error::config(
                    "REPORTS_ROOT",
                    "not set, and this worker would serve every kind: set REPORTS_ROOT (the directory report files live under), or name the kinds it serves with --kinds logs,metrics (ARCHIVER_KINDS)",
                ));
            }
            return Ok(None);
        }
        let mut kinds = self.kinds.clone();
        kinds.sort();
        kinds.dedup();
        if kinds.contains(&Kind::Reports) && !reports_root {
            return Err(Error::config(
                "REPORTS_ROOT",
                "not set, but --kinds includes reports: set REPORTS_ROOT or leave reports out of --kinds",
            ));
        }
        Ok(Some(kinds))
    }
}

/// Runs the worker command line.
pub async fn worker_main(cli: WorkerCli) -> ExitCode {
    telemetry::init(cli.common.verbose, cli.common.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match run_worker(&cli, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(cli.common.log_format, "worker", &e),
    }
}

async fn run_worker(cli: &WorkerCli, shutdown: CancellationToken) -> Result<()> {
    let opts = config::database_options(cli.common.database_url(), "archiver-worker")?;
    let queue = cli.common.queue()?;
    if queue == QueueConfig::Inline {
        return Err(Error::config(
            "QUEUE_URL",
            "not set: a worker consumes from a broker (amqp://… or an SQS queue URL); with no broker the planner runs batches itself",
        ));
    }
    let kinds = cli.served()?;
    let pool = db::connect(
        &cli.common.batch_options(&opts),
        u32::from(cli.common.concurrency) + 2,
        Duration::from_secs(600),
    )
    .await?;
    db::check_migrated(&pool).await?;
    let mut exec = cli.common.executor(&pool).await?;
    if let Some(kinds) = &kinds {
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        tracing::info!("serving {} batches only", names.join(","));
    }
    exec.kinds = kinds;
    let (options, concurrency) = (cli.common.worker_options(), cli.common.concurrency);
    let stats = match queue {
        QueueConfig::Amqp {
            url,
            queue,
            delivery_limit,
        } => {
            let cfg = AmqpConfig {
                url,
                queue,
                delivery_limit,
            };
            let mut consumer = AmqpConsumer::new(cfg, concurrency);
            let stats = worker::run(&exec, &mut consumer, options, shutdown).await?;
            consumer.close().await;
            stats
        }
        QueueConfig::Sqs {
            queue_url_or_name,
            delivery_limit,
        } => {
            let cfg = SqsConfig::new(&queue_url_or_name, delivery_limit)?;
            let mut consumer = SqsConsumer::from_env(cfg, concurrency).await;
            worker::run(&exec, &mut consumer, options, shutdown).await?
        }
        QueueConfig::Inline => unreachable!("refused above"),
    };
    tracing::info!(?stats, "worker stopped");
    Ok(())
}

/// Cancels `token` on SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: finishing in-flight batches");
    token.cancel();
}

/// Parses the command line; a bad flag exits 2 with one line that names it
/// (`--help` and `--version` print as usual).
pub fn parse<T: Parser>(program: &str) -> T {
    match T::try_parse() {
        Ok(t) => t,
        Err(e) if e.use_stderr() => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ");
            eprintln!("{program}: {first} (see --help)");
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_settings_never_show_urls_in_debug() {
        let cli = PlannerCli::try_parse_from([
            "planner",
            "--logs",
            "--database-url",
            "postgresql://app:hunter2@db:5432/app",
            "--queue-url",
            "amqp://guest:swordfish@rabbit:5672/%2f",
        ])
        .unwrap();
        let shown = format!("{cli:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("swordfish"),
            "{shown}"
        );
        assert_eq!(
            cli.common.database_url(),
            Some("postgresql://app:hunter2@db:5432/app")
        );
    }
}
