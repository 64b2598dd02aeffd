//! Progress for a person watching: the inline planner's bars appear only on
//! a terminal, and `planner status --watch` follows a job from the ledger to
//! its end, as plain text or NDJSON, ending by itself.

use crate::helpers::bin::{Bin, both};
use crate::helpers::{TestDb, plan_only, plan_options, small_chunks, wait_until};
use archiver::transport::BatchMessage;
use archiver::vocabulary::Kind;
use archiver::worker::{self, Disposition, WorkerOptions};
use serde_json::Value;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A control character other than a line break: `\r`, ESC, …
fn control(s: &str) -> Option<char> {
    s.chars().find(|&c| c.is_control() && c != '\n')
}

#[tokio::test]
async fn an_inline_run_piped_prints_no_bar_and_no_control_character() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let out = db
        .planner()
        .args(["--logs", "--batch-size", "200", "--verbose"])
        .output_within(Duration::from_secs(60))
        .await;
    let text = both(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("logs: job"),
        "the run said how it ended: {text}"
    );
    assert_eq!(control(&text), None, "{text:?}");
    assert!(!text.contains(" batches  "), "no bar: {text}");
    db.cleanup().await;
}

/// `planner status --watch …` running, its stdout collected line by line.
struct Watcher {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Watcher {
    fn start(bin: Bin) -> Watcher {
        let mut c = tokio::process::Command::from(bin.command());
        c.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = c.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                collected.lock().unwrap().push(line);
            }
        });
        Watcher { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (bounded) until a line satisfies `f`.
    async fn wait_line(&self, what: &str, f: impl Fn(&str) -> bool) {
        wait_until(what, Duration::from_secs(20), || {
            std::future::ready(self.lines().iter().any(|l| f(l)))
        })
        .await;
    }

    /// Waits (bounded) until it has exited by itself.
    async fn exit(&mut self) -> ExitStatus {
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the watch ends by itself once no work is left")
            .unwrap()
    }
}

/// Plans logs into the ledger with nobody to run them: a job running, its
/// batches pending. Returns the job and its batches.
async fn pending_job(db: &TestDb) -> (Uuid, Vec<Uuid>) {
    db.load_logs(4_000).await;
    let planned = plan_only(db, Kind::Logs, &plan_options(500, "inline")).await;
    let batches = db.batches_of(planned.job).await;
    assert!(batches.len() >= 4, "{}", batches.len());
    (planned.job, batches)
}

/// Runs one batch here, in chunks, as a worker would.
async fn run_batch(db: &TestDb, id: Uuid) {
    let d = worker::process(
        small_chunks(&db.pool),
        &BatchMessage::new(id, Kind::Logs).encode(),
        WorkerOptions::default(),
        &CancellationToken::new(),
    )
    .await;
    assert!(matches!(d, Disposition::Ack(_)), "{d:?}");
}

#[tokio::test]
async fn status_watch_json_follows_a_job_to_its_end_and_stops_by_itself() {
    let db = TestDb::new().await;
    let (job, batches) = pending_job(&db).await;
    let mut w = Watcher::start(db.planner().args(["status", "--watch", "0.2", "--json"]));
    w.wait_line("a first reading", |l| l.contains(&job.to_string()))
        .await;
    // One batch at a time, each seen by the watcher before the next.
    for (i, &b) in batches.iter().enumerate() {
        run_batch(&db, b).await;
        let want = format!("\"batches_done\":{}", i + 1);
        w.wait_line(&format!("a reading after batch {}", i + 1), |l| {
            l.contains(&want)
        })
        .await;
    }
    assert!(w.exit().await.success());
    assert_eq!(db.job_status(job).await, "completed");
    let lines = w.lines();
    let mut last = (0, 0);
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["at"].is_string() && v["active"].is_u64(), "{line}");
        let j = &v["jobs"][0];
        assert_eq!(j["id"], job.to_string(), "{line}");
        assert_eq!(j["kind"], "logs", "{line}");
        for f in [
            "batches_in_progress",
            "batches_dead",
            "rows_left",
            "planning_done",
        ] {
            assert!(j.get(f).is_some(), "{f} in {line}");
        }
        assert!(j["rows_per_s"].is_null() || j["rows_per_s"].as_f64().unwrap() >= 0.0);
        assert!(j["eta_s"].is_null() || j["eta_s"].is_u64(), "{line}");
        assert_eq!(j["batches_total"], batches.len() as u64, "{line}");
        let now = (
            j["batches_done"].as_i64().unwrap(),
            j["rows_done"].as_i64().unwrap(),
        );
        assert!(
            now.0 >= last.0 && now.1 >= last.1,
            "moved back: {last:?} → {line}"
        );
        last = now;
    }
    let end: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(end["active"], 0);
    assert_eq!(end["jobs"][0]["status"], "completed");
    assert_eq!(end["jobs"][0]["rows_left"], 0);
    let moved = db
        .scalar(&format!(
            "SELECT count(*) FROM scenario_logs_archive WHERE archive_batch_id IN
             (SELECT id FROM archive_batches WHERE job_id = '{job}')"
        ))
        .await;
    assert_eq!(last.1, moved, "rows_done ends at the rows archived");
    // Rows moved while the watcher read: some reading had a rate.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"rows_per_s\":") && !l.contains("\"rows_per_s\":null")),
        "{lines:#?}"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn status_watch_follows_a_failed_job_until_its_other_batches_are_done() {
    let db = TestDb::new().await;
    let (job, batches) = pending_job(&db).await;
    // One batch parked: the job is failed, the fleet goes on with the rest.
    let parked = archiver::ledger::record_failure(&db.pool, batches[0], "test: parked", true, 5)
        .await
        .unwrap();
    assert_eq!(parked, Some(true));
    assert_eq!(db.job_status(job).await, "failed");
    let mut w = Watcher::start(db.planner().args(["status", "--watch", "0.2", "--json"]));
    w.wait_line("a first reading", |l| l.contains(&job.to_string()))
        .await;
    for &b in &batches[1..] {
        run_batch(&db, b).await;
    }
    assert!(w.exit().await.success());
    let lines = w.lines();
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["active"], 1, "{}", lines[0]);
    assert_eq!(first["jobs"][0]["status"], "failed");
    assert_eq!(first["jobs"][0]["batches_dead"], 1);
    assert_eq!(
        first["jobs"][0]["batches_pending"],
        batches.len() as u64 - 1
    );
    let end: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(end["active"], 0, "{end}");
    assert_eq!(end["jobs"][0]["batches_pending"], 0);
    assert_eq!(end["jobs"][0]["batches_done"], batches.len() as u64 - 1);
    assert_eq!(end["jobs"][0]["batches_dead"], 1);
    db.cleanup().await;
}

#[tokio::test]
async fn status_watch_not_on_a_terminal_prints_plain_blocks_and_stops_by_itself() {
    let db = TestDb::new().await;
    let (job, batches) = pending_job(&db).await;
    let mut w = Watcher::start(db.planner().args(["status", "--watch", "0.2"]));
    w.wait_line("a first block", |l| l.contains(&job.to_string()))
        .await;
    for &b in &batches {
        run_batch(&db, b).await;
    }
    assert!(w.exit().await.success());
    let text = w.lines().join("\n");
    assert_eq!(control(&text), None, "{text:?}");
    assert!(text.contains("1 job(s) with work left"), "{text}");
    assert!(
        text.contains(&format!("batches 0/{}", batches.len())),
        "{text}"
    );
    let end = text.rsplit("UTC: ").next().unwrap();
    assert!(end.starts_with("no job pending or running"), "{text}");
    assert!(end.contains(&format!("completed job {job}")), "{end}");
    assert!(
        end.contains(&format!("batches {n}/{n}", n = batches.len())),
        "{end}"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn status_watch_with_nothing_running_prints_once_and_ends() {
    let db = TestDb::new().await;
    let out = db
        .planner()
        .args(["status", "--watch", "--json"])
        .output_within(Duration::from_secs(20))
        .await;
    assert!(out.status.success(), "{}", both(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let v: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["active"], 0);
    assert_eq!(v["jobs"], Value::Array(vec![]));
    db.cleanup().await;
}

#[tokio::test]
async fn status_watch_ends_cleanly_on_sigint_and_sigterm() {
    let db = TestDb::new().await;
    let (job, _) = pending_job(&db).await;
    for signal in ["-INT", "-TERM"] {
        let mut w = Watcher::start(db.planner().args(["status", "--watch", "0.2", "--json"]));
        w.wait_line("a first reading", |l| l.contains(&job.to_string()))
            .await;
        let pid = w.child.id().unwrap().to_string();
        let kill = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = w.exit().await;
        assert!(status.success(), "{signal}: {status:?}");
        for line in w.lines() {
            serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        }
    }
    // Watching changed nothing: the job still runs, its batches pending.
    assert_eq!(db.job_status(job).await, "running");
    let pending = db
        .scalar(&format!(
            "SELECT count(*) FROM archive_batches WHERE job_id = '{job}' AND status = 'pending'"
        ))
        .await;
    assert_eq!(pending, db.batches_of(job).await.len() as i64);
    db.cleanup().await;
}

#[tokio::test]
async fn hostile_watch_intervals_exit_2_naming_the_flag() {
    let db = TestDb::new().await;
    let (job, batches) = pending_job(&db).await;
    for v in ["0", "-1", "abc", "1e9", "NaN", "inf", "0.1", "3601", ""] {
        let out = db
            .planner()
            .args(["status", &format!("--watch={v}")])
            .output_within(Duration::from_secs(20))
            .await;
        let text = both(&out);
        assert_eq!(out.status.code(), Some(2), "{v:?}: {text}");
        assert!(text.contains("--watch"), "{v:?}: {text}");
        assert!(text.contains("0.2 to 3600"), "{v:?}: {text}");
    }
    // The value apart from the flag, as a person types it.
    for v in ["0", "-1", "NaN"] {
        let out = db
            .planner()
            .args(["status", "--watch", v])
            .output_within(Duration::from_secs(20))
            .await;
        let text = both(&out);
        assert_eq!(out.status.code(), Some(2), "{v:?}: {text}");
        assert!(text.contains("--watch"), "{v:?}: {text}");
        assert!(out.stdout.is_empty(), "{v:?}: nothing shown: {text}");
    }
    // Refused before anything ran: the job and its batches are as planned.
    assert_eq!(db.job_status(job).await, "running");
    let pending = db
        .scalar(&format!(
            "SELECT count(*) FROM archive_batches WHERE job_id = '{job}' AND status = 'pending'"
        ))
        .await;
    assert_eq!(pending, batches.len() as i64);
    db.cleanup().await;
}

#[tokio::test]
async fn on_a_terminal_the_inline_run_draws_its_bars() {
    let Ok(script) = which("script") else {
        eprintln!(
            "skipped: `script` (util-linux) is not installed, no pseudo-terminal to run under"
        );
        return;
    };
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let cmd = format!("{} --logs --batch-size 200", env!("CARGO_BIN_EXE_planner"));
    // `script` runs the command on a pseudo-terminal and copies what it
    // wrote to stdout.
    // The planner's clean environment, given to `script` to pass on.
    let planner = db.planner().command();
    let mut c = std::process::Command::new(script);
    for (k, v) in planner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.args(["-qec", &cmd, "/dev/null"]).stdin(Stdio::null());
    let run = tokio::process::Command::from(c).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run under script ends")
        .unwrap();
    let text = both(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(" batches  "), "a bar was drawn: {text:?}");
    assert!(text.contains('\r') || text.contains('\x1b'), "{text:?}");
    assert!(text.contains("logs: job"), "{text:?}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM archive_batches WHERE status <> 'done'")
            .await,
        0
    );
    db.cleanup().await;
}

fn which(program: &str) -> Result<String, ()> {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map_err(|_| ())?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !path.is_empty() {
        Ok(path)
    } else {
        Err(())
    }
}
