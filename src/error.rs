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
        kind: crate::ledger::Kind,
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
    /// A job ended with failed batches.
    #[error("{0}")]
    JobFailed(String),
    /// A remote call took longer than we allow.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// Work stopped because the process is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// The object store failed in a way worth retrying (5xx, throttling,
    /// connection or I/O trouble, a file that changed while it was read).
    #[error("object store: {0}")]
    Storage(String),
    /// The object store or its input said no for good: checksum mismatch,
    /// corrupt object, missing or unreadable file, invalid key or request.
    #[error("refused: {0}")]
    Refused(String),
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
            | Error::Storage(_)
            | Error::Declined { .. } => Class::Transient,
            Error::Migrate(_)
            | Error::Config { .. }
            | Error::BadMessage(_)
            | Error::UnknownBatch(_)
            | Error::WrongKind { .. }
            | Error::BadBatch { .. }
            | Error::Panicked(_)
            | Error::Schema(_)
            | Error::Locked(_)
            | Error::JobFailed(_)
            | Error::LeftInPlace(_)
            | Error::Refused(_) => Class::Permanent,
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
fn sqlstate_class(code: &str) -> Class {
    match code {
        // connection exception; operator intervention (shutdown, cannot connect now)
        c if c.starts_with("08") || c.starts_with("57P") => Class::Unavailable,
        // serialization failure, deadlock, lock not available, query canceled
        // (statement/lock timeout), insufficient resources, system error
        "40001" | "40P01" | "55P03" | "57014" => Class::Transient,
        c if c.starts_with("53") || c.starts_with("58") => Class::Transient,
        _ => Class::Permanent,
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
        assert_eq!(sqlstate_class("53300"), Class::Transient);
        assert_eq!(sqlstate_class("23505"), Class::Permanent);
        assert_eq!(sqlstate_class("42P01"), Class::Permanent);
    }

    #[test]
    fn message_errors_are_permanent() {
        assert_eq!(Error::BadMessage("x".into()).class(), Class::Permanent);
        assert_eq!(Error::UnknownBatch(Uuid::nil()).class(), Class::Permanent);
        assert_eq!(Error::Broker("x".into()).class(), Class::Transient);
    }
}
