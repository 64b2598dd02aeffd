//! The library's error type. Its [`Class`] decides what happens to a batch:
//! retried in place, handed back to the queue, or dead-lettered.

use uuid::Uuid;

/// What a failure means for the batch that hit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A server we depend on is unreachable: wait for it, however long,
    /// without charging the batch an attempt.
    Unavailable,
    /// Worth another try soon (serialization failure, lock timeout, broker
    /// hiccup). Retried a few times in place, then handed back.
    Transient,
    /// Will fail the same way every time (bad message, unknown batch,
    /// constraint violation): dead-letter at once.
    Permanent,
}

/// Everything the archiver can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or environment variable is missing or malformed.
    #[error("{name}: {reason}")]
    Config {
        /// The flag or variable, as the operator spells it.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// PostgreSQL said no, or could not be reached.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Applying the schema failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The message broker failed or refused a request.
    #[error("broker: {0}")]
    Broker(String),
    /// A message that cannot be decoded.
    #[error("malformed message: {0}")]
    BadMessage(String),
    /// A message naming a batch the ledger does not have.
    #[error("unknown batch {0}: not in the ledger")]
    UnknownBatch(Uuid),
    /// A message whose kind is not its batch's kind (stale or forged).
    #[error("message says batch {id} is {message}, the ledger says {ledger}")]
    WrongKind {
        /// The batch.
        id: Uuid,
        /// Kind named by the message.
        message: String,
        /// Kind recorded in the ledger.
        ledger: String,
    },
    /// This process cannot execute batches of this kind (not among its
    /// `--kinds`, or missing what the kind needs): the batch is someone
    /// else's to run, so its message is handed back, never failed.
    #[error("declined {kind} batch: {why}")]
    Declined {
        /// The batch's kind.
        kind: crate::vocabulary::Kind,
        /// What this process lacks.
        why: String,
    },
    /// Executing the batch panicked (a bug, or data we cannot decode): it
    /// would panic again, so the batch fails for good.
    #[error("panicked while executing: {0}")]
    Panicked(String),
    /// A batch whose ledger row contradicts itself.
    #[error("batch {id}: {reason}")]
    BadBatch {
        /// The batch.
        id: Uuid,
        /// What is inconsistent.
        reason: String,
    },
    /// The database's schema is not what the archiver needs.
    #[error("schema: {0}")]
    Schema(String),
    /// Another planner holds the advisory lock.
    #[error("another planner is running (advisory lock {0} is held); try again when it ends")]
    Locked(i64),
    /// The session holding the planner's advisory lock was lost: the run
    /// stopped, since another planner may hold the lock by now.
    #[error(
        "lost the session holding the planner lock ({0}): stopped so that two planners never run at once; the next run carries on from the ledger"
    )]
    LockLost(String),
    /// A job ended with failed batches.
    #[error("{0}")]
    JobFailed(String),
    /// A remote call took longer than we allow.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// Work stopped because the process is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// The governor stopped a batch between chunks (outside the window,
    /// past the deadline, replicas lagging too long): its message goes back
    /// with no attempt spent, and its cursor keeps what was done.
    #[error("handed back: {0}")]
    HandBack(String),
    /// The object store failed in a way worth retrying (5xx, throttling,
    /// connection or I/O trouble, a file that changed while it was read).
    #[error("object store: {0}")]
    Storage(String),
    /// The object store or its input said no for good: checksum mismatch,
    /// corrupt object, missing or unreadable file, invalid key or request.
    #[error("refused: {0}")]
    Refused(String),
    /// An object sits in an archive storage class (Glacier, Deep Archive)
    /// and cannot be read until it is restored from it: refused, as
    /// [`Error::Refused`], but nothing is wrong with it.
    #[error("refused: {0}")]
    InArchiveTier(String),
    /// A run archived what it should, but left archived reports' local files
    /// in place (each with its reason in `reports_archive`): the planner's
    /// exit status 4.
    #[error("{0}")]
    LeftInPlace(String),
}

/// Shorthand for the library's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// How a batch that hit this error should be treated.
    pub fn class(&self) -> Class {
        match self {
            Error::Db(e) => db_class(e),
            Error::Broker(_)
            | Error::Timeout(_)
            | Error::ShuttingDown
            | Error::HandBack(_)
            | Error::Storage(_) => Class::Transient,
            Error::Migrate(_)
            | Error::Config { .. }
            | Error::BadMessage(_)
            | Error::UnknownBatch(_)
            | Error::WrongKind { .. }
            | Error::BadBatch { .. }
            | Error::Panicked(_)
            // Never retried in place; `worker::process` hands the message
            // back before the class could park it.
            | Error::Declined { .. }
            | Error::Schema(_)
            | Error::Locked(_)
            | Error::LockLost(_)
            | Error::JobFailed(_)
            | Error::LeftInPlace(_)
            | Error::Refused(_)
            | Error::InArchiveTier(_) => Class::Permanent,
        }
    }

    /// The message itself is at fault (not the batch it names): park the
    /// message, and leave the ledger alone, so that a forged or stale
    /// message cannot mark a real batch dead.
    pub fn blames_message(&self) -> bool {
        matches!(
            self,
            Error::BadMessage(_) | Error::UnknownBatch(_) | Error::WrongKind { .. }
        )
    }

    /// Convenience for building a configuration error.
    pub fn config(name: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            name,
            reason: reason.into(),
        }
    }
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Broker(e.to_string())
    }
}

fn db_class(e: &sqlx::Error) -> Class {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Class::Unavailable,
        sqlx::Error::Protocol(_) => Class::Transient,
        sqlx::Error::Database(db) => sqlstate_class(db.code().as_deref().unwrap_or("")),
        _ => Class::Permanent,
    }
}

/// SQLSTATE codes: <https://www.postgresql.org/docs/current/errcodes-appendix.html>.
///
/// A batch is idempotent and the ledger makes a second run a no-op, so
/// trying again is always safe; the question is only whether it can help,
/// and whether trying should cost the batch an attempt:
///
/// - **Unavailable** (wait, however long, never charged): the server cannot
///   serve us right now but will: `08` connection exceptions (but `08P01`),
///   `57P01` admin shutdown, `57P02` crash shutdown, `57P03` cannot connect
///   now (starting up, recovering), `57P04` database dropped, `57P05` idle
///   session timeout; `25006` read-only transaction (a standby, or a demoted
///   primary right after a failover: the connection is reopened, see
///   [`crate::db::discard_stale`]); `53000`/`53100`/`53300` insufficient
///   resources, disk full, too many connections.
/// - **Transient** (retried, each delivery charged, parked after the
///   delivery limit): every `40` transaction rollback (serialization
///   failure, deadlock, statement completion unknown); `55P03` lock not
///   available and `57014` query canceled (lock or statement timeout, a DBA's
///   `pg_cancel_backend`): usually load that passes, and a batch that times
///   out every time ends parked with the reason rather than looping; `57000`
///   operator intervention; `25P03` idle-in-transaction timeout and `25P04`
///   transaction timeout; `53200` out of memory and `53400` configuration
///   limit exceeded (may be this batch's size); `58` system errors (I/O);
///   `72000` snapshot too old; `08P01` protocol violation; `XX000` internal
///   error (e.g. "cache lookup failed" racing concurrent DDL).
/// - **Permanent** (parked at once, with the reason): what the same batch
///   meets again every time until someone changes something: `22` data
///   exceptions and `23` integrity violations (the rows themselves), `42`
///   syntax, undefined object or insufficient privilege (schema or grants),
///   `0A` feature not supported, `21`, `24`, `25` (but those above), `26`,
///   `2B`, `2D`, `2F`, `34`, `38`, `39`, `3B`, `3D`, `3F` (program or
///   server-side function errors), `44` check option, `55` object not in
///   prerequisite state (but `55P03`), `P0` PL/pgSQL `RAISE` (an
///   application trigger refusing the delete), `F0` configuration file,
///   `HV` foreign data wrapper, `XX001`/`XX002` data or index corrupted (an
///   operator must repair first), and any code not listed.
fn sqlstate_class(code: &str) -> Class {
    match code {
        "08P01" => Class::Transient,
        c if c.starts_with("08") || c.starts_with("57P") => Class::Unavailable,
        "25006" | "53000" | "53100" | "53300" => Class::Unavailable,
        c if c.starts_with("40") || c.starts_with("58") => Class::Transient,
        "55P03" | "57014" | "57000" | "25P03" | "25P04" | "53200" | "53400" | "72000" | "XX000" => {
            Class::Transient
        }
        _ => Class::Permanent,
    }
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(e: &Error) -> Option<String> {
    match e {
        Error::Db(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        assert_eq!(sqlstate_class("08006"), Class::Unavailable);
        assert_eq!(sqlstate_class("57P01"), Class::Unavailable);
        assert_eq!(sqlstate_class("40001"), Class::Transient);
        assert_eq!(sqlstate_class("55P03"), Class::Transient);
        assert_eq!(sqlstate_class("53300"), Class::Unavailable);
        assert_eq!(sqlstate_class("23505"), Class::Permanent);
        assert_eq!(sqlstate_class("42P01"), Class::Permanent);
    }

    #[test]
    fn failover_is_never_permanent() {
        // A demoted primary, shutdowns, crash recovery, lost connections.
        for c in [
            "25006", "57P01", "57P02", "57P03", "57P04", "08000", "08003", "08006",
        ] {
            assert_eq!(sqlstate_class(c), Class::Unavailable, "{c}");
        }
        for c in [
            "40000", "40001", "40002", "40003", "40P01", "08P01", "57014", "XX000",
        ] {
            assert_eq!(sqlstate_class(c), Class::Transient, "{c}");
        }
        for c in [
            "22007", "23514", "42501", "0A000", "P0001", "XX001", "25P02",
        ] {
            assert_eq!(sqlstate_class(c), Class::Permanent, "{c}");
        }
    }

    #[test]
    fn message_errors_are_permanent() {
        assert_eq!(Error::BadMessage("x".into()).class(), Class::Permanent);
        assert_eq!(Error::UnknownBatch(Uuid::nil()).class(), Class::Permanent);
        assert_eq!(Error::Broker("x".into()).class(), Class::Transient);
    }
}
