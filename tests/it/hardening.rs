//! What a drifting fleet, forged messages and bad data do: each can only
//! hurt itself, never a batch or a job it does not own.

use crate::helpers::amqp::{amqp_config, amqp_url, delete_queues};
use crate::helpers::bin::{both, stderr};
use crate::helpers::{TestDb, plan_only, plan_options, reports_executor, scratch, wait_until};
use archiver::plan;
use archiver::transport::amqp::{AmqpConsumer, AmqpPublisher};
use archiver::transport::{BatchMessage, Publisher, inline};
use archiver::vocabulary::Kind;
use archiver::worker::{self, Disposition, WorkerOptions};
use sqlx::Row;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A reports root with `n` old report files and their rows.
async fn reports_fixture(db: &TestDb, n: usize) -> (PathBuf, PathBuf) {
    let base = scratch("hard");
    let (root, archive) = (base.join("root"), base.join("archive"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&archive).unwrap();
    for i in 0..n {
        let path = root.join(format!("r{i}.csv"));
        std::fs::write(&path, format!("{i},a,b\n").repeat(100)).unwrap();
        sqlx::query(
            "INSERT INTO reports (scenario_id, format, file_path, file_size_bytes, generated_by, created_at)
             VALUES (gen_random_uuid(), 'csv', $1, 0, 'test', now() - interval '200 days')",
        )
        .bind(path.to_string_lossy().to_string())
        .execute(&db.pool)
        .await
        .unwrap();
    }
    (root, archive)
}

#[tokio::test]
async fn a_forged_reports_message_for_a_logs_batch_hurts_only_itself() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let planned = plan_only(&db, Kind::Logs, &plan_options(500, "test")).await;
    let victim = db.batches_of(planned.job).await[0];
    // A worker with no REPORTS_ROOT gets a message claiming the logs batch
    // is a reports batch (forged, stale, or a drifted planner).
    let forged = format!(r#"{{"v":1,"batch_id":"{victim}","kind":"reports"}}"#);
    let d = worker::process(
        &db.pool,
        forged.as_bytes(),
        WorkerOptions::default(),
        &CancellationToken::new(),
    )
    .await;
    match d {
        Disposition::DeadLetter(reason) => {
            assert!(reason.contains("ledger says"), "{reason}")
        }
        other => panic!("the forged message must be parked, got {other:?}"),
    }
    assert_eq!(
        db.batch_state(victim).await,
        ("pending".into(), 0),
        "the real batch is untouched: not dead, no attempt spent"
    );
    let job: String = sqlx::query_scalar("SELECT status FROM archive_jobs WHERE id = $1")
        .bind(planned.job)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(job, "running", "its job is not failed");
    // The real message still runs it.
    let d = worker::process(
        &db.pool,
        &BatchMessage::new(victim, Kind::Logs).encode(),
        WorkerOptions::default(),
        &CancellationToken::new(),
    )
    .await;
    assert!(matches!(d, Disposition::Ack(_)), "{d:?}");
    db.cleanup().await;
}

#[tokio::test]
async fn a_reports_batch_reaching_a_worker_without_reports_root_is_handed_to_one_with_it() {
    let db = TestDb::new().await;
    let (root, archive) = reports_fixture(&db, 3).await;
    let mut opts = plan_options(500, "amqp");
    opts.reports_root = Some(root.clone());
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan::plan(&db.pool, Kind::Reports, &opts, &publisher)
        .await
        .unwrap();
    publisher.close().await.unwrap();
    assert_eq!(planned.batches, 1);
    let batch = db.batches_of(planned.job).await[0];

    // The unit of work: declined, not failed.
    let d = worker::process(
        &db.pool,
        &BatchMessage::new(batch, Kind::Reports).encode(),
        WorkerOptions::default(),
        &CancellationToken::new(),
    )
    .await;
    assert!(matches!(d, Disposition::Decline(_)), "{d:?}");
    assert_eq!(db.batch_state(batch).await, ("pending".into(), 0));

    // A worker without REPORTS_ROOT takes the delivery first and hands it
    // back; a worker with it then runs the batch.
    let stop = CancellationToken::new();
    let counted = Arc::new(worker::WorkerStats::default());
    let stop_without = CancellationToken::new();
    let without = {
        let (pool, cfg, stop, counted) = (
            db.pool.clone(),
            cfg.clone(),
            stop_without.clone(),
            counted.clone(),
        );
        tokio::spawn(async move {
            let mut consumer = AmqpConsumer::new(cfg, 1);
            let opts = WorkerOptions {
                concurrency: 1,
                ..Default::default()
            };
            worker::run_counting(&pool, &mut consumer, opts, stop, counted)
                .await
                .unwrap();
            consumer.close().await;
        })
    };
    wait_until(
        "the worker to decline it twice",
        Duration::from_secs(30),
        || std::future::ready(counted.declined.load(Ordering::Relaxed) >= 2),
    )
    .await;
    // Declined twice (the broker gave it back to the only worker there
    // is): still pending, no attempt spent.
    assert_eq!(db.batch_state(batch).await, ("pending".into(), 0));
    stop_without.cancel();
    without.await.unwrap();
    let with = {
        let exec = reports_executor(&db, &root, &archive).await;
        let (cfg, stop) = (cfg.clone(), stop.clone());
        tokio::spawn(async move {
            let mut consumer = AmqpConsumer::new(cfg, 1);
            let opts = WorkerOptions {
                concurrency: 1,
                ..Default::default()
            };
            let stats = worker::run(&exec, &mut consumer, opts, stop).await.unwrap();
            consumer.close().await;
            stats
        })
    };
    assert_eq!(db.wait_job(planned.job).await, "completed");
    stop.cancel();
    let with = with.await.unwrap();
    assert_eq!(with.done.load(Ordering::Relaxed), 1);
    assert_eq!(db.batch_state(batch).await.0, "done");
    let moved: i64 = sqlx::query_scalar("SELECT count(*) FROM reports_archive")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(moved, 3);
    delete_queues(&cfg).await;
    db.cleanup().await;
}

/// The worker binary on a queue of its own, told nothing of reports.
async fn worker_bin(db: &TestDb, envs: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut w = db.worker().args(args).amqp(&amqp_config());
    for (k, v) in envs {
        w = w.env(k, v);
    }
    w.output().await
}

#[tokio::test]
async fn a_worker_missing_what_a_kind_needs_refuses_to_start_unless_told_its_kinds() {
    let db = TestDb::new().await;
    let o = worker_bin(&db, &[], &[]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("REPORTS_ROOT") && err.contains("--kinds"),
        "{err}"
    );
    let o = worker_bin(&db, &[], &["--kinds", "logs,reports"]).await;
    assert_eq!(o.status.code(), Some(2));
    let o = worker_bin(&db, &[("ARCHIVER_KINDS", "logs,bogus")], &[]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("bogus"), "{err}");
    db.cleanup().await;
}

#[tokio::test]
async fn a_panicking_batch_fails_alone_and_the_run_goes_on() {
    let db = TestDb::new().await;
    db.load_logs(1_000).await;
    let (root, archive) = reports_fixture(&db, 2).await;
    let mut opts = plan_options(5_000, "inline");
    opts.reports_root = Some(root.clone());
    let reports = plan_only(&db, Kind::Reports, &opts).await;
    let logs = plan_only(&db, Kind::Logs, &opts).await;
    // The application changes a column of its own table under us: decoding
    // it panics inside the reports batch.
    sqlx::query("ALTER TABLE reports ALTER COLUMN generated_by TYPE integer USING 7")
        .execute(&db.pool)
        .await
        .unwrap();
    let exec = reports_executor(&db, &root, &archive).await;
    let (publisher, mut consumer) = inline::queue(Default::default());
    let mut messages: Vec<BatchMessage> = db
        .batches_of(reports.job)
        .await
        .into_iter()
        .map(|id| BatchMessage::new(id, Kind::Reports))
        .collect();
    messages.extend(
        db.batches_of(logs.job)
            .await
            .into_iter()
            .map(|id| BatchMessage::new(id, Kind::Logs)),
    );
    publisher.publish(&messages).await.unwrap();
    publisher.close().await.unwrap();
    let run = worker::run(
        &exec,
        &mut consumer,
        WorkerOptions::default(),
        CancellationToken::new(),
    );
    // Before the fix the panicked delivery was never settled: the run hung.
    let stats = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ends: the panicked delivery is settled")
        .unwrap();
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    let dead = publisher.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains("panicked"), "{:?}", dead[0].1);
    let r = sqlx::query("SELECT status, last_error FROM archive_batches WHERE job_id = $1")
        .bind(reports.job)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(r.get::<String, _>(0), "dead");
    assert!(
        r.get::<String, _>(1).contains("generated_by"),
        "the reason names the column: {}",
        r.get::<String, _>(1)
    );
    assert_eq!(
        db.wait_job(logs.job).await,
        "completed",
        "other work goes on"
    );
    // The panicked batch touched nothing: every file and row is in place.
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM reports")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 2);
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 2);
    db.cleanup().await;
}

/// Inserts a log row at `ts` (an SQL expression) and returns its id.
async fn log_at(db: &TestDb, ts: &str) -> Uuid {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO scenario_logs (scenario_id, received_at, message_hash, message_preview, source,
                                    size_bytes, has_pii, token_count, sqs_blocks)
         VALUES (gen_random_uuid(), {ts}, 'h', 'p', 'test', 10, false, 1, 1) RETURNING id"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn metric_at(db: &TestDb, ts: &str) -> Uuid {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO scenario_metrics (scenario_id, metric_type, metric_name, value, unit, \"timestamp\")
         VALUES (gen_random_uuid(), 'latency', 'p99', 1.5, 'ms', {ts}) RETURNING id"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn archive_partitions(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent IN ('scenario_logs_archive'::regclass, 'scenario_metrics_archive'::regclass)
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn sentinel_timestamps_are_never_archived_and_are_named() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    archiver::demo::load_metrics(&db.pool, 2_000, 5, 3 * 365)
        .await
        .unwrap();
    let sentinels = [
        ("-infinity", log_at(&db, "'-infinity'::timestamptz").await),
        (
            "BC",
            log_at(&db, "'0044-03-15 12:00:00+00 BC'::timestamptz").await,
        ),
        (
            "1970",
            log_at(&db, "'1970-01-01 00:00:00+00'::timestamptz").await,
        ),
        ("infinity", log_at(&db, "'infinity'::timestamptz").await),
    ];
    let metric_sentinels = [
        metric_at(&db, "'-infinity'::timestamptz").await,
        metric_at(&db, "'1970-01-01 00:00:00+00'::timestamptz").await,
        metric_at(&db, "'0001-01-01 00:00:00+00 BC'::timestamptz").await,
    ];
    let sane_old = db
        .hash(
            "FROM scenario_logs WHERE received_at < now() - interval '365 days'
               AND received_at >= '2000-01-01'",
        )
        .await;
    assert!(sane_old.0 > 0);

    // The dry run does not panic, and names every sentinel row.
    let o = db
        .planner()
        .args(["--dry-run", "--logs", "--metrics"])
        .output()
        .await;
    let text = both(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("logs: 4 row(s) with a time before the floor or infinite"),
        "{text}"
    );
    for (what, id) in &sentinels {
        assert!(
            text.contains(&id.to_string()),
            "{what} row {id} named: {text}"
        );
    }
    assert!(text.contains("metrics: 3 row(s)"), "{text}");

    // The real run archives everything else and leaves them where they are.
    let o = db.planner().args(["--logs", "--metrics"]).output().await;
    let text = both(&o);
    assert!(o.status.success(), "{text}");
    let still: i64 = sqlx::query_scalar("SELECT count(*) FROM scenario_logs WHERE id = ANY($1)")
        .bind(sentinels.iter().map(|s| s.1).collect::<Vec<_>>())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(still, 4, "sentinel rows stay in the hot table");
    let still: i64 = sqlx::query_scalar("SELECT count(*) FROM scenario_metrics WHERE id = ANY($1)")
        .bind(metric_sentinels.to_vec())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(still, 3);
    assert_eq!(
        db.hash("FROM scenario_logs_archive").await,
        sane_old,
        "every sane old row is archived, every column equal"
    );
    // No partition was made for a sentinel's month, and every name is sane.
    for p in archive_partitions(&db).await {
        let year: i32 = p.rsplit('_').nth(1).unwrap().parse().unwrap();
        assert!(year >= 2000, "partition {p} for a sentinel month");
    }
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM archive_jobs WHERE status <> 'completed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(failed, 0, "every job completed; none left running");

    // planner status names them too, text and JSON.
    let o = db.planner().args(["status"]).output().await;
    let text = both(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains(&sentinels[0].1.to_string()), "{text}");
    let o = db.planner().args(["status", "--json"]).output().await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["out_of_range"][0]["rows"], 4, "{v}");

    // Reports too: the dry run and the plan skip a report at -infinity.
    let (root, _archive) = reports_fixture(&db, 2).await;
    let bad: Uuid = sqlx::query_scalar(
        "INSERT INTO reports (scenario_id, format, file_path, created_at)
         VALUES (gen_random_uuid(), 'csv', 'x.csv', '-infinity') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut opts = plan_options(100, "test");
    opts.reports_root = Some(root);
    let e = plan::dry_run(&db.pool, Kind::Reports, &opts).await.unwrap();
    assert_eq!(e.rows, 2);
    let o = e.out_of_range.expect("the sentinel report is counted");
    assert_eq!((o.rows, o.examples[0].0), (1, bad));
    let planned = plan_only(&db, Kind::Reports, &opts).await;
    assert_eq!(planned.rows, 2);

    // A floor that is not a date, or is not in the past, is a setting
    // error naming the flag.
    for bad in ["1970-13-01", "2999-01-01", "-0044-03-15", "yesterday"] {
        let flag = format!("--timestamp-floor={bad}");
        let o = db
            .planner()
            .args(["--dry-run", "--logs", &flag])
            .output()
            .await;
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", both(&o));
        assert!(
            both(&o).contains("--timestamp-floor"),
            "{bad}: {}",
            both(&o)
        );
    }
    db.cleanup().await;
}

#[tokio::test]
async fn a_late_row_in_a_gap_month_finds_its_partition() {
    let db = TestDb::new().await;
    for days in [1000, 950, 900, 850, 800] {
        log_at(&db, &format!("now() - interval '{days} days'")).await;
    }
    // Job 1 (logs older than 700 days) is planned and not yet run: its
    // batches stay pending, so job 2 plans above them.
    let mut opts = plan_options(100, "test");
    opts.policy.logs_age_days = 700;
    let job1 = plan_only(&db, Kind::Logs, &opts).await;
    log_at(&db, "now() - interval '400 days'").await;
    opts.policy.logs_age_days = 365;
    let job2 = plan_only(&db, Kind::Logs, &opts).await;
    assert_eq!(job2.batches, 1);
    // A late row for a month between job 1's cut-off and job 2's first row:
    // it lies in job 2's first batch's range.
    let late = log_at(&db, "now() - interval '550 days'").await;
    for job in [job1.job, job2.job] {
        for id in db.batches_of(job).await {
            let d = worker::process(
                &db.pool,
                &BatchMessage::new(id, Kind::Logs).encode(),
                WorkerOptions::default(),
                &CancellationToken::new(),
            )
            .await;
            assert!(matches!(d, Disposition::Ack(_)), "batch {id}: {d:?}");
        }
        assert_eq!(db.wait_job(job).await, "completed");
    }
    let archived: i64 =
        sqlx::query_scalar("SELECT count(*) FROM scenario_logs_archive WHERE id = $1")
            .bind(late)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(archived, 1, "the late row is archived");
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM scenario_logs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(live, 0);
    db.cleanup().await;
}

#[tokio::test]
async fn logs_are_plain_text_in_a_pipe_and_json_on_request() {
    let db = TestDb::new().await;
    db.load_logs(1_000).await;
    // Piped (as cron's log file is): no escape codes.
    let o = db
        .planner()
        .args(["--logs", "-v", "--batch-size", "200"])
        .output()
        .await;
    let err = stderr(&o);
    assert!(o.status.success(), "{}", both(&o));
    assert!(err.contains("batch done"), "debug lines are there: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "no ANSI escape codes in a pipe: {err:?}"
    );

    // JSON: every line one object; a batch's lines carry its id and kind.
    db.load_logs(1_000).await;
    let o = db
        .planner()
        .args(["--logs", "-v", "--batch-size", "200"])
        .env("ARCHIVER_LOG_FORMAT", "json")
        .output()
        .await;
    assert!(o.status.success(), "{}", both(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let batch_lines: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["message"] == "batch done")
        .collect();
    assert!(!batch_lines.is_empty(), "{lines:?}");
    for v in batch_lines {
        assert!(
            v["span"]["archive_batch_id"]
                .as_str()
                .is_some_and(|s| s.len() == 36),
            "{v}"
        );
        assert_eq!(v["span"]["kind"], "logs", "{v}");
        assert!(
            v["rows"].as_i64().is_some(),
            "event fields are top-level: {v}"
        );
    }
    // A failing command's last line is JSON too.
    let o = db
        .planner()
        .args(["--reports"])
        .env("ARCHIVER_LOG_FORMAT", "json")
        .output()
        .await;
    assert_eq!(o.status.code(), Some(2));
    let last = String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let v: serde_json::Value =
        serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(v["level"], "ERROR");
    assert!(
        v["message"].as_str().unwrap().contains("REPORTS_ROOT"),
        "{v}"
    );
    assert_eq!(v["exit"], 2);
    // An unknown format is a setting error naming the flag.
    let o = db
        .planner()
        .args(["--logs", "--dry-run"])
        .env("ARCHIVER_LOG_FORMAT", "xml\u{1b}[31m")
        .output()
        .await;
    assert_eq!(o.status.code(), Some(2), "{}", both(&o));
    assert!(both(&o).contains("--log-format"), "{}", both(&o));
    db.cleanup().await;
}

#[tokio::test]
async fn a_broker_url_with_a_password_is_never_printed() {
    let db = TestDb::new().await;
    db.load_logs(200).await;
    let cfg = amqp_config();
    let port = url::Url::parse(&amqp_url()).unwrap().port().unwrap_or(5672);
    for url in [
        // Refused by the broker (wrong password), nobody listening, no scheme.
        format!("amqp://guest:hunter2@127.0.0.1:{port}/%2f"),
        "amqp://guest:hunter2@127.0.0.1:1/%2f".to_string(),
        format!("guest:hunter2@127.0.0.1:{port}"),
    ] {
        let o = db
            .planner()
            .args(["--logs"])
            .env("QUEUE_URL", &url)
            .env("ARCHIVER_QUEUE", &cfg.queue)
            .output()
            .await;
        assert!(!o.status.success(), "{url}: {}", both(&o));
        assert!(!both(&o).contains("hunter2"), "{url}: {}", both(&o));
    }
    // A worker retrying a broker it cannot log in to says so, and never
    // prints the password, at debug level too.
    let worker = db
        .worker()
        .args(["--kinds", "logs", "-v"])
        .env(
            "QUEUE_URL",
            format!("amqp://guest:hunter2@127.0.0.1:{port}/%2f"),
        )
        .env("ARCHIVER_QUEUE", &cfg.queue)
        .command();
    let mut child = tokio::process::Command::from(worker)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut text = String::new();
    // Its retries over five seconds (the scenario: several attempts, at
    // debug level), whatever they print.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf).await {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    child.kill().await.unwrap();
    assert!(!text.is_empty(), "the worker says why it cannot consume");
    assert!(!text.contains("hunter2"), "{text}");
    db.cleanup().await;
}
