//! `planner restore --logs` (issue #14 part 2): a scenario's archived logs
//! back in the hot table with every column equal, as a job of type
//! `restore`; redelivered batches are no-ops; the hold keeps the next
//! `planner --logs` off them until it ends; hostile flags; an id
//! collision loses nothing. And `planner restore-report --scenario`.

use crate::helpers::{Dirs, TestDb, ok, run_inline, stderr, stdout};
use archiver::execute::{self, Executor, Outcome};
use archiver::ledger::RestoreScope;
use archiver::transport::{BatchMessage, inline};
use archiver::vocabulary::Kind;
use archiver::worker::{self, Disposition, WorkerOptions};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::process::Output;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A run of the planner must end within this.
const LIMIT: Duration = Duration::from_secs(60);

/// Logs loaded and archived; a scenario and six months of it, wholly
/// archived.
struct Archived {
    db: TestDb,
    scenario: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// (count, hash) of the scope's rows before archiving.
    scope_hash: (i64, String),
    /// (count, hash) of the rest of the archive after archiving.
    others_hash: (i64, String),
}

impl Archived {
    async fn new(rows: i64) -> Archived {
        let db = TestDb::new().await;
        db.load_logs(rows).await;
        let (scenario, from, to): (Uuid, DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
            "SELECT scenario_id, date_trunc('month', now() - interval '700 days'),
                    date_trunc('month', now() - interval '700 days') + interval '6 months'
             FROM scenario_logs ORDER BY scenario_id LIMIT 1",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let mut a = Archived {
            db,
            scenario,
            from,
            to,
            scope_hash: (0, String::new()),
            others_hash: (0, String::new()),
        };
        a.scope_hash = a.db.hash(&a.scope_in("scenario_logs")).await;
        assert!(
            a.scope_hash.0 >= 5,
            "test data must fill the month: {:?}",
            a.scope_hash
        );
        run_inline(&a.db, Kind::Logs, 997).await;
        assert_eq!(a.db.hash(&a.scope_in("scenario_logs")).await.0, 0);
        a.others_hash = a.db.hash(&a.others()).await;
        a
    }

    /// `FROM table WHERE` the scope.
    fn scope_in(&self, table: &str) -> String {
        format!(
            "FROM {table} WHERE scenario_id = '{}' AND received_at >= '{}' AND received_at < '{}'",
            self.scenario,
            self.from.to_rfc3339(),
            self.to.to_rfc3339()
        )
    }

    /// The archive but the scope.
    fn others(&self) -> String {
        format!(
            "FROM scenario_logs_archive WHERE NOT (scenario_id = '{}' AND received_at >= '{}' AND received_at < '{}')",
            self.scenario,
            self.from.to_rfc3339(),
            self.to.to_rfc3339()
        )
    }

    fn scope(&self) -> RestoreScope {
        RestoreScope {
            scenario: self.scenario,
            from: Some(self.from),
            to: Some(self.to),
        }
    }

    /// `planner verify --kind logs` finds every archive batch whole
    /// (restored rows are subtracted from the batches they came from).
    async fn verified(&self) {
        let out = ok(&self
            .db
            .planner()
            .args(["verify", "--kind", "logs"])
            .output_within(LIMIT)
            .await);
        assert!(out.contains("0 mismatch"), "{out}");
    }

    /// The arguments of `planner restore --logs` of the scope.
    fn restore_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["restore", "--logs", "--scenario"]
            .map(String::from)
            .to_vec();
        args.extend([
            self.scenario.to_string(),
            "--from".into(),
            self.from.to_rfc3339(),
            "--to".into(),
            self.to.to_rfc3339(),
        ]);
        args
    }

    /// `planner restore --logs` of the scope, with `extra` flags.
    async fn restore(&self, extra: &[&str]) -> Output {
        self.db
            .planner()
            .env("ARCHIVER_BATCH_SIZE", "97")
            .args(self.restore_args())
            .args(extra)
            .output_within(LIMIT)
            .await
    }

    /// What must not change when a command is refused or a dry run.
    async fn state(&self) -> Vec<(i64, String)> {
        vec![
            self.db.hash("FROM scenario_logs").await,
            self.db.hash("FROM scenario_logs_archive").await,
            (
                self.db
                    .scalar("SELECT count(*) FROM archive_jobs WHERE job_type = 'restore'")
                    .await
                    + self
                        .db
                        .scalar("SELECT count(*) FROM archive_restores")
                        .await
                    + self
                        .db
                        .scalar(
                            "SELECT COALESCE(sum(restored_rows), 0)::bigint FROM archive_batches",
                        )
                        .await,
                String::new(),
            ),
        ]
    }
}

#[tokio::test]
async fn restoring_a_scenarios_months_brings_every_column_back_and_leaves_the_rest() {
    let a = Archived::new(20_000).await;
    let out = ok(&a.restore(&[]).await);
    assert!(
        out.contains(&format!("{} rows restored", a.scope_hash.0)),
        "{out}"
    );
    assert!(out.contains("hold: 30 day(s), until"), "{out}");
    assert!(out.contains(&a.scenario.to_string()), "{out}");
    // Every column of every row equal to what was there before archiving.
    assert_eq!(a.db.hash(&a.scope_in("scenario_logs")).await, a.scope_hash);
    assert_eq!(a.db.hash(&a.scope_in("scenario_logs_archive")).await.0, 0);
    // Other scenarios and months untouched in the archive.
    assert_eq!(a.db.hash(&a.others()).await, a.others_hash);
    // The job, in the ledger with type restore, its batches of kind restore.
    let job = sqlx::query(
        "SELECT j.id, j.status, j.records_deleted, j.batches_planned, j.batches_done,
                (SELECT count(*) FROM archive_batches b WHERE b.job_id = j.id AND b.kind = 'restore') AS batches,
                r.scenario_id, r.hold_until > now() + interval '29 days' AS held
         FROM archive_jobs j JOIN archive_restores r ON r.job_id = j.id WHERE j.job_type = 'restore'",
    )
    .fetch_one(&a.db.pool)
    .await
    .unwrap();
    assert_eq!(job.get::<String, _>("status"), "completed");
    assert_eq!(
        job.get::<Option<i64>, _>("records_deleted"),
        Some(a.scope_hash.0)
    );
    let batches = (a.scope_hash.0 + 96) / 97;
    assert_eq!(job.get::<i64, _>("batches"), batches);
    assert_eq!(i64::from(job.get::<i32, _>("batches_done")), batches);
    assert_eq!(job.get::<Uuid, _>("scenario_id"), a.scenario);
    assert!(job.get::<bool, _>("held"));
    // The archive batches the rows came from are credited with them: their
    // count and digest (what `planner verify` subtracts).
    let credit = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT COALESCE(sum(restored_rows), 0)::bigint FROM archive_batches) AS rows,
                (SELECT COALESCE(sum(restored_digest), 0) FROM archive_batches)::text AS digest,
                (SELECT COALESCE(sum({}), 0)::text {}) AS want",
        archiver::schema::LOGS_ROW_DIGEST,
        a.scope_in("scenario_logs")
    )))
    .fetch_one(&a.db.pool)
    .await
    .unwrap();
    assert_eq!(credit.get::<i64, _>("rows"), a.scope_hash.0);
    assert_eq!(
        credit.get::<String, _>("digest"),
        credit.get::<String, _>("want")
    );
    a.db.cleanup().await;
}

#[tokio::test]
async fn a_redelivered_restore_batch_is_a_no_op() {
    let a = Archived::new(6_000).await;
    // Planned into a queue nobody reads: the batches stay pending.
    let (publisher, _consumer) = inline::queue(CancellationToken::new());
    let planned = archiver::plan::restore::plan(&a.db.pool, a.scope(), 30, 3, "inline", &publisher)
        .await
        .unwrap();
    let batches = a.db.batches_of(planned.planned.job).await;
    assert!(batches.len() > 1, "{batches:?}");
    let exec = Executor::from(&a.db.pool);
    let stop = CancellationToken::new();
    for &id in &batches {
        let first = execute::execute_batch(&exec, id, Kind::Restore, &stop)
            .await
            .unwrap();
        assert!(matches!(first, Outcome::Done { .. }), "{first:?}");
        let before = a.state().await;
        // Again, directly and as a delivered message: acknowledged, no effect.
        let again = execute::execute_batch(&exec, id, Kind::Restore, &stop)
            .await
            .unwrap();
        assert_eq!(again, Outcome::AlreadyDone);
        let payload = BatchMessage::new(id, Kind::Restore).encode();
        let d = worker::process(&exec, &payload, WorkerOptions::default(), &stop).await;
        assert_eq!(d, Disposition::Ack(Outcome::AlreadyDone));
        assert_eq!(a.state().await, before, "a redelivery changed something");
    }
    assert_eq!(a.db.hash(&a.scope_in("scenario_logs")).await, a.scope_hash);
    assert_eq!(a.db.job_status(planned.planned.job).await, "completed");
    // A message that names the batch as logs is the message's fault.
    let payload = BatchMessage::new(batches[0], Kind::Logs).encode();
    let d = worker::process(&exec, &payload, WorkerOptions::default(), &stop).await;
    assert!(
        matches!(d, Disposition::DeadLetter(ref r) if r.contains("restore")),
        "{d:?}"
    );
    // A worker serving logs serves restores; one serving only metrics
    // hands them back.
    let metrics_only = Executor {
        kinds: Some(vec![Kind::Metrics]),
        ..Executor::from(&a.db.pool)
    };
    assert!(metrics_only.declines(Kind::Restore).is_some());
    let logs_only = Executor {
        kinds: Some(vec![Kind::Logs]),
        ..Executor::from(&a.db.pool)
    };
    assert!(logs_only.declines(Kind::Restore).is_none());
    a.db.cleanup().await;
}

#[tokio::test]
async fn the_next_logs_run_respects_the_hold_and_archives_them_once_it_expires() {
    let a = Archived::new(8_000).await;
    ok(&a.restore(&["--hold-days", "30"]).await);
    let restored = a.db.hash(&a.scope_in("scenario_logs")).await;
    assert_eq!(restored, a.scope_hash);
    // The archive batches the rows came from expect them gone: verify
    // still finds every batch whole.
    a.verified().await;
    // The dry run counts no held row; the run moves none of them.
    let dry = ok(&a
        .db
        .planner()
        .args(["--logs", "--dry-run"])
        .output_within(LIMIT)
        .await);
    assert!(dry.contains("logs: 0 eligible rows"), "{dry}");
    let job = run_inline(&a.db, Kind::Logs, 997).await.job;
    assert_eq!(
        a.db.hash(&a.scope_in("scenario_logs")).await,
        restored,
        "held rows stay hot"
    );
    assert_eq!(
        a.db.batches_of(job).await.len(),
        0,
        "held rows are not cut into batches night after night"
    );
    assert_eq!(
        a.db.scalar(&format!(
            "SELECT records_archived FROM archive_jobs WHERE id = '{job}'"
        ))
        .await,
        0
    );
    // The hold ends: the next run archives them again, exactly once.
    sqlx::query("UPDATE archive_restores SET hold_until = now() - interval '1 second'")
        .execute(&a.db.pool)
        .await
        .unwrap();
    let dry = ok(&a
        .db
        .planner()
        .args(["--logs", "--dry-run"])
        .output_within(LIMIT)
        .await);
    assert!(
        dry.contains(&format!("logs: {} eligible rows", a.scope_hash.0)),
        "{dry}"
    );
    run_inline(&a.db, Kind::Logs, 997).await;
    assert_eq!(a.db.hash(&a.scope_in("scenario_logs")).await.0, 0);
    assert_eq!(
        a.db.hash(&a.scope_in("scenario_logs_archive")).await,
        a.scope_hash
    );
    assert_eq!(
        a.db.scalar("SELECT count(*) - count(DISTINCT id) FROM scenario_logs_archive")
            .await,
        0,
        "no row archived twice"
    );
    assert_eq!(a.db.hash(&a.others()).await, a.others_hash);
    // Archived a second time, by a new batch that recorded their digest.
    a.verified().await;
    let again = run_inline(&a.db, Kind::Logs, 997).await.job;
    assert_eq!(
        a.db.scalar(&format!(
            "SELECT records_archived FROM archive_jobs WHERE id = '{again}'"
        ))
        .await,
        0
    );
    a.db.cleanup().await;
}

#[tokio::test]
async fn hold_days_zero_says_the_next_run_archives_them_again() {
    let a = Archived::new(4_000).await;
    let out = ok(&a.restore(&["--hold-days", "0"]).await);
    assert!(
        out.contains("hold: none")
            && out.contains("next nightly `planner --logs` run will archive them again"),
        "{out}"
    );
    run_inline(&a.db, Kind::Logs, 997).await;
    assert_eq!(
        a.db.hash(&a.scope_in("scenario_logs_archive")).await,
        a.scope_hash
    );
    a.db.cleanup().await;
}

#[tokio::test]
async fn the_dry_run_changes_nothing_and_says_what_per_month() {
    let a = Archived::new(6_000).await;
    let before = a.state().await;
    let (s, f, to) = (
        a.scenario.to_string(),
        a.from.to_rfc3339(),
        a.to.to_rfc3339(),
    );
    let out = ok(&a
        .db
        .planner()
        .env("ARCHIVER_BATCH_SIZE", "97")
        .args([
            "restore",
            "--logs",
            "--scenario",
            &s,
            "--from",
            &f,
            "--to",
            &to,
            "--dry-run",
        ])
        .output_within(LIMIT)
        .await);
    assert!(out.contains("DRY RUN"), "{out}");
    assert!(
        out.contains(&format!("restore: {} archived rows", a.scope_hash.0)),
        "{out}"
    );
    // One line per month with rows.
    let months = out.lines().filter(|l| l.starts_with("  20")).count();
    let per_month: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(DISTINCT date_trunc('month', received_at AT TIME ZONE 'UTC')) {}",
        a.scope_in("scenario_logs_archive")
    )))
    .fetch_one(&a.db.pool)
    .await
    .unwrap();
    assert_eq!(months as i64, per_month, "{out}");
    assert!(out.contains("hold: 30 day(s)"), "{out}");
    assert_eq!(a.state().await, before, "the dry run changed something");
    a.db.cleanup().await;
}

/// Runs the planner with `args`; asserts exit `code` and that the output
/// says `says`.
async fn refused(db: &TestDb, args: &[&str], code: i32, says: &str) {
    let o = db.planner().args(args).output_within(LIMIT).await;
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(code), "{args:?}: {all}");
    assert!(all.contains(says), "{args:?} should say {says:?}: {all}");
}

#[tokio::test]
async fn hostile_flags_are_refused_naming_what_is_wrong_and_change_nothing() {
    let a = Archived::new(3_000).await;
    let db = &a.db;
    let before = a.state().await;
    let s = a.scenario.to_string();
    let unknown = Uuid::new_v4().to_string();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["restore", "--logs"], 2, "--scenario"),
        (&["restore", "--scenario", &s], 2, "--logs"),
        (
            &["restore", "--logs", "--scenario", "not-a-uuid"],
            2,
            "--scenario",
        ),
        (&["restore", "--logs", "--scenario", ""], 2, "--scenario"),
        (
            &["restore", "--logs", "--scenario", &unknown],
            2,
            "no logs of scenario",
        ),
        (
            &[
                "restore",
                "--logs",
                "--scenario",
                &s,
                "--from",
                "2024-13-01",
            ],
            2,
            "--from",
        ),
        (
            &["restore", "--logs", "--scenario", &s, "--to", "yesterday"],
            2,
            "--to",
        ),
        (
            &["restore", "--logs", "--scenario", &s, "--from", "-1"],
            2,
            "--from",
        ),
        (
            &[
                "restore",
                "--logs",
                "--scenario",
                &s,
                "--from",
                "2024-02-01",
                "--to",
                "2024-02-01",
            ],
            2,
            "not before --to",
        ),
        (
            &[
                "restore",
                "--logs",
                "--scenario",
                &s,
                "--from",
                "2024-03-01",
                "--to",
                "2024-02-01",
            ],
            2,
            "not before --to",
        ),
        (
            &["restore", "--logs", "--scenario", &s, "--hold-days", "-1"],
            2,
            "--hold-days",
        ),
        (
            &[
                "restore",
                "--logs",
                "--scenario",
                &s,
                "--hold-days",
                "99999999999",
            ],
            2,
            "--hold-days",
        ),
        (
            &[
                "restore",
                "--logs",
                "--scenario",
                &s,
                "--hold-days",
                "36501",
            ],
            2,
            "--hold-days",
        ),
        (
            &["restore", "--logs", "--scenario", &s, "--hold-days", "abc"],
            2,
            "--hold-days",
        ),
        (
            &["restore", "--logs", "--scenario", &s, "--hold-days", ""],
            2,
            "--hold-days",
        ),
        (
            &["restore", "--metrics", "--scenario", &s],
            2,
            "metrics cannot be restored to samples: they were aggregated into daily rows (R2); the aggregates stay in",
        ),
        (
            &["restore", "--logs", "--metrics", "--scenario", &s],
            2,
            "--metrics",
        ),
        (
            &["restore", "--reports", "--scenario", &s],
            2,
            "restore-report --scenario",
        ),
    ];
    for (args, code, says) in cases {
        refused(db, args, *code, says).await;
    }
    // A bad environment value is named too.
    let o = db
        .planner()
        .env("ARCHIVER_RESTORE_HOLD_DAYS", "-5")
        .args(["restore", "--logs", "--scenario", &s])
        .output_within(LIMIT)
        .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--hold-days"), "{}", stderr(&o));
    // An empty range says so and succeeds.
    let out = ok(&db
        .planner()
        .args([
            "restore",
            "--logs",
            "--scenario",
            &s,
            "--from",
            "1990-01-01",
            "--to",
            "1990-02-01",
        ])
        .output_within(LIMIT)
        .await);
    assert!(out.contains("nothing to restore"), "{out}");
    assert_eq!(
        a.state().await,
        before,
        "a refused command changed something"
    );
    a.db.cleanup().await;
}

#[tokio::test]
async fn an_id_collision_fails_the_batch_naming_the_id_and_loses_nothing() {
    let a = Archived::new(3_000).await;
    // The application wrote a row under an id that is in the archive.
    let clash: Uuid = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id {} ORDER BY received_at, id LIMIT 1",
        a.scope_in("scenario_logs_archive")
    )))
    .fetch_one(&a.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO scenario_logs (id, scenario_id, received_at, message_hash, source, size_bytes, has_pii, token_count, sqs_blocks)
         VALUES ($1, gen_random_uuid(), now(), 'clash', 'app', 1, false, 1, 1)",
    )
    .bind(clash)
    .execute(&a.db.pool)
    .await
    .unwrap();
    let o = a.restore(&["--hold-days", "1"]).await;
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(all.contains(&format!("id {clash}")), "{all}");
    // Both copies are still there: the archived row and the hot one.
    assert_eq!(
        a.db.scalar(&format!(
            "SELECT count(*) FROM scenario_logs_archive WHERE id = '{clash}'"
        ))
        .await,
        1
    );
    assert_eq!(
        a.db.scalar(&format!(
            "SELECT count(*) FROM scenario_logs WHERE id = '{clash}' AND message_hash = 'clash'"
        ))
        .await,
        1
    );
    // Nothing lost: every row of the scope is in one table or the other.
    let hot =
        a.db.scalar(&format!("SELECT count(*) {}", a.scope_in("scenario_logs")))
            .await;
    let cold =
        a.db.scalar(&format!(
            "SELECT count(*) {}",
            a.scope_in("scenario_logs_archive")
        ))
        .await;
    assert_eq!(hot + cold, a.scope_hash.0);
    assert!(cold >= 1);
    let dead = sqlx::query_scalar::<_, String>(
        "SELECT last_error FROM archive_batches WHERE kind = 'restore' AND status = 'dead'",
    )
    .fetch_one(&a.db.pool)
    .await
    .unwrap();
    assert!(dead.contains(&clash.to_string()), "{dead}");
    a.db.cleanup().await;
}

#[tokio::test]
async fn restore_report_by_scenario_restores_every_file_verified_and_never_overwrites() {
    let db = TestDb::new().await;
    let d = Dirs::new("restore-reports");
    archiver::demo::load_reports(&db.pool, 30, 3, 900, &d.root)
        .await
        .unwrap();
    ok(&db
        .planner()
        .local_reports(&d.root, &d.archive)
        .args(["--reports"])
        .output_within(LIMIT)
        .await);
    let scenario = "00000000-0000-0000-0000-000000000001";
    let archived: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT id, format, sha256 FROM reports_archive WHERE scenario_id = $1::uuid ORDER BY id",
    )
    .bind(scenario)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(archived.len() >= 3, "{archived:?}");
    let to = d.outside.join("restored");
    let out = ok(&db
        .planner()
        .local_reports(&d.root, &d.archive)
        .args([
            "restore-report",
            "--scenario",
            scenario,
            "--to",
            to.to_str().unwrap(),
        ])
        .output_within(LIMIT)
        .await);
    assert!(
        out.contains(&format!(
            "{n} of {n} report(s) restored",
            n = archived.len()
        )) && out.contains("0 failed"),
        "{out}"
    );
    let sha = |p: &std::path::Path| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
    };
    for (id, format, want) in &archived {
        assert_eq!(&sha(&to.join(format!("{id}.{format}"))), want, "{id}");
    }
    assert_eq!(std::fs::read_dir(&to).unwrap().count(), archived.len());
    // Again into a directory where one of the files already is: that one
    // fails and keeps its bytes, the others are restored, exit 1.
    let again = d.outside.join("again");
    std::fs::create_dir_all(&again).unwrap();
    let (id, format, _) = &archived[0];
    let kept = again.join(format!("{id}.{format}"));
    std::fs::write(&kept, b"mine").unwrap();
    let o = db
        .planner()
        .local_reports(&d.root, &d.archive)
        .args([
            "restore-report",
            "--scenario",
            scenario,
            "--to",
            again.to_str().unwrap(),
        ])
        .output_within(LIMIT)
        .await;
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(
        all.contains(&id.to_string()) && all.contains("not overwriting"),
        "{all}"
    );
    assert!(all.contains("1 failed"), "{all}");
    assert_eq!(std::fs::read(&kept).unwrap(), b"mine");
    for (other, format, want) in &archived[1..] {
        assert_eq!(&sha(&again.join(format!("{other}.{format}"))), want);
    }
    // Hostile: a scenario with nothing archived, a malformed one, a file
    // as the directory, and neither an id nor a scenario.
    let out = ok(&db
        .planner()
        .local_reports(&d.root, &d.archive)
        .args([
            "restore-report",
            "--scenario",
            &Uuid::new_v4().to_string(),
            "--to",
            to.to_str().unwrap(),
        ])
        .output_within(LIMIT)
        .await);
    assert!(out.contains("no archived reports"), "{out}");
    for (args, says) in [
        (
            vec!["restore-report", "--scenario", "x", "--to", "/tmp"],
            "--scenario",
        ),
        (
            vec![
                "restore-report",
                "--scenario",
                scenario,
                "--to",
                kept.to_str().unwrap(),
            ],
            "not a directory",
        ),
        (vec!["restore-report", "--to", "/tmp"], "required"),
    ] {
        let o = db
            .planner()
            .local_reports(&d.root, &d.archive)
            .args(&args)
            .output_within(LIMIT)
            .await;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    db.cleanup().await;
}

#[tokio::test]
async fn a_restore_goes_through_rabbitmq_and_duplicate_deliveries_change_nothing() {
    use crate::helpers::amqp::{amqp_config, delete_queues, spawn_worker, wait_queue_empty};
    use archiver::transport::Publisher;
    use archiver::transport::amqp::AmqpPublisher;
    let a = Archived::new(4_000).await;
    let cfg = amqp_config();
    let out = ok(&a
        .db
        .planner()
        .amqp(&cfg)
        .env("ARCHIVER_BATCH_SIZE", "3")
        .args(a.restore_args())
        .output_within(LIMIT)
        .await);
    assert!(
        out.contains(&format!("published to {}", cfg.queue)),
        "{out}"
    );
    assert!(out.contains("hold: 30 day(s), until"), "{out}");
    let job: Uuid = sqlx::query_scalar("SELECT id FROM archive_jobs WHERE job_type = 'restore'")
        .fetch_one(&a.db.pool)
        .await
        .unwrap();
    let batches = a.db.batches_of(job).await;
    assert!(batches.len() > 1, "{batches:?}");
    // Every batch's message published a second time: each runs once.
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let again: Vec<BatchMessage> = batches
        .iter()
        .map(|&id| BatchMessage::new(id, Kind::Restore))
        .collect();
    publisher.publish(&again).await.unwrap();
    let stop = CancellationToken::new();
    let workers = [
        spawn_worker(&a.db.url, &cfg, 2, &stop),
        spawn_worker(&a.db.url, &cfg, 2, &stop),
    ];
    assert_eq!(a.db.wait_job(job).await, "completed");
    wait_queue_empty(&cfg).await;
    stop.cancel();
    let mut done = 0;
    let mut already = 0;
    for w in workers {
        let stats = w.await.unwrap();
        done += stats.done.load(std::sync::atomic::Ordering::Relaxed);
        already += stats
            .already_done
            .load(std::sync::atomic::Ordering::Relaxed);
    }
    assert_eq!(done as usize, batches.len(), "each batch ran once");
    assert_eq!(
        already as usize,
        batches.len(),
        "each duplicate was a no-op"
    );
    assert_eq!(a.db.hash(&a.scope_in("scenario_logs")).await, a.scope_hash);
    assert_eq!(a.db.hash(&a.others()).await, a.others_hash);
    assert_eq!(
        a.db.scalar("SELECT COALESCE(sum(restored_rows), 0)::bigint FROM archive_batches")
            .await,
        a.scope_hash.0,
        "credited once"
    );
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    a.db.cleanup().await;
}

#[tokio::test]
async fn a_restore_whose_messages_were_lost_is_republished_by_the_next_logs_run() {
    use crate::helpers::amqp::{amqp_config, delete_queues, purge, spawn_worker};
    let a = Archived::new(4_000).await;
    let cfg = amqp_config();
    ok(&a
        .db
        .planner()
        .amqp(&cfg)
        .env("ARCHIVER_BATCH_SIZE", "3")
        .args(a.restore_args())
        .output_within(LIMIT)
        .await);
    let job: Uuid = sqlx::query_scalar("SELECT id FROM archive_jobs WHERE job_type = 'restore'")
        .fetch_one(&a.db.pool)
        .await
        .unwrap();
    let batches = a.db.batches_of(job).await;
    // The broker loses every message; an hour and a half passes.
    purge(&cfg).await;
    sqlx::query("UPDATE archive_batches SET published_at = now() - interval '90 minutes'")
        .execute(&a.db.pool)
        .await
        .unwrap();
    // The nightly logs run republishes them (restores ride the logs
    // workers); a metrics-only run leaves them be.
    let run = |kind: &'static str| {
        a.db.planner()
            .amqp(&cfg)
            .args([kind])
            .env("ARCHIVER_RESCUE_AFTER_MINUTES", "60")
            .output_within(LIMIT)
    };
    let out = ok(&run("--metrics").await);
    assert!(!out.contains("restore: republished"), "{out}");
    let out = ok(&run("--logs").await);
    assert!(
        out.contains(&format!("restore: republished {} batch(es)", batches.len())),
        "{out}"
    );
    let stop = CancellationToken::new();
    let w = spawn_worker(&a.db.url, &cfg, 2, &stop);
    assert_eq!(a.db.wait_job(job).await, "completed");
    stop.cancel();
    w.await.unwrap();
    assert_eq!(a.db.hash(&a.scope_in("scenario_logs")).await, a.scope_hash);
    assert_eq!(a.db.hash(&a.others()).await, a.others_hash);
    delete_queues(&cfg).await;
    a.db.cleanup().await;
}

#[tokio::test]
async fn a_restore_without_to_holds_only_what_was_archived_not_the_scenarios_new_logs() {
    let a = Archived::new(2_000).await;
    let (s, f) = (a.scenario.to_string(), a.from.to_rfc3339());
    ok(&a
        .db
        .planner()
        .args(["restore", "--logs", "--scenario", &s, "--from", &f])
        .output_within(LIMIT)
        .await);
    // The hold's range ends when the restore began: a log of the scenario
    // arriving later is not held.
    assert_eq!(
        a.db.scalar(
            "SELECT count(*) FROM archive_restores
             WHERE to_ts IS NOT NULL AND to_ts <= now() AND to_ts > from_ts"
        )
        .await,
        1
    );
    a.db.cleanup().await;
}
