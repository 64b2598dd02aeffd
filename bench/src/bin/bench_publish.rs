//! Benchmark (issue 5, throughput): how fast the planner records and
//! publishes a job of many batches, next to how fast it cuts them, so an
//! operator sees whether publishing is the bottleneck.
//!
//! Run it with `scripts/bench-publish [--batches N] [--batch-size N]`
//! (brings up the services first), or `cargo run --release -p
//! archiver-bench --bin bench_publish -- --help` with `ARCHIVER_PG_ADMIN_URL`,
//! `ARCHIVER_AMQP_URL` and `ARCHIVER_S3_ENDPOINT` (moto serves SQS there)
//! set.
//!
//! It (re)creates a scratch database, loads `batches × batch-size` log rows,
//! every one older than the logs policy, and plans one logs job per method,
//! starting each from an empty ledger:
//!
//! - `cut-only`: the planner's keyset walk alone (nothing recorded), as a
//!   copy of its statements ([`Bench::cut_only`]);
//! - `record-only`: cut and record in the ledger, with a publisher that
//!   accepts every message at once (no broker);
//! - `rabbitmq`: cut, record, publish with confirms to a fresh quorum queue;
//! - `sqs`: cut, record, publish to a fresh SQS queue (moto on loopback).
//!
//! Every run is checked: the ledger holds exactly the expected batches, each
//! marked published (except `cut-only`, which records none), and the queue
//! holds exactly one message per batch. Queues are deleted afterwards.

use anyhow::{Context, Result, ensure};
use archiver::config::Policy;
use archiver::plan::{self, PlanOptions};
use archiver::transport::amqp::{AmqpConfig, AmqpPublisher};
use archiver::transport::sqs::{QueueUrls, SqsConfig, SqsPublisher, ensure_queues};
use archiver::transport::{BatchMessage, Publisher};
use archiver::vocabulary::Kind;
use archiver::{db, demo, partitions};
use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::QueueAttributeName;
use chrono::{DateTime, Utc};
use clap::Parser;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Planner publishing throughput: cut, record, RabbitMQ, SQS.
#[derive(Debug, Parser)]
#[command(name = "bench_publish")]
struct Args {
    /// Batches in the job.
    #[arg(long, default_value_t = 100_000)]
    batches: i64,
    /// Log rows per batch (the job loads batches × batch-size rows).
    #[arg(long, default_value_t = 1)]
    batch_size: i64,
    /// Rounds of all the measurements.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Skip RabbitMQ.
    #[arg(long)]
    no_amqp: bool,
    /// Skip SQS.
    #[arg(long)]
    no_sqs: bool,
    /// Batches of the SQS run: the same rows cut into fewer, larger batches
    /// (an SQS emulator such as moto slows down as its queue grows, and
    /// becomes the bottleneck long before 100,000 messages).
    #[arg(long, default_value_t = 2_000)]
    sqs_batches: i64,
    /// Database connections of the planner (the CLI's default: concurrency 2 + 3).
    #[arg(long, default_value_t = 5)]
    connections: u32,
    /// Scratch database (dropped and recreated).
    #[arg(long, default_value = "archiver_bench_publish")]
    database: String,
    /// PostgreSQL URL of a user that may create databases.
    #[arg(long, env = "ARCHIVER_PG_ADMIN_URL", hide_env_values = true)]
    admin_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "ARCHIVER_AMQP_URL", hide_env_values = true)]
    amqp_url: String,
    /// Endpoint of the SQS-protocol server (moto serves S3 and SQS on one port).
    #[arg(long, env = "ARCHIVER_S3_ENDPOINT")]
    sqs_endpoint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    CutOnly,
    RecordOnly,
    Amqp,
    Sqs,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::CutOnly => "cut-only",
            Method::RecordOnly => "record-only",
            Method::Amqp => "rabbitmq",
            Method::Sqs => "sqs",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Method::CutOnly => "keyset walk, nothing recorded",
            Method::RecordOnly => "cut + ledger inserts + mark_published",
            Method::Amqp => "cut + record + publish (confirms) + mark",
            Method::Sqs => "cut + record + SendMessageBatch + mark",
        }
    }
}

/// Accepts every message at once: what planning costs without a broker.
struct NullPublisher;

#[async_trait]
impl Publisher for NullPublisher {
    async fn publish(&self, _messages: &[BatchMessage]) -> archiver::Result<()> {
        Ok(())
    }
    async fn close(&self) -> archiver::Result<()> {
        Ok(())
    }
}

struct Line {
    round: u32,
    method: Method,
    batches: usize,
    secs: f64,
}

impl Line {
    fn rate(&self) -> f64 {
        self.batches as f64 / self.secs
    }
}

struct Bench {
    args: Args,
    pool: PgPool,
    sqs: Client,
}

impl Bench {
    /// Batches a method's job has.
    fn batches(&self, method: Method) -> i64 {
        match method {
            Method::Sqs => self.args.sqs_batches.min(self.args.batches),
            _ => self.args.batches,
        }
    }

    /// Rows per batch for a method's job.
    fn batch_size(&self, method: Method) -> i64 {
        let rows = self.args.batches * self.args.batch_size;
        let n = self.batches(method);
        (rows + n - 1) / n
    }

    fn plan_options(&self, method: Method, transport: &'static str) -> PlanOptions {
        PlanOptions {
            batch_size: self.batch_size(method),
            reports_batch_size: 20,
            reports_root: None,
            policy: Policy::default(),
            transport,
        }
    }

    /// An empty ledger, so every run plans the whole job.
    async fn reset(&self) -> Result<()> {
        for sql in [
            "TRUNCATE archive_batches, archive_jobs CASCADE",
            "VACUUM ANALYZE archive_batches, archive_jobs",
        ] {
            sqlx::raw_sql(sql).execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn measure(&self, round: u32, method: Method) -> Result<Line> {
        self.reset().await?;
        let want = self.batches(method) as usize;
        let (batches, secs) = match method {
            Method::CutOnly => self.cut_only(method).await?,
            Method::RecordOnly => self.plan(method, &NullPublisher, "inline").await?,
            Method::Amqp => {
                let cfg = AmqpConfig {
                    url: self.args.amqp_url.clone().into(),
                    queue: format!("bench.publish.{}", Uuid::new_v4().simple()),
                    delivery_limit: 5,
                };
                let publisher = AmqpPublisher::connect(cfg.clone()).await?;
                let r = self.plan(method, &publisher, "amqp").await;
                let ready = publisher.ready().await;
                publisher.close().await?;
                remove_amqp(&cfg).await?;
                let r = r?;
                let ready = ready?;
                ensure!(
                    ready as usize == want,
                    "rabbitmq: {ready} message(s) in the queue, expected {want}"
                );
                r
            }
            Method::Sqs => {
                let cfg = SqsConfig {
                    endpoint: Some(self.args.sqs_endpoint.clone()),
                    ..SqsConfig::new(&format!("bench-publish-{}", Uuid::new_v4().simple()), 5)?
                };
                let urls = ensure_queues(&self.sqs, &cfg).await?;
                let publisher = SqsPublisher::new(self.sqs.clone(), &cfg).await?;
                let r = self.plan(method, &publisher, "sqs").await;
                let ready = sqs_depth(&self.sqs, &urls.work).await;
                remove_sqs(&self.sqs, &urls).await;
                let r = r?;
                let ready = ready?;
                ensure!(
                    ready as usize == want,
                    "sqs: {ready} message(s) in the queue, expected {want}"
                );
                r
            }
        };
        ensure!(
            batches == want,
            "{}: cut {batches} batches, expected {want}",
            method.name()
        );
        if method != Method::CutOnly {
            self.verify_ledger(method).await?;
        }
        let line = Line {
            round,
            method,
            batches,
            secs,
        };
        eprintln!(
            "round {round} {:<12} {batches} batches in {secs:.1} s: {:.0}/s",
            method.name(),
            line.rate()
        );
        Ok(line)
    }

    /// The planner's cut of the logs job alone, nothing recorded; (batches,
    /// seconds). The library has no cut without recording, so this runs a
    /// copy of the statements of `first`, `boundary` and `tail` in
    /// `src/plan/keyset.rs` as its `cut` does (one round trip a batch, the
    /// archive's partitions ensured first): keep them in step with it.
    async fn cut_only(&self, method: Method) -> Result<(usize, f64)> {
        let opts = self.plan_options(method, "inline");
        // The planner's cut-off, by the database's clock (a dry run changes nothing).
        let cutoff = plan::dry_run(&self.pool, Kind::Logs, &opts).await?.cutoff;
        // Just below the floor, as the planner's walk starts with an empty ledger.
        let floor = (
            opts.policy.floor_time() - chrono::Duration::microseconds(1),
            Uuid::max(),
        );
        let t = Instant::now();
        let first: Option<(DateTime<Utc>, Uuid)> = sqlx::query_as(
            "SELECT received_at, id FROM scenario_logs
             WHERE (received_at, id) > ($1, $2) AND received_at < $3
             ORDER BY received_at, id LIMIT 1",
        )
        .bind(floor.0)
        .bind(floor.1)
        .bind(cutoff)
        .fetch_optional(&self.pool)
        .await?;
        let Some(first) = first else {
            return Ok((0, t.elapsed().as_secs_f64()));
        };
        let mut lo = (first.0 - chrono::Duration::microseconds(1), Uuid::max());
        partitions::ensure_months(
            &self.pool,
            "scenario_logs_archive",
            lo.0.max(floor.0),
            cutoff,
        )
        .await?;
        let mut batches = 0;
        loop {
            let boundary: Option<(DateTime<Utc>, Uuid)> = sqlx::query_as(
                "SELECT received_at, id FROM scenario_logs
                 WHERE (received_at, id) > ($1, $2) AND received_at < $3
                 ORDER BY received_at, id OFFSET $4 LIMIT 1",
            )
            .bind(lo.0)
            .bind(lo.1)
            .bind(cutoff)
            .bind(opts.batch_size - 1)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(hi) = boundary {
                batches += 1;
                lo = hi;
                continue;
            }
            let tail: Option<(DateTime<Utc>, Uuid, i64)> = sqlx::query_as(
                "SELECT received_at, id, count(*) OVER () AS n FROM scenario_logs
                 WHERE (received_at, id) > ($1, $2) AND received_at < $3
                 ORDER BY received_at DESC, id DESC LIMIT 1",
            )
            .bind(lo.0)
            .bind(lo.1)
            .bind(cutoff)
            .fetch_optional(&self.pool)
            .await?;
            batches += usize::from(tail.is_some());
            return Ok((batches, t.elapsed().as_secs_f64()));
        }
    }

    /// Plans the job through `publisher`; (batches, seconds).
    async fn plan(
        &self,
        method: Method,
        publisher: &dyn Publisher,
        transport: &'static str,
    ) -> Result<(usize, f64)> {
        let t = Instant::now();
        let planned = plan::plan(
            &self.pool,
            Kind::Logs,
            &self.plan_options(method, transport),
            publisher,
        )
        .await?;
        Ok((planned.batches, t.elapsed().as_secs_f64()))
    }

    /// Every batch recorded once and marked published.
    async fn verify_ledger(&self, method: Method) -> Result<()> {
        let (n, unpublished, planned): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL),
                    (SELECT COALESCE(sum(batches_planned), 0) FROM archive_jobs)::bigint
             FROM archive_batches",
        )
        .fetch_one(&self.pool)
        .await?;
        ensure!(
            n == self.batches(method) && unpublished == 0 && planned == n,
            "{}: ledger has {n} batches ({unpublished} unpublished, jobs count {planned}), expected {}",
            method.name(),
            self.batches(method)
        );
        Ok(())
    }
}

async fn remove_amqp(cfg: &AmqpConfig) -> Result<()> {
    let conn =
        Connection::connect(cfg.url.expose_secret(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    for q in [cfg.queue.clone(), cfg.dead_queue()] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    ch.exchange_delete(cfg.dlx().as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

async fn sqs_depth(client: &Client, url: &str) -> Result<u64> {
    let name = QueueAttributeName::ApproximateNumberOfMessages;
    let attrs = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(name.clone())
        .send()
        .await?
        .attributes
        .unwrap_or_default();
    attrs
        .get(&name)
        .and_then(|n| n.parse().ok())
        .context("no message count in the reply")
}

async fn remove_sqs(client: &Client, urls: &QueueUrls) {
    for url in [&urls.work, &urls.dead] {
        let _ = client.delete_queue().queue_url(url).send().await;
    }
}

/// Queues of an interrupted earlier run (the emulator keeps them in memory).
async fn remove_leftover_sqs(client: &Client) -> Result<()> {
    let urls = client
        .list_queues()
        .queue_name_prefix("bench-publish-")
        .send()
        .await
        .context("SQS ListQueues (is the SQS endpoint up?)")?
        .queue_urls
        .unwrap_or_default();
    for url in urls {
        let _ = client.delete_queue().queue_url(&url).send().await;
    }
    Ok(())
}

fn sqs_client(endpoint: &str) -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("bench", "bench", None, None, "static"))
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(config)
}

async fn create_database(args: &Args) -> Result<PgConnectOptions> {
    archiver_bench::recreate_database(
        &args.admin_url,
        &args.database,
        "archiver-bench-publish",
        &[],
    )
    .await
}

/// Schema and data: `batches × batch_size` log rows over two years, every
/// one older than the logs policy (365 days).
async fn prepare(args: Args) -> Result<Bench> {
    let t = Instant::now();
    let opts = create_database(&args).await?;
    let pool = db::connect(&opts, args.connections, Duration::from_secs(30)).await?;
    db::migrate(&pool).await?;
    let rows = args.batches * args.batch_size;
    demo::load_logs(&pool, rows, 1000, 730).await?;
    for sql in [
        "UPDATE scenario_logs SET received_at = received_at - interval '400 days'",
        "VACUUM ANALYZE scenario_logs",
    ] {
        sqlx::raw_sql(sql).execute(&pool).await?;
    }
    eprintln!(
        "loaded {rows} log rows into {} in {:.0} s",
        args.database,
        t.elapsed().as_secs_f64()
    );
    let sqs = sqs_client(&args.sqs_endpoint);
    if !args.no_sqs {
        remove_leftover_sqs(&sqs).await?;
    }
    Ok(Bench { args, pool, sqs })
}

fn print_table(bench: &Bench, lines: &[Line]) {
    let a = &bench.args;
    println!(
        "\nplanning one logs job of {} batches ({} row(s) each), planner pool of {} connections",
        a.batches, a.batch_size, a.connections
    );
    println!(
        "machine: {} CPU(s), load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!(
        "| round | method | what it does | batches | rows/batch | seconds | batches/s | vs cut-only |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    for l in lines {
        // Only against a cut of the same batches (the SQS job's are larger).
        let cut = lines
            .iter()
            .find(|c| c.round == l.round && c.method == Method::CutOnly)
            .filter(|_| bench.batch_size(l.method) == bench.batch_size(Method::CutOnly))
            .map(Line::rate);
        let vs = cut.map_or("n/a".to_string(), |c| {
            format!("{:.0} %", 100.0 * l.rate() / c)
        });
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.0} | {vs} |",
            l.round,
            l.method.name(),
            l.method.what(),
            l.batches,
            bench.batch_size(l.method),
            l.secs,
            l.rate()
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    archiver_bench::init_logging("warn,sqlx::query=error");
    let args = Args::parse();
    ensure!(
        args.batches > 0
            && args.batch_size > 0
            && args.sqs_batches > 0
            && args.repeat > 0
            && args.connections >= 2,
        "--batches, --batch-size, --sqs-batches and --repeat must be positive, --connections at least 2"
    );
    let bench = prepare(args).await?;
    let mut methods = vec![Method::CutOnly, Method::RecordOnly];
    if !bench.args.no_amqp {
        methods.push(Method::Amqp);
    }
    if !bench.args.no_sqs {
        methods.push(Method::Sqs);
    }
    let mut lines = Vec::new();
    for round in 1..=bench.args.repeat {
        for &m in &methods {
            lines.push(bench.measure(round, m).await?);
        }
    }
    bench.reset().await?;
    print_table(&bench, &lines);
    Ok(())
}
