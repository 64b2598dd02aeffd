//! The fleet over real RabbitMQ: workers share batches, redelivery and a
//! crash between commit and ack change nothing, bad messages are parked.

use crate::helpers::{TestDb, amqp_config, delete_queues, drain, plan_options, queue_depth};
use archiver::ledger::Kind;
use archiver::plan;
use archiver::transport::amqp::{AmqpConfig, AmqpConsumer, AmqpPublisher};
use archiver::transport::{BatchMessage, Consumer, Publisher};
use archiver::worker::{self, Disposition, WorkerOptions, WorkerStats};
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A worker as the binary runs it: its own pool and consumer.
fn spawn_worker(
    db: &TestDb,
    cfg: &AmqpConfig,
    stop: &CancellationToken,
) -> JoinHandle<Arc<WorkerStats>> {
    spawn_worker_with(db, cfg, stop, 1)
}

/// The same, executing `concurrency` batches at once.
fn spawn_worker_with(
    db: &TestDb,
    cfg: &AmqpConfig,
    stop: &CancellationToken,
    concurrency: usize,
) -> JoinHandle<Arc<WorkerStats>> {
    let (url, cfg, stop) = (db.url.clone(), cfg.clone(), stop.clone());
    tokio::spawn(async move {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(concurrency as u32 + 2)
            .connect(&url)
            .await
            .unwrap();
        let mut consumer = AmqpConsumer::new(cfg, concurrency as u16);
        let opts = WorkerOptions {
            concurrency,
            ..Default::default()
        };
        let stats = worker::run(&pool, &mut consumer, opts, stop).await.unwrap();
        consumer.close().await;
        stats
    })
}

async fn plan_to(db: &TestDb, publisher: &AmqpPublisher, batch_size: i64) -> plan::Planned {
    plan::plan(
        &db.pool,
        Kind::Logs,
        &plan_options(batch_size, "amqp"),
        publisher,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn two_workers_share_the_batches_and_archive_every_row_once() {
    let db = TestDb::new().await;
    db.load_logs(12_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_to(&db, &publisher, 300).await;
    assert!(planned.batches >= 20);
    let stop = CancellationToken::new();
    let workers = [
        spawn_worker(&db, &cfg, &stop),
        spawn_worker(&db, &cfg, &stop),
    ];
    assert_eq!(db.wait_job(planned.job).await, "completed");
    stop.cancel();
    let mut done = Vec::new();
    for w in workers {
        done.push(w.await.unwrap().done.load(Ordering::Relaxed));
    }
    assert!(
        done.iter().all(|&d| d > 0),
        "both workers executed batches: {done:?}"
    );
    assert_eq!(done.iter().sum::<u64>(), planned.batches as u64);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(queue_depth(&cfg, &cfg.queue).await, Some(0));
    assert_eq!(queue_depth(&cfg, &cfg.dead_queue()).await, Some(0));
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn every_batch_delivered_twice_has_its_effect_once() {
    let db = TestDb::new().await;
    db.load_logs(6_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_to(&db, &publisher, 500).await;
    // Publish every batch's message a second time.
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1")
        .bind(planned.job)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let dups: Vec<BatchMessage> = ids
        .iter()
        .map(|&id| BatchMessage::new(id, Kind::Logs))
        .collect();
    publisher.publish(&dups).await.unwrap();
    let stop = CancellationToken::new();
    let w = spawn_worker(&db, &cfg, &stop);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    // Let the duplicates drain too.
    crate::helpers::wait_queue_empty(&cfg).await;
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(stats.done.load(Ordering::Relaxed), ids.len() as u64);
    assert_eq!(stats.already_done.load(Ordering::Relaxed), ids.len() as u64);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_after_commit_and_before_ack_loses_and_duplicates_nothing() {
    let db = TestDb::new().await;
    db.load_logs(4_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_to(&db, &publisher, 400).await;

    // Receive one delivery, commit its batch, and vanish without acking.
    let mut doomed = AmqpConsumer::new(cfg.clone(), 1);
    let d = doomed.receive().await.unwrap().expect("a delivery");
    let token = CancellationToken::new();
    let outcome = worker::process(&db.pool, &d.payload, WorkerOptions::default(), &token).await;
    assert!(
        matches!(
            outcome,
            Disposition::Ack(archiver::execute::Outcome::Done { .. })
        ),
        "{outcome:?}"
    );
    drop(d);
    doomed.close().await;

    let stop = CancellationToken::new();
    let w = spawn_worker(&db, &cfg, &stop);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(
        stats.already_done.load(Ordering::Relaxed),
        1,
        "the redelivered batch had no effect"
    );
    assert_eq!(
        stats.done.load(Ordering::Relaxed),
        planned.batches as u64 - 1
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn malformed_and_unknown_messages_are_dead_lettered_and_the_worker_goes_on() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    // Garbage and a forged batch id go first, real work after them.
    let conn = lapin::Connection::connect(
        cfg.url.expose_secret(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for body in [
        b"this is not json".to_vec(),
        BatchMessage::new(Uuid::new_v4(), Kind::Logs).encode(),
    ] {
        ch.basic_publish(
            "".into(),
            cfg.queue.as_str().into(),
            Default::default(),
            &body,
            Default::default(),
        )
        .await
        .unwrap();
    }
    let planned = plan_to(&db, &publisher, 1000).await;
    // A stale or forged message naming a real batch with the wrong kind.
    let real: Uuid = sqlx::query_scalar("SELECT id FROM archive_batches LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    publisher
        .publish(&[BatchMessage::new(real, Kind::Metrics)])
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let w = spawn_worker(&db, &cfg, &stop);
    assert_eq!(db.wait_job(planned.job).await, "completed");
    let mut dead = Vec::new();
    for _ in 0..200 {
        dead.extend(drain(&cfg, &cfg.dead_queue()).await);
        if dead.len() >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 3);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    let not_done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM archive_batches WHERE status <> 'done'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(not_done, 0, "a bad message never marks a real batch dead");
    dead.sort();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let reasons: Vec<String> = dead
        .iter()
        .map(|(_, r)| r.clone().expect("reason header"))
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("the ledger says logs")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("malformed message")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not in the ledger")),
        "{reasons:?}"
    );
    assert!(dead.iter().any(|(p, _)| p == "this is not json"));
    let _ = conn.close(200, "".into()).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

/// Closes this queue's worker connections at the broker, as a broker restart
/// or a network cut would.
async fn close_broker_connections(queue: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let pids: Vec<String> = text
        .lines()
        .filter(|l| l.contains(&format!("archiver-worker {queue}")))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    for pid in &pids {
        let st = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: simulated broker failure"])
            .status()
            .await
            .unwrap();
        assert!(st.success());
    }
    pids.len()
}

#[tokio::test]
async fn a_worker_survives_losing_its_broker_and_database_connections() {
    let db = TestDb::new().await;
    db.load_logs(4_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let stop = CancellationToken::new();
    let w = spawn_worker(&db, &cfg, &stop);
    // Wait until it consumes, then cut both of its connections.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut closed = 0;
    while closed == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "worker never connected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        closed = close_broker_connections(&cfg.queue).await;
    }
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(killed > 0);
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_to(&db, &publisher, 400).await;
    assert_eq!(db.wait_job(planned.job).await, "completed");
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(stats.done.load(Ordering::Relaxed), planned.batches as u64);
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

/// Runs `rabbitmqctl eval EXPR`; its printed result.
fn rabbit_eval(expr: &str) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", expr])
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl eval {expr}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Makes every channel opened from now on check its consumer timeout every
/// 250 ms (RabbitMQ's default: once a minute); puts the old interval back
/// when dropped. Harmless to other tests: a tick only checks timeouts.
struct FastChannelTicks(String);

impl FastChannelTicks {
    fn new() -> Self {
        let old = rabbit_eval("application:get_env(rabbit, channel_tick_interval).");
        let old = old
            .strip_prefix("{ok,")
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or("60000")
            .to_string();
        rabbit_eval("application:set_env(rabbit, channel_tick_interval, 250).");
        FastChannelTicks(old)
    }
}

impl Drop for FastChannelTicks {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args([
                "eval",
                &format!(
                    "application:set_env(rabbit, channel_tick_interval, {}).",
                    self.0
                ),
            ])
            .output();
    }
}

/// Lowers the consumer timeout of the channels of this queue's worker
/// connections to `ms`, and of no other channel: RabbitMQ 3.10 has no
/// per-queue or per-consumer timeout, and changing the global one would
/// reach other tests' channels. Each channel copies the global value into
/// its state when it opens; this rewrites that copy, after checking the
/// field holds the global value (so a different broker version fails here
/// instead of silently testing nothing). Returns the channels changed.
fn lower_consumer_timeout(queue: &str, ms: u32) -> usize {
    let expr = format!(
        r#"Name = <<"archiver-worker {queue}">>,
        Props = fun(P) -> case catch rabbit_reader:info(P, [client_properties]) of
                              [{{client_properties, T}}] when is_list(T) -> T;
                              _ -> []
                          end end,
        Conns = [P || P <- rabbit_networking:connections_local(),
                      lists:keyfind(<<"connection_name">>, 1, Props(P))
                        =:= {{<<"connection_name">>, longstr, Name}}],
        ConnOf = fun(C) -> case catch rabbit_channel:info(C, [connection]) of
                               [{{connection, X}}] -> X;
                               _ -> none
                           end end,
        Chans = [C || C <- rabbit_channel:list_local(), lists:member(ConnOf(C), Conns)],
        {{ok, Global}} = application:get_env(rabbit, consumer_timeout),
        Set = fun(G) -> gs2_state = element(1, G),
                        Ch = element(4, G), ch = element(1, Ch),
                        Cfg = element(2, Ch), conf = element(1, Cfg),
                        Global = element(18, Cfg),
                        setelement(4, G, setelement(2, Ch, setelement(18, Cfg, {ms}))) end,
        [sys:replace_state(C, Set) || C <- Chans],
        length(Chans)."#
    );
    rabbit_eval(&expr)
        .parse()
        .expect("a channel count from rabbitmqctl eval")
}

#[tokio::test]
async fn a_batch_outliving_the_consumer_timeout_has_its_effect_once_and_the_worker_goes_on() {
    let db = TestDb::new().await;
    db.load_logs(4_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_to(&db, &publisher, 400).await;
    let first: Uuid =
        sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1 ORDER BY seq LIMIT 1")
            .bind(planned.job)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // The first batch waits 8 s for a row the application holds.
    let holder = crate::helpers::hold_a_row_of(&db, first, std::time::Duration::from_secs(8)).await;

    let ticks = FastChannelTicks::new();
    let stop = CancellationToken::new();
    let w = spawn_worker_with(&db, &cfg, &stop, 2);
    // Once it consumes, its channel times out deliveries after 2 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while lower_consumer_timeout(&cfg.queue, 2000) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "worker never connected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The broker closes that channel while the first batch is still
    // blocked; its message returns to the queue and comes back on the
    // worker's new channel. The batch commits once.
    assert_eq!(db.wait_job(planned.job).await, "completed");
    holder.await.unwrap();
    drop(ticks);
    let (attempts, status): (i32, String) =
        sqlx::query_as("SELECT attempts, status FROM archive_batches WHERE id = $1")
            .bind(first)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (attempts, status.as_str()),
        (1, "done"),
        "committed once, no failure recorded"
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;

    // The worker is still consuming: a second job completes too.
    db.load_logs(2_000).await;
    let second = plan_to(&db, &publisher, 400).await;
    assert!(second.batches > 0);
    assert_eq!(db.wait_job(second.job).await, "completed");
    crate::helpers::wait_queue_empty(&cfg).await;
    stop.cancel();
    let stats = w.await.unwrap();
    assert_eq!(
        stats.done.load(Ordering::Relaxed),
        (planned.batches + second.batches) as u64,
        "every batch executed once"
    );
    assert!(
        stats.already_done.load(Ordering::Relaxed) >= 1,
        "the timed-out delivery came back and was a no-op"
    );
    db.assert_job_counted_once(second.job, second.rows).await;
    assert_eq!(queue_depth(&cfg, &cfg.dead_queue()).await, Some(0));
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}
