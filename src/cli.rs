//! The two commands' flags, and the dispatch to what each does. The
//! binaries only call [`planner_main`] and [`worker_main`]; flags are parsed
//! and checked first (clap), resolved second ([`App`]), then handed to the
//! use case (`planner`, `ops`, `serve`, `check`, `verify`); every error becomes one
//! line and a documented exit status: 0 done, 1 failed, 2 bad flag or
//! setting (for `check`: a setting whose dependency failed its check),
//! 3 another planner is running, 4 done but archived reports' local files
//! were left in place (each with its reason: `planner status`; the next
//! `planner --reports` run retries them).

use crate::app::{App, Settings};
use crate::config::{self, Policy};
use crate::error::{Error, Result};
use crate::governor::GovernorOptions;
use crate::governor::window::Window;
use crate::objects::Compression;
use crate::ops::{self, Redrive};
use crate::plan::PlanOptions;
use crate::planner::{self, RunOptions};
use crate::vocabulary::Kind;
use crate::{check, retention, serve, shutdown, telemetry, verify};
use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// The live-traffic governor.
    #[command(flatten)]
    pub governor: GovernorArgs,
}

/// The live-traffic governor's flags: checked by every worker before each
/// chunk of a batch, so they hold for the fleet together.
#[derive(Debug, Clone, Args)]
pub struct GovernorArgs {
    /// Target duration of one chunk's transaction: a batch runs as chunks
    /// sized from the last ones' rows a second (500ms, 100ms; 0: each batch
    /// is one transaction).
    #[arg(long, env = "ARCHIVER_CHUNK_TIME", default_value = "100ms",
          value_parser = config::parse_timeout)]
    pub chunk_time: Duration,
    /// Wait before each chunk while any streaming replica lags more than
    /// this (seconds, or 500ms, 2min); a replica that stops reporting lags.
    #[arg(long, env = "ARCHIVER_MAX_REPLICA_LAG", value_parser = config::parse_timeout)]
    pub max_replica_lag: Option<Duration>,
    /// A replica whose lag is read on the replica itself (one behind a
    /// cascade, which the primary's pg_stat_replication does not list);
    /// repeat, or comma-separate in the environment.
    #[arg(long = "replica-url", env = "ARCHIVER_REPLICA_URLS", hide_env_values = true,
          value_delimiter = ',', value_parser = secret)]
    pub replica_urls: Vec<SecretString>,
    /// After waiting this long for lagging replicas, hand the batch back and
    /// say why.
    #[arg(long, env = "ARCHIVER_MAX_LAG_WAIT", default_value = "10min",
          value_parser = config::parse_timeout)]
    pub max_lag_wait: Duration,
    /// Wait before each chunk while more than this many sessions other than
    /// the archiver's are active (pg_stat_activity).
    #[arg(long, env = "ARCHIVER_MAX_ACTIVE_SESSIONS",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_active_sessions: Option<u32>,
    /// Slow down while the round trip of a trivial statement is more than
    /// this many times its idle baseline (e.g. 3).
    #[arg(long, env = "ARCHIVER_PROBE_FACTOR", value_parser = probe_factor)]
    pub probe_factor: Option<f64>,
    /// Wait before each chunk while the server writes WAL faster than this
    /// many MB a second (all of it: the archiver's and the application's).
    #[arg(long, env = "ARCHIVER_MAX_WAL_RATE", value_parser = wal_rate)]
    pub max_wal_rate: Option<f64>,
    /// Maintenance window, `HH:MM-HH:MM` in UTC or with a time zone
    /// (`01:00-06:00 Europe/Berlin`): no chunk starts outside it.
    #[arg(long, env = "ARCHIVER_WINDOW", value_parser = crate::governor::window::WindowParser)]
    pub window: Option<Window>,
    /// Stop starting chunks this long after the process started (2h, 90min):
    /// what is left stays pending for the next run.
    #[arg(long, env = "ARCHIVER_MAX_RUNTIME", value_parser = config::parse_timeout)]
    pub max_runtime: Option<Duration>,
}

impl GovernorArgs {
    /// The governor's settings, the deadline counted from now.
    fn options(&self) -> GovernorOptions {
        GovernorOptions {
            chunk_time: self.chunk_time,
            max_replica_lag: self.max_replica_lag,
            max_lag_wait: self.max_lag_wait,
            max_active_sessions: self.max_active_sessions,
            probe_factor: self.probe_factor,
            max_wal_rate: self.max_wal_rate.map(|mb| mb * 1_000_000.0),
            window: self.window.clone(),
            deadline: self
                .max_runtime
                .filter(|d| !d.is_zero())
                .map(|d| std::time::Instant::now() + d),
            ..GovernorOptions::default()
        }
    }
}

fn probe_factor(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (1.1..=1000.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a factor from 1.1 to 1000")),
    }
}

fn wal_rate(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 100_000.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate in MB/s from above 0 to 100000"
        )),
    }
}

/// URLs that may hold a password are kept as secrets from the start.
fn secret(s: &str) -> std::result::Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s))
}

fn scenario_id(s: &str) -> std::result::Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(s.trim())
        .map_err(|_| format!("{s:?} is not a scenario id (a UUID such as 0b7e…-…)"))
}

/// Most days a restore's hold may last: 100 years.
const MAX_HOLD_DAYS: u32 = 36_500;

fn hold_days(s: &str) -> std::result::Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(d) if d <= MAX_HOLD_DAYS => Ok(d),
        _ => Err(format!(
            "{s:?} is not a number of days from 0 to {MAX_HOLD_DAYS}"
        )),
    }
}

fn watch_every(s: &str) -> std::result::Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.2..=3600.0).contains(&v) => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a number of seconds from 0.2 to 3600")),
    }
}

fn rest_ratio(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=100.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a number from 0 to 100")),
    }
}

impl Common {
    /// The plain values, for [`App::new`] to resolve.
    fn settings(&self) -> Settings {
        Settings {
            database_url: self.database_url.clone(),
            queue_url: self.queue_url.clone(),
            queue: self.queue.clone(),
            delivery_limit: self.delivery_limit,
            concurrency: self.concurrency,
            rest_ratio: self.rest_ratio,
            reports_root: self.reports_root.clone(),
            reports_bucket: self.reports_bucket.clone(),
            reports_archive_dir: self.reports_archive_dir.clone(),
            compression: self.compression,
            batch_timeouts: config::BatchTimeouts {
                statement: self.statement_timeout,
                idle_in_transaction: self.idle_in_transaction_timeout,
            },
            governor: self.governor.options(),
            replica_urls: self.governor.replica_urls.clone(),
        }
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
    /// Download an archived report, decompress it and verify its SHA-256;
    /// or, with `--scenario`, every archived report of a scenario into a
    /// directory.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "scenario"])))]
    RestoreReport {
        /// The report's id.
        id: Option<uuid::Uuid>,
        /// Every archived report of this scenario, into the directory
        /// `--to` (created if missing), each as `<report id>.<format>`;
        /// a file already there is not overwritten (that report fails).
        #[arg(long, value_parser = scenario_id)]
        scenario: Option<uuid::Uuid>,
        /// Where to write the file (must not exist); with `--scenario`, the
        /// directory.
        #[arg(long)]
        to: PathBuf,
    },
    /// Bring a scenario's archived logs back into `scenario_logs`, as a job
    /// of its own (job type `restore`) whose batches go through the queue
    /// (or run here with no broker). Restored rows are kept out of the
    /// nightly run for `--hold-days`.
    Restore {
        /// Restore logs (the only kind that can be).
        #[arg(long)]
        logs: bool,
        /// Refused: metric samples were aggregated into daily rows.
        #[arg(long)]
        metrics: bool,
        /// Refused here: reports are files; see `restore-report --scenario`.
        #[arg(long)]
        reports: bool,
        /// The scenario whose logs to restore.
        #[arg(long, value_parser = scenario_id)]
        scenario: Option<uuid::Uuid>,
        /// From this time (inclusive, over received_at): RFC 3339 or a date
        /// (midnight UTC). Unset: the scenario's oldest archived row.
        #[arg(long, value_parser = config::instant, allow_hyphen_values = true)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// To this time (exclusive). Unset: its newest.
        #[arg(long, value_parser = config::instant, allow_hyphen_values = true)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Say what would be restored, per month; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep the restored rows out of archiving for this many days
        /// (0: no hold: the next nightly run archives them again).
        #[arg(long, env = "ARCHIVER_RESTORE_HOLD_DAYS", default_value_t = 30,
              allow_hyphen_values = true, value_parser = hold_days)]
        hold_days: u32,
    },
    /// Jobs, batches by status, dead batches with their reasons, and
    /// archived reports whose local file was left in place (and why).
    Status {
        /// Machine-readable output (with --watch: one JSON object a line,
        /// per refresh).
        #[arg(long)]
        json: bool,
        /// Instead: redraw each job's progress (batches, rows, rows/s over
        /// the last minute, ETA, dead batches) every SECONDS (0.2 to 3600;
        /// default 2) until no job is pending or running and no batch is
        /// pending, or SIGINT.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2",
              allow_negative_numbers = true, value_parser = watch_every)]
        watch: Option<Duration>,
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
    /// Check that the archive holds what each done batch recorded moving
    /// into it: log rows' count and digest, metrics aggregates' samples,
    /// value sum and digest (one grouped scan per kind), report objects'
    /// presence and size (HEAD; --deep: their SHA-256). One line per
    /// mismatch; exit 0 when all match, 1 when any does not, 2 on a bad
    /// flag.
    Verify {
        /// Only batches completed on or after this UTC day (YYYY-MM-DD).
        #[arg(long, value_name = "DATE", value_parser = utc_day)]
        since: Option<chrono::NaiveDate>,
        /// Only this job's batches.
        #[arg(long, value_name = "ID")]
        job: Option<uuid::Uuid>,
        /// Only these kinds (logs, metrics, reports; repeat or
        /// comma-separate). Unset: every kind.
        #[arg(long, value_name = "KIND", value_delimiter = ',')]
        kind: Vec<Kind>,
        /// Only this share of the batches (0 < N <= 100, e.g. 10%), picked
        /// by a hash of their id and today's date (the same batches all day).
        #[arg(long, value_name = "N%")]
        sample: Option<verify::Percent>,
        /// Also download each report object, decode it and check its size
        /// and SHA-256 against reports_archive.
        #[arg(long)]
        deep: bool,
        /// One JSON object: the summary and the mismatches.
        #[arg(long)]
        json: bool,
    },
    /// Reach every dependency a planner run uses — database (and its
    /// schema), broker queues, object store, REPORTS_ROOT — with these
    /// settings; one line each, secrets redacted. Exit 0 when all pass,
    /// else 2 naming the setting behind the first failure.
    Check,
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
                        Kind::Restore => false,
                    }
            })
            .collect()
    }

    fn policy(&self) -> Policy {
        Policy {
            logs_age_days: self.logs_age_days,
            metrics_age_days: self.metrics_age_days,
            reports_age_days: self.reports_age_days,
            floor: self.timestamp_floor,
        }
    }

    fn run_options(&self, app: &App) -> RunOptions {
        RunOptions {
            plan: PlanOptions {
                batch_size: self.batch_size,
                policy: self.policy(),
                transport: app.queue.name(),
                reports_batch_size: self.reports_batch_size,
                reports_root: self.common.reports_root.clone(),
            },
            rescue_after: Duration::from_secs(self.rescue_after_minutes * 60),
            dry_run: self.dry_run,
            explicit_reports: self.reports && !self.all,
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

async fn run_planner(cli: &PlannerCli) -> Result<bool> {
    let app = App::new(cli.common.settings(), "archiver-planner")?;
    let Some(command) = &cli.command else {
        let kinds = cli.kinds();
        if kinds.is_empty() {
            return Err(Error::config(
                "--all",
                "say what to archive: --all, --logs, --metrics and/or --reports",
            ));
        }
        return planner::run(&app, &kinds, &cli.run_options(&app)).await;
    };
    match command {
        PlannerCommand::Migrate { index_wait } => {
            ops::migrate(&app, index_wait.map(Duration::from_secs)).await
        }
        PlannerCommand::RestoreReport { id, scenario, to } => match (id, scenario) {
            (Some(id), _) => ops::restore_report(&app, *id, to).await,
            (None, Some(scenario)) => ops::restore_reports(&app, *scenario, to).await,
            (None, None) => Err(Error::config(
                "--scenario",
                "say which: a report id, or --scenario ID",
            )),
        },
        PlannerCommand::Restore {
            logs,
            metrics,
            reports,
            scenario,
            from,
            to,
            dry_run,
            hold_days,
        } => {
            if *metrics {
                return Err(Error::config(
                    "--metrics",
                    "metrics cannot be restored to samples: they were aggregated into daily rows (R2); \
                     the aggregates stay in scenario_metrics_archive, where v_scenario_metrics_all and \
                     the query API read them beside the live samples",
                ));
            }
            if *reports {
                return Err(Error::config(
                    "--reports",
                    "reports are files: restore them with `planner restore-report --scenario ID --to DIR` \
                     (or `planner restore-report REPORT_ID --to FILE`)",
                ));
            }
            if !*logs {
                return Err(Error::config(
                    "--logs",
                    "say what to restore: --logs (metrics cannot be restored; reports: restore-report)",
                ));
            }
            let Some(scenario) = scenario else {
                return Err(Error::config(
                    "--scenario",
                    "required: the scenario whose logs to restore",
                ));
            };
            if let (Some(f), Some(t)) = (from, to)
                && f >= t
            {
                return Err(Error::config(
                    "--from",
                    format!("{f} is not before --to {t}: the range is empty"),
                ));
            }
            let r = ops::Restore {
                scope: crate::ledger::RestoreScope {
                    scenario: *scenario,
                    from: *from,
                    to: *to,
                },
                hold_days: *hold_days,
                batch_size: cli.batch_size,
                dry_run: *dry_run,
            };
            ops::restore(&app, r).await
        }
        PlannerCommand::Status {
            json,
            watch: Some(every),
        } => ops::watch(&app, *every, *json).await,
        PlannerCommand::Status { json, watch: None } => {
            ops::status(&app, *json, &cli.policy()).await
        }
        PlannerCommand::Redrive {
            batch,
            all,
            dry_run,
        } => {
            let which = match (batch, all) {
                (Some(id), _) => Redrive::Batch(*id),
                (None, true) => Redrive::All,
                (None, false) => {
                    return Err(Error::config(
                        "--all",
                        "say what to redrive: --batch ID or --all",
                    ));
                }
            };
            ops::redrive(&app, which, *dry_run).await
        }
        PlannerCommand::Retention { dry_run, periods } => {
            ops::retention(&app, periods, &cli.policy(), *dry_run).await
        }
        PlannerCommand::Metrics { listen } => ops::metrics(&app, *listen).await,
        PlannerCommand::Lifecycle {
            dry_run,
            glacier_after_days,
            expire_after_days,
        } => {
            let rule = ops::Lifecycle {
                glacier_after_days: *glacier_after_days,
                expire_after_days: *expire_after_days,
            };
            ops::lifecycle(&app, rule, *dry_run).await
        }
        PlannerCommand::Check => check::planner(&app).await.map(|()| true),
        PlannerCommand::Verify {
            since,
            job,
            kind,
            sample,
            deep,
            json,
        } => {
            let opts = verify::Options {
                since: *since,
                job: *job,
                kinds: kind.clone(),
                sample: *sample,
                deep: *deep,
                json: *json,
            };
            verify::run(&app, &opts).await
        }
    }
}

/// A UTC day, `YYYY-MM-DD`.
fn utc_day(s: &str) -> std::result::Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|e| format!("{s:?} is not a UTC date YYYY-MM-DD: {e}"))
}

/// `worker`: executes batches from the broker until SIGTERM or SIGINT.
#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "Executes archive batches from the queue; SIGTERM finishes in-flight batches and exits."
)]
pub struct WorkerCli {
    /// Instead of consuming: `check`.
    #[command(subcommand)]
    pub command: Option<WorkerCommand>,
    /// The kinds this worker executes, comma-separated (logs,metrics,reports).
    /// Unset: every kind, and then reports need REPORTS_ROOT. A batch of a
    /// kind it does not serve is handed back for another worker, never failed.
    #[arg(long, env = "ARCHIVER_KINDS", value_delimiter = ',')]
    pub kinds: Vec<Kind>,
    /// Serve GET /healthz, /readyz and /metrics on this address (e.g.
    /// 0.0.0.0:9188). Unset: no endpoint.
    #[arg(long, env = "ARCHIVER_WORKER_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// /healthz answers 503 once the worker loop has not turned for this
    /// many seconds: every slot holds a batch and none settles.
    #[arg(long, env = "ARCHIVER_WORKER_STUCK_AFTER", value_name = "SECONDS",
          default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stuck_after: u64,
    /// Shared settings.
    #[command(flatten)]
    pub common: Common,
}

/// Worker subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum WorkerCommand {
    /// Reach every dependency this worker uses — database (and its
    /// schema), broker queues, and for reports (per --kinds) the object
    /// store and REPORTS_ROOT — with these settings; one line each, secrets
    /// redacted. Exit 0 when all pass, else 2 naming the setting behind the
    /// first failure.
    Check,
}

/// Runs the worker command line.
pub async fn worker_main(cli: WorkerCli) -> ExitCode {
    telemetry::init(cli.common.verbose, cli.common.log_format);
    let shutdown = shutdown::on_signal();
    let run = async {
        let app = App::new(cli.common.settings(), "archiver-worker")?;
        if let Some(WorkerCommand::Check) = cli.command {
            return check::worker(&app, &cli.kinds).await;
        }
        let endpoint = cli.listen.map(|listen| serve::Endpoint {
            listen,
            stuck_after: Duration::from_secs(cli.stuck_after),
        });
        serve::run(&app, &cli.kinds, endpoint, shutdown).await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(cli.common.log_format, "worker", &e),
    }
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
        let app = App::new(cli.common.settings(), "t").unwrap();
        let shown = format!("{app:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("swordfish"),
            "{shown}"
        );
        assert!(shown.contains("db:5432/app"), "{shown}");
    }
}
