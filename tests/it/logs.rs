//! The logs policy end to end, inline: every old row archived exactly once
//! with every column equal; the dry run; the query API.

use crate::helpers::{TestDb, plan_options, run_inline, stderr, stdout};
use archiver::plan;
use archiver::query::{self, Scope};
use archiver::transport::inline;
use sqlx::Row;
use uuid::Uuid;

#[tokio::test]
async fn every_old_row_is_archived_once_with_every_column_equal() {
    let db = TestDb::new().await;
    db.load_logs(20_000).await;
    let (old, young) = db.split_hashes().await;
    // Odd batch sizes, so batch edges fall everywhere.
    let job = run_inline(&db, archiver::vocabulary::Kind::Logs, 997)
        .await
        .job;
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(job, old.0).await;
    let batches: i64 = sqlx::query_scalar("SELECT count(*) FROM archive_batches WHERE job_id = $1")
        .bind(job)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(batches, (old.0 + 996) / 997);

    // A second run finds nothing left and still records a completed job.
    let again = run_inline(&db, archiver::vocabulary::Kind::Logs, 997)
        .await
        .job;
    db.assert_logs_invariant(&old, &young).await;
    let r = sqlx::query(
        "SELECT status, records_archived, batches_planned FROM archive_jobs WHERE id = $1",
    )
    .bind(again)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(r.get::<String, _>("status"), "completed");
    assert_eq!(r.get::<i64, _>("records_archived"), 0);
    assert_eq!(r.get::<i32, _>("batches_planned"), 0);
    db.cleanup().await;
}

#[tokio::test]
async fn rows_arriving_late_in_an_archived_range_are_archived_by_the_next_run() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    run_inline(&db, archiver::vocabulary::Kind::Logs, 500).await;
    // A late row, older than the cut-off, lands inside a finished range.
    sqlx::query(
        "INSERT INTO scenario_logs (scenario_id, received_at, message_hash, source, size_bytes, has_pii, token_count, sqs_blocks)
         SELECT scenario_id, received_at + interval '1 microsecond', 'late', source, 1, false, 1, 1
         FROM scenario_logs_archive ORDER BY received_at LIMIT 1",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (old, young) = db.split_hashes().await;
    assert_eq!(old.0, 1);
    let before = db.hash("FROM scenario_logs_archive").await;
    let job = run_inline(&db, archiver::vocabulary::Kind::Logs, 500)
        .await
        .job;
    db.assert_job_counted_once(job, 1).await;
    assert_eq!(db.hash("FROM scenario_logs_archive").await.0, before.0 + 1);
    assert_eq!(db.hash("FROM scenario_logs").await, young);
    db.cleanup().await;
}

#[tokio::test]
async fn query_api_returns_typed_rows_live_or_with_archive() {
    let db = TestDb::new().await;
    db.load_logs(5_000).await;
    let scenario: Uuid = sqlx::query_scalar("SELECT scenario_id FROM scenario_logs LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let all_before = query::get_logs(&db.pool, scenario, Scope::Live, 10_000)
        .await
        .unwrap();
    run_inline(&db, archiver::vocabulary::Kind::Logs, 1000).await;
    let live = query::get_logs(&db.pool, scenario, Scope::Live, 10_000)
        .await
        .unwrap();
    let all = query::get_logs(&db.pool, scenario, Scope::WithArchive, 10_000)
        .await
        .unwrap();
    assert!(!live.is_empty() && live.len() < all.len());
    assert!(
        live.iter()
            .all(|r| !r.is_archived && r.archived_at.is_none())
    );
    assert_eq!(all.len(), all_before.len());
    assert!(
        all.windows(2).all(|w| w[0].received_at >= w[1].received_at),
        "newest first"
    );
    // Same rows, every column, apart from the archive stamp.
    for (a, b) in all.iter().zip(&all_before) {
        assert_eq!(
            (a.id, &a.message_preview, a.size_bytes, a.received_at),
            (b.id, &b.message_preview, b.size_bytes, b.received_at)
        );
    }
    let archived = all.iter().filter(|r| r.is_archived).count();
    assert_eq!(archived + live.len(), all.len());
    assert!(
        all.iter()
            .filter(|r| r.is_archived)
            .all(|r| r.archived_at.is_some())
    );
    let limited = query::get_logs(&db.pool, scenario, Scope::WithArchive, 7)
        .await
        .unwrap();
    assert_eq!(limited, all[..7].to_vec());
    db.cleanup().await;
}

#[tokio::test]
async fn an_inline_run_that_died_is_resumed_by_the_next_run() {
    let db = TestDb::new().await;
    db.load_logs(4_000).await;
    let (old, young) = db.split_hashes().await;
    // A planner that recorded and enqueued its batches in-process, then died
    // before executing them (and before it finished planning).
    let (publisher, consumer) = inline::queue(Default::default());
    let dead_run = plan::plan(
        &db.pool,
        archiver::vocabulary::Kind::Logs,
        &plan_options(300, "inline"),
        &publisher,
    )
    .await
    .unwrap();
    drop((publisher, consumer));
    sqlx::query("UPDATE archive_jobs SET planning_done = false WHERE id = $1")
        .bind(dead_run.job)
        .execute(&db.pool)
        .await
        .unwrap();

    let o = db.planner().args(["--logs"]).output().await;
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.contains(&format!(
            "resuming {} unfinished batch(es)",
            dead_run.batches
        )),
        "{out}"
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(dead_run.job, old.0).await;
    let new_job_rows: i64 =
        sqlx::query_scalar("SELECT records_archived FROM archive_jobs WHERE id <> $1")
            .bind(dead_run.job)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        new_job_rows, 0,
        "the new run planned nothing the dead run already covered"
    );
    db.cleanup().await;
}
