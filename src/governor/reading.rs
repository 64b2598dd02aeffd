//! One reading of the database for the governor's controls, taken in one
//! round trip (two with the probe, which times a statement of its own) and
//! shared by the process's concurrent batches for [`FRESH`].

use super::Governor;
use super::replica::{Lag, Primary};
use crate::error::Result;
use sqlx::{PgPool, Row};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a reading serves every batch of the process: chunks of
/// concurrent batches start within it on one reading, so the controls cost
/// the database a few statements a second, whatever the concurrency.
pub const FRESH: Duration = Duration::from_millis(250);

/// How many WAL positions are kept at most (a few minutes of readings).
const MAX_SAMPLES: usize = 4096;

/// How long a reading may wait for the primary before its session is given
/// up as lost (a partition): a reading is two small statements that take
/// milliseconds, so 30 s without an answer is not load but a cut link. The
/// chunk then waits for the database as when it is down.
const READING_DEADLINE: Duration = Duration::from_secs(30);

/// What the database said at one instant.
#[derive(Debug, Clone)]
pub struct Reading {
    /// When it was read (after the answer came).
    pub at: Instant,
    /// `pg_current_wal_lsn()`, in bytes.
    pub lsn: u64,
    /// Client sessions active now, other than the archiver's.
    pub active: i64,
    /// Each streaming replica the primary lists (`pg_stat_replication`).
    pub primary: Vec<Primary>,
    /// Each `--replica-url`'s lag, read on the replica.
    pub direct: Vec<Lag>,
    /// The round trip of `SELECT 1` (with `--probe-factor`).
    pub probe: Option<Duration>,
}

/// What the governor remembers between readings.
#[derive(Debug, Default)]
pub struct Memory {
    last: Option<Reading>,
    /// (instant, WAL position) of past readings, oldest first.
    pub samples: VecDeque<(Instant, u64)>,
}

/// The sessions the archiver opens are named `archiver-…`
/// (`archiver-worker`, `archiver-planner`, the governor's own): not the
/// application's load.
const STATEMENT: &str = "
SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8 AS lsn,
       (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND state = 'active'
           AND pid <> pg_backend_pid()
           AND application_name NOT LIKE 'archiver%') AS active,
       (SELECT COALESCE(json_agg(json_build_object(
            'name', COALESCE(NULLIF(application_name, ''), 'walreceiver')
                    || '@' || COALESCE(host(client_addr), 'local'),
            'sent', (sent_lsn - '0/0'::pg_lsn)::int8,
            'replay', (replay_lsn - '0/0'::pg_lsn)::int8,
            'replay_lag', EXTRACT(epoch FROM replay_lag)::float8,
            'reply_age', EXTRACT(epoch FROM clock_timestamp() - reply_time)::float8)
            ORDER BY pid), '[]'::json)
          FROM pg_stat_replication) AS replicas";

impl Governor {
    /// The latest reading, taken anew when older than [`FRESH`]; concurrent
    /// callers wait for one reading rather than each taking its own.
    pub async fn reading(&self, pool: &PgPool) -> Result<Reading> {
        let mut memory = self.memory.lock().await;
        if let Some(r) = &memory.last
            && r.at.elapsed() < FRESH
        {
            return Ok(r.clone());
        }
        let r = self.read(pool).await?;
        if let Some(rtt) = r.probe {
            self.observe_probe(rtt, r.at);
        }
        memory.samples.push_back((r.at, r.lsn));
        let keep = self.history();
        while memory.samples.len() > MAX_SAMPLES
            || memory
                .samples
                .front()
                .is_some_and(|(t, _)| t.elapsed() > keep)
        {
            memory.samples.pop_front();
        }
        memory.last = Some(r.clone());
        Ok(r)
    }

    /// The WAL positions read so far (oldest first).
    pub async fn samples(&self) -> Vec<(Instant, u64)> {
        self.memory.lock().await.samples.iter().copied().collect()
    }

    /// How far back WAL positions are kept: the rate's window, and twice
    /// the lag limit (to date a replica's unreplayed WAL).
    fn history(&self) -> Duration {
        let lag = self.opts.max_replica_lag.unwrap_or_default() * 2;
        lag.max(super::wal::WINDOW).min(Duration::from_secs(3600))
    }

    async fn read(&self, pool: &PgPool) -> Result<Reading> {
        crate::db::on_session(
            pool,
            Some(READING_DEADLINE),
            "a governor reading",
            async |conn| self.read_on(conn).await,
        )
        .await
    }

    async fn read_on(&self, conn: &mut sqlx::PgConnection) -> Result<Reading> {
        let probe = match self.opts.probe_factor {
            Some(_) => {
                let t = Instant::now();
                sqlx::query("SELECT 1").execute(&mut *conn).await?;
                Some(t.elapsed())
            }
            None => None,
        };
        let (row, direct) = tokio::join!(
            sqlx::query(STATEMENT).fetch_one(&mut *conn),
            self.direct.read(&self.opts)
        );
        let row = row?;
        let at = Instant::now();
        let replicas: serde_json::Value = row.try_get("replicas")?;
        Ok(Reading {
            at,
            lsn: row.try_get::<i64, _>("lsn")?.max(0) as u64,
            active: row.try_get("active")?,
            primary: Primary::from_json(&replicas),
            direct,
            probe,
        })
    }
}
