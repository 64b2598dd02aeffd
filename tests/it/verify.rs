//! `planner verify` (R16): the archive holds what each batch recorded; a
//! changed or deleted row, a changed aggregate, a missing object are each
//! named by their batch (and only theirs); old batches without digests are
//! not verifiable, months dropped by retention are dropped, not missing;
//! `--deep` catches an object replaced with one of the same size; late
//! samples merged into an archived day move its sums to the merging batch;
//! bad flags exit 2 and change nothing.

use crate::helpers::bin::{both, stderr, stdout};
use crate::helpers::{Dirs, TestDb, run_inline, s3};
use archiver::vocabulary::Kind;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use uuid::Uuid;

/// A verify run is bounded: small data, a few seconds.
const LIMIT: Duration = Duration::from_secs(60);

/// Loads logs, metric samples and report files, all partly past their
/// policy age, and archives all three kinds with the planner binary into
/// `bucket`, in small batches.
async fn archive_all(db: &TestDb, root: &Path, bucket: &str) {
    db.load_logs(1_500).await;
    archiver::demo::load_metrics(&db.pool, 2_000, 4, 3 * 365)
        .await
        .unwrap();
    archiver::demo::load_reports(&db.pool, 9, 3, 400, root)
        .await
        .unwrap();
    let o = db
        .planner()
        .s3_reports(root, bucket)
        .args(["--all", "--batch-size", "200", "--reports-batch-size", "2"])
        .output_within(LIMIT)
        .await;
    assert!(o.status.success(), "{}", both(&o));
    for kind in ["logs", "metrics", "reports"] {
        let n = db
            .scalar(&format!(
                "SELECT count(*) FROM archive_batches WHERE kind = '{kind}' AND status = 'done'"
            ))
            .await;
        assert!(n >= 2, "{kind}: the test needs several batches, has {n}");
    }
}

/// A few report files archived by the planner binary into a new bucket:
/// their directories, the S3 client and the bucket.
async fn archive_reports(db: &TestDb, name: &str) -> (Dirs, aws_sdk_s3::Client, String) {
    let d = Dirs::new(name);
    let client = s3::client();
    let bucket = s3::new_bucket(&client).await;
    archiver::demo::load_reports(&db.pool, 4, 2, 400, &d.root)
        .await
        .unwrap();
    let o = db
        .planner()
        .s3_reports(&d.root, &bucket)
        .args(["--reports"])
        .output_within(LIMIT)
        .await;
    assert!(o.status.success(), "{}", both(&o));
    (d, client, bucket)
}

/// `planner verify ARGS` against `bucket`.
async fn verify(db: &TestDb, root: &Path, bucket: &str, args: &[&str]) -> Output {
    db.planner()
        .s3_reports(root, bucket)
        .args(["verify"])
        .args(args)
        .output_within(LIMIT)
        .await
}

/// `planner verify --json` with no object store (logs and metrics only):
/// its exit status and its one JSON object.
async fn verify_logs_json(db: &TestDb) -> (Option<i32>, Value) {
    let o = db
        .planner()
        .args(["verify", "--json"])
        .output_within(LIMIT)
        .await;
    let v = serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", both(&o)));
    (o.status.code(), v)
}

/// `planner verify --json ARGS`, its exit status and its one JSON object.
async fn verify_json(db: &TestDb, root: &Path, bucket: &str, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = verify(db, root, bucket, &all).await;
    let out = stdout(&o);
    assert_eq!(
        out.trim_end().lines().count(),
        1,
        "one object: {}",
        both(&o)
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {}", both(&o)));
    (o.status.code().unwrap(), v)
}

/// The batches the mismatches name.
fn named(v: &Value) -> BTreeSet<Uuid> {
    v["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["batch"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// A done batch of `kind` other than `not`, and one of its archived rows'
/// ids (logs: `scenario_logs_archive`; metrics: an aggregate).
async fn pick(db: &TestDb, kind: Kind, not: &[Uuid]) -> (Uuid, Uuid) {
    let table = match kind {
        Kind::Logs => "scenario_logs_archive",
        Kind::Metrics => "scenario_metrics_archive",
        _ => "reports_archive",
    };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT archive_batch_id, id FROM {table}
         WHERE archive_batch_id <> ALL($1) ORDER BY archive_batch_id, id LIMIT 1"
    )))
    .bind(not)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn ledger_state(db: &TestDb) -> String {
    sqlx::query_scalar("SELECT md5(string_agg(b::text, '|' ORDER BY b.id)) FROM archive_batches b")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn verify_matches_then_names_each_changed_batch_and_only_those() {
    let db = TestDb::new().await;
    let d = Dirs::new("verify");
    let client = s3::client();
    let bucket = s3::new_bucket(&client).await;
    archive_all(&db, &d.root, &bucket).await;

    // Everything matches: exit 0, and the counts are the archive's.
    let o = verify(&db, &d.root, &bucket, &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    assert!(stdout(&o).contains("0 mismatch(es)"), "{}", both(&o));
    assert!(stdout(&o).contains("all match"), "{}", both(&o));
    let (code, v) = verify_json(&db, &d.root, &bucket, &[]).await;
    assert_eq!(code, 0, "{v}");
    let s = &v["summary"];
    let done = db
        .scalar("SELECT count(*) FROM archive_batches WHERE status = 'done'")
        .await;
    let logs = db
        .scalar("SELECT count(*) FROM scenario_logs_archive")
        .await;
    let aggregates = db
        .scalar("SELECT count(*) FROM scenario_metrics_archive")
        .await;
    let samples = db
        .scalar("SELECT sum(sample_count)::bigint FROM scenario_metrics_archive")
        .await;
    let files = db.scalar("SELECT count(*) FROM reports_archive").await;
    assert_eq!(s["batches"], done, "{v}");
    assert_eq!(s["rows"], logs + aggregates, "{v}");
    assert_eq!(s["samples"], samples, "{v}");
    assert_eq!(s["objects"], files, "{v}");
    assert_eq!(s["mismatches"], 0, "{v}");
    assert_eq!(s["not_verifiable"], 0, "{v}");
    assert_eq!(s["dropped"], 0, "{v}");
    assert_eq!(s["ok"], true, "{v}");
    // Filters select fewer (or as many) batches, and still match.
    let (code, v) = verify_json(
        &db,
        &d.root,
        &bucket,
        &["--kind", "logs", "--sample", "50%"],
    )
    .await;
    assert_eq!(code, 0, "{v}");
    assert!(v["summary"]["batches"].as_i64().unwrap() <= done);
    assert_eq!(v["summary"]["objects"], 0, "{v}");
    let today = chrono::Utc::now().date_naive().to_string();
    let (code, v) = verify_json(&db, &d.root, &bucket, &["--since", &today]).await;
    assert_eq!(
        (code, &v["summary"]["batches"]),
        (0, &Value::from(done)),
        "{v}"
    );

    // One archived log row changed, another (of another batch) deleted, one
    // object deleted, one aggregate changed.
    let (changed, row) = pick(&db, Kind::Logs, &[]).await;
    sqlx::query("UPDATE scenario_logs_archive SET message_preview = 'tampered' WHERE id = $1")
        .bind(row)
        .execute(&db.pool)
        .await
        .unwrap();
    let (deleted, row) = pick(&db, Kind::Logs, &[changed]).await;
    sqlx::query("DELETE FROM scenario_logs_archive WHERE id = $1")
        .bind(row)
        .execute(&db.pool)
        .await
        .unwrap();
    let (aggregate, row) = pick(&db, Kind::Metrics, &[]).await;
    sqlx::query("UPDATE scenario_metrics_archive SET value = value + 1 WHERE id = $1")
        .bind(row)
        .execute(&db.pool)
        .await
        .unwrap();
    let (report_batch, report) = pick(&db, Kind::Reports, &[]).await;
    let key: String = sqlx::query_scalar("SELECT object_key FROM reports_archive WHERE id = $1")
        .bind(report)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    client
        .delete_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    let before = ledger_state(&db).await;

    let o = verify(&db, &d.root, &bucket, &[]).await;
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{}", both(&o));
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("mismatch:")).collect();
    let line = |batch: Uuid| -> String {
        let found: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains(&batch.to_string()))
            .collect();
        assert_eq!(found.len(), 1, "one line for {batch}: {out}");
        found[0].to_string()
    };
    let l = line(changed);
    assert!(
        l.contains("logs batch") && l.contains("digest differs"),
        "{l}"
    );
    assert!(!l.contains("rows"), "the row count still matches: {l}");
    let l = line(deleted);
    let recorded = db
        .scalar(&format!(
            "SELECT rows_archived FROM archive_batches WHERE id = '{deleted}'"
        ))
        .await;
    assert!(
        l.contains(&format!("rows {recorded} vs {}", recorded - 1)),
        "{l}"
    );
    let l = line(aggregate);
    assert!(
        l.contains("metrics batch") && l.contains("digest differs"),
        "{l}"
    );
    let l = line(report_batch);
    assert!(
        l.contains("reports batch") && l.contains(&format!("object {key} missing")),
        "{l}"
    );
    assert_eq!(lines.len(), 4, "only the changed batches: {out}");
    for batch in [changed, deleted, aggregate, report_batch] {
        let job: Uuid = sqlx::query_scalar("SELECT job_id FROM archive_batches WHERE id = $1")
            .bind(batch)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(line(batch).contains(&format!("job {job}")), "{out}");
    }

    let (code, v) = verify_json(&db, &d.root, &bucket, &[]).await;
    assert_eq!(code, 1);
    assert_eq!(
        named(&v),
        BTreeSet::from([changed, deleted, aggregate, report_batch]),
        "{v}"
    );
    assert_eq!(v["summary"]["batches_mismatched"], 4, "{v}");
    assert_eq!(v["summary"]["ok"], false, "{v}");
    // Only the kind asked for.
    let (code, v) = verify_json(&db, &d.root, &bucket, &["--kind", "metrics"]).await;
    assert_eq!((code, named(&v)), (1, BTreeSet::from([aggregate])), "{v}");
    // Only the job asked for.
    let job: Uuid = sqlx::query_scalar("SELECT job_id FROM archive_batches WHERE id = $1")
        .bind(report_batch)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let (code, v) = verify_json(&db, &d.root, &bucket, &["--job", &job.to_string()]).await;
    assert_eq!(
        (code, named(&v)),
        (1, BTreeSet::from([report_batch])),
        "{v}"
    );
    assert_eq!(ledger_state(&db).await, before, "verify changes nothing");

    s3::delete_bucket(&client, &bucket).await;
    db.cleanup().await;
}

#[tokio::test]
async fn deep_catches_an_object_replaced_with_one_of_the_same_size() {
    let db = TestDb::new().await;
    let (d, client, bucket) = archive_reports(&db, "verify-deep").await;
    let (batch, key): (Uuid, String) = sqlx::query_as(
        "SELECT archive_batch_id, object_key FROM reports_archive ORDER BY id LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // Same bytes but one, same size, same metadata: a HEAD cannot tell.
    let got = client
        .get_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    let metadata = got.metadata().cloned();
    let encoding = got.content_encoding().map(str::to_owned);
    let mut body = got.body.collect().await.unwrap().into_bytes().to_vec();
    let last = body.len() - 1;
    body[last / 2] ^= 0x5a;
    client
        .put_object()
        .bucket(&bucket)
        .key(&key)
        .set_metadata(metadata)
        .set_content_encoding(encoding)
        .body(body.into())
        .send()
        .await
        .unwrap();

    let o = verify(&db, &d.root, &bucket, &[]).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "a HEAD sees nothing: {}",
        both(&o)
    );
    let (code, v) = verify_json(&db, &d.root, &bucket, &["--deep"]).await;
    assert_eq!(code, 1, "{v}");
    assert_eq!(named(&v), BTreeSet::from([batch]), "{v}");
    let m = &v["mismatches"][0];
    assert_eq!(m["what"], "content", "{v}");
    assert!(m["message"].as_str().unwrap().contains(&key), "{v}");
    let files = db.scalar("SELECT count(*) FROM reports_archive").await;
    assert!(files >= 2, "{files}");
    assert_eq!(v["summary"]["objects"], files, "{v}");
    assert_eq!(v["summary"]["in_archive_tier"], 0, "{v}");
    // Another moves to Glacier (the lifecycle rule, after 90 days): its
    // content cannot be read, which is no mismatch.
    let other: String =
        sqlx::query_scalar("SELECT object_key FROM reports_archive WHERE object_key <> $1 LIMIT 1")
            .bind(&key)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    s3::to_glacier(&client, &bucket, &other).await;
    let (code, v) = verify_json(&db, &d.root, &bucket, &["--deep"]).await;
    assert_eq!(code, 1, "{v}");
    assert_eq!(
        named(&v),
        BTreeSet::from([batch]),
        "only the replaced one: {v}"
    );
    assert_eq!(v["summary"]["in_archive_tier"], 1, "{v}");
    let o = verify(&db, &d.root, &bucket, &["--deep"]).await;
    assert!(
        stdout(&o).contains("1 object(s) in an archive storage class"),
        "{}",
        both(&o)
    );
    s3::delete_bucket(&client, &bucket).await;
    db.cleanup().await;
}

/// Per batch, what it recorded against the sums over the aggregate rows
/// carrying its id: rows where they differ.
async fn metrics_ledger_differences(db: &TestDb) -> i64 {
    db.scalar(&format!(
        "SELECT count(*) FROM archive_batches b
         LEFT JOIN (SELECT archive_batch_id, sum(sample_count) AS n, sum(value_sum) AS s,
                           sum({}) AS d
                    FROM scenario_metrics_archive GROUP BY 1) a ON a.archive_batch_id = b.id
         WHERE b.kind = 'metrics' AND b.status = 'done'
           AND (b.samples_count IS DISTINCT FROM COALESCE(a.n, 0)
                OR b.samples_value_sum IS DISTINCT FROM COALESCE(a.s, 0)
                OR b.content_digest IS DISTINCT FROM COALESCE(a.d, 0))",
        archiver::schema::METRICS_AGG_DIGEST
    ))
    .await
}

#[tokio::test]
async fn late_samples_merged_into_an_archived_day_move_its_sums_to_the_merging_batch() {
    let db = TestDb::new().await;
    archiver::demo::load_metrics(&db.pool, 1_500, 3, 3 * 365)
        .await
        .unwrap();
    let first = run_inline(&db, Kind::Metrics, 200).await;
    assert_eq!(metrics_ledger_differences(&db).await, 0);
    let recorded_before: i64 = db
        .scalar(&format!(
            "SELECT sum(samples_count)::bigint FROM archive_batches WHERE job_id = '{}'",
            first.job
        ))
        .await;
    // A second job hits days the first archived: late samples for existing
    // aggregates (and one new group).
    sqlx::query(
        "INSERT INTO scenario_metrics (scenario_id, \"timestamp\", metric_type, metric_name, value, unit, extra_data)
         SELECT scenario_id, \"timestamp\" + interval '1 minute', metric_type, metric_name,
                value_sum / sample_count + 0.25, unit, extra_data
         FROM scenario_metrics_archive WHERE sample_count > 0 AND random() < 0.5
         UNION ALL
         SELECT '00000000-0000-0000-0000-0000000000ff', now() - interval '800 days', 'performance',
                'late', 1.000001, 'ms', '{}'::jsonb",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let late = db
        .scalar("SELECT count(*) FROM scenario_metrics WHERE \"timestamp\" < now() - interval '731 days'")
        .await;
    assert!(late > 10, "the test merges: {late} late samples");
    let second = run_inline(&db, Kind::Metrics, 200).await;
    assert_ne!(first.job, second.job);
    assert_eq!(
        metrics_ledger_differences(&db).await,
        0,
        "each batch's recorded sums equal its aggregates' after the merge"
    );
    let recorded_after: i64 = db
        .scalar(&format!(
            "SELECT sum(samples_count)::bigint FROM archive_batches WHERE job_id = '{}'",
            first.job
        ))
        .await;
    assert!(
        recorded_after < recorded_before,
        "merged rows moved off the first job's batches: {recorded_before} -> {recorded_after}"
    );
    let o = db
        .planner()
        .args(["verify", "--kind", "metrics"])
        .output_within(LIMIT)
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    db.cleanup().await;
}

#[tokio::test]
async fn batches_without_digests_are_not_verifiable_and_retention_drops_are_dropped() {
    let db = TestDb::new().await;
    db.load_logs(1_200).await;
    run_inline(&db, Kind::Logs, 100).await;
    // A batch recorded before digests were: NULL.
    let (old, row) = pick(&db, Kind::Logs, &[]).await;
    sqlx::query("UPDATE archive_batches SET content_digest = NULL WHERE id = $1")
        .bind(old)
        .execute(&db.pool)
        .await
        .unwrap();
    let o = db.planner().args(["verify"]).output_within(LIMIT).await;
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    assert!(
        stdout(&o).contains("1 not verifiable (archived before digests were recorded)"),
        "{}",
        both(&o)
    );
    // Its row count is still checked.
    sqlx::query("DELETE FROM scenario_logs_archive WHERE id = $1")
        .bind(row)
        .execute(&db.pool)
        .await
        .unwrap();
    let (code, v) = verify_logs_json(&db).await;
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(named(&v), BTreeSet::from([old]), "{v}");
    assert_eq!(v["mismatches"][0]["what"], "rows", "{v}");

    // Retention keeps 2 years of logs: the older months go, their batches
    // are dropped, not missing; the rest still match. (The old batch's
    // count is made whole again first.)
    sqlx::query("UPDATE archive_batches SET rows_archived = rows_archived - 1 WHERE id = $1")
        .bind(old)
        .execute(&db.pool)
        .await
        .unwrap();
    let o = db
        .planner()
        .args(["retention", "--logs-years", "2"])
        .output_within(LIMIT)
        .await;
    assert!(o.status.success(), "{}", both(&o));
    let recorded = db
        .scalar(
            "SELECT count(*) FROM archive_dropped_partitions d JOIN archive_jobs j ON j.id = d.job_id
             WHERE d.table_name = 'scenario_logs_archive' AND j.job_type = 'retention'",
        )
        .await;
    assert!(
        recorded >= 10,
        "each drop recorded with its job: {recorded}"
    );
    let (code, v) = verify_logs_json(&db).await;
    assert_eq!(code, Some(0), "{v}");
    let dropped = v["summary"]["dropped"].as_i64().unwrap();
    assert!(dropped > 0, "{v}");
    assert!(
        dropped < v["summary"]["batches"].as_i64().unwrap(),
        "younger batches still compared: {v}"
    );
    assert_eq!(named(&v), BTreeSet::new(), "{v}");
    let o = db.planner().args(["verify"]).output_within(LIMIT).await;
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    assert!(stdout(&o).contains("dropped by retention "), "{}", both(&o));
    // Months a retention run dropped before drops were recorded: their
    // partitions are gone, which is enough to tell.
    sqlx::query("DELETE FROM archive_dropped_partitions")
        .execute(&db.pool)
        .await
        .unwrap();
    let (code, w) = verify_logs_json(&db).await;
    assert_eq!(code, Some(0), "{w}");
    assert_eq!(w["summary"]["dropped"], v["summary"]["dropped"], "{w}");
    assert_eq!(named(&w), BTreeSet::new(), "{w}");
    db.cleanup().await;
}

#[tokio::test]
async fn bad_verify_flags_exit_2_naming_the_flag_and_change_nothing() {
    let db = TestDb::new().await;
    db.load_logs(300).await;
    let ran = run_inline(&db, Kind::Logs, 100).await;
    let logs_job = ran.job.to_string();
    let unknown = Uuid::new_v4().to_string();
    let retention = db.planner().args(["retention"]).output_within(LIMIT).await;
    assert!(retention.status.success(), "{}", both(&retention));
    let retention_job: Uuid =
        sqlx::query_scalar("SELECT id FROM archive_jobs WHERE job_type = 'retention'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let retention_job = retention_job.to_string();
    let before = ledger_state(&db).await;
    let archive = db.hash("FROM scenario_logs_archive").await;
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--since", "yesterday"], "--since"),
        (vec!["--since", "2024-13-01"], "--since"),
        (vec!["--since", ""], "--since"),
        (vec!["--since", "2999-01-01"], "--since"),
        (vec!["--sample", "0"], "--sample"),
        (vec!["--sample", "0%"], "--sample"),
        (vec!["--sample", "101"], "--sample"),
        (vec!["--sample", "abc"], "--sample"),
        (vec!["--sample=-5"], "--sample"),
        (vec!["--sample", "NaN"], "--sample"),
        (vec!["--sample", "99999999999999999999"], "--sample"),
        (vec!["--job", "garbage"], "--job"),
        (vec!["--job", &unknown], "--job"),
        (vec!["--job", &retention_job], "--job"),
        (vec!["--job", &logs_job, "--kind", "metrics"], "--job"),
        (vec!["--kind", "bogus"], "--kind"),
        (vec!["--kind", ""], "--kind"),
        (vec!["--deep", "--kind", "logs"], "--deep"),
        (vec!["--deep", "--job", &logs_job], "--deep"),
    ];
    for (args, names) in cases {
        let o = db
            .planner()
            .args(["verify"])
            .args(&args)
            .output_within(LIMIT)
            .await;
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", both(&o));
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
        assert!(err.contains(names), "{args:?}: names {names}: {err}");
        assert!(stdout(&o).is_empty(), "{args:?}: {}", both(&o));
    }
    assert_eq!(ledger_state(&db).await, before, "nothing changed");
    assert_eq!(db.hash("FROM scenario_logs_archive").await, archive);
    // And the job itself verifies.
    let o = db
        .planner()
        .args(["verify", "--job", &logs_job, "--sample", "100%"])
        .output_within(LIMIT)
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    db.cleanup().await;
}

#[tokio::test]
async fn objects_the_lifecycle_rule_expired_are_not_missing_but_younger_ones_are() {
    let db = TestDb::new().await;
    let (d, client, bucket) = archive_reports(&db, "verify-expired").await;
    let o = db
        .planner()
        .s3_reports(&d.root, &bucket)
        .args([
            "lifecycle",
            "--glacier-after-days",
            "10",
            "--expire-after-days",
            "30",
        ])
        .output_within(LIMIT)
        .await;
    assert!(o.status.success(), "{}", both(&o));
    let files: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
        "SELECT id, archive_batch_id, object_key FROM reports_archive ORDER BY id LIMIT 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let [(old_id, _, old_key), (_, young_batch, young_key)] = &files[..] else {
        panic!("two archived files: {files:?}");
    };
    // One was archived 40 days ago: the rule (30 days) deleted its object.
    // The other's object is gone though it is a day old: missing.
    sqlx::query(
        "UPDATE reports_archive SET archived_at = now() - interval '40 days' WHERE id = $1",
    )
    .bind(old_id)
    .execute(&db.pool)
    .await
    .unwrap();
    for key in [old_key, young_key] {
        client
            .delete_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
    }
    let (code, v) = verify_json(&db, &d.root, &bucket, &[]).await;
    assert_eq!(code, 1, "{v}");
    assert_eq!(named(&v), BTreeSet::from([*young_batch]), "{v}");
    assert_eq!(v["summary"]["expired"], 1, "{v}");
    let o = verify(&db, &d.root, &bucket, &[]).await;
    assert!(
        stdout(&o)
            .contains("1 object(s) gone, archived longer ago than the bucket's lifecycle rule"),
        "{}",
        both(&o)
    );
    s3::delete_bucket(&client, &bucket).await;
    db.cleanup().await;
}
