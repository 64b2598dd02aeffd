//! The spec's queries under "Querying Archived Data", "Monitoring" and
//! "Maintenance", run verbatim after an archive run.

use crate::helpers::{TestDb, ok};
use sqlx::Row;
use uuid::Uuid;

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .len() as i64
}

#[tokio::test]
async fn the_specs_queries_run_and_return_the_expected_rows() {
    let db = TestDb::new().await;
    db.load_logs(30_000).await;
    archiver::demo::load_metrics(&db.pool, 2_000, 50, 3 * 365)
        .await
        .unwrap();
    let sid: Uuid = sqlx::query_scalar("SELECT scenario_id FROM scenario_logs LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let q = |sql: &str| sql.replace("'uuid-here'", &format!("'{sid}'"));
    let per = |cond: &str| {
        format!("SELECT count(*) FROM scenario_logs WHERE scenario_id = '{sid}' AND {cond}")
    };
    let total = db.scalar(&per("true")).await;
    let live_expected = db
        .scalar(&per("received_at >= now() - interval '365 days'"))
        .await;
    let archived_expected = db
        .scalar(&per("received_at < now() - interval '365 days'"))
        .await;
    let jan_2025 = db
        .scalar(&per(
            "received_at >= '2025-01-01' AND received_at < '2025-02-01'",
        ))
        .await;
    assert!(jan_2025 > 0 && live_expected > 0 && archived_expected > 0);

    ok(&db.planner().args(["--all"]).output().await);

    // Querying Archived Data
    let all = q(
        "SELECT * FROM v_scenario_logs_all WHERE scenario_id = 'uuid-here' ORDER BY received_at DESC LIMIT 1000;",
    );
    assert_eq!(count(&db, &all).await, total.min(1000));
    let metrics = q(
        "SELECT * FROM v_scenario_metrics_all WHERE scenario_id = 'uuid-here' AND timestamp > NOW() - INTERVAL '2 years' ORDER BY timestamp;",
    );
    let metrics_expected = db.scalar(&format!("SELECT count(*) FROM scenario_metrics WHERE scenario_id = '{sid}' AND timestamp > now() - interval '2 years'")).await;
    assert_eq!(count(&db, &metrics).await, metrics_expected);
    let live =
        q("SELECT * FROM scenario_logs WHERE scenario_id = 'uuid-here' ORDER BY received_at DESC;");
    assert_eq!(count(&db, &live).await, live_expected);
    let archived = q(
        "SELECT * FROM scenario_logs_archive WHERE scenario_id = 'uuid-here' AND received_at < NOW() - INTERVAL '1 year' ORDER BY received_at DESC;",
    );
    assert_eq!(count(&db, &archived).await, archived_expected);
    let month = q(
        "SELECT * FROM scenario_logs_archive WHERE received_at >= '2025-01-01' AND received_at < '2025-02-01' AND scenario_id = 'uuid-here';",
    );
    assert_eq!(count(&db, &month).await, jan_2025);

    // Partition pruning (Troubleshooting): one month touches one partition.
    let plan: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM scenario_logs_archive WHERE received_at >= '2025-01-01' AND received_at < '2025-02-01';",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let text = plan.to_string();
    let touched: Vec<&str> = text
        .split("\"Relation Name\":\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap())
        .collect();
    assert_eq!(touched, vec!["scenario_logs_archive_2025_01"], "{text}");

    // Monitoring
    let jobs = sqlx::query(
        "SELECT job_type, status, started_at, completed_at, records_archived, records_deleted, pg_size_pretty(bytes_archived) as space_saved FROM archive_jobs ORDER BY started_at DESC LIMIT 10;",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut types: Vec<String> = jobs.iter().map(|r| r.get("job_type")).collect();
    types.sort();
    assert_eq!(
        types,
        ["logs", "metrics"],
        "one job per kind planned (no REPORTS_ROOT: reports are skipped)"
    );
    assert!(
        jobs.iter()
            .all(|r| r.get::<String, _>("status") == "completed")
    );
    let logs_job = jobs
        .iter()
        .find(|r| r.get::<String, _>("job_type") == "logs")
        .unwrap();
    let archived_total = db
        .scalar("SELECT count(*) FROM scenario_logs_archive")
        .await;
    assert_eq!(
        logs_job.get::<Option<i64>, _>("records_archived"),
        Some(archived_total)
    );
    let metrics_job = jobs
        .iter()
        .find(|r| r.get::<String, _>("job_type") == "metrics")
        .unwrap();
    let aggregates = db
        .scalar("SELECT count(*) FROM scenario_metrics_archive")
        .await;
    assert!(aggregates > 0);
    assert_eq!(
        metrics_job.get::<Option<i64>, _>("records_archived"),
        Some(aggregates)
    );
    assert_eq!(
        count(
            &db,
            "SELECT * FROM archive_jobs WHERE status = 'failed' ORDER BY started_at DESC;"
        )
        .await,
        0
    );
    let stats = sqlx::query("SELECT * FROM v_archive_statistics;")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(stats.len(), 3);
    let logs = stats
        .iter()
        .find(|r| r.get::<String, _>("archive_type") == "logs")
        .unwrap();
    assert_eq!(logs.get::<i64, _>("total_records"), archived_total);
    let growth = sqlx::query(
        "SELECT DATE_TRUNC('month', archived_at) as archive_month, archive_type, COUNT(*) as records_archived, pg_size_pretty(SUM(total_bytes)) as bytes_archived FROM v_archive_statistics GROUP BY DATE_TRUNC('month', archived_at), archive_type ORDER BY archive_month DESC;",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        growth.len(),
        3,
        "the spec's growth query runs: one row per archive type"
    );
    let real_growth: i64 = db.scalar(
        "SELECT sum(records_archived)::bigint FROM v_archive_growth WHERE archive_type = 'logs'",
    )
    .await;
    assert_eq!(
        real_growth, archived_total,
        "v_archive_growth answers the question"
    );

    // Maintenance
    let parts = sqlx::query(
        "SELECT schemaname, tablename, pg_size_pretty(pg_total_relation_size(schemaname||'.'||tablename)) as size FROM pg_tables WHERE tablename LIKE 'scenario_logs_archive_%' ORDER BY tablename;",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let months = db.scalar("SELECT count(DISTINCT date_trunc('month', received_at AT TIME ZONE 'UTC')) FROM scenario_logs_archive").await;
    assert!(
        parts.len() as i64 >= months && months >= 24,
        "{} partitions for {months} months",
        parts.len()
    );
    assert!(
        parts
            .iter()
            .any(|r| r.get::<String, _>("tablename") == "scenario_logs_archive_2025_01")
    );
    let idx = count(
        &db,
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename LIKE '%_archive%';",
    )
    .await;
    assert!(idx > 0);
    db.cleanup().await;
}
