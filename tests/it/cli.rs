//! The binaries as an operator runs them: the advisory lock, the dry run,
//! bad settings, and SIGTERM.

use crate::helpers::amqp::{amqp_config, delete_queues, queue_depth};
use crate::helpers::bin::{planner, stderr};
use crate::helpers::{TestDb, scratch, wait_until};
use archiver::transport::Publisher;
use archiver::transport::amqp::AmqpPublisher;
use std::time::Duration;

/// Every table's content and the set of relations, as one string.
async fn everything(db: &TestDb) -> String {
    let mut all = String::new();
    for t in [
        "scenario_logs",
        "scenario_logs_archive",
        "scenario_metrics",
        "reports",
        "archive_jobs",
        "archive_batches",
    ] {
        let h: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) || ':' || COALESCE(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {t} t"
        )))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        all.push_str(&format!("{t}={h};"));
    }
    let rels: String = sqlx::query_scalar("SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relnamespace = 'public'::regnamespace")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    all + &rels
}

#[tokio::test]
async fn a_dry_run_changes_nothing_and_publishes_nothing() {
    let db = TestDb::new().await;
    db.load_logs(5_000).await;
    archiver::demo::load_metrics(&db.pool, 3_000, 20, 3 * 365)
        .await
        .unwrap();
    let cfg = amqp_config();
    // Declare the queue so that we can see it stays empty.
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let before = everything(&db).await;
    let root = scratch("dry");
    let o = db
        .planner()
        .args(["--logs", "--metrics", "--reports", "--dry-run"])
        .amqp(&cfg)
        .env("REPORTS_ROOT", &root)
        .output()
        .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let eligible: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM scenario_logs WHERE received_at < now() - interval '365 days'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        out.contains(&format!(
            "logs: {} eligible rows",
            archiver::human::count(eligible)
        )),
        "{out}"
    );
    let samples: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM scenario_metrics
         WHERE \"timestamp\" < date_trunc('day', (now() - interval '730 days') AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(samples > 0);
    assert!(
        out.contains(&format!(
            "metrics: {} eligible samples",
            archiver::human::count(samples)
        )),
        "{out}"
    );
    assert!(out.contains("reports: 0 eligible reports"), "{out}");
    // --reports without REPORTS_ROOT is a setting error that names it.
    let o = db.planner().args(["--reports", "--dry-run"]).output().await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("REPORTS_ROOT"), "{}", stderr(&o));
    assert_eq!(everything(&db).await, before);
    assert_eq!(queue_depth(&cfg, &cfg.queue).await, Some(0));
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_second_planner_exits_non_zero_while_one_holds_the_lock() {
    let db = TestDb::new().await;
    db.load_logs(1_000).await;
    let mut holder = db.pool.acquire().await.unwrap();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(archiver::lock::PLANNER_LOCK)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert!(got);
    let before = everything(&db).await;
    let o = db.planner().args(["--logs"]).output().await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("another planner is running"),
        "{}",
        stderr(&o)
    );
    assert_eq!(everything(&db).await, before);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(archiver::lock::PLANNER_LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);
    let o = db.planner().args(["--logs"]).output().await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("completed"));
    db.cleanup().await;
}

#[tokio::test]
async fn bad_settings_give_one_line_errors_that_name_them() {
    let db = TestDb::new().await;
    let secret_url = db.url.replace("postgres@", "postgres:hunter2@");
    let cases: Vec<(Vec<&str>, String, &str, i32)> = vec![
        (
            vec!["--logs"],
            "mysql://u:hunter2@127.0.0.1/x".into(),
            "DATABASE_URL",
            2,
        ),
        (
            vec!["--logs"],
            secret_url.replace("archiver_t_", "no_such_db_"),
            "DATABASE_URL",
            2,
        ),
        (
            vec!["--logs", "--batch-size", "0"],
            db.url.clone(),
            "--batch-size",
            2,
        ),
        (
            vec!["--logs", "--logs-age-days", "soon"],
            db.url.clone(),
            "--logs-age-days",
            2,
        ),
        (vec!["--frobnicate"], db.url.clone(), "--frobnicate", 2),
        (
            vec!["--logs", "--rest-ratio", "lots"],
            db.url.clone(),
            "--rest-ratio",
            2,
        ),
        (vec![], db.url.clone(), "--all", 2),
    ];
    for (args, url, names, code) in cases {
        let o = planner(&url).args(&args).output().await;
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
        assert!(err.contains(names), "{args:?}: names {names}: {err}");
        assert!(
            !err.contains("hunter2"),
            "{args:?}: leaks the password: {err}"
        );
    }
    // The governor's flags (both binaries take them) and the worker's own:
    // out of range, not numbers, NaN, infinities, negatives, unknown units,
    // a replica to watch with no lag to watch it for. Exit 2, one line,
    // naming the setting.
    let governor: [(&[&str], &str); 13] = [
        (&["--chunk-time", "5y"], "--chunk-time"),
        (&["--chunk-time", "2d"], "--chunk-time"),
        (&["--max-replica-lag=-1"], "--max-replica-lag"),
        (&["--max-lag-wait", "forever"], "--max-lag-wait"),
        (&["--max-active-sessions", "0"], "--max-active-sessions"),
        (&["--max-active-sessions=-3"], "--max-active-sessions"),
        (&["--probe-factor", "0.5"], "--probe-factor"),
        (&["--probe-factor", "NaN"], "--probe-factor"),
        (&["--max-wal-rate", "0"], "--max-wal-rate"),
        (&["--max-wal-rate", "inf"], "--max-wal-rate"),
        (&["--max-runtime", "1y"], "--max-runtime"),
        (
            &["--replica-url", "postgresql://r:hunter2@127.0.0.1:1/app"],
            "ARCHIVER_MAX_REPLICA_LAG",
        ),
        (&["--window", "25:00-06:00"], "--window"),
    ];
    let worker_only: [(&[&str], &str); 4] = [
        (&["--listen", "127.0.0.1:notaport"], "--listen"),
        (&["--listen", "300.0.0.1:9188"], "--listen"),
        (&["--stuck-after", "0"], "--stuck-after"),
        (&["--stuck-after", "86401"], "--stuck-after"),
    ];
    let runs = governor
        .iter()
        .map(|(a, n)| (db.planner().args(["--logs"]).args(a.iter()), a, n))
        .chain(
            governor
                .iter()
                .map(|(a, n)| (db.worker().args(a.iter()), a, n)),
        )
        .chain(
            worker_only
                .iter()
                .map(|(a, n)| (db.worker().args(a.iter()), a, n)),
        );
    for (bin, args, names) in runs {
        let o = bin.output().await;
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
        assert!(err.contains(names), "{args:?}: names {names}: {err}");
        assert!(
            !err.contains("hunter2"),
            "{args:?}: leaks the password: {err}"
        );
    }
    let o = db
        .planner()
        .args(["--logs"])
        .env("QUEUE_URL", "kafka://x")
        .output()
        .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("QUEUE_URL"), "{}", stderr(&o));
    db.cleanup().await;
}

#[tokio::test]
async fn a_worker_exits_zero_on_sigterm() {
    let db = TestDb::new().await;
    let cfg = amqp_config();
    let mut worker = db
        .worker()
        .amqp(&cfg)
        .env("ARCHIVER_KINDS", "logs,metrics")
        .spawn();
    // Wait until it consumes (the queue exists once it has declared it).
    wait_until(
        "the worker to declare its queue",
        Duration::from_secs(30),
        || async { queue_depth(&cfg, &cfg.queue).await.is_some() },
    )
    .await;
    worker.sigterm();
    let status = worker.exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_failed_run_exits_non_zero_marks_the_job_failed_and_moves_nothing() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    // A stray table where a partition must go.
    let month: String = sqlx::query_scalar(
        "SELECT to_char(min(received_at) AT TIME ZONE 'UTC', 'YYYY_MM') FROM scenario_logs",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let stray = format!("scenario_logs_archive_{month}");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE {stray} (x int)")))
        .execute(&db.pool)
        .await
        .unwrap();
    let before = db.hash("FROM scenario_logs").await;
    let o = db.planner().args(["--all"]).output().await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&stray), "{}", stderr(&o));
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error_message FROM archive_jobs WHERE job_type = 'logs'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(error.unwrap_or_default().contains("is not a partition"));
    assert_eq!(db.hash("FROM scenario_logs").await, before, "nothing moved");
    let failed =
        sqlx::query("SELECT * FROM archive_jobs WHERE status = 'failed' ORDER BY started_at DESC;")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(failed.len(), 1, "the spec's failed-jobs query finds it");
    db.cleanup().await;
}
