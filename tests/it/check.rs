//! `planner check` and `worker check` run as an operator runs them: every
//! dependency passing gives one `ok` line each and exit 0; each broken one
//! gives one `failed` line naming it, exit 2, and no secret anywhere in the
//! output.

use crate::helpers::amqp::{amqp_config, amqp_url, delete_queues};
use crate::helpers::bin::{Bin, S3_SECRET, both, stdout};
use crate::helpers::{TestDb, s3, scratch, sqs};
use archiver::transport::sqs::ensure_queues;
use std::process::Output;
use uuid::Uuid;

/// The four dependency lines of a check, in order.
const NAMES: [&str; 4] = ["database", "queue", "reports root", "object store"];

/// Runs `bin check`; its output, after asserting it printed exactly one
/// line per dependency, in order, on stdout.
async fn check(bin: Bin) -> Output {
    let o = bin.args(["check"]).output().await;
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), NAMES.len(), "{}", both(&o));
    for (line, name) in lines.iter().zip(NAMES) {
        assert!(line.starts_with(&format!("{name}: ")), "{}", both(&o));
    }
    o
}

/// The line of dependency `name`.
fn line(out: &str, name: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} line in {out}"))
        .to_string()
}

/// Asserts exactly the dependencies in `failed` failed (each with its own
/// line), the command exited 2 naming the first one's setting on stderr,
/// and no secret in `secrets` was printed.
fn assert_failed(o: &Output, failed: &[&str], setting: &str, secrets: &[&str]) {
    let out = stdout(o);
    for name in NAMES {
        let l = line(&out, name);
        let is_failed = l.starts_with(&format!("{name}: failed, "));
        assert_eq!(is_failed, failed.contains(&name), "{name}: {}", both(o));
    }
    assert_eq!(o.status.code(), Some(2), "{}", both(o));
    let err = String::from_utf8_lossy(&o.stderr);
    let named = format!("{setting}: the {} check failed", failed[0]);
    assert!(err.lines().any(|l| l.contains(&named)), "{}", both(o));
    for secret in secrets {
        assert!(!both(o).contains(secret), "{secret} printed: {}", both(o));
    }
}

#[tokio::test]
async fn every_dependency_passes_with_one_line_each() {
    let db = TestDb::new().await;
    let cfg = amqp_config();
    let client = s3::client();
    let bucket = s3::new_bucket(&client).await;
    let root = scratch("check-root");
    std::fs::write(root.join("a.pdf"), b"report").unwrap();

    for bin in [db.planner(), db.worker()] {
        let o = check(bin.amqp(&cfg).s3_reports(&root, &bucket)).await;
        assert!(o.status.success(), "{}", both(&o));
        let out = stdout(&o);
        for name in NAMES {
            assert!(
                line(&out, name).starts_with(&format!("{name}: ok, ")),
                "{out}"
            );
        }
        assert!(
            line(&out, "database").contains("schema migrated to "),
            "{out}"
        );
        assert!(line(&out, "database").contains(&db.name), "{out}");
        let queue = line(&out, "queue");
        assert!(
            queue.contains(&cfg.queue) && queue.contains("delivery limit 5"),
            "{out}"
        );
        assert!(line(&out, "reports root").contains("(1 entries)"), "{out}");
        let store = line(&out, "object store");
        assert!(store.contains(&format!("s3://{bucket}/")), "{out}");
        assert!(store.contains("archived-reports/.archiver-check/"), "{out}");
        assert!(!both(&o).contains(S3_SECRET), "{}", both(&o));
    }
    // The test object was deleted again.
    let left = client
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(left.key_count(), Some(0), "{left:?}");

    // Inline: the planner runs batches itself; a worker has nothing to
    // consume. The local store is checked by a write and a delete.
    let archive = scratch("check-archive");
    let o = check(db.planner().local_reports(&root, &archive)).await;
    assert!(o.status.success(), "{}", both(&o));
    assert_eq!(
        line(&stdout(&o), "queue"),
        "queue: none (inline: the planner runs batches itself)"
    );
    assert!(
        line(&stdout(&o), "object store").contains("file://"),
        "{}",
        both(&o)
    );
    assert_eq!(
        std::fs::read_dir(archive.join("archived-reports"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "the test object's directory is left behind"
    );
    let o = check(db.worker().local_reports(&root, &archive)).await;
    assert_failed(&o, &["queue"], "QUEUE_URL", &[]);

    // A worker that does not serve reports checks neither root nor store.
    let o = check(db.worker().args(["--kinds", "logs,metrics"]).amqp(&cfg)).await;
    assert!(o.status.success(), "{}", both(&o));
    for name in ["reports root", "object store"] {
        assert!(
            line(&stdout(&o), name).contains("not checked (this worker does not serve reports"),
            "{}",
            both(&o)
        );
    }

    // The queue exists with a delivery limit of 5: the broker refuses the
    // publisher's declare with another, and the line says so.
    let o = check(
        db.worker()
            .args(["--kinds", "logs"])
            .amqp(&cfg)
            .env("ARCHIVER_DELIVERY_LIMIT", "3"),
    )
    .await;
    assert_failed(&o, &["queue"], "ARCHIVER_QUEUE", &[]);
    assert!(
        line(&stdout(&o), "queue").contains("exists with other arguments"),
        "{}",
        both(&o)
    );

    delete_queues(&cfg).await;
    s3::delete_bucket(&client, &bucket).await;
    db.cleanup().await;
}

/// PostgreSQL here trusts every login from 127.0.0.1, so a wrong password
/// is accepted: the failed login is a role that does not exist, with a
/// password in the URL that must never be printed.
#[tokio::test]
async fn a_database_login_that_fails_is_named_without_its_password() {
    let db = TestDb::new().await;
    let password = format!("pw-{}", Uuid::new_v4().simple());
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username("archiver_nobody").unwrap();
    url.set_password(Some(&password)).unwrap();
    let root = scratch("check-root");
    let o = check(
        crate::helpers::bin::planner(url.as_str()).local_reports(&root, &scratch("check-archive")),
    )
    .await;
    assert_failed(&o, &["database"], "DATABASE_URL", &[&password]);
    assert!(
        line(&stdout(&o), "database").contains("archiver_nobody"),
        "{}",
        both(&o)
    );
    db.cleanup().await;
}

#[tokio::test]
async fn an_unmigrated_database_is_named() {
    let db = TestDb::unmigrated().await;
    let o = check(db.planner()).await;
    assert_failed(&o, &["database"], "DATABASE_URL", &[]);
    let l = line(&stdout(&o), "database");
    assert!(l.contains("planner migrate") && l.contains("have 0"), "{l}");
    db.cleanup().await;
}

#[tokio::test]
async fn a_missing_bucket_and_a_bucket_name_with_spaces_are_named() {
    let db = TestDb::new().await;
    let root = scratch("check-root");
    for bucket in [
        format!("test-missing-{}", Uuid::new_v4().simple()),
        "my reports bucket".to_string(),
    ] {
        let o = check(db.planner().s3_reports(&root, &bucket)).await;
        assert_failed(
            &o,
            &["object store"],
            "REPORTS_ARCHIVE_BUCKET",
            &[S3_SECRET],
        );
        assert!(
            line(&stdout(&o), "object store").contains(&bucket),
            "{}",
            both(&o)
        );
    }
    db.cleanup().await;
}

/// Tests run as root, for whom a directory with mode 000 is readable: the
/// unreadable roots are a dangling symlink (a mount gone), a file, and `/`
/// (every file on the machine would count as a report).
#[tokio::test]
async fn an_unusable_reports_root_is_named() {
    let db = TestDb::new().await;
    let base = scratch("check-root");
    let dangling = base.join("gone");
    std::os::unix::fs::symlink(base.join("no-such-dir"), &dangling).unwrap();
    let file = base.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    // A newline in the path must not split the line.
    let newline = base.join("no\nsuch");
    for (root, says) in [
        (dangling.as_path(), "No such file"),
        (file.as_path(), "not a directory"),
        (std::path::Path::new("/"), "filesystem root"),
        (newline.as_path(), "no\\nsuch"),
    ] {
        let o = check(db.planner().local_reports(root, &scratch("check-archive"))).await;
        assert_failed(&o, &["reports root"], "REPORTS_ROOT", &[]);
        assert!(
            line(&stdout(&o), "reports root").contains(says),
            "{}",
            both(&o)
        );
    }
    db.cleanup().await;
}

#[tokio::test]
async fn a_broker_that_refuses_the_login_is_named_without_the_password() {
    let db = TestDb::new().await;
    let port = url::Url::parse(&amqp_url()).unwrap().port().unwrap_or(5672);
    let password = format!("pw-{}", Uuid::new_v4().simple());
    let cfg = amqp_config();
    for url in [
        format!("amqp://guest:{password}@127.0.0.1:{port}/%2f"),
        // Nobody listening.
        format!("amqp://guest:{password}@127.0.0.1:1/%2f"),
    ] {
        let o = check(
            db.worker()
                .args(["--kinds", "logs"])
                .env("QUEUE_URL", &url)
                .env("ARCHIVER_QUEUE", &cfg.queue),
        )
        .await;
        assert_failed(&o, &["queue"], "QUEUE_URL", &[&password]);
        assert!(
            line(&stdout(&o), "queue").contains("guest@127.0.0.1"),
            "{}",
            both(&o)
        );
    }
    db.cleanup().await;
}

/// SQS: the queues are checked read-only, the redrive policy's
/// `maxReceiveCount` against `ARCHIVER_DELIVERY_LIMIT`.
#[tokio::test]
async fn worker_check_reports_the_sqs_queues() {
    let db = TestDb::new().await;
    let client = sqs::client();
    let cfg = sqs::config();
    let worker = |limit: &str, name: &str| {
        db.worker()
            .args(["--kinds", "logs,metrics"])
            .env(
                "QUEUE_URL",
                format!("{}/123456789012/{name}", sqs::endpoint()),
            )
            .env("ARCHIVER_DELIVERY_LIMIT", limit)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env("AWS_REGION", "us-east-1")
    };
    // Not created yet: the check creates nothing.
    let o = check(worker("5", &cfg.name)).await;
    assert_failed(&o, &["queue"], "QUEUE_URL", &[S3_SECRET]);
    assert!(
        line(&stdout(&o), "queue").contains("does not exist"),
        "{}",
        both(&o)
    );
    let urls = ensure_queues(&client, &cfg).await.unwrap();
    let o = check(worker("5", &cfg.name)).await;
    assert!(o.status.success(), "{}", both(&o));
    let l = line(&stdout(&o), "queue");
    assert!(
        l.contains(&cfg.name) && l.contains(&cfg.dead_name()) && l.contains("after 5 receives"),
        "{l}"
    );
    // Another delivery limit than the queue's redrive policy.
    let o = check(worker("3", &cfg.name)).await;
    assert_failed(&o, &["queue"], "QUEUE_URL", &[S3_SECRET]);
    assert!(
        line(&stdout(&o), "queue").contains("expected"),
        "{}",
        both(&o)
    );
    sqs::delete_queues(&client, &urls).await;
    db.cleanup().await;
}
