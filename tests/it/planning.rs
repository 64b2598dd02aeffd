//! Planning a job of many batches over real RabbitMQ: cutting, recording and
//! publishing overlap, yet a message never names a batch the ledger does not
//! have, a batch is marked published only after the broker confirmed it, and
//! a publishing failure fails the job without marking what was not sent.

use crate::helpers::amqp::{amqp_config, delete_queues, drain, queue_depth};
use crate::helpers::{TestDb, plan_options};
use archiver::plan;
use archiver::transport::amqp::AmqpPublisher;
use archiver::transport::{BatchMessage, Publisher};
use archiver::vocabulary::Kind;
use async_trait::async_trait;
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;

/// The real RabbitMQ publisher, watched: before each publish it checks in
/// the ledger (another connection) that every batch is recorded and not yet
/// marked published; it counts publishes running at once, and can refuse
/// its `fail_on`-th call without sending anything (a broker refusing).
struct Watched {
    inner: AmqpPublisher,
    pool: PgPool,
    fail_on: Option<usize>,
    calls: AtomicUsize,
    running: AtomicUsize,
    most_running: AtomicUsize,
    sent: Mutex<Vec<Uuid>>,
    violations: Mutex<Vec<String>>,
}

impl Watched {
    fn new(inner: AmqpPublisher, pool: PgPool, fail_on: Option<usize>) -> Self {
        Watched {
            inner,
            pool,
            fail_on,
            calls: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            most_running: AtomicUsize::new(0),
            sent: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl Publisher for Watched {
    async fn publish(&self, messages: &[BatchMessage]) -> archiver::Result<()> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now, Ordering::SeqCst);
        let ids: Vec<Uuid> = messages.iter().map(|m| m.batch_id).collect();
        let (recorded, marked): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(published_at) FROM archive_batches WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        if recorded != ids.len() as i64 || marked != 0 {
            self.violations.lock().unwrap().push(format!(
                "call {call}: {} message(s), {recorded} recorded, {marked} already marked published",
                ids.len()
            ));
        }
        // Slow enough that later chunks catch up with this one.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let r = if self.fail_on == Some(call) {
            Err(archiver::Error::Broker(
                "injected: the broker refused".into(),
            ))
        } else {
            let r = self.inner.publish(messages).await;
            if r.is_ok() {
                self.sent.lock().unwrap().extend(&ids);
            }
            r
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        r
    }

    async fn close(&self) -> archiver::Result<()> {
        self.inner.close().await
    }
}

#[tokio::test]
async fn publishing_overlaps_yet_sends_only_recorded_batches_and_marks_only_confirmed_ones() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let cfg = amqp_config();
    let publisher = Watched::new(
        AmqpPublisher::connect(cfg.clone()).await.unwrap(),
        db.pool.clone(),
        None,
    );
    // One row per batch: about 2,000 batches, in chunks of 1, 2, 4 … 200.
    let planned = plan::plan(&db.pool, Kind::Logs, &plan_options(1, "amqp"), &publisher)
        .await
        .unwrap();
    assert!(planned.batches > 1_000, "{}", planned.batches);
    let violations = publisher.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:?}");
    let most = publisher.most_running.load(Ordering::SeqCst);
    assert!(
        (2..=4).contains(&most),
        "chunks published at once: {most} (expected overlap, bounded by 4)"
    );

    // Every batch recorded once, numbered 0.., marked published, and sent once.
    let (n, seqs_ok, unmarked, planned_count): (i64, bool, i64, i32) = sqlx::query_as(
        "SELECT count(*), bool_and(seq >= 0) AND max(seq) = count(*) - 1 AND count(DISTINCT seq) = count(*),
                count(*) FILTER (WHERE published_at IS NULL),
                (SELECT batches_planned FROM archive_jobs WHERE id = $1)
         FROM archive_batches WHERE job_id = $1",
    )
    .bind(planned.job)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(n, planned.batches as i64);
    assert!(seqs_ok, "seq numbers 0..n-1, each once");
    assert_eq!(unmarked, 0);
    assert_eq!(planned_count as i64, n);
    let sent = publisher.sent.lock().unwrap().clone();
    assert_eq!(sent.len() as i64, n);
    assert_eq!(sent.iter().collect::<HashSet<_>>().len() as i64, n);
    assert_eq!(queue_depth(&cfg, &cfg.queue).await, Some(n as u32));
    // The rows were cut in order: the batches tile the range without gaps.
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT lo_ts, lo_id, lag(hi_ts) OVER w AS p_ts, lag(hi_id) OVER w AS p_id
                               FROM archive_batches WHERE job_id = $1 WINDOW w AS (ORDER BY seq)) t
         WHERE p_ts IS NOT NULL AND (lo_ts, lo_id) IS DISTINCT FROM (p_ts, p_id)",
    )
    .bind(planned.job)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(gaps, 0, "each batch starts where the one before it ends");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_refused_publish_fails_the_job_and_leaves_unsent_batches_unmarked() {
    let db = TestDb::new().await;
    db.load_logs(3_000).await;
    let cfg = amqp_config();
    let publisher = Watched::new(
        AmqpPublisher::connect(cfg.clone()).await.unwrap(),
        db.pool.clone(),
        Some(6),
    );
    let err = plan::plan(&db.pool, Kind::Logs, &plan_options(1, "amqp"), &publisher)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    let violations = publisher.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:?}");
    let (status, reason): (String, Option<String>) = sqlx::query_as(
        "SELECT status, error_message FROM archive_jobs ORDER BY started_at DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(status, "failed");
    assert!(
        reason.as_deref().unwrap_or("").contains("planning failed"),
        "{reason:?}"
    );
    // Marked published ⊆ sent: nothing the broker did not confirm is marked.
    let marked: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM archive_batches WHERE published_at IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let sent: HashSet<Uuid> = publisher.sent.lock().unwrap().iter().copied().collect();
    assert!(!marked.is_empty(), "chunks before the failure were marked");
    assert!(
        marked.iter().all(|id| sent.contains(id)),
        "a batch was marked published that was never sent"
    );
    // Every message in the queue names a recorded batch.
    let recorded: HashSet<Uuid> = sqlx::query_scalar("SELECT id FROM archive_batches")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    // (Publishes still in flight when the job failed were dropped: some of
    // their messages may be queued, unmarked, which the ledger tolerates.)
    let queued: HashSet<Uuid> = drain(&cfg, &cfg.queue)
        .await
        .iter()
        .map(|(payload, _)| BatchMessage::decode(payload.as_bytes()).unwrap().batch_id)
        .collect();
    assert!(
        queued.is_subset(&recorded),
        "a message names an unrecorded batch"
    );
    assert!(sent.is_subset(&queued), "a confirmed message is missing");
    let unmarked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM archive_batches WHERE published_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(unmarked > 0, "the refused chunk stays unmarked for rescue");
    publisher.close().await.unwrap();
    delete_queues(&cfg).await;
    db.cleanup().await;
}
