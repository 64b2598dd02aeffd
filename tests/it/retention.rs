//! Retention (R12): whole monthly partitions past retention are dropped and
//! nothing younger; report metadata goes only once its file is gone; a dry
//! run changes nothing; unfinished batches hold a table back.

use crate::helpers::{TestDb, ok};
use archiver::partitions::{ensure_months, month_start, partition_name};
use chrono::{DateTime, Duration, Months, Utc};
use uuid::Uuid;

const LOGS: &str = "scenario_logs_archive";
const METRICS: &str = "scenario_metrics_archive";

fn ago(years: u32, extra_months: u32) -> DateTime<Utc> {
    Utc::now() - Months::new(years * 12 + extra_months)
}

/// `n` rows of `table` in the month of `t`, inserted by `insert` ($1: the
/// month's start, $2: n), in a partition made as the planner makes them.
async fn rows_in(
    db: &TestDb,
    table: &'static str,
    insert: &str,
    t: DateTime<Utc>,
    n: i32,
) -> String {
    let month = month_start(t);
    ensure_months(&db.pool, table, month, month).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(insert.to_owned()))
        .bind(month)
        .bind(n)
        .execute(&db.pool)
        .await
        .unwrap();
    partition_name(table, month)
}

/// `n` archived log rows in the month of `t`, from its first hour on.
async fn logs_in(db: &TestDb, t: DateTime<Utc>, n: i32) -> String {
    let insert = "INSERT INTO scenario_logs_archive (id, scenario_id, received_at, message_hash, source,
             size_bytes, has_pii, token_count, sqs_blocks)
         SELECT gen_random_uuid(), gen_random_uuid(), $1 + make_interval(hours => g), 'h', 's', 1, false, 1, 1
         FROM generate_series(1, $2) g";
    rows_in(db, LOGS, insert, t, n).await
}

/// `n` daily aggregates in the month of `t`.
async fn metrics_in(db: &TestDb, t: DateTime<Utc>, n: i32) -> String {
    let insert = "INSERT INTO scenario_metrics_archive (id, scenario_id, \"timestamp\", metric_type, metric_name,
             value, unit, is_aggregated, aggregation_period, sample_count)
         SELECT gen_random_uuid(), gen_random_uuid(), $1 + make_interval(days => g - 1), 'cpu', 'usage',
             1, '%', true, 'day', 10
         FROM generate_series(1, $2) g";
    rows_in(db, METRICS, insert, t, n).await
}

async fn report_row(db: &TestDb, created_at: DateTime<Utc>, deleted_locally: bool) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO reports_archive (id, scenario_id, format, file_path, created_at, s3_location, deleted_locally)
         VALUES ($1, gen_random_uuid(), 'csv', 'r.csv', $2, 's3://b/k', $3)",
    )
    .bind(id)
    .bind(created_at)
    .bind(deleted_locally)
    .execute(&db.pool)
    .await
    .unwrap();
    id
}

/// Every child of both archive tables with its row count, and the report
/// metadata ids: what retention may change.
async fn archive_state(db: &TestDb) -> Vec<(String, i64)> {
    let mut state = Vec::new();
    for parent in [LOGS, METRICS] {
        let children: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = to_regclass($1) ORDER BY 1",
        )
        .bind(parent)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        for child in children {
            let n: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {child}")))
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            state.push((child, n));
        }
    }
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM reports_archive ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    state.extend(ids.into_iter().map(|id| (id.to_string(), 1)));
    state
}

async fn retention_jobs(db: &TestDb) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT status::text, records_deleted FROM archive_jobs WHERE job_type = 'retention'
         ORDER BY started_at",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn retention_drops_whole_months_past_retention_and_nothing_younger() {
    let db = TestDb::new().await;
    // Logs keep 7 years: a month that ended before the cut-off goes; the
    // month holding the cut-off stays whole, even its rows older than it.
    let logs_old = logs_in(&db, ago(7, 2), 5).await;
    let logs_edge = logs_in(&db, ago(7, 0), 4).await;
    let logs_recent = logs_in(&db, ago(2, 0), 3).await;
    // Metrics keep 5 years.
    let metrics_old = metrics_in(&db, ago(5, 3), 6).await;
    let metrics_recent = metrics_in(&db, ago(4, 0), 2).await;
    // A partition the archiver did not make, far past retention: left alone.
    sqlx::query(
        "CREATE TABLE scenario_logs_archive_legacy PARTITION OF scenario_logs_archive
         FOR VALUES FROM ('2001-01-01') TO ('2002-01-01')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Report metadata keeps 5 years, and only once the file is gone.
    let report_gone = report_row(&db, ago(6, 0), true).await;
    let report_file_left = report_row(&db, ago(6, 0), false).await;
    let report_young = report_row(&db, ago(4, 0), true).await;

    let before = archive_state(&db).await;
    let out = ok(&db.planner().args(["retention", "--dry-run"]).output().await);
    assert!(out.contains("DRY RUN"), "{out}");
    assert!(
        out.contains(&format!("would drop {logs_old} (5 rows")),
        "{out}"
    );
    assert!(
        out.contains(&format!("would drop {metrics_old} (6 rows")),
        "{out}"
    );
    assert!(out.contains("would delete 1 metadata rows"), "{out}");
    assert!(
        out.contains("kept 1 whose local file is not deleted yet"),
        "{out}"
    );
    assert!(out.contains("in all: 12 rows would be removed"), "{out}");
    assert!(
        out.contains("scenario_logs_archive_legacy: not a monthly partition"),
        "{out}"
    );
    for young in [&logs_edge, &logs_recent, &metrics_recent] {
        assert!(!out.contains(young.as_str()), "{young} listed: {out}");
    }
    assert_eq!(
        archive_state(&db).await,
        before,
        "a dry run changed something"
    );
    assert!(
        retention_jobs(&db).await.is_empty(),
        "a dry run recorded a job"
    );

    let out = ok(&db.planner().args(["retention"]).output().await);
    assert!(
        out.contains(&format!("dropped {logs_old} (5 rows")),
        "{out}"
    );
    assert!(out.contains(": 12 rows removed"), "{out}");
    assert!(
        out.contains(&format!("dropped {metrics_old} (6 rows")),
        "{out}"
    );
    let expected: Vec<(String, i64)> = before
        .iter()
        .filter(|(name, _)| {
            *name != logs_old && *name != metrics_old && *name != report_gone.to_string()
        })
        .cloned()
        .collect();
    assert_eq!(archive_state(&db).await, expected);
    for kept in [report_file_left, report_young] {
        assert!(expected.iter().any(|(n, _)| *n == kept.to_string()));
    }
    assert_eq!(
        retention_jobs(&db).await,
        vec![("completed".to_owned(), 5 + 6 + 1)]
    );

    // Idempotent: a second run finds nothing and says so.
    let out = ok(&db.planner().args(["retention"]).output().await);
    assert!(out.contains("no partition is past retention"), "{out}");
    assert!(out.contains("deleted 0 metadata rows"), "{out}");
    assert_eq!(archive_state(&db).await, expected);
    assert_eq!(retention_jobs(&db).await.len(), 2);
    db.cleanup().await;
}

#[tokio::test]
async fn unfinished_batches_hold_their_table_and_short_periods_are_refused() {
    let db = TestDb::new().await;
    let logs_old = logs_in(&db, ago(8, 0), 2).await;
    let metrics_old = metrics_in(&db, ago(6, 0), 2).await;
    // A dead logs batch, awaiting a redrive, may yet write into an old month.
    let job: Uuid = sqlx::query_scalar(
        "INSERT INTO archive_jobs (job_type, status) VALUES ('logs', 'running') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO archive_batches (id, job_id, kind, seq, hi_ts, hi_id, planned_rows, status)
         VALUES (gen_random_uuid(), $1, 'logs', 1, $2, gen_random_uuid(), 10, 'dead')",
    )
    .bind(job)
    .bind(Utc::now() - Duration::days(3000))
    .execute(&db.pool)
    .await
    .unwrap();

    // A retention run that died left its job running: the next run closes
    // it as failed (and counted), then records its own.
    let stale: Uuid = sqlx::query_scalar(
        "INSERT INTO archive_jobs (job_type, status, started_at) VALUES ('retention', 'running', now())
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();

    let out = ok(&db.planner().args(["retention"]).output().await);
    let (status, failures): (String, i32) =
        sqlx::query_as("SELECT status::text, failures FROM archive_jobs WHERE id = $1")
            .bind(stale)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), failures), ("failed", 1));
    assert!(
        out.contains("held: scenario_logs_archive: 1 partition(s) past retention kept: 1 logs batch(es) are not done"),
        "{out}"
    );
    assert!(!out.contains(&format!("dropped {logs_old}")), "{out}");
    assert!(
        out.contains(&format!("dropped {metrics_old} (2 rows")),
        "{out}"
    );
    let names: Vec<String> = archive_state(&db).await.into_iter().map(|s| s.0).collect();
    assert!(
        names.contains(&logs_old) && !names.contains(&metrics_old),
        "{names:?}"
    );

    // A period that does not outlast the archive age would drop rows as
    // soon as they are archived: refused before anything is touched.
    let o = db
        .planner()
        .args(["retention", "--logs-years", "1"])
        .output()
        .await;
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--logs-years") && err.contains("--logs-age-days 365"),
        "{err}"
    );
    assert!(archive_state(&db).await.iter().any(|(n, _)| *n == logs_old));
    db.cleanup().await;
}
