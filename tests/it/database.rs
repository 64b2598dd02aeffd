//! The database as production runs it: migrations behind a long
//! transaction, a failover (a read-only database), a planner whose lock
//! session is lost, a planner that died while planning, batch statements
//! past their timeout, and what every session is configured with.

use crate::helpers::amqp::{amqp_config, delete_queues, drain, queue_depth};
use crate::helpers::bin::{Bin, stderr, stdout};
use crate::helpers::db::admin_exec;
use crate::helpers::standby::Clusters;
use crate::helpers::{TestDb, plan_options, wait_until};
use archiver::transport::amqp::{AmqpConfig, AmqpPublisher};
use archiver::transport::{BatchMessage, Publisher};
use archiver::vocabulary::Kind;
use sqlx::{Connection, PgConnection, PgPool};
use std::time::Duration;
use uuid::Uuid;

/// Opens a transaction that holds a snapshot, as `pg_dump` does for the
/// whole dump; returns the connection and its backend pid.
async fn old_transaction(url: &str) -> (PgConnection, i32) {
    let mut c = PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut c)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await
        .unwrap();
    (c, pid)
}

/// Indexes of the database that are INVALID.
async fn invalid_indexes(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE NOT i.indisvalid ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn index_exists(pool: &PgPool, name: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = $1)")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn applied_versions(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn all_versions() -> Vec<i64> {
    archiver::db::MIGRATOR.iter().map(|m| m.version).collect()
}

/// The spec's situation: a transaction older than the migration (a nightly
/// pg_dump) held for longer than the sessions' 30 s lock timeout. Before,
/// the index build gave up at 30 s leaving an INVALID index, and the rerun
/// skipped it (IF NOT EXISTS) and recorded the migration as applied.
#[tokio::test]
async fn migrate_waits_for_a_transaction_older_than_its_index_builds_and_leaves_every_index_valid()
{
    let db = TestDb::unmigrated().await;
    let (mut dump, dump_pid) = old_transaction(&db.url).await;
    let mut first = db.planner().args(["migrate"]).spawn();
    // The scenario: the old transaction outlives the sessions' 30 s lock
    // timeout.
    tokio::time::sleep(Duration::from_secs(35)).await;
    sqlx::query("COMMIT").execute(&mut dump).await.unwrap();
    let status = first.exit(Duration::from_secs(120)).await;
    let err = first.log();
    assert!(
        status.success(),
        "migrate must wait for the old transaction, not give up: {err}"
    );
    assert!(
        err.contains(&format!("waiting for pid {dump_pid}")),
        "says what it waits for: {err}"
    );
    let second = db.planner().args(["migrate"]).output().await;
    assert!(second.status.success(), "{}", stderr(&second));
    let p = &db.pool;
    assert_eq!(invalid_indexes(p).await, Vec::<String>::new());
    assert_eq!(applied_versions(p).await, all_versions());
    assert!(index_exists(p, "scenario_logs_received_at_id_idx").await);
    db.cleanup().await;
}

/// With `--index-wait`, a build that waits too long fails cleanly: the
/// error names what it waited for, no INVALID index is left, the migration
/// is not recorded; the next run completes.
#[tokio::test]
async fn migrate_with_an_index_wait_fails_cleanly_and_the_next_run_completes() {
    let db = TestDb::unmigrated().await;
    let (mut dump, dump_pid) = old_transaction(&db.url).await;
    let migrate = |wait: &str| {
        db.planner()
            .args(["migrate", "--index-wait", wait])
            .output()
    };
    let o = migrate("4").await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("migration 2"), "names the migration: {err}");
    assert!(
        err.contains(&format!("pid {dump_pid}")),
        "names the transaction it waited for: {err}"
    );
    let p = &db.pool;
    assert_eq!(invalid_indexes(p).await, Vec::<String>::new());
    assert_eq!(applied_versions(p).await, vec![1], "only the schema");
    sqlx::query("COMMIT").execute(&mut dump).await.unwrap();
    let o = migrate("30").await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(invalid_indexes(p).await, Vec::<String>::new());
    assert_eq!(applied_versions(p).await, all_versions());
    let o = migrate("soon").await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--index-wait"), "{}", stderr(&o));
    db.cleanup().await;
}

/// An INVALID index an older version left behind (its migration recorded as
/// applied) is rebuilt, before a later migration drops the index it
/// replaces: 0009's covering index is invalid when 0010 is due to drop
/// 0004's.
#[tokio::test]
async fn migrate_rebuilds_an_invalid_index_before_a_later_migration_drops_the_old_one() {
    let db = TestDb::unmigrated().await;
    let (url, p) = (&db.url, &db.pool);
    archiver::db::MIGRATOR.run_to(9, p).await.unwrap();
    // Make 0009's index INVALID as a lock timeout did: drop it, and build it
    // again CONCURRENTLY behind an old transaction with a short timeout.
    sqlx::query("DROP INDEX scenario_metrics_day_scenario_ts_idx")
        .execute(p)
        .await
        .unwrap();
    let (mut dump, _) = old_transaction(url).await;
    let mut c = PgConnection::connect(url).await.unwrap();
    sqlx::query("SET lock_timeout = '300ms'")
        .execute(&mut c)
        .await
        .unwrap();
    let build = sqlx::query(
        "CREATE INDEX CONCURRENTLY scenario_metrics_day_scenario_ts_idx
         ON scenario_metrics (date_trunc('day', \"timestamp\" AT TIME ZONE 'UTC'), scenario_id)
         INCLUDE (\"timestamp\")",
    )
    .execute(&mut c)
    .await;
    assert!(build.is_err(), "the build must time out");
    sqlx::query("COMMIT").execute(&mut dump).await.unwrap();
    assert_eq!(
        invalid_indexes(p).await,
        vec!["scenario_metrics_day_scenario_ts_idx".to_string()]
    );
    let o = db.planner().args(["migrate"]).output().await;
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("scenario_metrics_day_scenario_ts_idx") && err.contains("INVALID"),
        "says what it rebuilt: {err}"
    );
    assert_eq!(invalid_indexes(p).await, Vec::<String>::new());
    assert!(index_exists(p, "scenario_metrics_day_scenario_ts_idx").await);
    assert!(
        !index_exists(p, "scenario_metrics_day_scenario_idx").await,
        "0010 ran"
    );
    assert_eq!(applied_versions(p).await, all_versions());
    // Once more, as the recorded-but-invalid case: nothing left to do.
    let o = db.planner().args(["migrate"]).output().await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("INVALID"), "{}", stderr(&o));
    c.close().await.unwrap();
    db.cleanup().await;
}

/// The worker binary on the test's queue, one batch at a time.
fn worker(db: &TestDb, cfg: &AmqpConfig) -> Bin {
    db.worker()
        .amqp(cfg)
        .env("ARCHIVER_CONCURRENCY", "1")
        .env("ARCHIVER_KINDS", "logs,metrics")
}

/// A failover as a worker sees it: its sessions are cut (57P01), and the
/// server it reconnects to is read-only (25006, a demoted primary) for a
/// while. No batch may be charged for that, let alone parked: the job
/// completes once the database is writable again, on fresh sessions.
#[tokio::test]
async fn a_read_only_database_pauses_batches_and_the_job_completes_once_it_is_writable() {
    let db = TestDb::new().await;
    db.load_logs(4_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = archiver::plan::plan(&db.pool, Kind::Logs, &plan_options(25, "amqp"), &publisher)
        .await
        .unwrap();
    assert!(planned.batches >= 80, "{}", planned.batches);
    let worker = worker(&db, &cfg).spawn();
    let done = "SELECT count(*) FROM archive_batches WHERE status = 'done'";
    wait_until("a first batch", Duration::from_secs(30), || async {
        db.scalar(done).await >= 1
    })
    .await;
    let name = &db.name;
    admin_exec(format!(
        "ALTER DATABASE {name} SET default_transaction_read_only = on"
    ))
    .await;
    admin_exec(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = '{name}' AND application_name = 'archiver-worker'"
    ))
    .await;
    wait_until(
        "a batch to meet the read-only database",
        Duration::from_secs(30),
        || async { worker.log().contains("read-only transaction") },
    )
    .await;
    let done_while_read_only = db.scalar(done).await;
    // Time passes while the database is read-only: nothing gets done.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(db.scalar(done).await, done_while_read_only);
    assert!(done_while_read_only < planned.batches as i64);
    admin_exec(format!(
        "ALTER DATABASE {name} RESET default_transaction_read_only"
    ))
    .await;
    let status = wait_until(
        "the job to leave running",
        Duration::from_secs(45),
        || async {
            let status = db.job_status(planned.job).await;
            (status != "running").then_some(status)
        },
    )
    .await;
    assert_eq!(status, "completed", "{}", worker.log());
    let log = worker.stop().await;
    let dead = db
        .scalar("SELECT count(*) FROM archive_batches WHERE status = 'dead'")
        .await;
    assert_eq!(dead, 0, "{log}");
    let charged = db
        .scalar("SELECT count(*) FROM archive_batches WHERE attempts > 1")
        .await;
    assert_eq!(charged, 0, "no batch charged an attempt for the failover");
    assert!(log.matches("read-only transaction").count() >= 1, "{log}");
    assert_eq!(queue_depth(&cfg, &cfg.dead_queue()).await, Some(0));
    db.assert_logs_invariant(&old, &young).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

/// The database restarts under a running fleet (a fast restart: every
/// session ended, the server gone for a moment), and then turns read-only
/// for a while and back, for every session at once, as a primary demoted
/// and promoted again: the workers wait and retry, no batch dies or is
/// charged an attempt, and the job completes with every row archived once.
#[tokio::test]
async fn a_fast_restart_and_a_read_only_spell_under_two_workers_lose_nothing() {
    let clusters = tokio::task::spawn_blocking(Clusters::primary)
        .await
        .unwrap();
    let admin = clusters.primary_url();
    let db = TestDb::new_at(&admin).await;
    db.load_logs(12_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = archiver::plan::plan(&db.pool, Kind::Logs, &plan_options(50, "amqp"), &publisher)
        .await
        .unwrap();
    let workers: Vec<_> = (0..2)
        .map(|_| worker(&db, &cfg).env("ARCHIVER_REST_RATIO", "5").spawn())
        .collect();
    let logs = || {
        workers
            .iter()
            .map(|w| w.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let done = "SELECT count(*) FROM archive_batches WHERE status = 'done'";
    wait_until("a few batches", Duration::from_secs(30), || async {
        db.scalar(done).await >= 3
    })
    .await;
    let c = std::sync::Arc::new(clusters);
    let restart = c.clone();
    tokio::task::spawn_blocking(move || restart.restart_primary())
        .await
        .unwrap();
    let after_restart = db.scalar(done).await;
    wait_until(
        "batches done after the restart",
        Duration::from_secs(60),
        || async { db.scalar(done).await > after_restart },
    )
    .await;
    let system = |sql: &'static str| {
        let admin = admin.clone();
        async move {
            let pool = sqlx::PgPool::connect(&admin).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            sqlx::query("SELECT pg_reload_conf()")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    };
    system("ALTER SYSTEM SET default_transaction_read_only = on").await;
    wait_until(
        "both workers to meet the read-only database",
        Duration::from_secs(30),
        || async {
            workers
                .iter()
                .all(|w| w.log().contains("read-only transaction"))
        },
    )
    .await;
    let during = db.scalar(done).await;
    eprintln!(
        "{} batches: {after_restart} done at the restart, {during} when the database turned read-only",
        planned.batches
    );
    assert!(
        during < planned.batches as i64,
        "the job outlasted the faults"
    );
    system("ALTER SYSTEM RESET default_transaction_read_only").await;
    let status = wait_until("the job to complete", Duration::from_secs(90), || async {
        let status = db.job_status(planned.job).await;
        (status != "running").then_some(status)
    })
    .await;
    assert_eq!(status, "completed", "{}", logs());
    let charged = db
        .scalar("SELECT count(*) FROM archive_batches WHERE status <> 'done' OR attempts > 1")
        .await;
    assert_eq!(charged, 0, "no batch dead or charged:\n{}", logs());
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(queue_depth(&cfg, &cfg.dead_queue()).await, Some(0));
    let mut outs = Vec::new();
    for mut w in workers {
        assert!(w.is_running(), "{}", w.log());
        outs.push(w.stop().await);
    }
    let all = outs.join("\n");
    assert!(all.contains("read-only transaction"), "{all}");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
    drop(c);
}

/// The planner's lock session is ended (as a NAT dropping it, or a DBA)
/// while the planner is about to publish: it stops, publishes nothing more
/// and exits non-zero saying why. The next run closes the job it left.
#[tokio::test]
async fn a_planner_that_loses_its_lock_session_stops_publishing_and_exits_non_zero() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let cfg = amqp_config();
    // Recording batches waits behind this: the planner is held mid-run.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE archive_batches IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let plan = || {
        db.planner()
            .args(["--logs", "--batch-size", "100"])
            .amqp(&cfg)
    };
    let mut planner = plan().spawn();
    let running = "SELECT count(*) FROM archive_jobs WHERE status = 'running'";
    wait_until(
        "the planner to start its job",
        Duration::from_secs(30),
        || async { db.scalar(running).await == 1 },
    )
    .await;
    // Held up, but with its lock: its heartbeats find the lock and it runs
    // on. (Heartbeats must have time to run: the wait is the scenario.)
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(planner.is_running(), "{}", planner.log());
    let lock_holder: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(archiver::lock::PLANNER_LOCK)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(lock_holder)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(terminated);
    // Let the planner go on: had it not noticed, it would publish
    // everything. (Nothing to await: the scenario is that nothing happens.)
    tokio::time::sleep(Duration::from_secs(4)).await;
    blocker.rollback().await.unwrap();
    let status = planner.exit(Duration::from_secs(20)).await;
    let err = planner.log();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("lost the session holding the planner lock"),
        "{err}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM archive_batches").await,
        0,
        "nothing recorded after the lock was lost"
    );
    assert_eq!(
        queue_depth(&cfg, &cfg.queue).await.unwrap_or(0),
        0,
        "nothing published"
    );
    // The job it left running is closed by the next run, which says so.
    let left: Uuid = sqlx::query_scalar("SELECT id FROM archive_jobs WHERE status = 'running'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let o = plan().output().await;
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains(&format!("job {left} was left running")),
        "{out}"
    );
    let (st, why): (String, Option<String>) =
        sqlx::query_as("SELECT status, error_message FROM archive_jobs WHERE id = $1")
            .bind(left)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(st, "failed");
    assert!(why.unwrap_or_default().contains("planner stopped"));
    delete_queues(&cfg).await;
    db.cleanup().await;
}

/// A broker-mode planner died while planning: some batches recorded and
/// published, the rest recorded but never published, planning never
/// finished. The next run adopts the job (publishes what was not) and the
/// job completes when its batches do, instead of staying `running`.
#[tokio::test]
async fn a_job_left_running_by_a_planner_that_died_while_planning_is_adopted_and_completes() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let plan = || {
        db.planner()
            .args(["--logs", "--batch-size", "200"])
            .amqp(&cfg)
    };
    let o = plan().output().await;
    assert!(o.status.success(), "{}", stderr(&o));
    let job: Uuid = sqlx::query_scalar("SELECT id FROM archive_jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let n = db.scalar("SELECT count(*) FROM archive_batches").await;
    assert!(n >= 6, "{n}");
    // As if it had died after publishing half: the other half's messages
    // never went out, and planning never ended.
    drain(&cfg, &cfg.queue).await;
    sqlx::query(
        "UPDATE archive_batches SET published_at = CASE WHEN seq < $1 THEN published_at END",
    )
    .bind((n / 2) as i32)
    .execute(&db.pool)
    .await
    .unwrap();
    let first_half: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM archive_batches WHERE published_at IS NOT NULL ORDER BY seq",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let messages: Vec<BatchMessage> = first_half
        .iter()
        .map(|&id| BatchMessage::new(id, Kind::Logs))
        .collect();
    publisher.publish(&messages).await.unwrap();
    sqlx::query("UPDATE archive_jobs SET planning_done = false WHERE id = $1")
        .bind(job)
        .execute(&db.pool)
        .await
        .unwrap();
    let o = plan().output().await;
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains(&format!("job {job} was left running")) && out.contains("adopted"),
        "{out}"
    );
    let worker = worker(&db, &cfg).spawn();
    wait_until("the job to complete", Duration::from_secs(30), || async {
        db.job_status(job).await == "completed"
    })
    .await;
    let log = worker.stop().await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM archive_jobs WHERE status <> 'completed'")
            .await,
        0,
        "{log}"
    );
    db.assert_logs_invariant(&old, &young).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

/// A batch statement that runs past `--statement-timeout` (here: a DELETE
/// waiting on a row the application holds, with the lock timeout longer)
/// is cancelled by the server and retried, not parked: a time-out is most
/// often load that passes. The job completes once the row is released.
#[tokio::test]
async fn a_batch_statement_past_its_statement_timeout_is_retried_and_completes() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned =
        archiver::plan::plan(&db.pool, Kind::Logs, &plan_options(500, "amqp"), &publisher)
            .await
            .unwrap();
    let first: Uuid = sqlx::query_scalar("SELECT id FROM archive_batches ORDER BY seq LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let holder = db.hold_a_row_of(first, Duration::from_secs(4)).await;
    let worker = worker(&db, &cfg)
        .env("ARCHIVER_STATEMENT_TIMEOUT", "300ms")
        .spawn();
    assert_eq!(
        db.wait_job(planned.job).await,
        "completed",
        "{}",
        worker.log()
    );
    holder.await.unwrap();
    let log = worker.stop().await;
    assert!(
        log.contains("canceling statement due to statement timeout"),
        "the statement timeout applied: {log}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM archive_batches WHERE status = 'dead'")
            .await,
        0,
        "{log}"
    );
    db.assert_logs_invariant(&old, &young).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

/// Every session carries TCP keepalives (the server ends a vanished
/// client's session, releasing its locks); batch sessions carry the batch
/// timeouts, planning sessions do not; bad values name their setting.
#[tokio::test]
async fn sessions_carry_keepalives_and_batch_sessions_their_timeouts() {
    use archiver::config::{BatchTimeouts, batch_options, database_options};
    let db = TestDb::new().await;
    let opts = database_options(Some(&db.url), "t").unwrap();
    let show = |pool: PgPool, what: &'static str| async move {
        let v: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {what}")))
            .fetch_one(&pool)
            .await
            .unwrap();
        v
    };
    let planning = archiver::db::connect(&opts, 1, Duration::from_secs(5))
        .await
        .unwrap();
    let batches = archiver::db::connect(
        &batch_options(&opts, BatchTimeouts::default()),
        1,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    for p in [&planning, &batches] {
        assert_eq!(show(p.clone(), "tcp_keepalives_idle").await, "30");
        assert_eq!(show(p.clone(), "tcp_keepalives_count").await, "3");
    }
    assert_eq!(show(planning.clone(), "statement_timeout").await, "0");
    assert_eq!(show(batches.clone(), "statement_timeout").await, "1min");
    assert_eq!(
        show(batches.clone(), "idle_in_transaction_session_timeout").await,
        "30s"
    );
    for (var, value) in [
        ("ARCHIVER_STATEMENT_TIMEOUT", "forever"),
        ("ARCHIVER_IDLE_IN_TRANSACTION_TIMEOUT", "-5s"),
    ] {
        let o = db
            .worker()
            .amqp(&amqp_config())
            .env(var, value)
            .output()
            .await;
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let flag = var
            .trim_start_matches("ARCHIVER_")
            .to_lowercase()
            .replace('_', "-");
        assert!(stderr(&o).contains(&flag), "{}", stderr(&o));
    }
    planning.close().await;
    batches.close().await;
    db.cleanup().await;
}

/// A worker cut off from the database in the middle of a chunk (its
/// statement sent, waiting on a row lock the application holds) hears
/// nothing: no error, no reset, the socket would wait out the kernel's
/// retransmissions (~15 min). The executor gives the chunk up at its
/// deadline with an error that says so and waits for the database as when
/// it is down; the server rolls the chunk back once the session's end
/// reaches it; run again, the batch moves every row once.
#[tokio::test]
async fn a_chunk_the_database_leaves_unanswered_is_given_up_at_its_deadline_and_runs_once_later() {
    use crate::helpers::plan_only;
    use crate::helpers::relay::Relay;
    use archiver::error::Class;
    use archiver::execute::{Executor, Outcome, execute_batch};
    use tokio_util::sync::CancellationToken;

    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let (old, young) = db.split_hashes().await;
    let planned = plan_only(&db, Kind::Logs, &plan_options(5_000, "inline")).await;
    assert_eq!(planned.batches, 1, "one batch holds every old row");
    let batch = db.batches_of(planned.job).await[0];
    let mut url = url::Url::parse(&db.url).unwrap();
    let relay = Relay::to(&format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap()
    ))
    .await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(relay.port())).unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url.as_str())
        .await
        .unwrap();
    let deadline = Duration::from_secs(2);
    let exec = Executor {
        deadline: Some(deadline),
        ..Executor::from(&pool)
    };
    let held = db.hold_a_row_of(batch, Duration::from_secs(4)).await;
    let run = {
        let exec = exec.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = execute_batch(&exec, batch, Kind::Logs, &CancellationToken::new()).await;
            (r, started.elapsed())
        })
    };
    wait_until(
        "the chunk to wait on the row lock",
        Duration::from_secs(20),
        || async { db.lock_waiters().await >= 1 },
    )
    .await;
    relay.freeze();
    let (given_up, took) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("given up within its deadline, not the kernel's 15 minutes")
        .unwrap();
    let err = given_up.expect_err("nothing answered");
    assert_eq!(err.class(), Class::Unavailable, "{err}");
    assert!(
        err.to_string().contains("no answer to a chunk within 2s"),
        "{err}"
    );
    assert!(took >= deadline && took < deadline * 5, "{took:?}");
    // The application lets go; nothing of the chunk was committed.
    held.await.unwrap();
    let archived = "SELECT count(*) FROM scenario_logs_archive";
    assert_eq!(db.scalar(archived).await, 0);
    // The network comes back: the server hears the session end and rolls
    // its transaction back; the batch runs again, once.
    relay.thaw();
    let again = execute_batch(&exec, batch, Kind::Logs, &CancellationToken::new())
        .await
        .unwrap();
    assert!(matches!(again, Outcome::Done { .. }), "{again:?}");
    let redelivered = execute_batch(&exec, batch, Kind::Logs, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(redelivered, Outcome::AlreadyDone);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    pool.close().await;
    db.cleanup().await;
}
