//! The live-traffic governor's database controls, on real servers: a
//! private primary with a hot standby whose replay the test pauses, other
//! sessions held active, a WAL rate set low; and hostile replica URLs.

use crate::helpers::standby::{Clusters, wait_streaming};
use crate::helpers::{self, TestDb, stderr, wait_until};
use archiver::Error;
use archiver::execute::Executor;
use archiver::governor::replica::{self, Replicas};
use archiver::governor::{Governor, GovernorOptions, Reason};
use archiver::transport::BatchMessage;
use archiver::vocabulary::Kind;
use archiver::worker::{self, Disposition, WorkerOptions};
use secrecy::SecretString;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SECOND: Duration = Duration::from_secs(1);

/// A migrated database on `c`'s primary with logs planned in batches of
/// `batch` (pending, published nowhere); the archive's and the live rows'
/// hashes, the job and its batches.
struct Planned {
    db: TestDb,
    old: (i64, String),
    young: (i64, String),
    job: Uuid,
    batches: Vec<Uuid>,
}

async fn planned(c: &Clusters, rows: i64, batch: i64) -> Planned {
    let db = TestDb::new_at(&c.primary_url()).await;
    db.load_logs(rows).await;
    let (old, young) = db.split_hashes().await;
    let p = helpers::plan_only(&db, Kind::Logs, &helpers::plan_options(batch, "inline")).await;
    let batches = db.batches_of(p.job).await;
    Planned {
        db,
        old,
        young,
        job: p.job,
        batches,
    }
}

fn executor(db: &TestDb, opts: GovernorOptions) -> (Executor, Arc<Governor>) {
    let g = Arc::new(Governor::new(opts));
    let exec = Executor {
        governor: g.clone(),
        ..Executor::from(&db.pool)
    };
    (exec, g)
}

/// Processes the batches one after another, as a worker's deliveries.
async fn process_all(exec: Executor, batches: Vec<Uuid>) -> Vec<Disposition> {
    let stop = CancellationToken::new();
    let mut out = Vec::new();
    for id in batches {
        let payload = BatchMessage::new(id, Kind::Logs).encode();
        out.push(worker::process(exec.clone(), &payload, WorkerOptions::default(), &stop).await);
    }
    out
}

async fn done(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM archive_batches WHERE status = 'done'")
        .await
}

/// Pauses the standby's replay and writes WAL it will not replay.
async fn pause_replay(standby: &PgPool, db: &TestDb) {
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(standby)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE unreplayed AS SELECT g FROM generate_series(1, 1000) g")
        .execute(&db.pool)
        .await
        .unwrap();
}

/// Waits until the governor's own readings say a replica lags over its limit.
async fn until_lagging(g: &Governor, pool: &PgPool) -> replica::Lag {
    let limit = g.opts.max_replica_lag.unwrap();
    wait_until("a replica to lag past the limit", 20 * SECOND, || async {
        let r = g.reading(pool).await.unwrap();
        replica::worst(&r.primary, &r.direct, r.at, &g.samples().await, limit)
    })
    .await
}

fn assert_all_acked(ds: &[Disposition]) {
    for d in ds {
        assert!(matches!(d, Disposition::Ack(_)), "{ds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replay_stops_chunks_until_it_resumes_then_the_job_completes_exactly() {
    let c = tokio::task::spawn_blocking(Clusters::with_standby)
        .await
        .unwrap();
    let p = planned(&c, 1500, 100).await;
    wait_streaming(&p.db.pool).await;
    let standby = PgPoolOptions::new()
        .max_connections(1)
        .connect(&c.standby_url("postgres"))
        .await
        .unwrap();
    // Read from pg_stat_replication only: no --replica-url.
    let (exec, g) = executor(
        &p.db,
        GovernorOptions {
            max_replica_lag: Some(SECOND),
            max_lag_wait: 60 * SECOND,
            ..GovernorOptions::default()
        },
    );
    pause_replay(&standby, &p.db).await;
    let lag = until_lagging(&g, &p.db.pool).await;
    assert!(lag.replica.starts_with("walreceiver@127.0.0.1"), "{lag:?}");
    // What pg_stat_replication itself says meanwhile (replay_lag stays at
    // its last value while replay is paused; see governor::replica).
    eprintln!(
        "{lag:?}: {:?}",
        g.reading(&p.db.pool).await.unwrap().primary
    );

    let run = tokio::spawn(process_all(exec, p.batches.clone()));
    wait_until("the governor to wait", 20 * SECOND, || async {
        g.throttled.waits(Reason::ReplicaLag) >= 1
    })
    .await;
    let archived =
        p.db.scalar("SELECT count(*) FROM scenario_logs_archive")
            .await;
    // Well past the 1 s limit, nothing moves while the throttled time grows.
    wait_until("3 s throttled", 20 * SECOND, || async {
        g.throttled.seconds(Reason::ReplicaLag) >= 3.0
    })
    .await;
    assert_eq!(
        done(&p.db).await,
        0,
        "no batch ran while the standby lagged"
    );
    assert_eq!(
        p.db.scalar("SELECT count(*) FROM scenario_logs_archive")
            .await,
        archived
    );
    assert!(!run.is_finished());

    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby)
        .await
        .unwrap();
    let ds = tokio::time::timeout(30 * SECOND, run)
        .await
        .expect("the job resumes once replay does")
        .unwrap();
    assert_all_acked(&ds);
    p.db.assert_logs_invariant(&p.old, &p.young).await;
    p.db.assert_job_counted_once(p.job, p.old.0).await;
    standby.close().await;
    p.db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_url_lagging_past_max_lag_wait_hands_the_batch_back_unspent() {
    let c = tokio::task::spawn_blocking(Clusters::with_standby)
        .await
        .unwrap();
    let p = planned(&c, 1500, 100).await;
    wait_streaming(&p.db.pool).await;
    let standby = PgPoolOptions::new()
        .max_connections(1)
        .connect(&c.standby_url("postgres"))
        .await
        .unwrap();
    let direct = c.standby_url(&p.db.name);
    let (exec, g) = executor(
        &p.db,
        GovernorOptions {
            max_replica_lag: Some(SECOND),
            max_lag_wait: 2 * SECOND,
            replicas: Replicas::parse(&[SecretString::from(direct)]).unwrap(),
            ..GovernorOptions::default()
        },
    );
    pause_replay(&standby, &p.db).await;
    // Read on the replica itself: it says it is paused and behind.
    let r = wait_until("the replica to say it lags", 20 * SECOND, || async {
        let r = g.reading(&p.db.pool).await.unwrap();
        r.direct.first().filter(|l| l.lag > SECOND).cloned()
    })
    .await;
    assert!(r.why.contains("replay paused"), "{r:?}");
    assert!(r.replica.contains(&p.db.name), "{r:?}");

    let first = p.batches[0];
    let d = process_all(exec.clone(), vec![first]).await;
    assert_eq!(d, vec![Disposition::HandBack]);
    assert_eq!(p.db.batch_state(first).await.1, 0, "no attempt spent");
    assert_eq!(done(&p.db).await, 0);
    match g.before_chunk(&p.db.pool, &CancellationToken::new()).await {
        Err(Error::HandBack(why)) => {
            assert!(
                why.contains("lags") && why.contains("--max-lag-wait"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }

    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby)
        .await
        .unwrap();
    let ds = tokio::time::timeout(30 * SECOND, process_all(exec, p.batches.clone()))
        .await
        .unwrap();
    assert_all_acked(&ds);
    p.db.assert_logs_invariant(&p.old, &p.young).await;
    p.db.assert_job_counted_once(p.job, p.old.0).await;
    standby.close().await;
    p.db.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_replica_url_lags_and_a_malformed_one_is_refused_by_name() {
    let db = TestDb::new().await;
    let g = Governor::new(GovernorOptions {
        max_replica_lag: Some(SECOND),
        max_lag_wait: SECOND,
        replicas: Replicas::parse(&[SecretString::from(
            "postgresql://postgres:hunter2@127.0.0.1:1/nowhere",
        )])
        .unwrap(),
        ..GovernorOptions::default()
    });
    let t = std::time::Instant::now();
    match g.before_chunk(&db.pool, &CancellationToken::new()).await {
        Err(Error::HandBack(why)) => {
            assert!(
                why.contains("127.0.0.1:1/nowhere") && why.contains("unreachable"),
                "{why}"
            );
            assert!(!why.contains("hunter2"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < 10 * SECOND);
    assert!(g.throttled.seconds(Reason::ReplicaLag) > 0.5);

    for bad in [
        "postgresql://u:hunter2@h:notaport/db",
        "mysql://u:hunter2@h/db",
    ] {
        let out = db
            .planner()
            .env(
                "ARCHIVER_REPLICA_URLS",
                format!("postgresql://a@replica/db,{bad}"),
            )
            .env("ARCHIVER_MAX_REPLICA_LAG", "1s")
            .args(["status"])
            .output()
            .await;
        let err = stderr(&out);
        assert!(!out.status.success());
        assert!(err.contains("ARCHIVER_REPLICA_URLS: entry 2"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_active_sessions_than_allowed_hold_chunks_until_they_end() {
    let c = tokio::task::spawn_blocking(Clusters::primary)
        .await
        .unwrap();
    let p = planned(&c, 1500, 100).await;
    let mut sleepers = Vec::new();
    for _ in 0..3 {
        let url = p.db.url.clone();
        sleepers.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            sqlx::query("SELECT pg_sleep(4)")
                .execute(&mut conn)
                .await
                .unwrap();
        }));
    }
    wait_until("three sessions active", 10 * SECOND, || async {
        p.db.scalar("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(4)' AND state = 'active'")
            .await
            >= 3
    })
    .await;
    let (exec, g) = executor(
        &p.db,
        GovernorOptions {
            max_active_sessions: Some(1),
            ..GovernorOptions::default()
        },
    );
    let run = tokio::spawn(process_all(exec, p.batches.clone()));
    wait_until("the governor to wait", 10 * SECOND, || async {
        g.throttled.waits(Reason::ActiveSessions) >= 1
    })
    .await;
    assert_eq!(
        done(&p.db).await,
        0,
        "no batch ran while 3 sessions were active"
    );
    assert!(sleepers.iter().any(|s| !s.is_finished()));
    for s in sleepers {
        s.await.unwrap();
    }
    let ds = tokio::time::timeout(30 * SECOND, run)
        .await
        .unwrap()
        .unwrap();
    assert_all_acked(&ds);
    assert!(g.throttled.seconds(Reason::ActiveSessions) > 1.0);
    p.db.assert_logs_invariant(&p.old, &p.young).await;
    p.db.assert_job_counted_once(p.job, p.old.0).await;
    p.db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_wal_rate_paces_the_job_which_still_completes() {
    const RATE: f64 = 500_000.0;
    let c = tokio::task::spawn_blocking(Clusters::primary)
        .await
        .unwrap();
    let p = planned(&c, 3000, 25).await;
    let (exec, g) = executor(
        &p.db,
        GovernorOptions {
            // The application's burst and the job's WAL (about 1 MB and
            // 1.3 MB) in about five seconds; unpaced, a fraction of one.
            max_wal_rate: Some(RATE),
            ..GovernorOptions::default()
        },
    );
    let wal = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8";
    // From the governor's first reading on: the burst counts against the
    // limit from then, and so does the time it took.
    let t = std::time::Instant::now();
    let before = p.db.scalar(wal).await;
    // The application writes a burst the governor sees (the WAL is the
    // server's): the first chunk already waits, however fast the job is.
    let first = g.reading(&p.db.pool).await.unwrap().lsn;
    sqlx::query("CREATE TABLE app_writes AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 4000) g")
        .execute(&p.db.pool)
        .await
        .unwrap();
    wait_until("a reading after the burst", 5 * SECOND, || async {
        g.reading(&p.db.pool).await.unwrap().lsn > first + 500_000
    })
    .await;
    let run = tokio::spawn(process_all(exec, p.batches.clone()));
    wait_until("the governor to wait", 10 * SECOND, || async {
        g.throttled.waits(Reason::WalRate) >= 1
    })
    .await;
    assert_eq!(done(&p.db).await, 0, "the first chunk waits for the burst");
    let ds = tokio::time::timeout(40 * SECOND, run)
        .await
        .expect("a paced job still ends")
        .unwrap();
    assert_all_acked(&ds);
    let waited = g.throttled.seconds(Reason::WalRate);
    assert!(waited > 0.2, "{waited}");
    let written = (p.db.scalar(wal).await - before) as f64;
    let took = t.elapsed().as_secs_f64();
    eprintln!("paced job: {took:.1}s, waited {waited:.1}s, {written} bytes of WAL");
    // The pace held, loosely: readings are shared for a quarter second, so
    // the chunks of the last one (at full speed, a good part of this small
    // job) go unmeasured; the pacing itself is unit-tested in `wal.rs`.
    assert!(took >= 0.3 * written / RATE, "{took}s for {written} bytes");
    p.db.assert_logs_invariant(&p.old, &p.young).await;
    p.db.assert_job_counted_once(p.job, p.old.0).await;
    p.db.cleanup().await;
}

/// With no broker, a batch handed back (here: a replica that never answers,
/// past `--max-lag-wait`) stops the inline run instead of being run again at
/// once, in a loop: the planner exits 0 saying why and what is left, nothing
/// is dead or charged an attempt, and the next run finishes the job exactly.
#[tokio::test]
async fn an_inline_run_whose_batch_is_handed_back_stops_and_the_next_run_finishes_it() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let first = db
        .planner()
        .args(["--logs", "--batch-size", "500"])
        .env("ARCHIVER_MAX_REPLICA_LAG", "1s")
        .env("ARCHIVER_MAX_LAG_WAIT", "2s")
        .env(
            "ARCHIVER_REPLICA_URLS",
            format!("postgresql://r:hunter2@127.0.0.1:{port}/app"),
        )
        .output_within(Duration::from_secs(60))
        .await;
    let out = crate::helpers::bin::ok(&first);
    let all = crate::helpers::bin::both(&first);
    assert!(out.contains("stopped: a batch was handed back"), "{all}");
    assert!(all.contains("--max-lag-wait"), "says why: {all}");
    assert!(!all.contains("hunter2"), "{all}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM scenario_logs_archive")
            .await,
        0,
        "no chunk ran while the replica did not answer"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM archive_batches WHERE status <> 'pending' OR attempts > 0")
            .await,
        0,
        "every batch pending, none charged an attempt"
    );
    let job: Uuid = sqlx::query_scalar("SELECT id FROM archive_jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let second = db
        .planner()
        .args(["--logs", "--batch-size", "500"])
        .output_within(Duration::from_secs(60))
        .await;
    let out = crate::helpers::bin::ok(&second);
    assert!(out.contains("resuming"), "{out}");
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(job, old.0).await;
    db.cleanup().await;
}
