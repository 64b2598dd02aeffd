//! Settings resolved once into what the commands work with, the way
//! ripgrep turns its `LowArgs` into `HiArgs`: [`Settings`] are the plain
//! values the command line gave (flags and environment, already checked
//! one by one); [`App`] parses the URLs in them once, and builds the heavy
//! objects on demand — database pools, the executor, the object store, the
//! queue's publisher and consumer. The use cases (`planner`, `ops`,
//! `serve`) take an `&App`, never the command line.

use crate::config::{self, BatchTimeouts};
use crate::db;
use crate::error::{Error, Result};
use crate::execute::Executor;
use crate::execute::reports::ReportsContext;
use crate::governor::replica::Replicas;
use crate::governor::{Governor, GovernorOptions};
use crate::objects::{self, Compression, ObjectStore};
use crate::transport::{self, Consumer, Publisher, QueueConfig};
use crate::vocabulary::Kind;
use crate::worker::WorkerOptions;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What the command line gave, each value checked on its own.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL` (holds a password).
    pub database_url: Option<SecretString>,
    /// `QUEUE_URL` (may hold a password); unset: inline.
    pub queue_url: Option<SecretString>,
    /// The RabbitMQ work queue's name.
    pub queue: String,
    /// Deliveries of a failing batch before it is dead-lettered.
    pub delivery_limit: u32,
    /// Batches executed at once.
    pub concurrency: u16,
    /// After each batch, rest this many times its duration.
    pub rest_ratio: f64,
    /// Directory every report file must resolve under.
    pub reports_root: Option<PathBuf>,
    /// S3 bucket for archived reports.
    pub reports_bucket: Option<String>,
    /// Local directory for archived reports when no bucket is set.
    pub reports_archive_dir: PathBuf,
    /// Compression of archived reports.
    pub compression: Compression,
    /// Server-side limits on a batch's session.
    pub batch_timeouts: BatchTimeouts,
    /// The live-traffic governor's settings (its replicas come from
    /// `replica_urls`, resolved by [`App::new`]).
    pub governor: GovernorOptions,
    /// `--replica-url`s (may hold passwords).
    pub replica_urls: Vec<SecretString>,
}

/// The settings resolved: the database's connection options and the queue's
/// configuration parsed, and constructors for the rest.
pub struct App {
    /// Connection options for planning and operator sessions.
    pub database: PgConnectOptions,
    /// Where batches travel.
    pub queue: QueueConfig,
    settings: Settings,
    governor: Arc<Governor>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the connection options: their Debug shows the password.
        f.debug_struct("App")
            .field("database", &config::describe(&self.database))
            .field("queue", &self.queue)
            .field("settings", &self.settings)
            .finish()
    }
}

/// How long a command waits for the database at start before giving up.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

impl App {
    /// Parses `DATABASE_URL` (sessions named `application`) and then
    /// `QUEUE_URL`; each error names its setting and never shows a secret.
    pub fn new(settings: Settings, application: &str) -> Result<App> {
        let url = settings.database_url.as_ref().map(|u| u.expose_secret());
        let database = config::database_options(url, application)?;
        let queue = QueueConfig::parse(
            settings.queue_url.as_ref().map(|u| u.expose_secret()),
            &settings.queue,
            settings.delivery_limit,
        )?;
        let mut settings = settings;
        if !settings.replica_urls.is_empty() && settings.governor.max_replica_lag.is_none() {
            // Replicas given to be watched, and nothing to watch them for:
            // say so rather than run with the control silently off.
            return Err(Error::config(
                "ARCHIVER_REPLICA_URLS",
                "replicas are given but no lag limit: set ARCHIVER_MAX_REPLICA_LAG (--max-replica-lag) too",
            ));
        }
        settings.governor.replicas = Replicas::parse(&settings.replica_urls)?;
        Ok(App {
            database,
            queue,
            governor: Arc::new(Governor::new(settings.governor.clone())),
            settings,
        })
    }

    /// The settings as given.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A pool of `size` planning or operator sessions.
    pub async fn pool(&self, size: u32) -> Result<PgPool> {
        db::connect(&self.database, size, CONNECT_PATIENCE).await
    }

    /// [`App::pool`], refusing a database whose schema is not migrated.
    pub async fn migrated_pool(&self, size: u32) -> Result<PgPool> {
        let pool = self.pool(size).await?;
        db::check_migrated(&pool).await?;
        Ok(pool)
    }

    /// Planning sessions for a run that also executes batches: one per
    /// batch executed at once, and three for planning.
    pub fn planning_sessions(&self) -> u32 {
        u32::from(self.settings.concurrency) + 3
    }

    /// A pool of sessions that execute batches, with the batch timeouts,
    /// waiting up to `patience` for the database at start.
    pub async fn batch_pool(&self, size: u32, patience: Duration) -> Result<PgPool> {
        let opts = config::batch_options(&self.database, self.settings.batch_timeouts);
        db::connect(&opts, size, patience).await
    }

    /// The object store for archived reports: S3 when a bucket is set,
    /// otherwise the local directory.
    pub async fn object_store(&self) -> Result<Box<dyn ObjectStore>> {
        let s = &self.settings;
        let bucket = s.reports_bucket.as_deref().filter(|b| !b.is_empty());
        objects::open(bucket, &s.reports_archive_dir).await
    }

    /// An executor for batches run inline by the planner (no broker): on
    /// sessions of its own, with the batch timeouts, one per concurrent
    /// batch and one over (planning keeps its own pool).
    pub async fn inline_executor(&self) -> Result<Executor> {
        let concurrency = u32::from(self.settings.concurrency);
        let pool = self
            .batch_pool(concurrency + 1, Duration::from_secs(30))
            .await?;
        self.executor(&pool).await
    }

    /// What executing batches needs; reports only when `REPORTS_ROOT` is set.
    pub async fn executor(&self, pool: &PgPool) -> Result<Executor> {
        let Some(root) = &self.settings.reports_root else {
            return Ok(Executor {
                governor: self.governor(),
                deadline: self.settings.batch_timeouts.client_deadline(),
                ..Executor::from(pool)
            });
        };
        if !root.is_dir() {
            return Err(Error::config(
                "REPORTS_ROOT",
                format!("{} is not a directory", root.display()),
            ));
        }
        crate::schema::reports_root::check(root).map_err(|r| Error::config("REPORTS_ROOT", r))?;
        let ctx = ReportsContext {
            root: root.clone(),
            store: self.object_store().await?,
            compression: self.settings.compression,
        };
        Ok(Executor {
            pool: pool.clone(),
            reports: Some(Arc::new(ctx)),
            kinds: None,
            governor: self.governor(),
            chunks: Arc::default(),
            deadline: self.settings.batch_timeouts.client_deadline(),
        })
    }

    /// The live-traffic governor of this process's batches: one per
    /// process, so that every executor and the endpoint share its readings
    /// and its throttle counts.
    pub fn governor(&self) -> Arc<Governor> {
        self.governor.clone()
    }

    /// How the worker loop behaves.
    pub fn worker_options(&self) -> WorkerOptions {
        WorkerOptions {
            concurrency: self.settings.concurrency.into(),
            delivery_limit: self.settings.delivery_limit,
            rest_ratio: self.settings.rest_ratio,
            ..Default::default()
        }
    }

    /// A publisher to the broker; `None` with no broker (inline).
    pub async fn publisher(&self) -> Result<Option<Box<dyn Publisher>>> {
        transport::publisher(&self.queue).await
    }

    /// A consumer of the broker's work queue (an error with no broker).
    pub async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        transport::consumer(&self.queue, self.settings.concurrency).await
    }

    /// The kinds a worker serves (`kinds`; empty: every kind), checked
    /// against what the settings provide: a worker that would receive
    /// reports without `REPORTS_ROOT` refuses to start rather than decline
    /// every reports batch. `None`: every kind.
    pub fn served(&self, kinds: &[Kind]) -> Result<Option<Vec<Kind>>> {
        let reports_root = self.settings.reports_root.is_some();
        if kinds.is_empty() {
            if !reports_root {
                return Err(Error::config(
                    "REPORTS_ROOT",
                    "not set, and this worker would serve every kind: set REPORTS_ROOT (the directory report files live under), or name the kinds it serves with --kinds logs,metrics (ARCHIVER_KINDS)",
                ));
            }
            return Ok(None);
        }
        let mut kinds = kinds.to_vec();
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
