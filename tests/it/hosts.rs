//! The fleet across hosts (#15): workers on other "machines" (network
//! namespaces of the test's own, `helpers::hosts`) reach PostgreSQL and
//! RabbitMQ over links the test cuts: the whole link, or one service only
//! (its packets dropped, as a partition does: nothing is refused or reset).
//! After each fault the job completes with every row archived once, its
//! counters equal to the archive, no batch dead, and the cut-off worker
//! still running, having recovered by itself.
//!
//! The workers ask the broker for a 5 s heartbeat (`?heartbeat=5` in
//! `QUEUE_URL`) and run batch sessions with 5 s server timeouts, so that a
//! partition "longer than the heartbeat" or "for minutes" needs seconds,
//! not the defaults' minutes.

use crate::helpers::amqp::{amqp_config, amqp_url, delete_queues, queue_depth};
use crate::helpers::bin::Running;
use crate::helpers::hosts::Host;
use crate::helpers::wait::poll_until;
use crate::helpers::{TestDb, plan_logs};
use archiver::plan::Planned;
use archiver::transport::Publisher;
use archiver::transport::amqp::{AmqpConfig, AmqpPublisher};
use std::time::{Duration, Instant};

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

/// The broker heartbeat the workers ask for, in seconds.
const HEARTBEAT: u64 = 5;

/// A logs job and the workers on their hosts executing it.
struct Fleet {
    db: TestDb,
    cfg: AmqpConfig,
    publisher: AmqpPublisher,
    planned: Planned,
    old: (i64, String),
    young: (i64, String),
    hosts: Vec<Host>,
    /// Per host: its database URL and its broker URL (through its link).
    urls: Vec<(String, String)>,
    workers: Vec<Running>,
}

impl Fleet {
    /// `rows` logs rows planned in batches of `batch`, and a worker on each
    /// of `hosts` new hosts running `slots` batches at once, each resting
    /// `rest` times what its batch took. `None` where hosts cannot be made.
    async fn start(hosts: usize, rows: i64, batch: i64, slots: u8, rest: &str) -> Option<Fleet> {
        let mut made = Vec::new();
        for _ in 0..hosts {
            made.push(host()?);
        }
        let db = TestDb::new().await;
        db.load_logs(rows).await;
        let (old, young) = db.split_hashes().await;
        let cfg = amqp_config();
        let publisher = AmqpPublisher::connect(cfg.clone()).await.unwrap();
        let planned = plan_logs(&db, &publisher, batch, "amqp").await;
        let mut urls = Vec::new();
        let mut workers = Vec::new();
        for h in &mut made {
            let db_url = h.url(&db.url).await;
            let mut amqp = url::Url::parse(&h.url(&amqp_url()).await).unwrap();
            amqp.set_query(Some(&format!("heartbeat={HEARTBEAT}")));
            let amqp = amqp.to_string();
            workers.push(
                h.worker(&db_url)
                    .env("QUEUE_URL", &amqp)
                    .env("ARCHIVER_QUEUE", &cfg.queue)
                    .env("ARCHIVER_REST_RATIO", rest)
                    .env("ARCHIVER_CONCURRENCY", slots.to_string())
                    .env("RUST_LOG", "archiver=debug,worker=debug,info")
                    .env("ARCHIVER_STATEMENT_TIMEOUT", "5s")
                    .env("ARCHIVER_IDLE_IN_TRANSACTION_TIMEOUT", "5s")
                    .args(["--kinds", "logs"])
                    .spawn(),
            );
            urls.push((db_url, amqp));
        }
        Some(Fleet {
            db,
            cfg,
            publisher,
            planned,
            old,
            young,
            hosts: made,
            urls,
            workers,
        })
    }

    /// Batches of the job done so far.
    async fn done(&self) -> i64 {
        self.db
            .scalar(&format!(
                "SELECT count(*) FROM archive_batches WHERE job_id = '{}' AND status = 'done'",
                self.planned.job
            ))
            .await
    }

    /// Waits (bounded) until `n` batches are done.
    async fn until_done(&self, n: i64) {
        let got = poll_until(Duration::from_secs(60), || async { self.done().await >= n }).await;
        assert!(got.is_some(), "{n} batches not done:\n{}", self.logs());
    }

    /// Waits (bounded by `within`) until the worker on host `i` has
    /// connected to the broker and is consuming again.
    async fn until_consuming_again(&self, i: usize, within: Duration) {
        let again = poll_until(within, || async {
            self.workers[i].log().matches("consuming").count() >= 2
        })
        .await;
        assert!(
            again.is_some(),
            "the cut-off worker consumes again:\n{}",
            self.logs()
        );
    }

    /// Every worker's log, headed by its host's number.
    fn logs(&self) -> String {
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| format!("--- worker on host {i}:\n{}", w.log()))
            .collect()
    }

    /// What the worker on host `i` said, less its debug lines: seen when a
    /// test fails, or with `--success-output`.
    fn report(&self, i: usize) {
        let log = self.workers[i].log();
        let said: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
        eprintln!("worker on host {i}:\n{}", said.join("\n"));
    }

    /// The job completed (bounded by `within`), every row was archived
    /// once, its counters are counted once, no batch is dead, nothing was
    /// dead-lettered and every worker still runs; then stops them and
    /// returns their logs.
    async fn assert_exactly_once(mut self, within: Duration) -> Vec<String> {
        let job = self.planned.job;
        let status = poll_until(within, || async {
            let s = self.db.job_status(job).await;
            (s != "running" && s != "pending").then_some(s)
        })
        .await;
        let batches = self
            .db
            .scalar(&format!(
                "SELECT count(*) FROM archive_batches WHERE job_id = '{job}' AND status = 'done'"
            ))
            .await;
        assert_eq!(
            status.as_deref(),
            Some("completed"),
            "{batches} of {} batches done:\n{}",
            self.planned.batches,
            self.logs()
        );
        self.db.assert_logs_invariant(&self.old, &self.young).await;
        self.db.assert_job_counted_once(job, self.old.0).await;
        let dead = self
            .db
            .scalar(&format!(
                "SELECT count(*) FROM archive_batches WHERE job_id = '{job}' AND status <> 'done'"
            ))
            .await;
        assert_eq!(dead, 0, "every batch done:\n{}", self.logs());
        assert_eq!(
            queue_depth(&self.cfg, &self.cfg.dead_queue()).await,
            Some(0),
            "{}",
            self.logs()
        );
        for (i, w) in self.workers.iter_mut().enumerate() {
            assert!(w.is_running(), "worker on host {i} exited:\n{}", w.log());
        }
        self.report(0);
        for w in &self.workers {
            w.sigterm();
        }
        for w in &mut self.workers {
            w.exit(Duration::from_secs(30)).await;
        }
        self.publisher.close().await.unwrap();
        delete_queues(&self.cfg).await;
        let logs = self.workers.iter().map(|w| w.log()).collect();
        self.db.cleanup().await;
        logs
    }
}

#[tokio::test]
async fn a_worker_on_another_host_archives_every_row_once_and_rides_out_a_cut_link() {
    let Some(fleet) = Fleet::start(1, 6_000, 200, 2, "1").await else {
        return;
    };
    fleet.until_done(2).await;
    // The link goes down for a few seconds mid-job, then comes back.
    fleet.hosts[0].cut();
    let during = fleet.done().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.hosts[0].heal();
    assert!(
        during < fleet.planned.batches as i64,
        "cut mid-job: {during} of {}",
        fleet.planned.batches
    );
    fleet.assert_exactly_once(Duration::from_secs(120)).await;
}

/// How long a worker is cut off from the database: four heartbeats, so the
/// broker would long have noticed had the cut been its own.
const DB_CUT: Duration = Duration::from_secs(4 * HEARTBEAT);

#[tokio::test]
async fn a_host_cut_off_from_the_database_longer_than_the_heartbeat_resumes_its_batches() {
    let Some(fleet) = Fleet::start(2, 30_000, 200, 2, "20").await else {
        return;
    };
    fleet.until_done(4).await;
    let cut = &fleet.hosts[0];
    cut.block(&fleet.urls[0].0);
    let t = Instant::now();
    tokio::time::sleep(DB_CUT).await;
    cut.unblock(&fleet.urls[0].0);
    eprintln!("database cut for {:?}", t.elapsed());
    let log = fleet.workers[0].log();
    assert!(
        fleet.done().await < fleet.planned.batches as i64,
        "the job outlasted the cut"
    );
    // The broker kept the worker's connection (and its deliveries): only
    // the database was gone.
    assert!(
        !log.contains("reconnecting"),
        "the broker link stayed up:\n{log}"
    );
    fleet.assert_exactly_once(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn a_host_cut_off_from_the_broker_after_its_commits_reconnects_and_nothing_runs_twice() {
    let Some(fleet) = Fleet::start(2, 30_000, 200, 2, "20").await else {
        return;
    };
    // Right after a commit of this host's.
    let before = fleet.done().await;
    fleet.until_done(before + 4).await;
    let cut = &fleet.hosts[0];
    cut.block(&fleet.urls[0].1);
    // Past the heartbeat timeout: the broker gives the host's deliveries to
    // the other worker, whose ledger lock makes them no-ops or resumes them
    // at their cursors.
    tokio::time::sleep(Duration::from_secs(4 * HEARTBEAT)).await;
    cut.unblock(&fleet.urls[0].1);
    let healed = Instant::now();
    fleet
        .until_consuming_again(0, Duration::from_secs(60))
        .await;
    eprintln!("consuming again {:?} after the heal", healed.elapsed());
    fleet.assert_exactly_once(Duration::from_secs(120)).await;
}

/// How long a host is cut off from everything: long enough for its
/// deliveries to go back to the queue and the other host to run them.
const LONG_CUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_host_cut_off_from_everything_for_minutes_loses_its_batches_to_the_other_and_rejoins() {
    // Enough work that some is left when the link comes back.
    let Some(fleet) = Fleet::start(2, 60_000, 200, 1, "100").await else {
        return;
    };
    fleet.until_done(4).await;
    let cut = &fleet.hosts[0];
    cut.cut();
    let t = Instant::now();
    tokio::time::sleep(LONG_CUT).await;
    // The other host went on meanwhile, with the cut one's deliveries.
    let during = fleet.done().await;
    cut.heal();
    let healed = fleet.workers[0].log().len();
    eprintln!(
        "link down for {:?}; {during} of {} batches done",
        t.elapsed(),
        fleet.planned.batches
    );
    assert!(
        during < fleet.planned.batches as i64,
        "work is left for the host that comes back"
    );
    fleet
        .until_consuming_again(0, Duration::from_secs(90))
        .await;
    let log = fleet.assert_exactly_once(Duration::from_secs(180)).await;
    let log = &log[0];
    assert!(
        log[healed..].contains("batch done"),
        "the host that came back ran batches again:\n{log}"
    );
}
