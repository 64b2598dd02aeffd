//! The planner lock: one PostgreSQL advisory lock, so that two planners
//! (or a planner and a redrive or retention run) never work at once. It is
//! held on a connection of its own for the whole run, released by the
//! server if the process dies, and watched: a run whose lock session is
//! lost stops wherever it is, since another planner may hold it by then.

use crate::error::{Error, Result};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::time::Duration;

/// The planner's advisory-lock key: "archiver" in ASCII.
pub const PLANNER_LOCK: i64 = 0x6172_6368_6976_6572;

/// Holds the planner lock on a connection of its own for the whole run;
/// the server releases it if the planner dies.
pub async fn take(opts: &PgConnectOptions) -> Result<PgConnection> {
    let mut conn = PgConnection::connect_with(opts).await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(PLANNER_LOCK)
        .fetch_one(&mut conn)
        .await?;
    if got {
        Ok(conn)
    } else {
        Err(Error::Locked(PLANNER_LOCK))
    }
}

/// How often the planner checks the session holding its advisory lock, and
/// how long it waits for an answer. Their sum (12 s) is well under the time
/// the server takes to notice a vanished client and release the lock (TCP
/// keepalives: 30 s idle at least, see `config::database_options`), so a
/// planner cut off from the database stops before another can start.
const LOCK_HEARTBEAT: Duration = Duration::from_secs(2);
const LOCK_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// The planner lock's session, checked every [`LOCK_HEARTBEAT`] by a task
/// of its own.
#[derive(Debug)]
pub struct LockWatch {
    lost: tokio::sync::watch::Receiver<Option<String>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl LockWatch {
    /// Watches the lock held on `conn` (from [`take`]).
    pub fn start(mut conn: PgConnection) -> Self {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_HEARTBEAT).await;
                let check = sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                       AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = $1)",
                )
                .bind(PLANNER_LOCK)
                .fetch_one(&mut conn);
                let why = match tokio::time::timeout(LOCK_HEARTBEAT_TIMEOUT, check).await {
                    Ok(Ok(true)) => continue,
                    Ok(Ok(false)) => "the session no longer holds it".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {LOCK_HEARTBEAT_TIMEOUT:?}"),
                };
                let _ = tx.send(Some(why));
                return;
            }
        });
        LockWatch {
            lost: rx,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// Resolves once the lock's session is lost, with the error to exit on.
    pub async fn lost(&self) -> Error {
        let mut rx = self.lost.clone();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "the lock watcher stopped".to_string(),
        };
        Error::LockLost(why)
    }

    /// Fails if the lock's session was lost at any point of the run.
    pub async fn still_held(&self) -> Result<()> {
        match self.lost.borrow().clone() {
            Some(why) => Err(Error::LockLost(why)),
            None => Ok(()),
        }
    }
}
