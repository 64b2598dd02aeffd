//! The fleet over a three-node RabbitMQ cluster (#15, part 3): `QUEUE_URL`
//! lists the nodes, the quorum queues live on all three, and losing the node
//! that leads the work queue mid-job costs nothing: workers move on to the
//! surviving nodes, a planner started while the node is down still
//! publishes, and every row is archived once. The cluster is
//! `scripts/services.sh cluster` (archc1-3@localhost); without it the test
//! skips.

use crate::helpers::amqp::drain;
use crate::helpers::amqp::{
    CLUSTER_NODES, StoppedNode, cluster_config, delete_queues, lock_cluster, queue_depth,
    quorum_leader_and_members, rabbitmqctl_on,
};
use crate::helpers::bin::ok;
use crate::helpers::wait::poll_until;
use crate::helpers::{TestDb, plan_logs};
use archiver::transport::amqp::AmqpPublisher;
use archiver::transport::{BatchMessage, Publisher};
use archiver::vocabulary::Kind;
use secrecy::ExposeSecret;
use std::time::{Duration, Instant};

/// The metrics cut-off the planner uses: whole UTC days older than 730 days.
const METRICS_CUTOFF: &str =
    "date_trunc('day', (now() - interval '730 days') AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'";

#[tokio::test]
async fn the_fleet_rides_out_losing_the_node_that_leads_its_queue() {
    let Some(cfg) = cluster_config() else { return };
    let _cluster = lock_cluster().await;
    let db = TestDb::new().await;
    db.load_logs(8_000).await;
    archiver::demo::load_metrics(&db.pool, 3_000, 6, 3 * 365)
        .await
        .unwrap();
    let (old, young) = db.split_hashes().await;
    let old_samples = db
        .scalar(&format!(
            "SELECT count(*) FROM scenario_metrics WHERE \"timestamp\" < {METRICS_CUTOFF}"
        ))
        .await;
    assert!(old_samples > 0, "test data must have old samples");

    // Two workers, slowed (they rest 20 times as long as they work) so the
    // node can go mid-job, each given every node. They start first, so that the work
    // queue is declared by one of them and led by its node (RabbitMQ puts a
    // new quorum queue's leader on the declaring client's node): stopping
    // the leader then also takes a worker's connection.
    let spawn = || {
        db.worker()
            .amqp(&cfg)
            .env("ARCHIVER_REST_RATIO", "20")
            .args(["--kinds", "logs,metrics", "--concurrency", "1"])
            .spawn()
    };
    let mut workers = [spawn(), spawn()];
    let logs = |workers: &[crate::helpers::bin::Running; 2]| {
        format!(
            "worker 1:\n{}\nworker 2:\n{}",
            workers[0].log(),
            workers[1].log()
        )
    };
    let consuming = poll_until(Duration::from_secs(60), || {
        std::future::ready(workers.iter().all(|w| w.log().contains("consuming")))
    })
    .await;
    assert!(
        consuming.is_some(),
        "workers not consuming; {}",
        logs(&workers)
    );

    // The work queue and its dead-letter queue are replicated on all three.
    let (leader, members) = quorum_leader_and_members(CLUSTER_NODES[0], &cfg.queue);
    assert_eq!(members.len(), 3, "work queue members: {members:?}");
    assert_eq!(
        quorum_leader_and_members(CLUSTER_NODES[0], &cfg.dead_queue())
            .1
            .len(),
        3
    );
    assert!(
        CLUSTER_NODES.contains(&leader.as_str()),
        "leader {leader:?}"
    );
    let on_leader = worker_nodes(&cfg.queue)
        .iter()
        .filter(|n| **n == leader)
        .count();
    assert!(
        on_leader >= 1,
        "no worker on the leader {leader}; {}",
        logs(&workers)
    );

    // Planned last, so that the job is young when the node goes.
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 50, "amqp").await;
    publisher.close().await.unwrap();

    let done = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM archive_batches WHERE job_id = $1 AND status = 'done'",
        )
        .bind(planned.job)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let started = poll_until(Duration::from_secs(60), || async { done().await >= 2 }).await;
    assert!(started.is_some(), "no batch done; {}", logs(&workers));

    // The node leading the work queue goes.
    let down = StoppedNode::stop(&leader);
    let stopped_at = Instant::now();
    let at_stop = done().await;
    assert!(
        at_stop < planned.batches as i64,
        "stopped mid-job: {at_stop} of {}",
        planned.batches
    );

    // While it is down, a planner (the binary, given every node) still
    // publishes a job of its own.
    let planner = db
        .planner()
        .amqp(&cfg)
        .args(["--metrics"])
        .output_within(Duration::from_secs(90))
        .await;
    let planner_took = stopped_at.elapsed();
    let planner_out = ok(&planner);
    let metrics_job: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM archive_jobs WHERE job_type = 'metrics' ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();

    // `planner check` tries the nodes from the first: given the stopped one
    // first, it says so and moves on to the next.
    let mut urls: Vec<&str> = cfg.url.expose_secret().split(',').collect();
    let down_at = CLUSTER_NODES.iter().position(|n| *n == leader).unwrap();
    urls.rotate_left(down_at);
    let check = db
        .planner()
        .env("QUEUE_URL", urls.join(","))
        .env("ARCHIVER_QUEUE", &cfg.queue)
        .args(["check"])
        .output_within(Duration::from_secs(90))
        .await;
    let check_out = crate::helpers::bin::both(&check);
    assert!(check.status.success(), "{check_out}");
    assert!(
        check_out.contains("broker node 1 of 3 unavailable") && check_out.contains("queue: ok"),
        "{check_out}"
    );

    // The workers go on with the logs job on the surviving nodes.
    let resumed = poll_until(Duration::from_secs(90), || async { done().await > at_stop }).await;
    let resumed_after = stopped_at.elapsed();
    assert!(
        resumed.is_some(),
        "no batch done in 90 s after {leader} stopped; {}",
        logs(&workers)
    );
    let (new_leader, _) = quorum_leader_and_members(
        CLUSTER_NODES.iter().find(|n| **n != leader).unwrap(),
        &cfg.queue,
    );
    down.start();
    let restarted_after = stopped_at.elapsed();

    let all_logs = logs(&workers);
    assert_eq!(db.wait_job(planned.job).await, "completed", "{all_logs}");
    assert_eq!(db.wait_job(metrics_job).await, "completed", "{all_logs}");
    eprintln!(
        "leader {leader} (holding {on_leader} of the 2 workers' connections) stopped with {at_stop} of {} batches done; the planner published while it was down \
         ({planner_took:?} after the stop); a batch done again {resumed_after:?} after the stop; new leader \
         {new_leader}; node started again {restarted_after:?} after the stop\nplanner: {planner_out}{}\n{}",
        planned.batches,
        crate::helpers::stderr(&planner),
        logs(&workers)
    );

    // Every row archived once, counted once; metrics aggregated once.
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM scenario_metrics WHERE \"timestamp\" < {METRICS_CUTOFF}"
        ))
        .await,
        0,
        "no old sample left"
    );
    assert_eq!(
        db.scalar("SELECT COALESCE(sum(sample_count), 0)::bigint FROM scenario_metrics_archive")
            .await,
        old_samples,
        "every old sample aggregated exactly once"
    );
    assert_eq!(queue_depth(&cfg, &cfg.dead_queue()).await, Some(0));
    let running = workers.each_mut().map(|w| w.is_running());
    assert_eq!(
        running,
        [true, true],
        "workers still running; {}",
        logs(&workers)
    );
    for w in workers {
        w.stop().await;
    }
    delete_queues(&cfg).await;
    db.cleanup().await;
}

/// The nodes this queue's worker connections are on.
fn worker_nodes(queue: &str) -> Vec<String> {
    connection_nodes(&format!("archiver-worker {queue}"), CLUSTER_NODES[0])
}

/// The nodes of the connections named `name`, as the cluster lists them
/// (`rabbitmqctl list_connections` answers for the whole cluster): node
/// `archc<i>` listens on port 5680 + i.
fn connection_nodes(name: &str, via: &str) -> Vec<String> {
    let out = rabbitmqctl_on(
        via,
        &[
            "list_connections",
            "--no-table-headers",
            "port",
            "client_properties",
        ],
    );
    out.lines()
        .filter(|l| l.contains(name))
        .filter_map(|l| l.split_whitespace().next()?.parse::<usize>().ok())
        .filter_map(|port| CLUSTER_NODES.get(port.checked_sub(5681)?))
        .map(|n| n.to_string())
        .collect()
}

/// The planner's side: a publisher whose node goes while it publishes
/// sends what was not confirmed again on another node, and every publish
/// returns `Ok` with every message in the queue (some perhaps twice).
#[tokio::test]
async fn a_publish_cut_off_with_its_node_is_published_again_on_another() {
    let Some(cfg) = cluster_config() else { return };
    let _cluster = lock_cluster().await;
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let node = connection_nodes(&format!("archiver-planner {}", cfg.queue), CLUSTER_NODES[0]);
    assert_eq!(node.len(), 1, "one publisher connection: {node:?}");
    let node = node[0].clone();

    // Publish rounds of 10 until the node has been stopped, then 5 more.
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = {
        let stopped = stopped.clone();
        async move {
            let (mut sent, mut after) = (Vec::new(), 0);
            let limit = Instant::now() + Duration::from_secs(60);
            while after < 5 && Instant::now() < limit {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    after += 1;
                }
                let round: Vec<BatchMessage> = (0..10)
                    .map(|_| BatchMessage::new(uuid::Uuid::new_v4(), Kind::Logs))
                    .collect();
                let started = Instant::now();
                publisher.publish(&round).await.unwrap();
                sent.push((round, started.elapsed()));
            }
            (publisher, sent)
        }
    };
    let stopping = async {
        // Stopped from another thread: rabbitmqctl blocks.
        let node = node.clone();
        let down = tokio::task::spawn_blocking(move || StoppedNode::stop(&node))
            .await
            .unwrap();
        stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        down
    };
    let ((publisher, sent), down) = tokio::join!(publishing, stopping);
    // It went on over a new connection, to another node.
    let survivor = CLUSTER_NODES.iter().find(|n| **n != node).unwrap();
    let moved_to = connection_nodes(&format!("archiver-planner {}", cfg.queue), survivor);
    assert!(
        moved_to.len() == 1 && moved_to[0] != node,
        "publisher connections after the stop: {moved_to:?}"
    );
    publisher.close().await.unwrap();
    let slowest = sent.iter().map(|(_, took)| *took).max().unwrap();
    let (leader, _) = quorum_leader_and_members(survivor, &cfg.queue);
    let got: std::collections::HashSet<String> = drain(&cfg, &cfg.queue)
        .await
        .into_iter()
        .map(|(payload, _)| payload)
        .collect();
    down.start();
    let missing = sent
        .iter()
        .flat_map(|(round, _)| round)
        .filter(|m| !got.contains(&String::from_utf8(m.encode()).unwrap()))
        .count();
    eprintln!(
        "publisher on {node}, stopped mid-publish, went on at {}: {} rounds of 10 confirmed, the slowest in {slowest:?}; \
         new leader {leader}; {} distinct messages in the queue",
        moved_to[0],
        sent.len(),
        got.len()
    );
    assert_eq!(missing, 0, "every confirmed message is in the queue");
    delete_queues(&cfg).await;
}

/// A `QUEUE_URL` list with a bad entry stops the planner at start, naming
/// the entry by position; one whose nodes all refuse fails the run saying
/// how many were tried. Neither shows the password. (No cluster needed.)
#[tokio::test]
async fn a_bad_or_unreachable_node_list_is_named_without_the_password() {
    let db = TestDb::new().await;
    db.load_logs(200).await;
    let bad = "amqp://guest:hunter2@127.0.0.1:5681/%2f,amqp://guest:hunter2@127.0.0.1:notaport/%2f";
    let o = db
        .planner()
        .env("QUEUE_URL", bad)
        .args(["--logs"])
        .output_within(Duration::from_secs(60))
        .await;
    let err = crate::helpers::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("QUEUE_URL: entry 2 of 2: "), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    // Nothing listens on these (ports below 1024 that no test uses).
    let down = "amqp://guest:hunter2@127.0.0.1:9/%2f,amqp://guest:hunter2@127.0.0.1:7/%2f";
    let o = db
        .planner()
        .env("QUEUE_URL", down)
        .args(["--logs"])
        .output_within(Duration::from_secs(90))
        .await;
    let both = crate::helpers::bin::both(&o);
    assert!(!o.status.success(), "{both}");
    assert!(
        both.contains("none of the 2 broker nodes answered"),
        "{both}"
    );
    assert!(!both.contains("hunter2"), "{both}");
    db.cleanup().await;
}
