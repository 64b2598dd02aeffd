//! Shared test setup: a fresh database per test (migrated), fresh queue
//! names, content hashes, and waiting for a job to finish.

use archiver::config::Policy;
use archiver::plan::PlanOptions;
use archiver::transport::amqp::AmqpConfig;
use secrecy::ExposeSecret;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use std::process::Output;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const LOG_COLUMNS: &str = "id, scenario_id, received_at, message_hash, message_preview, source, size_bytes, has_pii, token_count, sqs_blocks";

pub fn admin_url() -> String {
    std::env::var("ARCHIVER_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("ARCHIVER_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A RabbitMQ config with a queue no other test uses.
pub fn amqp_config() -> AmqpConfig {
    AmqpConfig {
        url: amqp_url().into(),
        queue: format!("test.{}", Uuid::new_v4().simple()),
        delivery_limit: 5,
    }
}

pub fn plan_options(batch_size: i64, transport: &'static str) -> PlanOptions {
    PlanOptions {
        batch_size,
        reports_batch_size: 20,
        reports_root: None,
        policy: Policy::default(),
        transport,
    }
}

/// A database of its own, with the schema applied; dropped by `cleanup`.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("archiver_t_{}", Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("admin connection");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let mut url = url::Url::parse(&admin_url()).unwrap();
        url.set_path(&name);
        let url = url.to_string();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap();
        archiver::db::migrate(&pool).await.unwrap();
        TestDb { pool, url, name }
    }

    pub async fn cleanup(self) {
        self.pool.close().await;
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&admin)
            .await;
        }
    }

    /// Loads `n` log rows over three years, none within a day of the
    /// 365-day cut-off (so which side a row is on cannot change mid-test).
    pub async fn load_logs(&self, n: i64) {
        archiver::demo::load_logs(&self.pool, n, 50, 3 * 365)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE scenario_logs SET received_at = received_at - interval '3 days'
             WHERE received_at BETWEEN now() - interval '367 days' AND now() - interval '363 days'",
        )
        .execute(&self.pool)
        .await
        .unwrap();
        sqlx::query("VACUUM ANALYZE scenario_logs")
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// (count, md5 over every column of every row, in id order) of a query
    /// that selects the log columns.
    pub async fn hash(&self, from_where: &str) -> (i64, String) {
        let sql = format!(
            "SELECT count(*), COALESCE(md5(string_agg(t::text, '|' ORDER BY t.id)), '')
             FROM (SELECT {LOG_COLUMNS} {from_where}) t"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// Hashes of the rows that must end up archived and those that stay.
    pub async fn split_hashes(&self) -> ((i64, String), (i64, String)) {
        (
            self.hash("FROM scenario_logs WHERE received_at < now() - interval '365 days'")
                .await,
            self.hash("FROM scenario_logs WHERE received_at >= now() - interval '365 days'")
                .await,
        )
    }

    /// Asserts the logs invariant: every old row archived exactly once with
    /// every column equal, every young row live and untouched.
    pub async fn assert_logs_invariant(&self, old: &(i64, String), young: &(i64, String)) {
        assert!(
            old.0 > 0 && young.0 > 0,
            "test data must have rows on both sides"
        );
        assert_eq!(
            &self.hash("FROM scenario_logs_archive").await,
            old,
            "archive = old rows, every column"
        );
        assert_eq!(
            &self.hash("FROM scenario_logs").await,
            young,
            "live = young rows, every column"
        );
        let dup: i64 =
            sqlx::query_scalar("SELECT count(*) - count(DISTINCT id) FROM scenario_logs_archive")
                .fetch_one(&self.pool)
                .await
                .unwrap();
        assert_eq!(dup, 0, "no row archived twice");
        let unstamped: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM scenario_logs_archive a
             WHERE a.archived_at IS NULL OR NOT EXISTS
                 (SELECT 1 FROM archive_batches b WHERE b.id = a.archive_batch_id AND b.status = 'done')",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(unstamped, 0, "every archived row names a done batch");
    }

    /// Asserts the job's counters equal what was archived: counted once.
    pub async fn assert_job_counted_once(&self, job: Uuid, rows: i64) {
        let r = sqlx::query(
            "SELECT status, records_processed, records_archived, records_deleted, batches_planned, batches_done,
                    bytes_archived,
                    (SELECT COALESCE(sum(a.size_bytes), 0) FROM scenario_logs_archive a
                     JOIN archive_batches b ON b.id = a.archive_batch_id WHERE b.job_id = $1)::bigint AS bytes,
                    (SELECT count(*) FROM scenario_logs_archive a
                     JOIN archive_batches b ON b.id = a.archive_batch_id WHERE b.job_id = $1) AS stamped
             FROM archive_jobs WHERE id = $1",
        )
        .bind(job)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(r.get::<String, _>("status"), "completed");
        assert_eq!(r.get::<i64, _>("records_archived"), rows);
        assert_eq!(r.get::<i64, _>("records_deleted"), rows);
        assert_eq!(r.get::<i64, _>("records_processed"), rows);
        assert_eq!(
            r.get::<i64, _>("stamped"),
            rows,
            "archive rows stamped with this job's batches"
        );
        assert_eq!(r.get::<i64, _>("bytes_archived"), r.get::<i64, _>("bytes"));
        assert_eq!(
            r.get::<i32, _>("batches_done"),
            r.get::<i32, _>("batches_planned")
        );
        let ledger_rows: i64 = sqlx::query_scalar(
            "SELECT sum(rows_archived)::bigint FROM archive_batches WHERE job_id = $1",
        )
        .bind(job)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(ledger_rows, rows);
    }

    /// Waits (bounded) until a job leaves `running`; returns its status.
    pub async fn wait_job(&self, job: Uuid) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status: String =
                sqlx::query_scalar("SELECT status FROM archive_jobs WHERE id = $1")
                    .bind(job)
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
            if status != "running" && status != "pending" {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "job {job} still {status} after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Holds a row lock on one row of `batch` for `hold`, as the application might.
pub async fn hold_a_row_of(
    db: &TestDb,
    batch: Uuid,
    hold: Duration,
) -> tokio::task::JoinHandle<()> {
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT 1 FROM scenario_logs l, archive_batches b WHERE b.id = $1
           AND (l.received_at, l.id) > (b.lo_ts, b.lo_id) AND (l.received_at, l.id) <= (b.hi_ts, b.hi_id)
         LIMIT 1 FOR UPDATE OF l",
    )
    .bind(batch)
    .execute(&mut *tx)
    .await
    .unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        tx.rollback().await.unwrap();
    })
}

/// Plans `kind` and runs its batches inline, as `planner` does with no
/// broker; asserts nothing was dead-lettered and the job completed.
pub async fn run_inline(
    db: &TestDb,
    kind: archiver::ledger::Kind,
    batch_size: i64,
) -> archiver::plan::Planned {
    use archiver::transport::Publisher;
    let (publisher, mut consumer) = archiver::transport::inline::queue();
    let pool = db.pool.clone();
    let executors = tokio::spawn(async move {
        let opts = archiver::worker::WorkerOptions::default();
        archiver::worker::run(
            &pool,
            &mut consumer,
            opts,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
    });
    let planned = archiver::plan::plan(
        &db.pool,
        kind,
        &plan_options(batch_size, "inline"),
        &publisher,
    )
    .await
    .unwrap();
    publisher.close().await.unwrap();
    executors.await.unwrap().unwrap();
    let dead = publisher.dead_letters().await;
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(db.wait_job(planned.job).await, "completed");
    planned
}

/// Waits (bounded) until no message is ready in the work queue, then long
/// enough for a worker to settle what it still holds in its prefetch buffer
/// (ready counts exclude those), so that stopping it loses no delivery.
pub async fn wait_queue_empty(cfg: &AmqpConfig) {
    let mut empty_for = 0;
    for _ in 0..400 {
        if queue_depth(cfg, &cfg.queue).await == Some(0) {
            empty_for += 1;
            if empty_for >= 10 {
                return;
            }
        } else {
            empty_for = 0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("queue {} never drained", cfg.queue);
}

/// Messages ready in a queue (declares nothing if it does not exist: returns None).
pub async fn queue_depth(cfg: &AmqpConfig, queue: &str) -> Option<u32> {
    let conn = lapin::Connection::connect(
        cfg.url.expose_secret(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let opts = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let r = ch
        .queue_declare(queue.into(), opts, lapin::types::FieldTable::default())
        .await;
    let n = r.ok().map(|q| q.message_count());
    let _ = conn.close(200, "".into()).await;
    n
}

/// Drops every ready message of the work queue (a broker that lost them).
pub async fn purge(cfg: &AmqpConfig) {
    let conn = lapin::Connection::connect(
        cfg.url.expose_secret(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    conn.create_channel()
        .await
        .unwrap()
        .queue_purge(cfg.queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "".into()).await;
}

/// Takes every message from a queue: (payload, x-archiver-error header).
pub async fn drain(cfg: &AmqpConfig, queue: &str) -> Vec<(String, Option<String>)> {
    let conn = lapin::Connection::connect(
        cfg.url.expose_secret(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let reason = m.delivery.properties.headers().as_ref().and_then(|h| {
            h.inner().get("x-archiver-error").map(|v| match v {
                lapin::types::AMQPValue::LongString(s) => {
                    String::from_utf8_lossy(s.as_bytes()).to_string()
                }
                other => format!("{other:?}"),
            })
        });
        out.push((
            String::from_utf8_lossy(&m.delivery.data).to_string(),
            reason,
        ));
    }
    let _ = conn.close(200, "".into()).await;
    out
}

/// Deletes a test's queues and exchange (quorum queues are not free).
pub async fn delete_queues(cfg: &AmqpConfig) {
    let conn = lapin::Connection::connect(
        cfg.url.expose_secret(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [cfg.queue.clone(), cfg.dead_queue()] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = ch
        .exchange_delete(cfg.dlx().as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "".into()).await;
}

/// A command's stdout, once it has succeeded; its output otherwise.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}
