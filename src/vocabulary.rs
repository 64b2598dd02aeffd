//! The archiver's vocabulary, on the ground floor where every module can
//! use it: the kinds of data, the job types of `archive_jobs.job_type`, and
//! the statuses of jobs and batches. Each is an enum with the one spelling
//! the ledger, the messages and the metrics use, stored as text.

use std::fmt;
use std::str::FromStr;

/// Implements `as_str`, `Display`, `FromStr` (naming what it was given),
/// and reading and writing as PostgreSQL text, from one table of names.
macro_rules! named {
    ($t:ident, $what:literal, { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            /// The name stored in the ledger.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $s,)+
                }
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad`, not `write_str`: `{:<9}` in a table must align.
                f.pad(self.as_str())
            }
        }

        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($s => Ok($t::$v),)+
                    other => Err(format!(concat!("unknown ", $what, " {:?}"), other)),
                }
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $t {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <String as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $t {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
                let s = <&str as sqlx::Decode<'r, sqlx::Postgres>>::decode(value)?;
                Ok(s.parse::<$t>()?)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $t {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'_, sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }
    };
}

/// A kind of data the archiver handles.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `scenario_logs` → `scenario_logs_archive` (R1).
    Logs,
    /// `scenario_metrics` → daily aggregates (R2).
    Metrics,
    /// `reports` → object store + `reports_archive` (R3).
    Reports,
    /// `scenario_logs_archive` → back into `scenario_logs`: a batch of
    /// `planner restore` (R16). Not in [`Kind::ALL`]: nothing archives it.
    Restore,
}

impl Kind {
    /// Every kind the planner archives, in the order it runs them (not
    /// [`Kind::Restore`], which only `planner restore` plans).
    pub const ALL: [Kind; 3] = [Kind::Logs, Kind::Metrics, Kind::Reports];
}

named!(Kind, "kind", {
    Logs => "logs", Metrics => "metrics", Reports => "reports", Restore => "restore",
});

/// What a job in `archive_jobs` does: archive a kind, or drop what is past
/// retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// Archiving logs.
    Logs,
    /// Aggregating metric samples.
    Metrics,
    /// Moving report files to the object store.
    Reports,
    /// `planner retention`.
    Retention,
    /// `planner restore`: archived logs brought back.
    Restore,
}

impl JobType {
    /// Every job type, for metrics present from the start.
    pub const ALL: [JobType; 4] = [
        JobType::Logs,
        JobType::Metrics,
        JobType::Reports,
        JobType::Retention,
    ];
}

named!(JobType, "job type", {
    Logs => "logs", Metrics => "metrics", Reports => "reports", Retention => "retention",
    Restore => "restore",
});

impl From<Kind> for JobType {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Logs => JobType::Logs,
            Kind::Metrics => JobType::Metrics,
            Kind::Reports => JobType::Reports,
            Kind::Restore => JobType::Restore,
        }
    }
}

/// A job's status (`archive_jobs.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Being planned.
    Pending,
    /// Planned; its batches are being executed.
    Running,
    /// Every batch done.
    Completed,
    /// A batch is dead (or the run stopped); `planner redrive` revives it.
    Failed,
}

named!(JobStatus, "job status", {
    Pending => "pending", Running => "running", Completed => "completed", Failed => "failed",
});

/// A batch's status (`archive_batches.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchStatus {
    /// Recorded, not executed yet.
    Pending,
    /// Executed: its rows are archived.
    Done,
    /// Parked in the dead-letter queue, awaiting `planner redrive`.
    Dead,
}

named!(BatchStatus, "batch status", { Pending => "pending", Done => "done", Dead => "dead" });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_named() {
        for k in Kind::ALL {
            assert_eq!(k.as_str().parse::<Kind>(), Ok(k));
            assert_eq!(JobType::from(k).as_str(), k.as_str());
        }
        for t in JobType::ALL {
            assert_eq!(t.to_string().parse::<JobType>(), Ok(t));
        }
        assert_eq!("restore".parse::<Kind>(), Ok(Kind::Restore));
        assert!(
            !Kind::ALL.contains(&Kind::Restore),
            "nothing archives restores"
        );
        assert_eq!(JobType::from(Kind::Restore).as_str(), "restore");
        for s in [
            JobStatus::Pending,
            JobStatus::Running,
            JobStatus::Completed,
            JobStatus::Failed,
        ] {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(s));
        }
        for s in [BatchStatus::Pending, BatchStatus::Done, BatchStatus::Dead] {
            assert_eq!(s.as_str().parse::<BatchStatus>(), Ok(s));
        }
        assert_eq!(
            "Logs".parse::<Kind>(),
            Err("unknown kind \"Logs\"".to_string())
        );
        assert_eq!(
            "archived".parse::<BatchStatus>(),
            Err("unknown batch status \"archived\"".to_string())
        );
        assert_eq!(
            serde_json::to_string(&JobStatus::Completed).unwrap(),
            "\"completed\""
        );
    }
}
