//! The worker binary's HTTP endpoint (`--listen`) over real RabbitMQ:
//! `/healthz` turns 503 when the loop is really stuck (every slot waiting on
//! a row lock) and 200 once it moves; `/readyz` is 503 while the broker is
//! unreachable (a relay the test cuts) and from SIGTERM on; `/metrics`
//! adds up to what the run archived; idle, oversized and unfinished
//! requests cannot stop batches.

use crate::helpers::amqp::{amqp_config, amqp_url, delete_queues};
use crate::helpers::bin::Running;
use crate::helpers::http::{WORKER_SERIES, endpoint_of, get, request, value};
use crate::helpers::relay::Relay;
use crate::helpers::{TestDb, plan_logs, wait_until};
use archiver::transport::Publisher;
use archiver::transport::amqp::{AmqpConfig, AmqpPublisher};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The worker binary on `cfg`'s queue, serving logs, with its endpoint on a
/// free port of loopback; `extra` flags after.
async fn start(db: &TestDb, cfg: &AmqpConfig, extra: &[&str]) -> (Running, SocketAddr) {
    let w = db
        .worker()
        .amqp(cfg)
        .args(["--kinds", "logs", "--listen", "127.0.0.1:0"])
        .args(extra)
        .spawn();
    let addr = endpoint_of(&w).await;
    (w, addr)
}

/// Waits (bounded) until `path` answers `want`; its body.
async fn wait_status(addr: SocketAddr, path: &str, want: u16, within: Duration) -> String {
    wait_until(&format!("{path} to answer {want}"), within, || async move {
        let (status, body) = get(addr, path).await;
        (status == want).then_some(body)
    })
    .await
}

#[tokio::test]
async fn healthz_turns_503_while_the_loop_is_stuck_and_200_once_it_moves() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 500, "amqp").await;
    // Whichever batch the worker takes waits for a row the application holds.
    let lock = db.lock_a_row_of_each_batch(planned.job).await;
    let (w, addr) = start(&db, &cfg, &["--concurrency", "1", "--stuck-after", "2"]).await;
    wait_until(
        "a batch to wait on the lock",
        Duration::from_secs(30),
        || async { db.lock_waiters().await > 0 },
    )
    .await;
    // Its only slot is held and nothing settles: stuck after 2 s.
    let why = wait_status(addr, "/healthz", 503, Duration::from_secs(20)).await;
    assert!(why.starts_with("stuck: "), "{why}");
    assert!(why.contains("1 batch(es) in flight"), "{why}");
    let (_, metrics) = get(addr, "/metrics").await;
    assert_eq!(
        value(&metrics, "archiver_worker_batches_in_flight"),
        Some(1.0)
    );
    // Database and broker are fine: it is ready, only not alive.
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_string()));

    lock.rollback().await.unwrap();
    assert_eq!(db.wait_job(planned.job).await, "completed");
    wait_status(addr, "/healthz", 200, Duration::from_secs(10)).await;
    // Idle on an empty queue with a 2 s limit, it stays alive: the loop
    // beats while it waits on the broker. (Polled for 4 s, twice the limit.)
    let stuck = crate::helpers::poll_until(Duration::from_secs(4), || async {
        get(addr, "/healthz").await.0 != 200
    })
    .await;
    assert!(stuck.is_none(), "an idle worker was reported stuck");
    let log = w.stop().await;
    assert!(!log.contains("panicked"), "{log}");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn readyz_is_503_while_the_broker_is_unreachable() {
    let db = TestDb::new().await;
    let cfg = amqp_config();
    // The worker reaches RabbitMQ through a relay the test can cut (the
    // shared broker itself stays up for the other tests).
    let url = url::Url::parse(&amqp_url()).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672));
    let mut relay = Relay::to(&target).await;
    let mut via = url.clone();
    via.set_port(Some(relay.port())).unwrap();
    let relayed = AmqpConfig {
        url: via.to_string().into(),
        ..cfg.clone()
    };
    let (w, addr) = start(&db, &relayed, &["--stuck-after", "2"]).await;
    wait_status(addr, "/readyz", 200, Duration::from_secs(30)).await;

    relay.cut().await;
    let why = wait_status(addr, "/readyz", 503, Duration::from_secs(30)).await;
    assert!(why.starts_with("broker unreachable"), "{why}");
    // Waiting for a broker is not being stuck.
    assert_eq!(get(addr, "/healthz").await.0, 200);

    relay.restore().await;
    wait_status(addr, "/readyz", 200, Duration::from_secs(90)).await;
    // And it consumes again.
    db.load_logs(1_000).await;
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 500, "amqp").await;
    assert_eq!(db.wait_job(planned.job).await, "completed");
    let log = w.stop().await;
    assert!(!log.contains("panicked"), "{log}");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn readyz_is_503_from_sigterm_while_the_batch_in_flight_finishes() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 500, "amqp").await;
    let lock = db.lock_a_row_of_each_batch(planned.job).await;
    let (mut w, addr) = start(&db, &cfg, &["--concurrency", "1"]).await;
    wait_until(
        "a batch to wait on the lock",
        Duration::from_secs(30),
        || async { db.lock_waiters().await > 0 },
    )
    .await;
    wait_status(addr, "/readyz", 200, Duration::from_secs(10)).await;

    w.sigterm();
    let why = wait_status(addr, "/readyz", 503, Duration::from_secs(10)).await;
    assert!(why.starts_with("draining"), "{why}");
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert!(w.is_running(), "it waits for its batch in flight");

    lock.rollback().await.unwrap();
    let status = w.exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}\n{}", w.log());
    let done = db
        .scalar(&format!(
            "SELECT count(*) FROM archive_batches WHERE job_id = '{}' AND status = 'done'",
            planned.job
        ))
        .await;
    assert_eq!(
        done, 1,
        "the batch in flight finished, and no other started"
    );
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

/// Whether the server has closed `s` (end of stream or reset); never waits.
fn closed(s: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[tokio::test]
async fn a_hundred_idle_connections_do_not_stop_a_batch() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let cfg = amqp_config();
    let (w, addr) = start(&db, &cfg, &[]).await;
    wait_status(addr, "/readyz", 200, Duration::from_secs(30)).await;

    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Beyond the cap of 64, the server closes them at once.
    wait_until(
        "the connections beyond the cap to be closed",
        Duration::from_secs(4),
        || std::future::ready(idle.iter().filter(|s| closed(s)).count() >= 36),
    )
    .await;
    // Batches run while the endpoint is full.
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 300, "amqp").await;
    assert_eq!(db.wait_job(planned.job).await, "completed");
    // The idle ones are dropped after the header timeout; then it answers.
    wait_until(
        "every idle connection to be closed",
        Duration::from_secs(30),
        || std::future::ready(idle.iter().all(closed)),
    )
    .await;
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let log = w.stop().await;
    assert!(!log.contains("panicked"), "{log}");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn metrics_add_up_to_what_the_run_archived() {
    let db = TestDb::new().await;
    db.load_logs(4_000).await;
    let cfg = amqp_config();
    let (w, addr) = start(&db, &cfg, &["--concurrency", "2"]).await;
    let (_, before) = get(addr, "/metrics").await;
    for (name, kind) in WORKER_SERIES {
        let line = format!("# TYPE {name} {kind}");
        assert!(before.lines().any(|l| l == line), "{line} in\n{before}");
    }
    // Exactly these: a series served and not listed would escape the
    // dashboard and alert checks.
    let served = before.lines().filter(|l| l.starts_with("# TYPE ")).count();
    assert_eq!(served, WORKER_SERIES.len(), "{before}");
    assert_eq!(
        value(&before, "archiver_worker_last_settled_timestamp_seconds"),
        Some(0.0)
    );

    let started = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 400, "amqp").await;
    assert_eq!(db.wait_job(planned.job).await, "completed");
    let archived = db
        .scalar("SELECT count(*) FROM scenario_logs_archive")
        .await;
    let bytes = db
        .scalar("SELECT COALESCE(sum(size_bytes), 0)::bigint FROM scenario_logs_archive")
        .await;
    assert_eq!(archived, planned.rows);
    let done = "archiver_worker_batch_duration_seconds_count{kind=\"logs\",outcome=\"done\"}";
    // The counters move when a delivery is settled, just after its commit.
    let metrics = wait_until(
        "the last batch to be counted",
        Duration::from_secs(10),
        || async {
            let (_, m) = get(addr, "/metrics").await;
            (value(&m, done) == Some(planned.batches as f64)).then_some(m)
        },
    )
    .await;
    let v =
        |series: &str| value(&metrics, series).unwrap_or_else(|| panic!("{series} in\n{metrics}"));
    assert_eq!(
        v("archiver_worker_rows_total{kind=\"logs\"}"),
        archived as f64
    );
    assert_eq!(
        v("archiver_worker_bytes_total{kind=\"logs\"}"),
        bytes as f64
    );
    assert_eq!(v("archiver_worker_rows_total{kind=\"metrics\"}"), 0.0);
    assert_eq!(v("archiver_worker_batches_in_flight"), 0.0);
    assert_eq!(v("archiver_worker_retries_total"), 0.0);
    assert_eq!(v("archiver_worker_hand_backs_total"), 0.0);
    assert_eq!(v("archiver_worker_dead_letters_total"), 0.0);
    let in_use = v("archiver_worker_db_connections_in_use");
    assert!((0.0..=4.0).contains(&in_use), "pool of 4: {in_use}");
    let last = v("archiver_worker_last_settled_timestamp_seconds");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started - 1.0 <= last && last <= now + 1.0,
        "{started} <= {last} <= {now}"
    );
    let log = w.stop().await;
    assert!(!log.contains("panicked"), "{log}");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn hostile_requests_are_dropped_and_the_worker_goes_on() {
    let db = TestDb::new().await;
    db.load_logs(1_000).await;
    let cfg = amqp_config();
    let (w, addr) = start(&db, &cfg, &[]).await;
    wait_status(addr, "/readyz", 200, Duration::from_secs(30)).await;

    // A header of a mebibyte: refused (431) or cut off, never served.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: w\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    match request(addr, huge.as_bytes()).await {
        None => {}
        Some((status, _)) => assert_eq!(status, 431),
    }
    // Not HTTP at all.
    match request(addr, b"\x16\x03\x01\x02\x00 not http\r\n\r\n").await {
        None => {}
        Some((status, _)) => assert_eq!(status, 400),
    }
    // A request never finished: the server closes it after its header
    // timeout, without serving it.
    let mut unfinished = TcpStream::connect(addr).await.unwrap();
    unfinished
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: w\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), unfinished.read_to_end(&mut answer))
        .await
        .expect("the server closes an unfinished request");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_err() || !answer.contains(" 200 "),
        "served an unfinished request: {answer}"
    );

    // What is not a probe.
    assert_eq!(get(addr, "/").await.0, 404);
    assert_eq!(get(addr, "/healthz/../metrics").await.0, 404);
    let post = request(
        addr,
        b"POST /readyz HTTP/1.1\r\nHost: w\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(post.map(|(s, _)| s), Some(405));
    let head = request(
        addr,
        b"HEAD /metrics HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head, Some((200, String::new())));

    // The worker went on: a job completes, and it is alive and ready.
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 300, "amqp").await;
    assert_eq!(db.wait_job(planned.job).await, "completed");
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let log = w.stop().await;
    assert!(!log.contains("panicked"), "{log}");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn an_sqs_consumer_is_connected_while_its_receives_succeed() {
    use crate::helpers::sqs;
    use archiver::transport::Consumer;
    use archiver::transport::sqs::{SqsConfig, SqsConsumer, ensure_queues};
    // Short polls, so that a cut shows within a second.
    let cfg = SqsConfig {
        wait_time: Duration::from_secs(1),
        ..sqs::config()
    };
    let urls = ensure_queues(&sqs::client(), &cfg).await.unwrap();
    let mut relay = crate::helpers::sqs::relay().await;
    let mut consumer = SqsConsumer::new(sqs::client_at(&relay.endpoint()), cfg, 1);
    let link = consumer.connected();
    assert!(!link.is_up(), "not connected before its first receive");
    // The queue is empty: the receive polls on until the task is aborted.
    let polling = tokio::spawn(async move { consumer.receive().await.map(|d| d.is_some()) });
    wait_until("a receive to succeed", Duration::from_secs(30), || {
        std::future::ready(link.is_up())
    })
    .await;
    relay.cut().await;
    wait_until("the cut to show", Duration::from_secs(30), || {
        std::future::ready(!link.is_up())
    })
    .await;
    relay.restore().await;
    wait_until("receives to succeed again", Duration::from_secs(60), || {
        std::future::ready(link.is_up())
    })
    .await;
    assert!(!polling.is_finished(), "{:?}", polling.await);
    polling.abort();
    relay.cut().await;
    sqs::delete_queues(&sqs::client(), &urls).await;
}

#[tokio::test]
async fn a_worker_waiting_out_a_database_outage_is_alive_and_unready() {
    let db = TestDb::new().await;
    db.load_logs(2_000).await;
    let cfg = amqp_config();
    // The worker reaches PostgreSQL through a relay the test can cut (the
    // shared server stays up for the other tests, and for this test's own
    // checks).
    let url = url::Url::parse(&db.url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let mut relay = Relay::to(&target).await;
    let mut via = url.clone();
    via.set_port(Some(relay.port())).unwrap();
    let w = crate::helpers::bin::worker(via.as_str())
        .amqp(&cfg)
        .args(["--kinds", "logs", "--listen", "127.0.0.1:0"])
        .args(["--concurrency", "1", "--stuck-after", "2"])
        .spawn();
    let addr = endpoint_of(&w).await;
    wait_status(addr, "/readyz", 200, Duration::from_secs(30)).await;

    // The database goes away; then batches arrive, and the only slot waits.
    relay.cut().await;
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 500, "amqp").await;
    let why = wait_status(addr, "/readyz", 503, Duration::from_secs(30)).await;
    assert!(why.starts_with("database unreachable"), "{why}");
    wait_until(
        "the worker to hold a batch",
        Duration::from_secs(30),
        || async {
            let (_, m) = get(addr, "/metrics").await;
            value(&m, "archiver_worker_batches_in_flight") == Some(1.0)
        },
    )
    .await;
    // Well past --stuck-after with nothing settled: alive, and saying why.
    let stuck = crate::helpers::poll_until(Duration::from_secs(6), || async {
        get(addr, "/healthz").await.0 != 200
    })
    .await;
    assert!(
        stuck.is_none(),
        "a worker waiting for the database was reported stuck"
    );
    let (_, why) = get(addr, "/healthz").await;
    assert!(
        why.starts_with("alive: batches wait for the database"),
        "{why}"
    );

    relay.restore().await;
    assert_eq!(db.wait_job(planned.job).await, "completed");
    wait_status(addr, "/readyz", 200, Duration::from_secs(60)).await;
    let log = w.stop().await;
    assert!(!log.contains("panicked"), "{log}");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}
