//! Benchmark (issue 2, item 9; issue 3): the archiver's throughput against
//! the in-database limit, and its impact on live inserts, in one run.
//!
//! Run it with `scripts/bench [--kind logs|metrics] [--rows N]` (brings up
//! the services first), or `cargo run --release -p archiver-bench --bin bench -- --help`
//! with `ARCHIVER_PG_ADMIN_URL` and `ARCHIVER_AMQP_URL` set.
//!
//! It (re)creates a scratch database, loads the data, keeps a pristine copy,
//! and before every measurement resets to identical state.
//!
//! - `--kind logs` (default): N log rows over 912 days (`bench/reset.sql`).
//!   It measures the one-statement move, a server-side loop of keyset
//!   batches, then the archiver inline and with 1 and 2 workers. Every run
//!   is checked: the archive holds exactly the eligible rows, column for
//!   column, and the hot table the rest.
//! - `--kind metrics`: N samples over 1095 days, 1,000 scenarios x 5 metric
//!   names (`bench/metrics_reset.sql`; `demo::load_metrics`, in arrival
//!   order, or random times with `--random-order`). It measures the one-statement
//!   `DELETE … RETURNING` + `INSERT … GROUP BY`
//!   (`bench/metrics_one_statement.sql`), then the archiver inline and with
//!   2 workers. Every run is checked: the archive equals one `GROUP BY` over
//!   the pristine samples older than the cut-off (`EXCEPT ALL` both ways),
//!   no eligible sample remains, and the younger ones are untouched.
//! - `--verify` (logs): the cost of `planner verify` against the archiving
//!   it checks, and the digest's overhead on the archive statement.
//!
//! The workers run over RabbitMQ in-process: each its own pool, consumer and
//! `worker::run` task, concurrency 1. A paced inserter on its own thread and
//! pool records insert latency into the hot table of the kind, idle and
//! during each run.

use anyhow::{Context, Result, bail, ensure};
use archiver::config::Policy;
use archiver::execute::Executor;
use archiver::governor::{Governor, GovernorOptions, Reason};
use archiver::plan::{self, PlanOptions};
use archiver::transport::Publisher;
use archiver::transport::amqp::{AmqpConfig, AmqpConsumer, AmqpPublisher};
use archiver::vocabulary::Kind;
use archiver::worker::{self, WorkerOptions};
use archiver::{db, demo, partitions};
use chrono::{DateTime, Utc};
use clap::Parser;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Row};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

const ONE_STATEMENT: &str = include_str!("../../move_one_statement.sql");
const BATCHED_PROC: &str = include_str!("../../move_batched.sql");
const RESET: &str = include_str!("../../reset.sql");
const LIVE_INSERT: &str = include_str!("../../live_insert.sql");
const METRICS_ONE_STATEMENT: &str = include_str!("../../metrics_one_statement.sql");
const METRICS_RESET: &str = include_str!("../../metrics_reset.sql");
const METRICS_LIVE_INSERT: &str = include_str!("../../metrics_live_insert.sql");
const METRICS_LOAD_RANDOM: &str = include_str!("../../metrics_load_random.sql");
/// The scenario of live rows (`bench/live_insert.sql`,
/// `bench/metrics_live_insert.sql`).
const LIVE_SCENARIO: &str = "00000000-0000-0000-0000-00000000ffff";
/// A job that finishes no batch for this long is stuck.
const STALL: Duration = Duration::from_secs(120);

/// What is archived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    /// `scenario_logs`: rows moved as they are.
    Logs,
    /// `scenario_metrics`: samples aggregated per group and UTC day.
    Metrics,
}

impl Target {
    fn kind(self) -> Kind {
        match self {
            Target::Logs => Kind::Logs,
            Target::Metrics => Kind::Metrics,
        }
    }

    fn default_rows(self) -> i64 {
        match self {
            Target::Logs => 1_000_000,
            Target::Metrics => 500_000,
        }
    }

    fn default_span_days(self) -> i64 {
        match self {
            Target::Logs => 912,
            Target::Metrics => 1095,
        }
    }

    fn methods(self) -> &'static [Method] {
        match self {
            Target::Logs => &[
                Method::OneStatement,
                Method::Batched,
                Method::Inline,
                Method::Workers(1),
                Method::Workers(2),
            ],
            Target::Metrics => &[Method::OneStatement, Method::Inline, Method::Workers(2)],
        }
    }

    fn reset_sql(self) -> &'static str {
        match self {
            Target::Logs => RESET,
            Target::Metrics => METRICS_RESET,
        }
    }

    /// Live inserts go to the hot table being archived.
    fn live_insert(self) -> &'static str {
        match self {
            Target::Logs => LIVE_INSERT,
            Target::Metrics => METRICS_LIVE_INSERT,
        }
    }

    fn hot_table(self) -> &'static str {
        match self {
            Target::Logs => "scenario_logs",
            Target::Metrics => "scenario_metrics",
        }
    }

    fn archive_table(self) -> &'static str {
        match self {
            Target::Logs => "scenario_logs_archive",
            Target::Metrics => "scenario_metrics_archive",
        }
    }

    /// What one unit moved is called in the table.
    fn unit(self) -> &'static str {
        match self {
            Target::Logs => "rows",
            Target::Metrics => "samples",
        }
    }
}

/// Archiver throughput vs the in-database limit, with live-insert latency.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// What to archive.
    #[arg(long, value_enum, default_value_t = Target::Logs)]
    kind: Target,
    /// Log rows or metric samples to load [default: 1000000 logs, 500000 metrics].
    #[arg(long)]
    rows: Option<i64>,
    /// Days back from now the data spans [default: 912 logs, 1095 metrics].
    #[arg(long)]
    span_days: Option<i64>,
    /// Metrics: load samples at random times (a heap in no order: every
    /// batch touches most pages) instead of arrival order
    /// (`demo::load_metrics`, as an append-only table's heap is).
    #[arg(long)]
    random_order: bool,
    /// Scenarios the rows spread over (metrics: each reports 5 metrics, so
    /// fewer scenarios make denser daily groups).
    #[arg(long, default_value_t = 1000)]
    scenarios: i64,
    /// Turn PostgreSQL's JIT off in the scratch database (every run, the
    /// limit included), to see what JIT compilation costs each statement.
    #[arg(long)]
    no_jit: bool,
    /// Rows per batch (archiver and server-side loop alike).
    #[arg(long, default_value_t = 5000)]
    batch_size: i64,
    /// Rounds of all the measurements.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Live inserts per second.
    #[arg(long, default_value_t = 200)]
    insert_rate: u32,
    /// Seconds of idle insert latency measured first.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Batches the inline executor runs at once (the planner's default).
    #[arg(long, default_value_t = 2)]
    inline_concurrency: u16,
    /// Also measure the inline executor resting this many times each
    /// batch's duration after it (ARCHIVER_REST_RATIO), as the line
    /// `archiver-inline-rest` (0: no such line).
    #[arg(long, default_value_t = 0.0)]
    rest_ratio: f64,
    /// Also measure the live-traffic governor: the inline executor flat out
    /// (`--chunk-time 0`, no controls: `archiver-inline-flat`), and with
    /// each of `--chunk-times` and the load and lag controls on
    /// (`archiver-chunk-<ms>ms`).
    #[arg(long)]
    governor: bool,
    /// Chunk times (milliseconds) of the governed lines.
    #[arg(long, value_delimiter = ',', default_value = "25,100,400")]
    chunk_times: Vec<u64>,
    /// Governed lines: slow down while a trivial statement's round trip is
    /// over this many times its idle baseline (0: off).
    #[arg(long, default_value_t = 2.0)]
    probe_factor: f64,
    /// Governed lines: wait while more than this many other sessions are
    /// active (0: off).
    #[arg(long, default_value_t = 4)]
    max_active_sessions: u32,
    /// Governed lines: wait while a streaming replica lags more than this
    /// many seconds (read from pg_stat_replication; 0: off).
    #[arg(long, default_value_t = 10)]
    max_replica_lag: u64,
    /// Also measure the 100 ms chunks with the load and lag controls and a
    /// WAL-rate limit of this many MB/s (`archiver-wal-<rate>MBps`; 0: no
    /// such line).
    #[arg(long, default_value_t = 0.0)]
    max_wal_rate: f64,
    /// Logs: the cost of `planner verify` instead of the usual table. Per
    /// round: the statement moving every eligible row as the archiver's is
    /// shaped, without and with the sum of the rows' digests (the digest's
    /// overhead on the archive path); then the archiver inline at its
    /// default settings, and `verify --kind logs` over what it archived
    /// (verify seconds / archive seconds: the target is at most 1).
    #[arg(long)]
    verify: bool,
    /// Scratch database (dropped and recreated).
    #[arg(long, default_value = "archiver_bench")]
    database: String,
    /// PostgreSQL URL of a user that may create databases.
    #[arg(long, env = "ARCHIVER_PG_ADMIN_URL", hide_env_values = true)]
    admin_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "ARCHIVER_AMQP_URL", hide_env_values = true)]
    amqp_url: String,
}

// ------------------------------------------------------------------ latency

/// Insert latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    fn of(mut ms: Vec<f64>) -> Latency {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = ((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len().max(1)) - 1;
            ms.get(i).copied().unwrap_or(f64::NAN)
        };
        Latency {
            n: ms.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: ms.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// A paced inserter on a thread and runtime of its own (so the archiver's
/// tasks cannot delay it), with its own pool of 2 connections. Latency is
/// measured from each insert's scheduled time, as `pgbench -R` does.
struct Inserter {
    stop: CancellationToken,
    thread: std::thread::JoinHandle<Result<Vec<f64>>>,
}

impl Inserter {
    async fn start(opts: PgConnectOptions, rate: u32, sql: &'static str) -> Result<Inserter> {
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(insert_loop(opts, rate, sql, token, ready_tx))
        });
        if ready_rx.await.is_err() {
            let e = thread
                .join()
                .map_err(|_| anyhow::anyhow!("inserter panicked"))?;
            return Err(e.err().unwrap_or_else(|| anyhow::anyhow!("inserter quit")));
        }
        Ok(Inserter { stop, thread })
    }

    fn stop(self) -> Result<Latency> {
        self.stop.cancel();
        let ms = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("inserter panicked"))??;
        Ok(Latency::of(ms))
    }
}

async fn insert_loop(
    opts: PgConnectOptions,
    rate: u32,
    sql: &'static str,
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<Vec<f64>> {
    let pool = PgPoolOptions::new()
        .min_connections(2)
        .max_connections(2)
        .connect_with(opts.application_name("archiver-bench-live"))
        .await?;
    // Open both connections and prepare the statement on each.
    let (a, b) = tokio::join!(
        sqlx::query(sql).execute(&pool),
        sqlx::query(sql).execute(&pool)
    );
    a?;
    b?;
    let _ = ready.send(());
    let samples = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let tracker = TaskTracker::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    loop {
        let at = tokio::select! {
            at = tick.tick() => at,
            _ = stop.cancelled() => break,
        };
        let (pool, samples, failures) = (pool.clone(), samples.clone(), failures.clone());
        tracker.spawn(async move {
            match sqlx::query(sql).execute(&pool).await {
                Ok(_) => lock(&samples).push(at.elapsed().as_secs_f64() * 1e3),
                Err(e) => lock(&failures).push(e.to_string()),
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    pool.close().await;
    if let Some(e) = lock(&failures).first() {
        bail!(
            "{} live insert(s) failed, first: {e}",
            lock(&failures).len()
        );
    }
    Ok(std::mem::take(&mut *lock(&samples)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The 1-minute load average.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Brackets the timed part of a run: load average, inserter, clock.
struct Probe {
    opts: PgConnectOptions,
    rate: u32,
    sql: &'static str,
    live: Option<(Inserter, Instant, f64)>,
    done: Option<(Duration, Latency, f64, f64)>,
}

impl Probe {
    fn new(opts: PgConnectOptions, rate: u32, sql: &'static str) -> Probe {
        Probe {
            opts,
            rate,
            sql,
            live: None,
            done: None,
        }
    }

    async fn start(&mut self) -> Result<()> {
        let load = loadavg();
        let inserter = Inserter::start(self.opts.clone(), self.rate, self.sql).await?;
        self.live = Some((inserter, Instant::now(), load));
        Ok(())
    }

    /// Seconds since the timed part started.
    fn elapsed(&self) -> f64 {
        self.live
            .as_ref()
            .map_or(f64::NAN, |(_, t0, _)| t0.elapsed().as_secs_f64())
    }

    fn finish(&mut self) -> Result<()> {
        let (inserter, t0, load0) = self.live.take().context("probe was not started")?;
        let secs = t0.elapsed();
        let lat = inserter.stop()?;
        self.done = Some((secs, lat, load0, loadavg()));
        Ok(())
    }
}

// ---------------------------------------------------------------- the runs

/// One printed line.
struct Line {
    round: u32,
    method: Method,
    moved: i64,
    /// Metrics: archive rows (groups) written.
    groups: Option<i64>,
    secs: f64,
    lat: Latency,
    load: (f64, f64),
    /// Checkpoints the server finished during the run.
    checkpoints: i64,
    /// WAL the server wrote during the run, bytes.
    wal: i64,
    /// Transactions committed in the database during the run.
    commits: i64,
    /// Seconds the governor waited, summed over executors.
    throttled: f64,
}

impl Line {
    fn rate(&self) -> f64 {
        self.moved as f64 / self.secs
    }
}

/// What a run moved: rows older than `cutoff`.
struct Moved {
    cutoff: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy)]
enum Method {
    OneStatement,
    Batched,
    /// Inline at the archiver's default settings.
    Inline,
    /// Inline, resting `--rest-ratio` × each batch's duration after it.
    InlineRested,
    /// Inline flat out: each batch one transaction, no controls.
    InlineFlat,
    /// Inline with this chunk time (ms) and the load and lag controls on.
    Governed(u64),
    /// [`Method::Governed`] at the default chunk time, with
    /// `--max-wal-rate` on too.
    WalCapped,
    Workers(usize),
}

impl Method {
    fn name(self) -> String {
        match self {
            Method::OneStatement => "limit-one-statement".into(),
            Method::Batched => "limit-batched".into(),
            Method::Inline => "archiver-inline".into(),
            Method::InlineRested => "archiver-inline-rest".into(),
            Method::InlineFlat => "archiver-inline-flat".into(),
            Method::Governed(ms) => format!("archiver-chunk-{ms}ms"),
            Method::WalCapped => "archiver-wal-capped".into(),
            Method::Workers(1) => "archiver-1-worker".into(),
            Method::Workers(_) => "archiver-2-workers".into(),
        }
    }

    fn is_limit(self) -> bool {
        matches!(self, Method::OneStatement | Method::Batched)
    }
}

struct Bench {
    args: Args,
    target: Target,
    span_days: i64,
    opts: PgConnectOptions,
    pool: PgPool,
    /// Rows (samples) loaded.
    total: i64,
}

impl Bench {
    /// A pool whose `max` connections are all open before the timed part,
    /// as the limit's one connection is: opening one (TLS included) takes
    /// tens of milliseconds here, a cost a long-running worker pays once.
    async fn connect(&self, max: u32) -> Result<PgPool> {
        let pool = db::connect(&self.opts, max, Duration::from_secs(30)).await?;
        let conns = futures::future::try_join_all((0..max).map(|_| pool.acquire())).await?;
        drop(conns);
        Ok(pool)
    }

    fn plan_options(&self, transport: &'static str) -> PlanOptions {
        PlanOptions {
            batch_size: self.args.batch_size,
            reports_batch_size: 20,
            reports_root: None,
            policy: Policy::default(),
            transport,
        }
    }

    /// The archiver's cut-off, by the database's clock: a dry run's (it
    /// changes nothing, and runs before the timed part).
    async fn cutoff(&self) -> Result<DateTime<Utc>> {
        let opts = self.plan_options("inline");
        Ok(plan::dry_run(&self.pool, self.target.kind(), &opts)
            .await?
            .cutoff)
    }

    async fn checkpoints(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT (checkpoints_timed + checkpoints_req)::bigint FROM pg_stat_bgwriter",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// The server's WAL position (bytes) and the scratch database's
    /// commits so far.
    async fn wal_and_commits(&self) -> Result<(i64, i64)> {
        let r = sqlx::query(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
                    (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((r.get(0), r.get(1)))
    }

    /// The governor of a governed line: chunk time `ms`, and the load and
    /// lag controls `--probe-factor`, `--max-active-sessions` and
    /// `--max-replica-lag` (those not 0).
    fn governed(&self, ms: u64) -> GovernorOptions {
        let a = &self.args;
        GovernorOptions {
            chunk_time: Duration::from_millis(ms),
            probe_factor: (a.probe_factor > 0.0).then_some(a.probe_factor),
            max_active_sessions: (a.max_active_sessions > 0).then_some(a.max_active_sessions),
            max_replica_lag: (a.max_replica_lag > 0)
                .then(|| Duration::from_secs(a.max_replica_lag)),
            ..GovernorOptions::default()
        }
    }

    async fn reset(&self) -> Result<()> {
        for stmt in statements(self.target.reset_sql()) {
            sqlx::raw_sql(AssertSqlSafe(stmt.to_string()))
                .execute(&self.pool)
                .await
                .with_context(|| format!("reset: {stmt}"))?;
        }
        Ok(())
    }

    async fn measure(&self, round: u32, method: Method) -> Result<Line> {
        self.reset().await?;
        let checkpoints = self.checkpoints().await?;
        let (wal0, commits0) = self.wal_and_commits().await?;
        let mut probe = Probe::new(
            self.opts.clone(),
            self.args.insert_rate,
            self.target.live_insert(),
        );
        let defaults = GovernorOptions::default;
        let flat = || GovernorOptions {
            chunk_time: Duration::ZERO,
            ..GovernorOptions::default()
        };
        let (moved, throttled) = match method {
            Method::OneStatement => (self.one_statement(&mut probe).await?, 0.0),
            Method::Batched => (self.batched(&mut probe).await?, 0.0),
            Method::Inline => self.inline(&mut probe, 0.0, defaults()).await?,
            Method::InlineRested => {
                self.inline(&mut probe, self.args.rest_ratio, defaults())
                    .await?
            }
            Method::InlineFlat => self.inline(&mut probe, 0.0, flat()).await?,
            Method::Governed(ms) => self.inline(&mut probe, 0.0, self.governed(ms)).await?,
            Method::WalCapped => {
                let capped = GovernorOptions {
                    max_wal_rate: Some(self.args.max_wal_rate * 1_000_000.0),
                    ..self.governed(100)
                };
                self.inline(&mut probe, 0.0, capped).await?
            }
            Method::Workers(n) => (self.workers(n, &mut probe).await?, 0.0),
        };
        let (secs, lat, load0, load1) = probe.done.context("run did not finish its probe")?;
        let checkpoints = self.checkpoints().await? - checkpoints;
        let (wal1, commits1) = self.wal_and_commits().await?;
        let (moved, groups) = match self.target {
            Target::Logs => (self.verify(method, moved.cutoff).await?, None),
            Target::Metrics => {
                let (samples, groups) = self.verify_metrics(method, moved.cutoff).await?;
                (samples, Some(groups))
            }
        };
        let line = Line {
            round,
            method,
            moved,
            groups,
            secs: secs.as_secs_f64(),
            lat,
            load: (load0, load1),
            checkpoints,
            wal: wal1 - wal0,
            commits: commits1 - commits0,
            throttled,
        };
        let unit = self.target.unit();
        eprintln!(
            "bench: {} moved {} {unit} in {:.2} s ({:.0} {unit}/s); insert p99 {:.1} ms",
            method.name(),
            line.moved,
            line.secs,
            line.rate(),
            lat.p99
        );
        Ok(line)
    }

    async fn one_statement(&self, probe: &mut Probe) -> Result<Moved> {
        let cutoff = self.cutoff().await?;
        let sql = match self.target {
            Target::Logs => ONE_STATEMENT,
            Target::Metrics => METRICS_ONE_STATEMENT,
        };
        let mut conn = self.pool.acquire().await?;
        probe.start().await?;
        sqlx::query(sql)
            .bind(cutoff)
            .bind(Uuid::new_v4())
            .execute(&mut *conn)
            .await?;
        probe.finish()?;
        Ok(Moved { cutoff })
    }

    async fn batched(&self, probe: &mut Probe) -> Result<Moved> {
        ensure!(
            self.target == Target::Logs,
            "the server-side batched loop is for logs only"
        );
        let cutoff = self.cutoff().await?;
        // Simple protocol: the procedure commits, so no implicit transaction.
        let call = format!(
            "CALL bench_move_batched({}, '{}')",
            self.args.batch_size,
            cutoff.to_rfc3339()
        );
        let mut conn = self.pool.acquire().await?;
        probe.start().await?;
        sqlx::raw_sql(AssertSqlSafe(call))
            .execute(&mut *conn)
            .await?;
        probe.finish()?;
        Ok(Moved { cutoff })
    }

    /// As the planner does with no broker (`worker::run_inline`), with
    /// this governor. Returns also the seconds it waited.
    async fn inline(
        &self,
        probe: &mut Probe,
        rest_ratio: f64,
        governor: GovernorOptions,
    ) -> Result<(Moved, f64)> {
        let c = self.args.inline_concurrency;
        let pool = self.connect(u32::from(c) + 3).await?;
        let governor = Arc::new(Governor::new(governor));
        let exec = Executor {
            governor: governor.clone(),
            ..Executor::from(&pool)
        };
        let wopts = WorkerOptions {
            concurrency: c.into(),
            rest_ratio,
            ..Default::default()
        };
        probe.start().await?;
        let opts = self.plan_options("inline");
        let ran = worker::run_inline(exec, wopts, async |publisher| {
            let planned = plan::plan(&pool, self.target.kind(), &opts, publisher).await?;
            Ok((planned, probe.elapsed()))
        })
        .await
        .context("planning and running inline")?;
        let (planned, plan_returned) = ran.fed;
        // The inline run returns once every batch is settled.
        self.wait_job(planned.job).await?;
        let done_seen = probe.elapsed();
        probe.finish()?;
        self.timeline(planned.job, plan_returned, done_seen).await?;
        ensure!(
            ran.dead.is_empty(),
            "{} inline batch(es) dead-lettered",
            ran.dead.len()
        );
        pool.close().await;
        let waited: Vec<String> = Reason::ALL
            .iter()
            .filter(|r| governor.throttled.waits(**r) > 0)
            .map(|r| {
                format!(
                    "{} {:.2} s ({} waits)",
                    r.as_str(),
                    governor.throttled.seconds(*r),
                    governor.throttled.waits(*r)
                )
            })
            .collect();
        if !waited.is_empty() {
            eprintln!("bench: governor waited: {}", waited.join(", "));
        }
        let throttled = Reason::ALL
            .iter()
            .map(|r| governor.throttled.seconds(*r))
            .sum();
        Ok((
            Moved {
                cutoff: planned.cutoff,
            },
            throttled,
        ))
    }

    /// The planner publishing to RabbitMQ, `n` workers consuming.
    async fn workers(&self, n: usize, probe: &mut Probe) -> Result<Moved> {
        let cfg = AmqpConfig {
            url: self.args.amqp_url.clone().into(),
            queue: format!("bench.{}", Uuid::new_v4()),
            delivery_limit: 5,
        };
        let broker = Broker::open(&cfg).await?;
        let stop = CancellationToken::new();
        let mut fleet = Vec::new();
        for _ in 0..n {
            fleet.push(self.spawn_worker(cfg.clone(), stop.clone()).await?);
        }
        broker.await_consumers(&cfg.queue, n).await?;
        let pool = self.connect(3).await?;
        probe.start().await?;
        let publisher = AmqpPublisher::connect(cfg.clone()).await?;
        let planned = plan::plan(
            &pool,
            self.target.kind(),
            &self.plan_options("amqp"),
            &publisher,
        )
        .await
        .context("planning")?;
        publisher.close().await?;
        let plan_returned = probe.elapsed();
        self.wait_job(planned.job).await?;
        let done_seen = probe.elapsed();
        probe.finish()?;
        self.timeline(planned.job, plan_returned, done_seen).await?;
        stop.cancel();
        let mut shares = Vec::new();
        for w in fleet {
            shares.push(w.await??);
        }
        eprintln!("bench: batches per worker: {shares:?}");
        broker.remove(&cfg).await?;
        pool.close().await;
        Ok(Moved {
            cutoff: planned.cutoff,
        })
    }

    /// One worker: its own pool and consumer, concurrency 1. Returns the
    /// batches it did.
    async fn spawn_worker(
        &self,
        cfg: AmqpConfig,
        stop: CancellationToken,
    ) -> Result<JoinHandle<Result<u64>>> {
        let pool = self.connect(3).await?;
        let wopts = WorkerOptions {
            concurrency: 1,
            delivery_limit: cfg.delivery_limit,
            ..Default::default()
        };
        let mut consumer = AmqpConsumer::new(cfg, 1);
        Ok(tokio::spawn(async move {
            let stats = worker::run(&pool, &mut consumer, wopts, stop).await;
            consumer.close().await;
            pool.close().await;
            let stats = stats?;
            let (dead, retried) = (
                stats.dead_lettered.load(Ordering::Relaxed),
                stats.retried.load(Ordering::Relaxed),
            );
            ensure!(
                dead + retried == 0,
                "worker: {dead} dead-lettered, {retried} retried"
            );
            Ok(stats.done.load(Ordering::Relaxed))
        }))
    }

    /// Polls the job every 10 ms until it completes; fails if it fails or stalls.
    async fn wait_job(&self, job: Uuid) -> Result<()> {
        let (mut last, mut since) = (-1, Instant::now());
        loop {
            let r = sqlx::query(
                "SELECT status, batches_done, error_message FROM archive_jobs WHERE id = $1",
            )
            .bind(job)
            .fetch_one(&self.pool)
            .await?;
            let (status, done): (String, i32) = (r.get(0), r.get(1));
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" => bail!("job {job} failed: {:?}", r.get::<Option<String>, _>(2)),
                _ => {}
            }
            if done != last {
                (last, since) = (done, Instant::now());
            }
            ensure!(
                since.elapsed() < STALL,
                "job {job} stalled at {done} batches"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Where a job's time went, from the ledger, and when the bench saw
    /// `plan()` return and the job done, by the run's clock (to stderr).
    async fn timeline(&self, job: Uuid, plan_returned: f64, done_seen: f64) -> Result<()> {
        let r = sqlx::query(
            "SELECT extract(epoch FROM max(b.published_at) - j.started_at)::float8,
                    extract(epoch FROM min(b.completed_at) - j.started_at)::float8,
                    extract(epoch FROM j.completed_at - max(b.published_at))::float8,
                    count(*),
                    extract(epoch FROM j.completed_at - j.started_at)::float8
             FROM archive_jobs j JOIN archive_batches b ON b.job_id = j.id
             WHERE j.id = $1 GROUP BY j.id",
        )
        .bind(job)
        .fetch_one(&self.pool)
        .await?;
        let secs = |i: usize| r.get::<Option<f64>, _>(i).unwrap_or(f64::NAN);
        eprintln!(
            "bench: {} batches; planning took {:.2} s, first batch done at {:.2} s, \
             last batch published → job done {:.2} s; job start → done {:.2} s; \
             run clock: plan() returned at {plan_returned:.2} s, job seen done at {done_seen:.2} s",
            r.get::<i64, _>(3),
            secs(0),
            secs(1),
            secs(2),
            secs(4)
        );
        Ok(())
    }

    /// Moves every eligible row in one statement shaped as the archiver's
    /// chunk statement (`execute::logs`: it returns the rows' count and
    /// bytes), with `digest` also the sum of their digests
    /// (`schema::LOGS_ROW_DIGEST`), from a reset table, rows older than
    /// `cutoff`. Returns the rows
    /// moved and the seconds the statement took.
    async fn one_statement_counted(
        &self,
        cutoff: DateTime<Utc>,
        digest: bool,
    ) -> Result<(i64, f64)> {
        self.reset().await?;
        let (returning, sum) = match digest {
            true => (
                format!(", {} AS digest", archiver::schema::LOGS_ROW_DIGEST),
                ", COALESCE(sum(digest), 0)::text AS digest",
            ),
            false => (String::new(), ""),
        };
        let sql = format!(
            "WITH moved AS (
                 DELETE FROM scenario_logs WHERE received_at < $1
                 RETURNING id, scenario_id, received_at, message_hash, message_preview, source,
                           size_bytes, has_pii, token_count, sqs_blocks
             ), ins AS (
                 INSERT INTO scenario_logs_archive (id, scenario_id, received_at, message_hash,
                     message_preview, source, size_bytes, has_pii, token_count, sqs_blocks,
                     archived_at, archive_batch_id)
                 SELECT id, scenario_id, received_at, message_hash, message_preview, source,
                        size_bytes, has_pii, token_count, sqs_blocks, now(), $2
                 FROM moved
                 RETURNING size_bytes{returning}
             )
             SELECT count(*) AS n, COALESCE(sum(size_bytes), 0)::bigint AS bytes{sum} FROM ins"
        );
        let mut conn = self.pool.acquire().await?;
        let t = Instant::now();
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(cutoff)
            .bind(Uuid::new_v4())
            .fetch_one(&mut *conn)
            .await?;
        let secs = t.elapsed().as_secs_f64();
        Ok((row.get("n"), secs))
    }

    /// Checks the archive holds exactly the rows older than `cutoff`, every
    /// column equal to the pristine copy, and the hot table the rest.
    /// Returns the rows moved.
    async fn verify(&self, method: Method, cutoff: DateTime<Utc>) -> Result<i64> {
        let r = sqlx::query(
            "SELECT
               (SELECT count(*) FROM logs_pristine WHERE received_at < $1) AS eligible,
               (SELECT count(*) FROM scenario_logs_archive) AS archived,
               (SELECT count(*) FROM scenario_logs_archive
                 WHERE received_at >= $1 OR archived_at IS NULL OR archive_batch_id IS NULL) AS bad,
               (SELECT count(*) FROM scenario_logs_archive a WHERE NOT EXISTS (
                   SELECT 1 FROM logs_pristine p
                    WHERE p.id = a.id AND p.scenario_id = a.scenario_id
                      AND p.received_at = a.received_at AND p.message_hash = a.message_hash
                      AND p.message_preview = a.message_preview AND p.source = a.source
                      AND p.size_bytes = a.size_bytes AND p.has_pii = a.has_pii
                      AND p.token_count = a.token_count AND p.sqs_blocks = a.sqs_blocks)) AS changed,
               (SELECT count(*) FROM scenario_logs WHERE scenario_id <> $2::uuid) AS hot,
               (SELECT count(*) FROM scenario_logs WHERE received_at < $1) AS hot_old",
        )
        .bind(cutoff)
        .bind(LIVE_SCENARIO)
        .fetch_one(&self.pool)
        .await?;
        let get = |c: &str| r.get::<i64, _>(c);
        let (eligible, archived) = (get("eligible"), get("archived"));
        let problems = [
            (archived != eligible, "archive rows != eligible rows"),
            (get("bad") != 0, "archive rows too young or unstamped"),
            (
                get("changed") != 0,
                "archive rows differing from the originals",
            ),
            (
                get("hot") != self.total - eligible,
                "hot rows != total - eligible",
            ),
            (get("hot_old") != 0, "eligible rows left in the hot table"),
        ];
        for (failed, what) in problems {
            if failed {
                bail!(
                    "{}: CHECK FAILED: {what} (eligible {eligible}, archived {archived}, bad {}, changed {}, hot {}, hot_old {}, total {})",
                    method.name(),
                    get("bad"),
                    get("changed"),
                    get("hot"),
                    get("hot_old"),
                    self.total
                );
            }
        }
        Ok(archived)
    }

    /// Checks the archive equals one `GROUP BY` over the pristine samples
    /// older than `cutoff` (deterministic id, average rounded to 6 places,
    /// count, sum, min, max), compared with `EXCEPT ALL` both ways; that
    /// every archive row is a stamped daily aggregate; that no eligible
    /// sample is left; and that the younger samples are exactly the pristine
    /// ones. Returns the samples moved and the groups (archive rows).
    async fn verify_metrics(&self, method: Method, cutoff: DateTime<Utc>) -> Result<(i64, i64)> {
        let r = sqlx::query(
            "WITH expected AS (
                 SELECT md5(concat_ws('|', scenario_id, metric_type, metric_name, unit,
                                      to_char(day, 'YYYY-MM-DD')))::uuid AS id,
                        scenario_id, day AT TIME ZONE 'UTC' AS ts, metric_type, metric_name, unit,
                        round(avg(value), 6) AS value, count(*) AS n, sum(value) AS s,
                        min(value) AS mn, max(value) AS mx
                 FROM (SELECT *, date_trunc('day', \"timestamp\" AT TIME ZONE 'UTC') AS day
                       FROM metrics_pristine WHERE \"timestamp\" < $1) p
                 GROUP BY scenario_id, metric_type, metric_name, unit, day
             ), actual AS (
                 SELECT id, scenario_id, \"timestamp\" AS ts, metric_type, metric_name, unit,
                        value, sample_count::bigint AS n, value_sum AS s,
                        value_min AS mn, value_max AS mx
                 FROM scenario_metrics_archive
             )
             SELECT
               (SELECT count(*) FROM metrics_pristine WHERE \"timestamp\" < $1) AS eligible,
               (SELECT count(*) FROM expected) AS groups,
               (SELECT count(*) FROM actual) AS archived,
               (SELECT COALESCE(sum(n), 0)::bigint FROM actual) AS archived_samples,
               (SELECT count(*) FROM (SELECT * FROM expected EXCEPT ALL SELECT * FROM actual) x) AS missing,
               (SELECT count(*) FROM (SELECT * FROM actual EXCEPT ALL SELECT * FROM expected) x) AS extra,
               (SELECT count(*) FROM scenario_metrics_archive
                 WHERE \"timestamp\" >= $1 OR NOT is_aggregated
                    OR aggregation_period IS DISTINCT FROM 'day'
                    OR archived_at IS NULL OR archive_batch_id IS NULL) AS bad,
               (SELECT count(*) FROM scenario_metrics WHERE \"timestamp\" < $1) AS hot_old,
               (SELECT count(*) FROM scenario_metrics WHERE scenario_id <> $2::uuid) AS hot,
               (SELECT count(*) FROM (
                   SELECT * FROM metrics_pristine WHERE \"timestamp\" >= $1
                   EXCEPT ALL
                   SELECT * FROM scenario_metrics WHERE scenario_id <> $2::uuid) x) AS young_changed",
        )
        .bind(cutoff)
        .bind(LIVE_SCENARIO)
        .fetch_one(&self.pool)
        .await?;
        let get = |c: &str| r.get::<i64, _>(c);
        let (eligible, groups, archived) = (get("eligible"), get("groups"), get("archived"));
        let problems = [
            (eligible == 0, "no eligible samples: nothing was measured"),
            (archived != groups, "archive rows != groups"),
            (
                get("archived_samples") != eligible,
                "samples in the archive != eligible samples",
            ),
            (
                get("missing") != 0,
                "GROUP BY rows missing from the archive",
            ),
            (
                get("extra") != 0,
                "archive rows differing from the GROUP BY",
            ),
            (
                get("bad") != 0,
                "archive rows too young, unstamped or not daily aggregates",
            ),
            (
                get("hot_old") != 0,
                "eligible samples left in the hot table",
            ),
            (
                get("hot") != self.total - eligible,
                "hot samples != total - eligible",
            ),
            (
                get("young_changed") != 0,
                "younger samples changed or missing",
            ),
        ];
        for (failed, what) in problems {
            if failed {
                bail!(
                    "{}: CHECK FAILED: {what} (eligible {eligible}, groups {groups}, archived {archived}, \
                     archived samples {}, missing {}, extra {}, bad {}, hot_old {}, hot {}, \
                     young_changed {}, total {})",
                    method.name(),
                    get("archived_samples"),
                    get("missing"),
                    get("extra"),
                    get("bad"),
                    get("hot_old"),
                    get("hot"),
                    get("young_changed"),
                    self.total
                );
            }
        }
        Ok((eligible, groups))
    }
}

/// Splits a file of statements that each end in `;` at the end of a line.
fn statements(sql: &str) -> Vec<String> {
    let body: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    body.split(";\n")
        .map(|s| s.trim().trim_end_matches(';').trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

// ------------------------------------------------------------------ broker

/// A bench-side broker channel: waits for consumers, removes the topology.
struct Broker {
    conn: Connection,
    channel: Channel,
}

impl Broker {
    async fn open(cfg: &AmqpConfig) -> Result<Broker> {
        let conn =
            Connection::connect(cfg.url.expose_secret(), ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        // The topology, declared as the planner's publisher declares it,
        // before any worker consumes.
        AmqpPublisher::connect(cfg.clone()).await?.close().await?;
        Ok(Broker { conn, channel })
    }

    async fn await_consumers(&self, queue: &str, n: usize) -> Result<()> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        for _ in 0..200 {
            let q = self
                .channel
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await?;
            if q.consumer_count() as usize >= n {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{n} worker(s) did not start consuming {queue} within 10 s")
    }

    /// Deletes the run's queues; fails if a message was left or dead-lettered.
    async fn remove(self, cfg: &AmqpConfig) -> Result<()> {
        let left = self
            .channel
            .queue_delete(cfg.queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        let dead = self
            .channel
            .queue_delete(cfg.dead_queue().into(), QueueDeleteOptions::default())
            .await?;
        self.channel
            .exchange_delete(cfg.dlx().into(), ExchangeDeleteOptions::default())
            .await?;
        let _ = self.conn.close(200, "done".into()).await;
        ensure!(
            left == 0 && dead == 0,
            "{}: {left} message(s) left in the queue, {dead} dead-lettered",
            cfg.queue
        );
        Ok(())
    }
}

// -------------------------------------------------------------------- setup

async fn create_database(args: &Args) -> Result<PgConnectOptions> {
    let settings: Vec<String> = if args.no_jit {
        vec![format!("ALTER DATABASE {} SET jit = off", args.database)]
    } else {
        Vec::new()
    };
    archiver_bench::recreate_database(&args.admin_url, &args.database, "archiver-bench", &settings)
        .await
}

/// Schema, data, pristine copy, the procedure (logs), every archive
/// partition (so no run pays for DDL).
async fn prepare(args: Args) -> Result<Bench> {
    let t = Instant::now();
    let target = args.kind;
    let rows = args.rows.unwrap_or(target.default_rows());
    let span_days = args.span_days.unwrap_or(target.default_span_days());
    let opts = create_database(&args).await?;
    let pool = db::connect(&opts, 4, Duration::from_secs(30)).await?;
    db::migrate(&pool).await?;
    let setup: &[&str] = match target {
        Target::Logs => {
            demo::load_logs(&pool, rows, args.scenarios, span_days).await?;
            &[
                "CREATE UNLOGGED TABLE logs_pristine AS SELECT * FROM scenario_logs",
                "ANALYZE logs_pristine",
                BATCHED_PROC,
            ]
        }
        Target::Metrics => {
            if args.random_order {
                sqlx::query(METRICS_LOAD_RANDOM)
                    .bind(rows)
                    .bind(args.scenarios)
                    .bind(span_days)
                    .execute(&pool)
                    .await?;
            } else {
                demo::load_metrics(&pool, rows, args.scenarios, span_days).await?;
            }
            &[
                "CREATE UNLOGGED TABLE metrics_pristine AS SELECT * FROM scenario_metrics",
                "ANALYZE metrics_pristine",
            ]
        }
    };
    for sql in setup {
        sqlx::raw_sql(AssertSqlSafe(*sql)).execute(&pool).await?;
    }
    let now = Utc::now();
    partitions::ensure_months(
        &pool,
        target.archive_table(),
        now - chrono::Duration::days(span_days + 1),
        now,
    )
    .await?;
    let total: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        target.hot_table()
    )))
    .fetch_one(&pool)
    .await?;
    eprintln!(
        "bench: loaded {total} {} into {} in {:.1} s",
        target.unit(),
        args.database,
        t.elapsed().as_secs_f64()
    );
    Ok(Bench {
        args,
        target,
        span_days,
        opts,
        pool,
        total,
    })
}

async fn idle_latency(bench: &Bench) -> Result<Latency> {
    bench.reset().await?;
    let inserter = Inserter::start(
        bench.opts.clone(),
        bench.args.insert_rate,
        bench.target.live_insert(),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(bench.args.idle_secs)).await;
    inserter.stop()
}

// ------------------------------------------------------------------- report

async fn print_header(bench: &Bench, idle: &Latency) -> Result<()> {
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&bench.pool)
        .await?;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let a = &bench.args;
    match bench.target {
        Target::Logs => println!(
            "nproc {nproc} · PostgreSQL {version} · {} rows over {} days, {} scenarios · batch {} · inline concurrency {} · live inserts {}/s",
            bench.total,
            bench.span_days,
            a.scenarios,
            a.batch_size,
            a.inline_concurrency,
            a.insert_rate
        ),
        Target::Metrics => println!(
            "nproc {nproc} · PostgreSQL {version} · metrics: {} samples over {} days ({}), {} scenarios x 5 metric names · cut-off 730 days (whole UTC days) · batch {} · inline concurrency {} · live inserts {}/s into scenario_metrics",
            bench.total,
            bench.span_days,
            if a.random_order {
                "random times"
            } else {
                "arrival order"
            },
            a.scenarios,
            a.batch_size,
            a.inline_concurrency,
            a.insert_rate
        ),
    }
    if a.no_jit {
        println!("--no-jit: jit = off in {} (every run)", a.database);
    }
    println!(
        "idle insert latency ({} inserts over {} s): p50 {:.2} ms · p99 {:.2} ms · max {:.2} ms",
        idle.n, a.idle_secs, idle.p50, idle.p99, idle.max
    );
    Ok(())
}

/// The table: per line, what it moved (metrics: samples and the archive
/// rows, groups, written) and the columns every target shares.
fn print_table(target: Target, lines: &[Line], idle: &Latency) {
    let head = match target {
        Target::Logs => format!(
            "{:<3} {:<21} {:>10} {:>8} {:>9}",
            "#", "run", "rows", "seconds", "rows/s"
        ),
        Target::Metrics => format!(
            "{:<3} {:<21} {:>9} {:>8} {:>8} {:>10}",
            "#", "run", "samples", "groups", "seconds", "samples/s"
        ),
    };
    println!(
        "{head} {:>8} {:>22} {:>10} {:>10} {:>14} {:>5} {:>7} {:>9} {:>7}",
        "x limit",
        "insert p50/p99/max ms",
        "p50 x idle",
        "p99 x idle",
        "load1m start>end",
        "ckpts",
        "WAL MB",
        "WAL/commit",
        "wait s"
    );
    for l in lines {
        let (round, name) = (l.round, l.method.name());
        let moved = match target {
            Target::Logs => format!(
                "{round:<3} {name:<21} {:>10} {:>8.2} {:>9.0}",
                l.moved,
                l.secs,
                l.rate()
            ),
            Target::Metrics => format!(
                "{round:<3} {name:<21} {:>9} {:>8} {:>8.2} {:>10.0}",
                l.moved,
                l.groups.unwrap_or(0),
                l.secs,
                l.rate()
            ),
        };
        // Against the fastest limit line of the same round.
        let limit = lines
            .iter()
            .filter(|o| o.round == l.round && o.method.is_limit())
            .map(Line::rate)
            .fold(f64::NAN, f64::max);
        println!(
            "{moved} {:>8.2} {:>22} {:>10.2} {:>10.2} {:>14} {:>5} {:>7.0} {:>9} {:>7.1}",
            l.rate() / limit,
            format!("{:.1}/{:.1}/{:.1}", l.lat.p50, l.lat.p99, l.lat.max),
            l.lat.p50 / idle.p50,
            l.lat.p99 / idle.p99,
            format!("{:.2}>{:.2}", l.load.0, l.load.1),
            l.checkpoints,
            l.wal as f64 / 1e6,
            per_commit(l),
            l.throttled,
        );
    }
}

/// WAL written per commit during a run, in kB.
fn per_commit(l: &Line) -> String {
    if l.commits <= 0 {
        return "-".into();
    }
    format!("{:.1} kB", l.wal as f64 / l.commits as f64 / 1e3)
}

/// `--verify`: per round, the digest's overhead on one statement moving
/// every eligible row, then the archiver inline and `verify --kind logs`
/// over what it archived.
async fn verify_cost(bench: &Bench) -> Result<()> {
    let mut rows = Vec::new();
    for round in 1..=bench.args.repeat {
        // One cut-off for both, so that they move the same rows.
        let cutoff = bench.cutoff().await?;
        let (n0, plain) = bench.one_statement_counted(cutoff, false).await?;
        let (n1, digest) = bench.one_statement_counted(cutoff, true).await?;
        ensure!(n0 == n1, "the two statements moved {n0} and {n1} rows");
        eprintln!(
            "bench: one statement moved {n0} rows in {plain:.2} s, {digest:.2} s with the digest"
        );
        let line = bench.measure(round, Method::Inline).await?;
        let sel = archiver::ledger::Selection {
            kinds: vec![Kind::Logs],
            ..Default::default()
        };
        let t = Instant::now();
        let report = archiver::verify::verify(&bench.pool, &sel, false, None).await?;
        let verify = t.elapsed().as_secs_f64();
        let s = &report.summary;
        ensure!(
            s.ok && s.rows == line.moved && s.mismatches == 0,
            "verify: {} mismatch(es), {} rows found, {} archived",
            s.mismatches,
            s.rows,
            line.moved
        );
        eprintln!(
            "bench: verify checked {} batches, {} rows in {verify:.2} s",
            s.batches, s.rows
        );
        rows.push((round, line, s.batches, verify, n0, plain, digest));
    }
    println!(
        "verify cost · {} log rows over {} days · batch {} · inline concurrency {} · live inserts {}/s during archiving",
        bench.total,
        bench.span_days,
        bench.args.batch_size,
        bench.args.inline_concurrency,
        bench.args.insert_rate
    );
    println!(
        "{:<3} {:>10} {:>8} {:>10} {:>9} {:>14} {:>13} {:>13} {:>16}",
        "#",
        "rows",
        "batches",
        "archive s",
        "verify s",
        "verify/archive",
        "1 stmt s",
        "+digest s",
        "digest overhead"
    );
    for (round, line, batches, verify, _, plain, digest) in rows {
        println!(
            "{round:<3} {:>10} {batches:>8} {:>10.2} {verify:>9.2} {:>14.2} {plain:>13.2} {digest:>13.2} {:>15.1}%",
            line.moved,
            line.secs,
            verify / line.secs,
            (digest / plain - 1.0) * 100.0
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    archiver_bench::init_logging("warn,sqlx::query=error");
    let args = Args::parse();
    ensure!(
        args.rows.is_none_or(|n| n > 0)
            && args.span_days.is_none_or(|n| n > 0)
            && args.batch_size > 0
            && args.repeat > 0,
        "--rows, --span-days, --batch-size and --repeat must be positive"
    );
    ensure!(args.scenarios > 0, "--scenarios must be positive");
    ensure!(
        (0.0..=100.0).contains(&args.rest_ratio),
        "--rest-ratio must be from 0 to 100"
    );
    ensure!(
        args.chunk_times
            .iter()
            .all(|&ms| (1..=60_000).contains(&ms)),
        "--chunk-times must be milliseconds from 1 to 60000"
    );
    ensure!(
        args.probe_factor == 0.0 || (1.1..=1000.0).contains(&args.probe_factor),
        "--probe-factor must be 0 (off) or from 1.1 to 1000"
    );
    ensure!(
        (0.0..=100_000.0).contains(&args.max_wal_rate),
        "--max-wal-rate must be from 0 (off) to 100000 MB/s"
    );
    ensure!(
        !args.random_order || args.kind == Target::Metrics,
        "--random-order is for --kind metrics"
    );
    ensure!(
        !args.verify || args.kind == Target::Logs,
        "--verify is for --kind logs"
    );
    let bench = prepare(args).await?;
    if bench.args.verify {
        return verify_cost(&bench).await;
    }
    let idle = idle_latency(&bench).await?;
    let mut lines = Vec::new();
    for round in 1..=bench.args.repeat {
        for &method in bench.target.methods() {
            lines.push(bench.measure(round, method).await?);
            if matches!(method, Method::Inline) && bench.args.rest_ratio > 0.0 {
                lines.push(bench.measure(round, Method::InlineRested).await?);
            }
            if matches!(method, Method::Inline) && bench.args.governor {
                lines.push(bench.measure(round, Method::InlineFlat).await?);
                for &ms in &bench.args.chunk_times {
                    lines.push(bench.measure(round, Method::Governed(ms)).await?);
                }
                if bench.args.max_wal_rate > 0.0 {
                    lines.push(bench.measure(round, Method::WalCapped).await?);
                }
            }
        }
    }
    print_header(&bench, &idle).await?;
    print_table(bench.target, &lines, &idle);
    Ok(())
}
