//! The helper wing of the integration tests, split by what each part talks
//! to: `db` (a database per test, dropped even when the test panics),
//! `bin` (the planner and worker binaries), `amqp`, `sqs`, `s3`, `http` (a
//! worker's endpoint), `standby` (a private primary and its hot
//! standby), and `wait`
//! (waiting for a condition instead of sleeping). What runs the library in
//! this process (planning, inline runs, a reports executor) is here.

pub mod amqp;
pub mod bin;
pub mod db;
pub mod hosts;
pub mod http;
pub mod relay;
pub mod s3;
pub mod sqs;
pub mod standby;
pub mod wait;

pub use bin::{ok, stderr, stdout};
pub use db::TestDb;
pub use wait::{poll_until, wait_until};

use archiver::config::Policy;
use archiver::execute::Executor;
use archiver::execute::reports::ReportsContext;
use archiver::objects::{self, Compression};
use archiver::plan::{PlanOptions, Planned};
use archiver::transport::{Publisher, inline};
use archiver::vocabulary::Kind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

pub fn plan_options(batch_size: i64, transport: &'static str) -> PlanOptions {
    PlanOptions {
        batch_size,
        reports_batch_size: 20,
        reports_root: None,
        policy: Policy::default(),
        transport,
    }
}

/// Plans the logs into `publisher` in batches of `batch_size`.
pub async fn plan_logs(
    db: &TestDb,
    publisher: &dyn Publisher,
    batch_size: i64,
    transport: &'static str,
) -> Planned {
    archiver::plan::plan(
        &db.pool,
        Kind::Logs,
        &plan_options(batch_size, transport),
        publisher,
    )
    .await
    .unwrap()
}

/// Plans `kind` into the ledger and publishes nowhere that runs it (as a
/// planner whose executors died before running anything): its batches stay
/// pending.
pub async fn plan_only(db: &TestDb, kind: Kind, opts: &PlanOptions) -> Planned {
    let (publisher, _consumer) = inline::queue(Default::default());
    let planned = archiver::plan::plan(&db.pool, kind, opts, &publisher)
        .await
        .unwrap();
    assert!(planned.batches > 0, "test data must make batches");
    planned
}

/// Plans `kind` and runs its batches inline, as `planner` does with no
/// broker; asserts nothing was dead-lettered and the job completed.
pub async fn run_inline(db: &TestDb, kind: Kind, batch_size: i64) -> Planned {
    let opts = plan_options(batch_size, "inline");
    let ran = archiver::worker::run_inline(
        &db.pool,
        archiver::worker::WorkerOptions::default(),
        async |publisher| archiver::plan::plan(&db.pool, kind, &opts, publisher).await,
    )
    .await
    .unwrap();
    assert!(ran.dead.is_empty(), "{:?}", ran.dead);
    assert_eq!(db.wait_job(ran.fed.job).await, "completed");
    ran.fed
}

/// An executor that archives reports from `root` into the local store at
/// `archive`.
pub async fn reports_executor(db: &TestDb, root: &Path, archive: &Path) -> Executor {
    Executor {
        pool: db.pool.clone(),
        reports: Some(Arc::new(ReportsContext {
            root: root.to_path_buf(),
            store: objects::open(None, archive).await.unwrap(),
            compression: Compression::Zstd,
        })),
        ..Executor::from(&db.pool)
    }
}

/// The chunk time of the in-process workers of the fleet tests: 1 ms, so
/// that after a process's first chunk (1,000 rows) every chunk is the
/// minimum (100 rows) and the exactly-once tests run with several chunks per
/// batch.
pub const TEST_CHUNK_TIME: std::time::Duration = std::time::Duration::from_millis(1);

/// An executor on `pool` whose chunks aim at [`TEST_CHUNK_TIME`].
pub fn small_chunks(pool: &sqlx::PgPool) -> Executor {
    let opts = archiver::governor::GovernorOptions {
        chunk_time: TEST_CHUNK_TIME,
        ..Default::default()
    };
    Executor {
        governor: Arc::new(archiver::governor::Governor::new(opts)),
        ..Executor::from(pool)
    }
}

/// A new directory under target/ no other test uses.
pub fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A reports root, a local archive store and a directory outside both.
pub struct Dirs {
    pub root: PathBuf,
    pub archive: PathBuf,
    pub outside: PathBuf,
}

impl Dirs {
    pub fn new(name: &str) -> Dirs {
        let base = scratch(name);
        let d = Dirs {
            root: base.join("root"),
            archive: base.join("archive"),
            outside: base.join("outside"),
        };
        for p in [&d.root, &d.archive, &d.outside] {
            std::fs::create_dir_all(p).unwrap();
        }
        d
    }
}
