//! A private PostgreSQL primary on a free port, and optionally a hot
//! standby of it (`pg_basebackup -R`), made by the test itself and thrown
//! away (`pg_ctl stop -m immediate`, data removed) when the value is
//! dropped, also when the test panics. As root the servers run as user
//! postgres (`runuser`), as `scripts/services.sh` runs its private cluster.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A private primary, and its standby when asked for.
pub struct Clusters {
    base: PathBuf,
    bin: PathBuf,
    /// The primary's port on 127.0.0.1.
    pub primary: u16,
    /// The standby's port, when there is one.
    pub standby: Option<u16>,
    started: Vec<PathBuf>,
}

/// The newest /usr/lib/postgresql/<version>/bin with initdb.
fn bindir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL binaries under /usr/lib/postgresql")
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().expect("an initdb under /usr/lib/postgresql").1
}

fn root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Clusters {
    /// A primary only (for controls read on the primary, free of the
    /// shared server's other traffic).
    pub fn primary() -> Clusters {
        let mut c = Clusters {
            base: std::env::temp_dir().join(format!("archiver-pg-{}", Uuid::new_v4().simple())),
            bin: bindir(),
            primary: free_port(),
            standby: None,
            started: Vec::new(),
        };
        std::fs::create_dir_all(&c.base).unwrap();
        if root() {
            c.run("chown", &["postgres:", c.base.to_str().unwrap()], false);
        }
        let data = c.base.join("primary");
        let d = data.to_str().unwrap().to_string();
        c.pg(
            "initdb",
            &[
                "-D",
                &d,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             max_connections = 40\nshared_buffers = 32MB\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nwal_level = replica\nmax_wal_senders = 4\nhot_standby = on\n\
             wal_receiver_status_interval = 1s\n",
            c.primary,
            c.base.display()
        );
        c.append(&data.join("postgresql.conf"), &conf);
        c.append(
            &data.join("pg_hba.conf"),
            "host replication all 127.0.0.1/32 trust\n",
        );
        c.start(&data);
        c
    }

    /// A primary and a hot standby streaming from it (replies every second:
    /// `wal_receiver_status_interval = 1s`).
    pub fn with_standby() -> Clusters {
        let mut c = Clusters::primary();
        let port = free_port();
        let data = c.base.join("standby");
        let (d, p) = (data.to_str().unwrap().to_string(), c.primary.to_string());
        c.pg(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &p,
                "-U",
                "postgres",
                "-D",
                &d,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        c.append(&data.join("postgresql.conf"), &format!("port = {port}\n"));
        c.standby = Some(port);
        c.start(&data);
        c
    }

    /// The administrator's URL of the primary.
    pub fn primary_url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.primary)
    }

    /// A URL of database `db` on the standby.
    pub fn standby_url(&self, db: &str) -> String {
        let port = self.standby.expect("a standby");
        format!("postgresql://postgres@127.0.0.1:{port}/{db}")
    }

    /// Restarts the primary as an operator's fast restart does: every
    /// session is ended (57P01), the server is down for a moment and comes
    /// back with its data. Blocks until it accepts connections again.
    pub fn restart_primary(&self) {
        let data = self.base.join("primary");
        let d = data.to_str().unwrap().to_string();
        let log = format!("{d}.log");
        // With its log file named again: otherwise the server would write
        // to (and hold open) this call's pipes.
        self.pg(
            "pg_ctl",
            &[
                "-D", &d, "-l", &log, "-m", "fast", "-w", "-t", "60", "restart",
            ],
        );
    }

    fn start(&mut self, data: &Path) {
        let d = data.to_str().unwrap().to_string();
        let log = format!("{d}.log");
        if root() {
            self.run("touch", &[&log], false);
            self.run("chown", &["postgres:", &log], false);
        }
        self.started.push(data.to_path_buf());
        self.pg("pg_ctl", &["-D", &d, "-l", &log, "-w", "-t", "60", "start"]);
    }

    fn append(&self, file: &Path, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// Runs a PostgreSQL program (as postgres when root); panics with its
    /// output when it fails.
    fn pg(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut all = vec![path.to_str().unwrap()];
        all.extend_from_slice(args);
        if root() {
            let mut with = vec!["-u", "postgres", "--"];
            with.extend(all);
            self.run("runuser", &with, true);
        } else {
            self.run(all[0], &all[1..], true);
        }
    }

    fn run(&self, program: &str, args: &[&str], check: bool) {
        let out = Command::new(program)
            .args(args)
            .current_dir("/")
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        if check && !out.status.success() {
            panic!(
                "{program} {args:?}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Clusters {
    /// Stops the servers at once (standby first) and removes their data.
    fn drop(&mut self) {
        for data in self.started.clone().iter().rev() {
            let d = data.to_str().unwrap().to_string();
            let stop = [
                "-D",
                d.as_str(),
                "-m",
                "immediate",
                "-w",
                "-t",
                "20",
                "stop",
            ];
            let path = self.bin.join("pg_ctl");
            let mut all = vec![path.to_str().unwrap()];
            all.extend_from_slice(&stop);
            if root() {
                let mut with = vec!["-u", "postgres", "--"];
                with.extend(all);
                self.run("runuser", &with, false);
            } else {
                self.run(all[0], &all[1..], false);
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Waits (bounded) until the primary lists the standby as streaming.
pub async fn wait_streaming(primary: &sqlx::PgPool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND reply_time IS NOT NULL",
        )
        .fetch_one(primary)
        .await
        .unwrap();
        if n > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the standby never streamed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
