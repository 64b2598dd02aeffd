//! The maintenance window (`--window`) and `--max-runtime`: the inline
//! planner stops and leaves the rest pending for the next run (which moves
//! it exactly once), does nothing outside its window, and a worker outside
//! its window holds no delivery; `planner status` says what is pending and
//! when the window opens.

use crate::helpers::amqp::{amqp_config, delete_queues, queue_depth};
use crate::helpers::bin::{both, ok, stderr};
use crate::helpers::http::{endpoint_of, get};
use crate::helpers::{TestDb, wait_until};
use chrono::Utc;
use std::time::{Duration, Instant};

/// A window that is closed now: from two to three hours from now (UTC).
fn closed_window() -> String {
    let now = Utc::now();
    let at = |h| {
        (now + chrono::Duration::hours(h))
            .format("%H:%M")
            .to_string()
    };
    format!("{}-{}", at(2), at(3))
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.scalar(sql).await
}

#[tokio::test]
async fn an_inline_run_past_max_runtime_leaves_the_rest_pending_and_the_next_run_finishes_it_once()
{
    let db = TestDb::new().await;
    db.load_logs(20_000).await;
    let (old, young) = db.split_hashes().await;
    // Small batches, resting four times each batch's time: the run cannot
    // finish in one second.
    let first = db
        .planner()
        .args(["--logs", "--batch-size", "50", "--max-runtime", "1s"])
        .env("ARCHIVER_CHUNK_TIME", "1ms")
        .env("ARCHIVER_REST_RATIO", "4")
        .output_within(Duration::from_secs(60))
        .await;
    let out = ok(&first);
    assert!(
        out.contains("stopped: past --max-runtime"),
        "{}",
        both(&first)
    );
    assert!(
        out.contains("left pending for the next run: logs: "),
        "{out}"
    );
    let pending = count(
        &db,
        "SELECT count(*) FROM archive_batches WHERE status = 'pending'",
    )
    .await;
    assert!(pending > 0, "work left pending:\n{out}");
    assert!(
        out.contains(&format!("logs: {pending} batch(es) planned with")),
        "{out}"
    );
    let moved = count(&db, "SELECT count(*) FROM scenario_logs_archive").await;
    assert!(moved < old.0, "the run stopped before the end: {moved}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM archive_batches WHERE status = 'dead' OR attempts > 1"
        )
        .await,
        0,
        "no batch dead, none charged an attempt for stopping"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM archive_jobs WHERE status <> 'running' OR failures > 0"
        )
        .await,
        0,
        "the job is running, not failed"
    );

    // Status shows the job running with its pending batches, and the window.
    let status = db
        .planner()
        .args(["--window", "00:00-23:59 UTC", "status"])
        .output()
        .await;
    let s = ok(&status);
    assert!(s.contains("running"), "{s}");
    assert!(s.contains(&format!("logs     {pending} batch(es)")), "{s}");
    assert!(
        s.contains("maintenance window 00:00-23:59 UTC: open now, closes at"),
        "{s}"
    );

    // The next run resumes the pending batches, exactly once.
    let second = db
        .planner()
        .args(["--logs", "--batch-size", "50"])
        .output_within(Duration::from_secs(120))
        .await;
    let out = ok(&second);
    assert!(
        out.contains(&format!("resuming {pending} unfinished batch(es)")),
        "{out}"
    );
    db.assert_logs_invariant(&old, &young).await;
    let job: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM archive_jobs ORDER BY created_at LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    db.assert_job_counted_once(job, old.0).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM archive_batches WHERE status <> 'done' OR attempts <> 1"
        )
        .await,
        0,
        "every batch ran once"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn an_inline_run_outside_its_window_moves_nothing_and_says_when_it_opens() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let (old, young) = db.split_hashes().await;
    let window = closed_window();
    let o = db
        .planner()
        .args(["--logs"])
        .env("ARCHIVER_WINDOW", &window)
        .output_within(Duration::from_secs(30))
        .await;
    let out = ok(&o);
    assert!(
        out.contains(&format!(
            "outside the maintenance window {window} UTC: it next opens at"
        )),
        "{}",
        both(&o)
    );
    assert!(out.contains("nothing planned or run now"), "{out}");
    assert_eq!(count(&db, "SELECT count(*) FROM archive_jobs").await, 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM scenario_logs_archive").await,
        0
    );
    assert_eq!(
        db.hash("FROM scenario_logs WHERE received_at < now() - interval '365 days'")
            .await,
        old
    );
    assert_eq!(
        db.hash("FROM scenario_logs WHERE received_at >= now() - interval '365 days'")
            .await,
        young
    );

    // Status, in text and JSON, says when the window opens.
    let s = ok(&db
        .planner()
        .env("ARCHIVER_WINDOW", &window)
        .args(["status"])
        .output()
        .await);
    assert!(
        s.contains(&format!(
            "maintenance window {window} UTC: closed now; next opens at"
        )),
        "{s}"
    );
    assert!(s.contains("pending work: none"), "{s}");
    let j = ok(&db
        .planner()
        .args(["--window", &window, "status", "--json"])
        .output()
        .await);
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(v["window"]["open"], false, "{j}");
    assert_eq!(v["window"]["closes_at"], serde_json::Value::Null, "{j}");
    let opens: chrono::DateTime<Utc> =
        serde_json::from_value(v["window"]["next_opens_at"].clone()).unwrap();
    let ahead = opens - Utc::now();
    assert!(
        ahead > chrono::Duration::minutes(60) && ahead <= chrono::Duration::hours(2),
        "{j}"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn hostile_windows_are_refused_naming_the_setting() {
    let db = TestDb::new().await;
    let huge = "9".repeat(100_000);
    for bad in [
        "25:00-06:00",
        "01:60-06:00",
        "0100",
        "",
        "01:00-01:00",
        "01:00-06:00 Mars/Olympus",
        "01:00-06:00 UTC junk",
        huge.as_str(),
    ] {
        // An empty variable is no variable (clap): only the flag is tried.
        for by_env in [!bad.is_empty(), false] {
            let b = if by_env {
                db.planner().env("ARCHIVER_WINDOW", bad).args(["status"])
            } else {
                db.planner().args([&format!("--window={bad}"), "status"])
            };
            let o = b.output().await;
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{bad:.40}: {}", both(&o));
            assert!(
                err.contains("--window") && err.contains("ARCHIVER_WINDOW"),
                "{bad:.40}: {err}"
            );
            assert!(err.len() < 2_000, "the error does not echo it whole");
        }
    }
    db.cleanup().await;
}

#[tokio::test]
async fn a_worker_outside_its_window_holds_no_delivery_and_takes_them_once_it_may() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let plan = db
        .planner()
        .amqp(&cfg)
        .args(["--logs", "--batch-size", "500"])
        .output()
        .await;
    ok(&plan);
    let batches = count(&db, "SELECT count(*) FROM archive_batches").await;
    assert!(batches >= 3);
    assert_eq!(queue_depth(&cfg, &cfg.queue).await, Some(batches as u32));

    let window = closed_window();
    let mut w = db
        .worker()
        .amqp(&cfg)
        .args([
            "--kinds",
            "logs",
            "--listen",
            "127.0.0.1:0",
            "--window",
            &window,
        ])
        .spawn();
    let addr = endpoint_of(&w).await;
    let said = format!("outside the maintenance window {window} UTC");
    wait_until(
        "the worker to say it waits",
        Duration::from_secs(20),
        || std::future::ready(w.log().contains(&said)),
    )
    .await;
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&said) && body.contains("opens at"), "{body}");
    assert_eq!(get(addr, "/healthz").await.0, 200);
    // For a bounded while, every message stays ready in the queue and every
    // batch pending: the worker holds none.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(queue_depth(&cfg, &cfg.queue).await, Some(batches as u32));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM archive_batches WHERE status = 'pending'"
        )
        .await,
        batches
    );
    assert!(w.is_running());
    // SIGTERM ends the wait at once.
    w.sigterm();
    assert!(
        w.exit(Duration::from_secs(15)).await.success(),
        "{}",
        w.log()
    );

    // Without the window it drains them.
    let w = db.worker().amqp(&cfg).args(["--kinds", "logs"]).spawn();
    let job: uuid::Uuid = sqlx::query_scalar("SELECT id FROM archive_jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(db.wait_job(job).await, "completed");
    w.stop().await;
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(job, old.0).await;
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_worker_past_max_runtime_exits_0_saying_so() {
    let db = TestDb::new().await;
    let cfg = amqp_config();
    let mut w = db
        .worker()
        .amqp(&cfg)
        .args(["--kinds", "logs", "--max-runtime", "1s"])
        .spawn();
    let status = w.exit(Duration::from_secs(20)).await;
    let log = w.log();
    assert!(status.success(), "{log}");
    assert!(log.contains("past --max-runtime"), "{log}");
    delete_queues(&cfg).await;
    db.cleanup().await;
}
