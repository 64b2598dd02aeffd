//! Report files under hostile conditions: a file that cannot be deleted
//! after its batch committed, a file changed or swapped (symlink, FIFO)
//! after it was archived or while it is opened, `REPORTS_ROOT=/`, and
//! restores of an object that is not the archived file or sits in Glacier.
//! A file, a setting or a message can only hurt itself: nothing loops,
//! nothing outside the root is read, nothing but the archived file is
//! deleted.

use crate::helpers::bin::{stderr, stdout};
use crate::helpers::{Dirs, TestDb, ok, plan_only, plan_options, reports_executor, s3};
use archiver::execute::Executor;
use archiver::objects::{self, Compression};
use archiver::transport::BatchMessage;
use archiver::vocabulary::Kind;
use archiver::worker::{self, Disposition, WorkerOptions};
use aws_sdk_s3::error::ProvideErrorMetadata;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn dirs() -> Dirs {
    Dirs::new("report-safety")
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn csv(rows: usize, tag: &str) -> Vec<u8> {
    (0..rows)
        .map(|i| format!("{i},{tag},{}.25,ok\n", i * 3))
        .collect::<String>()
        .into_bytes()
}

/// A `reports` row for `path` (the file is written first unless `body` is
/// None), 200 days old.
async fn report(db: &TestDb, path: &Path, body: Option<&[u8]>) -> Uuid {
    if let Some(body) = body {
        std::fs::write(path, body).unwrap();
    }
    sqlx::query_scalar(
        "INSERT INTO reports (scenario_id, format, file_path, file_size_bytes, generated_by, created_at)
         VALUES (gen_random_uuid(), 'csv', $1, $2, 'test', now() - interval '200 days') RETURNING id",
    )
    .bind(path.to_string_lossy().to_string())
    .bind(body.map_or(0, |b| b.len() as i64))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// `chattr +i` on a directory: not even root can delete a file in it. The
/// flag comes off on drop, also when the test panics.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Immutable {
        let st = Command::new("chattr").arg("+i").arg(dir).status().unwrap();
        assert!(st.success(), "chattr +i {}", dir.display());
        let guard = Immutable(dir.to_path_buf());
        let probe = dir.join(".probe");
        assert!(
            std::fs::write(&probe, b"x").is_err(),
            "chattr +i must stop even root from changing {}",
            dir.display()
        );
        guard
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// Plans the eligible reports (one batch), runs nothing; returns the batch.
async fn plan_one_batch(db: &TestDb, root: &Path) -> Uuid {
    let opts = archiver::plan::PlanOptions {
        reports_root: Some(root.to_path_buf()),
        ..plan_options(5000, "inline")
    };
    let planned = plan_only(db, Kind::Reports, &opts).await;
    sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1")
        .bind(planned.job)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// One delivery of `batch`, as a worker handles it (bounded).
async fn deliver(exec: &Executor, batch: Uuid) -> Disposition {
    let payload = BatchMessage::new(batch, Kind::Reports).encode();
    let opts = WorkerOptions {
        transient_tries: 1,
        ..Default::default()
    };
    let never = CancellationToken::new();
    let work = worker::process(exec, &payload, opts, &never);
    tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .expect("one delivery finishes within 60 s")
}

async fn reason_of(db: &TestDb, id: Uuid) -> (bool, Option<String>) {
    sqlx::query_as("SELECT deleted_locally, local_delete_error FROM reports_archive WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_undeletable_report_ends_the_run_with_status_4_and_a_later_run_deletes_it() {
    let db = TestDb::new().await;
    let d = dirs();
    let locked = d.root.join("locked");
    std::fs::create_dir(&locked).unwrap();
    let stuck = locked.join("stuck.csv");
    let stuck_id = report(&db, &stuck, Some(&csv(200, "stuck"))).await;
    let free = d.root.join("free.csv");
    report(&db, &free, Some(&csv(100, "free"))).await;
    // Upload only reads the file; deleting it (after the commit) is what
    // the immutable directory refuses.
    let guard = Immutable::set(&locked);

    let o = db
        .planner()
        .args(["--reports"])
        .local_reports(&d.root, &d.archive)
        .output_within(Duration::from_secs(60))
        .await;
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(
        o.status.code(),
        Some(4),
        "exit 4: a file was left\n{out}\n{err}"
    );
    assert!(out.contains("2 of 2 reports archived"), "{out}");
    assert!(
        err.contains("stuck.csv") && err.contains("Operation not permitted"),
        "{err}"
    );
    assert!(
        stuck.exists() && !free.exists(),
        "only the undeletable file stays"
    );
    let (deleted, reason) = reason_of(&db, stuck_id).await;
    assert!(!deleted);
    assert!(
        reason
            .unwrap_or_default()
            .contains("Operation not permitted")
    );
    let (job, batches): (String, String) = sqlx::query_as(
        "SELECT j.status, string_agg(b.status, ',') FROM archive_jobs j
         JOIN archive_batches b ON b.job_id = j.id GROUP BY j.status",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((job.as_str(), batches.as_str()), ("completed", "done"));

    let st = ok(&db
        .planner()
        .args(["status"])
        .local_reports(&d.root, &d.archive)
        .output_within(Duration::from_secs(30))
        .await);
    assert!(
        st.contains("local file left in place: 1") && st.contains("stuck.csv"),
        "{st}"
    );
    let json = ok(&db
        .planner()
        .args(["status", "--json"])
        .local_reports(&d.root, &d.archive)
        .output_within(Duration::from_secs(30))
        .await);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["local_files_left"]["total"], 1, "{json}");

    // Still undeletable: the next run retries, leaves it, says so again.
    let o = db
        .planner()
        .args(["--reports"])
        .local_reports(&d.root, &d.archive)
        .output_within(Duration::from_secs(60))
        .await;
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(4), "{out}\n{err}");
    assert!(
        out.contains("retried 1 local file(s)") && out.contains("1 still left"),
        "{out}"
    );

    // The cause fixed, the next run deletes it and exits 0.
    drop(guard);
    let o = db
        .planner()
        .args(["--reports"])
        .local_reports(&d.root, &d.archive)
        .output_within(Duration::from_secs(60))
        .await;
    let out = ok(&o);
    assert!(out.contains("1 deleted, 0 still left"), "{out}");
    assert!(!stuck.exists());
    assert_eq!(reason_of(&db, stuck_id).await, (true, None));
    let st = ok(&db
        .planner()
        .args(["status"])
        .local_reports(&d.root, &d.archive)
        .output_within(Duration::from_secs(30))
        .await);
    assert!(st.contains("local file left in place: 0"), "{st}");
    db.cleanup().await;
}

#[tokio::test]
async fn a_done_batch_whose_file_cannot_be_deleted_is_acknowledged_not_retried() {
    let db = TestDb::new().await;
    let d = dirs();
    let locked = d.root.join("locked");
    std::fs::create_dir(&locked).unwrap();
    let stuck = locked.join("stuck.csv");
    let stuck_id = report(&db, &stuck, Some(&csv(300, "stuck"))).await;
    let orphan = d.root.join("orphan.csv");
    let orphan_id = report(&db, &orphan, Some(&csv(50, "orphan"))).await;
    let batch = plan_one_batch(&db, &d.root).await;
    let exec = reports_executor(&db, &d.root, &d.archive).await;
    let guard = Immutable::set(&locked);

    // First delivery: commits, cannot delete one file. A broker would ack.
    let first = deliver(&exec, batch).await;
    assert!(matches!(first, Disposition::Ack(_)), "{first:?}");
    assert!(stuck.exists() && !orphan.exists());

    // The batch redelivered (a duplicate, or a crash before the ack): acked
    // again without effect, never retried or dead-lettered.
    let again = deliver(&exec, batch).await;
    assert!(matches!(again, Disposition::Ack(_)), "{again:?}");

    // An object missing when its file is about to be deleted: the file stays.
    drop(guard);
    std::fs::write(&orphan, csv(50, "orphan")).unwrap();
    sqlx::query("UPDATE reports_archive SET deleted_locally = false WHERE id = $1")
        .bind(orphan_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let key: String = sqlx::query_scalar("SELECT object_key FROM reports_archive WHERE id = $1")
        .bind(orphan_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    std::fs::remove_file(d.archive.join(&key)).unwrap();
    let third = deliver(&exec, batch).await;
    assert!(matches!(third, Disposition::Ack(_)), "{third:?}");
    assert!(
        orphan.exists(),
        "its object is gone: the file is all there is"
    );
    assert!(
        !stuck.exists(),
        "the redelivery deleted the file it now could"
    );
    let (deleted, reason) = reason_of(&db, orphan_id).await;
    assert!(!deleted && reason.unwrap_or_default().contains("missing"));
    assert_eq!(reason_of(&db, stuck_id).await, (true, None));
    let status: String = sqlx::query_scalar("SELECT status FROM archive_batches WHERE id = $1")
        .bind(batch)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, "done");
    db.cleanup().await;
}

#[tokio::test]
async fn a_file_changed_or_swapped_after_upload_is_kept_and_nothing_else_is_deleted() {
    let db = TestDb::new().await;
    let d = dirs();
    let names = ["same", "changed", "fifo", "link_in", "link_out"];
    let mut ids = Vec::new();
    for n in names {
        let body = csv(500, n);
        ids.push((
            n,
            report(&db, &d.root.join(format!("{n}.csv")), Some(&body)).await,
            body,
        ));
    }
    let batch = plan_one_batch(&db, &d.root).await;
    let exec = reports_executor(&db, &d.root, &d.archive).await;
    assert!(matches!(deliver(&exec, batch).await, Disposition::Ack(_)));
    for n in names {
        assert!(
            !d.root.join(format!("{n}.csv")).exists(),
            "{n} deleted after the commit"
        );
    }

    // As if the cleanup had not run yet (a crash after the commit), the
    // files come back, most of them not as they were archived.
    let path = |n: &str| d.root.join(format!("{n}.csv"));
    std::fs::write(path("same"), &ids[0].2).unwrap();
    std::fs::write(path("changed"), b"edited after it was archived\n").unwrap();
    let st = Command::new("mkfifo").arg(path("fifo")).status().unwrap();
    assert!(st.success());
    let bystander = d.root.join("bystander.txt");
    std::fs::write(&bystander, b"another file under the root\n").unwrap();
    std::os::unix::fs::symlink(&bystander, path("link_in")).unwrap();
    // Outside the root, byte for byte the archived file.
    let outside = d.outside.join("copy.csv");
    std::fs::write(&outside, &ids[4].2).unwrap();
    std::os::unix::fs::symlink(&outside, path("link_out")).unwrap();
    sqlx::query("UPDATE reports_archive SET deleted_locally = false")
        .execute(&db.pool)
        .await
        .unwrap();

    let redelivered = deliver(&exec, batch).await;
    assert!(
        matches!(redelivered, Disposition::Ack(_)),
        "{redelivered:?}"
    );
    assert!(!path("same").exists(), "the archived bytes go");
    assert_eq!(
        std::fs::read(path("changed")).unwrap(),
        b"edited after it was archived\n",
        "a file changed after upload stays"
    );
    assert!(path("fifo").exists(), "a FIFO is never touched");
    assert!(
        bystander.exists() && path("link_in").exists(),
        "a symlink swapped in: neither it nor its target is deleted"
    );
    assert!(
        outside.exists() && path("link_out").exists(),
        "nothing outside the root is deleted"
    );
    for (n, id, _) in &ids {
        let (deleted, reason) = reason_of(&db, *id).await;
        let reason = reason.unwrap_or_default();
        match *n {
            "same" => assert!(deleted, "{reason}"),
            "changed" => assert!(
                !deleted && reason.contains("changed since it was archived"),
                "{reason}"
            ),
            "fifo" => assert!(!deleted && reason.contains("FIFO"), "{reason}"),
            "link_in" => assert!(
                !deleted && reason.contains("changed since it was archived"),
                "{reason}"
            ),
            _ => assert!(
                !deleted && reason.contains("outside REPORTS_ROOT"),
                "{reason}"
            ),
        }
    }
    db.cleanup().await;
}

#[tokio::test]
async fn a_fifo_in_place_of_a_report_is_refused_without_hanging() {
    let d = dirs();
    let fifo = d.root.join("pipe.csv");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let local = objects::open(None, &d.archive).await.unwrap();
    let client = s3::client();
    let bucket = s3::new_bucket(&client).await;
    let s3 = objects::S3Store::new(client, bucket);
    let stores: [&dyn objects::ObjectStore; 2] = [local.as_ref(), &s3];
    for store in stores {
        let put = store.put_file(
            &fifo,
            "archived-reports/2025/01/pipe.csv",
            Compression::Zstd,
        );
        let err = tokio::time::timeout(Duration::from_secs(20), put)
            .await
            .unwrap_or_else(|_| panic!("{store:?}: uploading a FIFO hangs"))
            .expect_err("a FIFO is not archived");
        assert!(matches!(err, archiver::Error::Refused(_)), "{err}");
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    // Through a batch: the FIFO fails alone, the other report is archived.
    let db = TestDb::new().await;
    let pipe = report(&db, &fifo, None).await;
    let good = d.root.join("good.csv");
    report(&db, &good, Some(&csv(100, "good"))).await;
    let batch = plan_one_batch(&db, &d.root).await;
    let exec = reports_executor(&db, &d.root, &d.archive).await;
    assert!(matches!(deliver(&exec, batch).await, Disposition::Ack(_)));
    assert!(!good.exists() && fifo.exists());
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM archive_item_failures WHERE item_id = $1")
            .bind(pipe)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(reason.contains("not a regular file"), "{reason}");
    db.cleanup().await;
}

#[tokio::test]
async fn a_symlink_swapped_in_while_reports_are_archived_never_uploads_the_outside_file() {
    let db = TestDb::new().await;
    let d = dirs();
    let secret = d.outside.join("secret.txt");
    let secret_bytes = b"outside the root: must never be archived\n".repeat(2000);
    std::fs::write(&secret, &secret_bytes).unwrap();
    let n = 20; // one batch
    let mut files = Vec::new();
    for i in 0..n {
        let p = d.root.join(format!("r{i}.csv"));
        let body = csv(2000, &format!("r{i}"));
        report(&db, &p, Some(&body)).await;
        files.push((p, body));
    }
    let batch = plan_one_batch(&db, &d.root).await;
    let exec = reports_executor(&db, &d.root, &d.archive).await;

    // One racer per report swaps its path between the real file and a
    // symlink to the secret (renames: atomic, about half the time each), so
    // a path checked as a regular file under the root names the secret a
    // moment later.
    let stop = Arc::new(AtomicBool::new(false));
    let racers: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, (p, _))| {
            let (stop, p) = (stop.clone(), p.clone());
            let link = p.with_file_name(format!(".link{i}"));
            let real = p.with_file_name(format!(".real{i}"));
            std::os::unix::fs::symlink(&secret, &link).unwrap();
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if std::fs::rename(&p, &real).is_ok() && std::fs::rename(&link, &p).is_ok() {
                        swaps += 1;
                        std::thread::yield_now();
                        let _ = std::fs::rename(&p, &link);
                        let _ = std::fs::rename(&real, &p);
                    }
                    std::thread::yield_now();
                }
                // Leave the real file in place.
                if real.exists() {
                    let _ = std::fs::rename(&real, &p);
                }
                swaps
            })
        })
        .collect();
    let outcome = deliver(&exec, batch).await;
    stop.store(true, Ordering::Relaxed);
    let swaps: u64 = racers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(swaps > 100, "the racers ran ({swaps} swaps)");

    // Whatever was archived is a report's own bytes; the secret is nowhere.
    let store = objects::open(None, &d.archive).await.unwrap();
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT object_key, sha256, file_path FROM reports_archive")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let secret_sha = sha(&secret_bytes);
    for (key, row_sha, file_path) in &rows {
        assert_ne!(
            row_sha, &secret_sha,
            "{file_path}: the secret was archived as the report"
        );
        let to = d
            .outside
            .join(format!("restored-{}", Uuid::new_v4().simple()));
        store.restore(key, &to).await.unwrap();
        let got = std::fs::read(&to).unwrap();
        let want = &files
            .iter()
            .find(|(p, _)| p.to_string_lossy() == *file_path)
            .unwrap()
            .1;
        assert_eq!(
            &got, want,
            "{file_path}: the object holds the report's own bytes"
        );
    }
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        secret_bytes,
        "the secret is untouched"
    );
    eprintln!(
        "{} of {n} archived under the race ({swaps} swaps); outcome {outcome:?}",
        rows.len()
    );
    db.cleanup().await;
}

#[tokio::test]
async fn reports_root_at_the_filesystem_root_is_refused() {
    let db = TestDb::new().await;
    let d = dirs();
    let file = d.root.join("r.csv");
    let id = report(&db, &file, Some(&csv(100, "r"))).await;
    for args in [&["--reports"][..], &["--reports", "--dry-run"][..]] {
        let o = db
            .planner()
            .args(args)
            .local_reports(Path::new("/"), &d.archive)
            .output_within(Duration::from_secs(60))
            .await;
        let (out, err) = (stdout(&o), stderr(&o));
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: bad setting\n{out}\n{err}"
        );
        assert!(
            err.contains("REPORTS_ROOT") && err.contains("filesystem root"),
            "{err}"
        );
    }
    assert!(file.exists());

    // A worker configured so (the check inside the executor): the report
    // fails alone, its file untouched.
    let batch = plan_one_batch(&db, &d.root).await;
    let exec = reports_executor(&db, Path::new("/"), &d.archive).await;
    let outcome = deliver(&exec, batch).await;
    assert!(matches!(outcome, Disposition::DeadLetter(_)), "{outcome:?}");
    assert!(
        file.exists(),
        "nothing archived or deleted under REPORTS_ROOT=/"
    );
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM archive_item_failures WHERE item_id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(reason.contains("filesystem root"), "{reason}");
    db.cleanup().await;
}

#[tokio::test]
async fn restore_report_checks_the_bytes_against_reports_archive() {
    let db = TestDb::new().await;
    let d = dirs();
    let a = report(&db, &d.root.join("a.csv"), Some(&csv(300, "a"))).await;
    let b = report(&db, &d.root.join("b.csv"), Some(&csv(300, "b"))).await;
    ok(&db
        .planner()
        .args(["--reports"])
        .local_reports(&d.root, &d.archive)
        .output_within(Duration::from_secs(60))
        .await);
    let key = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT object_key FROM reports_archive WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (ka, kb) = (key(a).await, key(b).await);
    // B's object, metadata and all, in A's place: valid on its own terms.
    std::fs::copy(d.archive.join(&kb), d.archive.join(&ka)).unwrap();
    std::fs::copy(
        d.archive.join(format!("{kb}.meta.json")),
        d.archive.join(format!("{ka}.meta.json")),
    )
    .unwrap();
    let to = d.outside.join("a.restored.csv");
    let args = [
        "restore-report",
        &a.to_string(),
        "--to",
        to.to_str().unwrap(),
    ];
    let o = db
        .planner()
        .args(args)
        .local_reports(&d.root, &d.archive)
        .output_within(Duration::from_secs(60))
        .await;
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(1), "refused\n{out}\n{err}");
    assert!(err.contains("not the archived file"), "{err}");
    assert!(!to.exists(), "nothing restored");
    let to = d.outside.join("b.restored.csv");
    let args = [
        "restore-report",
        &b.to_string(),
        "--to",
        to.to_str().unwrap(),
    ];
    let out = ok(&db
        .planner()
        .args(args)
        .local_reports(&d.root, &d.archive)
        .output_within(Duration::from_secs(60))
        .await);
    assert!(out.contains("verified"), "{out}");
    assert_eq!(std::fs::read(&to).unwrap(), csv(300, "b"));
    db.cleanup().await;
}

#[tokio::test]
async fn restore_report_of_a_glacier_object_says_to_restore_it_from_the_archive_tier() {
    let db = TestDb::new().await;
    let d = dirs();
    let client = s3::client();
    let bucket = s3::new_bucket(&client).await;
    let id = report(&db, &d.root.join("old.csv"), Some(&csv(300, "old"))).await;
    let run = |args: Vec<String>| {
        db.planner()
            .args(args)
            .s3_reports(&d.root, &bucket)
            .output()
    };
    ok(&run(vec!["--reports".into()]).await);
    let key: String = sqlx::query_scalar("SELECT object_key FROM reports_archive WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // What the lifecycle rule does after 90 days: the object moves to Glacier.
    s3::to_glacier(&client, &bucket, &key).await;
    let get = client.get_object().bucket(&bucket).key(&key).send().await;
    assert_eq!(
        get.err().and_then(|e| e.code().map(str::to_owned)),
        Some("InvalidObjectState".to_owned()),
        "the server refuses to read a Glacier object"
    );
    let to = d.outside.join("old.restored.csv");
    let o = run(vec![
        "restore-report".into(),
        id.to_string(),
        "--to".into(),
        to.to_string_lossy().into(),
    ])
    .await;
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(
        err.contains("GLACIER") && err.contains("restore it from the archive tier first"),
        "{err}"
    );
    assert!(!err.contains("access denied"), "{err}");
    assert!(!to.exists());
    db.cleanup().await;
}
