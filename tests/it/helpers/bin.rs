//! The planner and worker binaries, run as an operator runs them: one
//! command builder that starts from a clean environment (none of the
//! archiver's settings inherited from the shell) and adds what a test gives
//! it: the database, the queue, the reports root and store.

use super::db::TestDb;
use super::wait::wait_until;
use archiver::transport::amqp::AmqpConfig;
use secrecy::ExposeSecret;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;
use uuid::Uuid;

/// A command for one of the binaries, built up and then run.
pub struct Bin(Command);

/// The planner binary against the database at `database_url`.
pub fn planner(database_url: &str) -> Bin {
    Bin::new(env!("CARGO_BIN_EXE_planner"), database_url)
}

/// The worker binary against the database at `database_url`.
pub fn worker(database_url: &str) -> Bin {
    Bin::new(env!("CARGO_BIN_EXE_worker"), database_url)
}

impl TestDb {
    /// The planner binary against this database.
    pub fn planner(&self) -> Bin {
        planner(&self.url)
    }

    /// The worker binary against this database.
    pub fn worker(&self) -> Bin {
        worker(&self.url)
    }
}

impl Bin {
    pub(crate) fn new(exe: &str, database_url: &str) -> Bin {
        let mut c = Command::new(exe);
        // Every setting comes from the test: none from the environment the
        // tests run in (a developer's shell may set any of them).
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if key.starts_with("ARCHIVER_")
                || key.starts_with("REPORTS_")
                || key.starts_with("AWS_")
                || ["QUEUE_URL", "DATABASE_URL", "RUST_LOG"].contains(&key)
            {
                c.env_remove(key);
            }
        }
        c.env("DATABASE_URL", database_url);
        Bin(c)
    }

    pub fn args<I, S>(mut self, args: I) -> Bin
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.0.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Bin {
        self.0.env(key, value);
        self
    }

    /// Over RabbitMQ, on the test's queue.
    pub fn amqp(self, cfg: &AmqpConfig) -> Bin {
        self.env("QUEUE_URL", cfg.url.expose_secret())
            .env("ARCHIVER_QUEUE", &cfg.queue)
    }

    /// Reports under `root`, archived into the local store at `archive`.
    pub fn local_reports(self, root: &Path, archive: &Path) -> Bin {
        self.env("REPORTS_ROOT", root)
            .env("REPORTS_ARCHIVE_DIR", archive)
    }

    /// Reports under `root`, archived into `bucket`, configured only by the
    /// environment as in production: endpoint override, static
    /// credentials (a secret that must never be logged), region.
    pub fn s3_reports(self, root: &Path, bucket: &str) -> Bin {
        self.env("REPORTS_ROOT", root)
            .env("REPORTS_ARCHIVE_BUCKET", bucket)
            .env("AWS_ENDPOINT_URL", super::s3::endpoint())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env("AWS_REGION", "us-east-1")
    }

    /// Runs it to the end; its output.
    pub async fn output(self) -> Output {
        tokio::process::Command::from(self.0)
            .output()
            .await
            .unwrap()
    }

    /// Runs it to the end, killing it and failing the test if it takes
    /// longer than `limit` (a run that loops).
    pub async fn output_within(self, limit: Duration) -> Output {
        let mut c = tokio::process::Command::from(self.0);
        let run = c.kill_on_drop(true).output();
        tokio::time::timeout(limit, run)
            .await
            .unwrap_or_else(|_| panic!("{c:?} still running after {limit:?}: it loops"))
            .unwrap()
    }

    /// Starts it, its stderr going to a file readable while it runs.
    pub fn spawn(mut self) -> Running {
        let log = scratch_file("bin.log");
        self.0
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Running {
            child: self.0.spawn().unwrap(),
            log,
        }
    }

    /// The command itself, for a test that wires its pipes otherwise.
    pub fn command(self) -> Command {
        self.0
    }
}

/// The AWS secret `s3_reports` gives the binary.
pub const S3_SECRET: &str = "test-secret-never-logged";

/// A path under target/ no other test uses.
fn scratch_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}", Uuid::new_v4().simple()))
}

/// A running binary whose stderr goes to a file.
pub struct Running {
    child: Child,
    log: PathBuf,
}

/// A test that fails before stopping its process must not leave it running
/// (a worker would go on consuming from the shared broker).
impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    /// What it has written to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGTERM, as systemd or Kubernetes does to stop it.
    pub fn sigterm(&self) {
        sigterm(&self.child);
    }

    /// Waits (bounded) until it has exited; its status.
    pub async fn exit(&mut self, within: Duration) -> ExitStatus {
        exited(&mut self.child, within).await
    }

    /// Stops it (SIGTERM; killed if still running 20 s later); its log.
    pub async fn stop(mut self) -> String {
        self.sigterm();
        let within = Duration::from_secs(20);
        let stopped = super::wait::poll_until(within, || {
            let exited = self.child.try_wait().unwrap().is_some();
            std::future::ready(exited)
        })
        .await;
        if stopped.is_none() {
            let _ = self.child.kill();
        }
        self.log()
    }
}

/// Sends SIGTERM to a child.
pub fn sigterm(child: &Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// Waits (bounded) until a child has exited; its status.
pub async fn exited(child: &mut Child, within: Duration) -> ExitStatus {
    let pid = child.id();
    wait_until(&format!("process {pid} to exit"), within, || {
        std::future::ready(child.try_wait().unwrap())
    })
    .await
}

/// Its stdout, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Its stderr, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Its stdout and stderr, as one text.
pub fn both(o: &Output) -> String {
    format!("{}\n{}", stdout(o), stderr(o))
}

/// A command's stdout, once it has succeeded; its output otherwise.
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", both(o));
    stdout(o)
}
