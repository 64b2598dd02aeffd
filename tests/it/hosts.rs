//! The fleet across hosts (#15, first steps): a worker on another "machine"
//! (a network namespace of the test's own, `helpers::hosts`) reaches
//! PostgreSQL and RabbitMQ over a link the test can cut.

use crate::helpers::amqp::{amqp_config, amqp_url, delete_queues, queue_depth};
use crate::helpers::hosts::Host;
use crate::helpers::wait::poll_until;
use crate::helpers::{TestDb, plan_logs};
use archiver::transport::Publisher;
use archiver::transport::amqp::AmqpPublisher;
use std::time::Duration;

/// A host, or `None` (the test skips, saying why) where namespaces cannot
/// be made.
fn host() -> Option<Host> {
    match Host::new() {
        Ok(h) => Some(h),
        Err(why) => {
            eprintln!("skipped: no test host here: {why}");
            None
        }
    }
}

#[tokio::test]
async fn a_worker_on_another_host_archives_every_row_once_and_rides_out_a_cut_link() {
    let Some(mut host) = host() else { return };
    let db = TestDb::new().await;
    db.load_logs(6_000).await;
    let (old, young) = db.split_hashes().await;
    let cfg = amqp_config();
    let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
    let planned = plan_logs(&db, &publisher, 200, "amqp").await;
    let (db_url, amqp) = (host.url(&db.url).await, host.url(&amqp_url()).await);
    // Slow enough to be caught mid-job: it rests as long as it works.
    let mut worker = host
        .worker(&db_url)
        .env("QUEUE_URL", &amqp)
        .env("ARCHIVER_QUEUE", &cfg.queue)
        .env("ARCHIVER_REST_RATIO", "1")
        .args(["--kinds", "logs"])
        .spawn();
    let done = |db: &TestDb| {
        let job = planned.job;
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM archive_batches WHERE job_id = $1 AND status = 'done'",
            )
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let started = poll_until(Duration::from_secs(60), || async { done(&db).await >= 2 }).await;
    assert!(
        started.is_some(),
        "no batch done; worker log:\n{}",
        worker.log()
    );
    // The link goes down for a few seconds mid-job, then comes back.
    host.cut();
    let during = done(&db).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    host.heal();
    assert_eq!(
        db.wait_job(planned.job).await,
        "completed",
        "worker log:\n{}",
        worker.log()
    );
    assert!(
        during < planned.batches as i64,
        "cut mid-job: {during} of {}",
        planned.batches
    );
    assert!(
        worker.is_running(),
        "it rode out the cut:\n{}",
        worker.log()
    );
    db.assert_logs_invariant(&old, &young).await;
    db.assert_job_counted_once(planned.job, old.0).await;
    assert_eq!(queue_depth(&cfg, &cfg.dead_queue()).await, Some(0));
    worker.sigterm();
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}
