//! The reports policy end to end through the planner binary: files are
//! compressed into the object store, metadata moves, local files go only
//! after the commit; refused and missing files fail alone; restore returns
//! the original bytes; a crash at any step is repaired by redelivery.

use crate::helpers::bin::{S3_SECRET, stderr};
use crate::helpers::{Dirs, TestDb, ok, plan_only, plan_options, reports_executor, s3};
use archiver::objects::{self, Compression};
use archiver::transport::{BatchMessage, Publisher, inline};
use archiver::vocabulary::Kind;
use archiver::worker::{self, WorkerOptions};
use sha2::{Digest, Sha256};
use std::path::Path;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn dirs() -> Dirs {
    Dirs::new("reports")
}

fn sha(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Writes a file and its `reports` row, 200 days old.
async fn report(db: &TestDb, path: &Path, body: &[u8], format: &str) -> Uuid {
    if !body.is_empty() || !path.exists() {
        std::fs::write(path, body).unwrap();
    }
    sqlx::query_scalar(
        "INSERT INTO reports (scenario_id, format, file_path, file_size_bytes, generated_by, created_at)
         VALUES (gen_random_uuid(), $1, $2, $3, 'test', now() - interval '200 days') RETURNING id",
    )
    .bind(format)
    .bind(path.to_string_lossy().to_string())
    .bind(body.len() as i64)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

fn csv(rows: usize) -> Vec<u8> {
    (0..rows)
        .map(|i| format!("{i},scenario-{},{}.25,ok\n", i % 7, i * 3))
        .collect::<String>()
        .into_bytes()
}

/// Incompressible bytes (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn reports_round_trip_through_the_local_store_and_restore_byte_for_byte() {
    let db = TestDb::new().await;
    let d = dirs();
    let files = [
        (d.root.join("big.csv"), csv(400_000), "csv"), // ~10 MB, larger than a part
        (d.root.join("small.csv"), csv(50), "csv"),
        (d.root.join("random.pdf"), noise(300_000), "pdf"),
    ];
    let mut ids = Vec::new();
    for (p, body, f) in &files {
        ids.push((report(&db, p, body, f).await, sha(p), body.len()));
    }
    let young = report(&db, &d.root.join("young.csv"), &csv(10), "csv").await;
    sqlx::query("UPDATE reports SET created_at = now() - interval '10 days' WHERE id = $1")
        .bind(young)
        .execute(&db.pool)
        .await
        .unwrap();

    let out = ok(&db
        .planner()
        .local_reports(&d.root, &d.archive)
        .args(["--reports"])
        .output()
        .await);
    assert!(out.contains("3 of 3 reports archived"), "{out}");
    for (p, _, _) in &files {
        assert!(!p.exists(), "{} deleted after the commit", p.display());
    }
    assert!(
        d.root.join("young.csv").exists(),
        "younger report untouched"
    );
    let rows: Vec<(Uuid, String, i64, i64, bool, String)> = sqlx::query_as(
        "SELECT id, encoding, file_size_bytes, stored_size_bytes, deleted_locally, sha256 FROM reports_archive",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM reports")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 1);
    for (id, want_sha, len) in &ids {
        let r = rows.iter().find(|r| r.0 == *id).unwrap();
        assert!(r.4, "deleted_locally");
        assert_eq!((r.2, &r.5), (*len as i64, want_sha));
        let to = d.outside.join(format!("{id}.restored"));
        let out = ok(&db
            .planner()
            .local_reports(&d.root, &d.archive)
            .args([
                "restore-report",
                &id.to_string(),
                "--to",
                to.to_str().unwrap(),
            ])
            .output()
            .await);
        assert!(out.contains("SHA-256 verified"), "{out}");
        assert_eq!(&sha(&to), want_sha, "restored byte for byte");
    }
    let enc = |n: &str| {
        rows.iter()
            .find(|r| {
                r.0 == ids[match n {
                    "big" => 0,
                    "small" => 1,
                    _ => 2,
                }]
                .0
            })
            .unwrap()
            .clone()
    };
    assert_eq!(enc("big").1, "zstd");
    assert!(enc("big").3 < enc("big").2 / 3, "a CSV shrinks");
    assert_eq!(
        enc("random").1,
        "identity",
        "an incompressible file is stored as it is"
    );
    // Restoring over an existing file is refused.
    let o = db
        .planner()
        .local_reports(&d.root, &d.archive)
        .args([
            "restore-report",
            &ids[0].0.to_string(),
            "--to",
            d.outside.to_str().unwrap(),
        ])
        .output()
        .await;
    assert_eq!(o.status.code(), Some(2));
    db.cleanup().await;
}

#[tokio::test]
async fn refused_and_missing_files_fail_alone_and_are_left_untouched() {
    let db = TestDb::new().await;
    let d = dirs();
    let good = report(&db, &d.root.join("good.csv"), &csv(100), "csv").await;
    let secret = d.outside.join("secret.csv");
    let outside = report(&db, &secret, b"outside the root\n", "csv").await;
    std::os::unix::fs::symlink(&secret, d.root.join("link.csv")).unwrap();
    let link = report(&db, &d.root.join("link.csv"), b"", "csv").await;
    let missing = report(&db, &d.root.join("gone.csv"), b"x", "csv").await;
    std::fs::remove_file(d.root.join("gone.csv")).unwrap();

    let dry = ok(&db
        .planner()
        .local_reports(&d.root, &d.archive)
        .args(["--reports", "--dry-run"])
        .output()
        .await);
    assert!(
        dry.contains("4 eligible reports") && dry.contains("3 with a missing or refused file"),
        "{dry}"
    );
    let out = ok(&db
        .planner()
        .local_reports(&d.root, &d.archive)
        .args(["--reports"])
        .output()
        .await);
    assert!(out.contains("1 of 4 reports archived"), "{out}");
    assert!(
        secret.exists() && d.root.join("link.csv").exists(),
        "refused files are never deleted"
    );
    let reasons: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT item_id, reason FROM archive_item_failures")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let reason = |id: Uuid| {
        reasons
            .iter()
            .find(|r| r.0 == id)
            .map(|r| r.1.clone())
            .unwrap_or_default()
    };
    assert!(
        reason(outside).contains("outside REPORTS_ROOT"),
        "{reasons:?}"
    );
    assert!(reason(link).contains("outside REPORTS_ROOT"), "{reasons:?}");
    assert!(reason(missing).contains("No such file"), "{reasons:?}");
    // The job says so, and keeps its first reason.
    let note: Option<String> =
        sqlx::query_scalar("SELECT error_message FROM archive_jobs WHERE job_type = 'reports'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        note.as_deref(),
        Some("some reports were not archived; see archive_item_failures")
    );
    let stayed: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM reports ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let mut want = vec![outside, link, missing];
    want.sort();
    assert_eq!(stayed, want, "their reports rows stay");
    let archived: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM reports_archive")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(archived, vec![good]);
    db.cleanup().await;
}

/// Runs one planned batch through the real executor, inline.
async fn run_batch(db: &TestDb, d: &Dirs, batch: Uuid) {
    let exec = reports_executor(db, &d.root, &d.archive).await;
    let (publisher, mut consumer) = inline::queue(Default::default());
    publisher
        .publish(&[BatchMessage::new(batch, Kind::Reports)])
        .await
        .unwrap();
    publisher.close().await.unwrap();
    worker::run(
        &exec,
        &mut consumer,
        WorkerOptions::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(publisher.dead_letters().await.is_empty());
}

fn objects_in(dir: &Path) -> usize {
    fn walk(p: &Path, n: &mut usize) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, n);
            } else if !path.to_string_lossy().ends_with(".meta.json") {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

#[tokio::test]
async fn a_crash_at_any_step_is_repaired_by_redelivery() {
    let db = TestDb::new().await;
    let d = dirs();
    let mut files = Vec::new();
    for i in 0..3 {
        let p = d.root.join(format!("r{i}.csv"));
        report(&db, &p, &csv(1000 + i), "csv").await;
        files.push((p.clone(), sha(&p)));
    }
    // Plan only, as a planner whose executors died before running anything.
    let opts = archiver::plan::PlanOptions {
        reports_root: Some(d.root.clone()),
        ..plan_options(5000, "inline")
    };
    let planned = plan_only(&db, Kind::Reports, &opts).await;
    let batch: Uuid = sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1")
        .bind(planned.job)
        .fetch_one(&db.pool)
        .await
        .unwrap();

    // Crash after upload, before commit: the objects exist, nothing else.
    let store = objects::open(None, &d.archive).await.unwrap();
    let rows: Vec<(Uuid, chrono::DateTime<chrono::Utc>, String)> =
        sqlx::query_as("SELECT id, created_at, file_path FROM reports")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for (id, created, path) in &rows {
        store
            .put_file(
                Path::new(path),
                &objects::report_key_base(*created, *id, "csv"),
                Compression::Zstd,
            )
            .await
            .unwrap();
    }
    run_batch(&db, &d, batch).await;
    let count = |sql| db.scalar(sql);
    assert_eq!(
        count("SELECT count(*) FROM reports_archive").await,
        3,
        "one row each"
    );
    assert_eq!(objects_in(&d.archive), 3, "one object each");
    assert!(files.iter().all(|(p, _)| !p.exists()), "no local file");

    // Crash after commit, before the local delete: files back (as they were
    // archived: a changed file is kept, see report_safety), flag unset.
    for (i, (p, _)) in files.iter().enumerate() {
        std::fs::write(p, csv(1000 + i)).unwrap();
    }
    sqlx::query("UPDATE reports_archive SET deleted_locally = false")
        .execute(&db.pool)
        .await
        .unwrap();
    run_batch(&db, &d, batch).await;
    assert!(
        files.iter().all(|(p, _)| !p.exists()),
        "redelivery finishes the delete"
    );
    assert_eq!(
        count("SELECT count(*) FROM reports_archive WHERE deleted_locally").await,
        3
    );
    assert_eq!(count("SELECT count(*) FROM reports_archive").await, 3);
    assert_eq!(objects_in(&d.archive), 3);
    assert_eq!(
        count("SELECT records_archived FROM archive_jobs").await,
        3,
        "counted once"
    );
    let (id, _, _) = &rows[0];
    let to = d.outside.join("restored");
    let key: String = sqlx::query_scalar("SELECT object_key FROM reports_archive WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    store.restore(&key, &to).await.unwrap();
    let original = files
        .iter()
        .find(|(p, _)| p.to_string_lossy() == rows[0].2)
        .unwrap();
    assert_eq!(sha(&to), original.1);
    db.cleanup().await;
}

#[tokio::test]
async fn reports_round_trip_through_s3_configured_from_the_environment() {
    let db = TestDb::new().await;
    let d = dirs();
    let client = s3::client();
    let bucket = s3::new_bucket(&client).await;
    let big = d.root.join("big.csv");
    let id = report(&db, &big, &csv(500_000), "csv").await; // > one 8 MiB part
    let want = sha(&big);
    let pdf = report(&db, &d.root.join("r.pdf"), &noise(100_000), "pdf").await;

    let o = db
        .planner()
        .s3_reports(&d.root, &bucket)
        .args(["--reports", "--verbose"])
        .output()
        .await;
    let out = ok(&o);
    assert!(out.contains("2 of 2 reports archived"), "{out}");
    assert!(!stderr(&o).contains(S3_SECRET));
    assert!(!big.exists());
    let (location, key): (String, String) =
        sqlx::query_as("SELECT s3_location, object_key FROM reports_archive WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let created: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT created_at FROM reports_archive WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        key,
        format!("archived-reports/{}/{id}.csv.zst", created.format("%Y/%m"))
    );
    assert_eq!(location, format!("s3://{bucket}/{key}"));
    let head = client
        .head_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_encoding(), Some("zstd"));
    let listed = client
        .list_objects_v2()
        .bucket(&bucket)
        .prefix("archived-reports/")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.contents().len(), 2, "one object per report");

    let to = d.outside.join("big.restored.csv");
    ok(&db
        .planner()
        .s3_reports(&d.root, &bucket)
        .args([
            "restore-report",
            &id.to_string(),
            "--to",
            to.to_str().unwrap(),
        ])
        .output()
        .await);
    assert_eq!(sha(&to), want);
    let to = d.outside.join("r.restored.pdf");
    ok(&db
        .planner()
        .s3_reports(&d.root, &bucket)
        .args([
            "restore-report",
            &pdf.to_string(),
            "--to",
            to.to_str().unwrap(),
        ])
        .output()
        .await);

    // The bucket lifecycle: a dry run changes nothing; applying is idempotent.
    let dry = ok(&db
        .planner()
        .s3_reports(&d.root, &bucket)
        .args(["lifecycle", "--dry-run"])
        .output()
        .await);
    let rules = client
        .get_bucket_lifecycle_configuration()
        .bucket(&bucket)
        .send()
        .await;
    assert!(
        rules.is_err() || rules.unwrap().rules().is_empty(),
        "dry run applied nothing: {dry}"
    );
    ok(&db
        .planner()
        .s3_reports(&d.root, &bucket)
        .args(["lifecycle"])
        .output()
        .await);
    let again = ok(&db
        .planner()
        .s3_reports(&d.root, &bucket)
        .args(["lifecycle"])
        .output()
        .await);
    let rules = client
        .get_bucket_lifecycle_configuration()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let rule = rules
        .rules()
        .iter()
        .find(|r| r.id().unwrap_or_default().starts_with("archiver"))
        .expect("our rule");
    assert_eq!(rule.expiration().and_then(|e| e.days()), Some(1095));
    assert!(
        rule.transitions()
            .iter()
            .any(|t| t.storage_class().map(|c| c.as_str()) == Some("GLACIER"))
    );
    assert_eq!(rules.rules().len(), 1, "applied once: {again}");
    db.cleanup().await;
}
