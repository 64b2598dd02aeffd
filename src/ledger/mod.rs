//! The ledger: `archive_jobs` (one row per kind per planner run) and
//! `archive_batches` (one row per batch). It is the authority on what a
//! message may do: a worker executes only what the planner recorded here.
//! Every SQL statement on those two tables is in this module:
//! - [`jobs`]: a job's life: created, planned, completed or failed, adopted;
//! - [`batches`]: recording batches, and executing one (lock, record each
//!   chunk and the last one's completion, fail);
//! - [`read`]: what operators and monitoring read.

mod batches;
mod jobs;
mod read;

pub use batches::*;
pub use jobs::*;
pub use read::*;

use crate::vocabulary::{BatchStatus, Kind};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A point in a kind's keyset order: (time, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// The time column (`received_at`, `created_at`, or a day).
    pub ts: DateTime<Utc>,
    /// The tie-breaker (`id`, or `scenario_id` for metrics).
    pub id: Uuid,
}

/// A batch as the planner cuts it, before it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBatch {
    /// Becomes `archive_batch_id` on every row the batch archives.
    pub id: Uuid,
    /// Exclusive lower bound.
    pub lo: Key,
    /// Inclusive upper bound.
    pub hi: Key,
    /// Rows in (lo, hi] when the planner counted them.
    pub planned_rows: i64,
}

/// A batch as a worker loads it, locked for the length of its transaction
/// (one chunk's).
#[derive(Debug, Clone)]
pub struct Batch {
    /// The batch id.
    pub id: Uuid,
    /// The job it belongs to.
    pub job_id: Uuid,
    /// What it archives.
    pub kind: Kind,
    /// Exclusive lower bound; `None`: from the start.
    pub lo: Option<Key>,
    /// Inclusive upper bound.
    pub hi: Key,
    /// Where the next chunk starts (exclusive): the key the last committed
    /// chunk ended at, or `lo` when no chunk has run.
    pub cursor: Option<Key>,
    /// Chunks committed so far.
    pub chunks: i32,
    /// Rows (metric samples) in the range when the planner counted them.
    pub planned_rows: i64,
    /// Rows (samples) the committed chunks deleted from the hot table.
    pub moved: i64,
    /// Whether it is still to run.
    pub status: BatchStatus,
    /// The job's policy cut-off: only rows older than it move.
    pub cutoff: DateTime<Utc>,
}

/// What executing a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows examined.
    pub processed: i64,
    /// Rows written to the archive.
    pub archived: i64,
    /// Rows deleted from the hot table.
    pub deleted: i64,
    /// Bytes archived (`size_bytes` for logs).
    pub bytes: i64,
    /// The exact sum of the 64-bit digests of the rows written to the
    /// archive (`schema::LOGS_ROW_DIGEST`, `schema::METRICS_AGG_DIGEST`):
    /// what `planner verify` recomputes. A sum of at most 2⁶³ per row cannot
    /// overflow an `i128` for 2⁶⁴ rows; it is carried as NUMERIC in SQL.
    pub digest: i128,
    /// Metrics: the sample count of the aggregates written (merged ones
    /// whole, with the samples they held before).
    pub samples: i64,
    /// Metrics: the value sum of those aggregates, in millionths (sample
    /// values are `DECIMAL(15,6)`, so their sums are whole millionths).
    pub value_sum_micros: i128,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, c: Counts) {
        self.processed += c.processed;
        self.archived += c.archived;
        self.deleted += c.deleted;
        self.bytes += c.bytes;
        self.digest += c.digest;
        self.samples += c.samples;
        self.value_sum_micros += c.value_sum_micros;
    }
}
