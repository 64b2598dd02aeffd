//! Monitoring (R9): the metrics say what the ledger says, in a format
//! Prometheus accepts, printed or served; the alert rules are valid and fire
//! as their unit tests expect (promtool, from scripts/services.sh).

use crate::helpers::bin::{exited, sigterm};
use crate::helpers::{TestDb, ok};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use uuid::Uuid;

/// `promtool` with `args` in `dir`, fed `stdin`; panics if it is missing.
fn promtool(dir: &Path, args: &[&str], stdin: &str) -> Output {
    // scripts/services.sh names the one it found or unpacked.
    let tool = std::env::var("ARCHIVER_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = Command::new(&tool)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{tool}: {e}; `scripts/services.sh promtool` fetches it (run the tests with scripts/test)")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `name{labels} value` lines → value by `name{labels}`.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_owned(), value.parse().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn metrics_say_what_the_ledger_says_and_pass_promtool() {
    let db = TestDb::new().await;
    db.load_logs(3000).await;
    ok(&db
        .planner()
        .args(["--logs", "--batch-size", "500"])
        .output()
        .await);
    // Two metrics jobs fail; one of them is failed twice over (counted once)
    // and then, redriven, completes: the counter must not fall.
    let mut failed = Vec::new();
    for _ in 0..2 {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO archive_jobs (job_type, status) VALUES ('metrics', 'running') RETURNING id",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        archiver::ledger::fail_job(&db.pool, id, "boom")
            .await
            .unwrap();
        failed.push(id);
    }
    archiver::ledger::fail_job(&db.pool, failed[0], "again")
        .await
        .unwrap();
    sqlx::query("UPDATE archive_jobs SET status = 'completed', completed_at = now() WHERE id = $1")
        .bind(failed[0])
        .execute(&db.pool)
        .await
        .unwrap();
    // A batch of the other one is parked in the dead-letter queue.
    sqlx::query(
        "INSERT INTO archive_batches (id, job_id, kind, seq, hi_ts, planned_rows, status)
         VALUES (gen_random_uuid(), $1, 'metrics', 1, now(), 10, 'dead')",
    )
    .bind(failed[1])
    .execute(&db.pool)
    .await
    .unwrap();
    let (last, bytes, rows): (f64, i64, i64) = sqlx::query_as(
        "SELECT extract(epoch FROM completed_at)::float8, bytes_archived, records_archived
         FROM archive_jobs WHERE job_type = 'logs' AND status = 'completed'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(bytes > 0 && rows > 0);
    let last_batch: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(completed_at))::float8 FROM archive_batches WHERE status = 'done'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();

    let text = ok(&db.planner().args(["metrics"]).output().await);
    let m = samples(&text);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in:\n{text}"));
    assert_eq!(
        get(r#"archive_job_failures_total{job_type="metrics"}"#),
        2.0
    );
    for t in ["logs", "reports", "retention"] {
        assert_eq!(
            get(&format!(r#"archive_job_failures_total{{job_type="{t}"}}"#)),
            0.0
        );
    }
    assert!((get(r#"archive_job_last_success_timestamp{job_type="logs"}"#) - last).abs() < 0.01);
    assert!(m.contains_key(r#"archive_job_last_success_timestamp{job_type="metrics"}"#));
    assert_eq!(get(r#"archive_bytes_total{job_type="logs"}"#), bytes as f64);
    assert_eq!(
        get(r#"archive_rows_archived_total{job_type="logs"}"#),
        rows as f64
    );
    assert_eq!(get(r#"archive_batches{status="dead"}"#), 1.0);
    assert_eq!(get(r#"archive_batches{status="pending"}"#), 0.0);
    assert_eq!(get(r#"archive_jobs_running{job_type="logs"}"#), 0.0);
    assert!((get("archive_batch_last_completed_timestamp") - last_batch).abs() < 0.01);

    let lint = promtool(Path::new("."), &["check", "metrics"], &text);
    assert!(
        lint.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    db.cleanup().await;
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test]
async fn metrics_are_served_over_http_until_sigterm() {
    let db = TestDb::new().await;
    let mut child = db
        .planner()
        .args(["metrics", "--listen", "127.0.0.1:0"])
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("serving metrics at http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();

    let page = http_get(&addr, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{page}"
    );
    assert!(
        page.contains(r#"archive_job_failures_total{job_type="logs"} 0"#),
        "{page}"
    );
    // An empty ledger: no batch ever completed reads as 0 (so a fleet that
    // never started alerts).
    assert!(
        page.contains("archive_batch_last_completed_timestamp 0"),
        "{page}"
    );
    let missing = http_get(&addr, "/nope");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    sigterm(&child);
    let status = exited(&mut child, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    db.cleanup().await;
}

#[test]
fn alert_rules_are_valid_and_fire_as_their_unit_tests_say() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        &["check", "rules", "archive-alerts.yml"][..],
        &["test", "rules", "archive-alerts.test.yml"][..],
    ] {
        let o = promtool(&dir, args, "");
        assert!(
            o.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
