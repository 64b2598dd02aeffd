//! Chunk sizing: how many rows (metric samples) the next chunk of a batch
//! takes so that its transaction lasts about `--chunk-time`.
//!
//! As pt-online-schema-change does: the rate (rows a second) is a weighted
//! average over the chunks so far, kept per kind for the whole process (every
//! batch, every slot), and the next chunk is that rate times the chunk time.
//! A process starts at [`FIRST_CHUNK`] rows; from one chunk to the next the
//! size moves by at most [`MAX_STEP`]× either way, so one slow chunk (a
//! checkpoint, a lock wait) does not swing it; and it stays within
//! [`MIN_CHUNK`] … [`MAX_CHUNK`], so a tiny chunk time never makes chunks of
//! a row or two (whose fixed cost, a lock and two ledger updates and a
//! commit, would dwarf their work).

use crate::vocabulary::Kind;
use std::sync::Mutex;
use std::time::Duration;

/// A process's first chunk of a kind (pt-online-schema-change's starting
/// `--chunk-size`).
pub const FIRST_CHUNK: i64 = 1_000;
/// The smallest chunk, whatever the chunk time.
pub const MIN_CHUNK: i64 = 100;
/// The largest chunk, whatever the rate (a batch is at most 1,000,000 rows).
pub const MAX_CHUNK: i64 = 1_000_000;
/// How much the size may grow, or shrink, from one chunk to the next.
pub const MAX_STEP: f64 = 2.0;
/// How much of the average the chunks before the last keep (pt-osc's 0.75):
/// the rate is Σ rows·wᵏ / Σ seconds·wᵏ, so a chunk weighs by its size and
/// recent chunks weigh more.
const WEIGHT: f64 = 0.75;

/// The chunk size of one kind: a weighted rate and the size it gives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    rows: f64,
    secs: f64,
    size: i64,
}

impl Default for Rate {
    fn default() -> Self {
        Rate {
            rows: 0.0,
            secs: 0.0,
            size: FIRST_CHUNK,
        }
    }
}

impl Rate {
    /// Rows the next chunk takes; `None` for a zero chunk time (a batch is
    /// one transaction).
    pub fn size(&self, chunk_time: Duration) -> Option<i64> {
        (!chunk_time.is_zero()).then_some(self.size)
    }

    /// The rows a second measured so far; `None` before any chunk.
    pub fn rows_per_sec(&self) -> Option<f64> {
        (self.secs > 0.0).then(|| self.rows / self.secs)
    }

    /// Feeds a committed chunk: `rows` moved in `took` (its transaction's
    /// work and commit). A chunk that moved nothing says nothing of the rate.
    pub fn record(&mut self, rows: i64, took: Duration, chunk_time: Duration) {
        if rows <= 0 || took.is_zero() {
            return;
        }
        self.rows = self.rows * WEIGHT + rows as f64;
        self.secs = self.secs * WEIGHT + took.as_secs_f64();
        let Some(rate) = self.rows_per_sec() else {
            return;
        };
        let want = rate * chunk_time.as_secs_f64();
        let cur = self.size as f64;
        let next = want.clamp(cur / MAX_STEP, cur * MAX_STEP);
        self.size = (next.round() as i64).clamp(MIN_CHUNK, MAX_CHUNK);
    }
}

/// The chunk sizes of a process, per kind (logs and metrics; a reports
/// batch is not cut into chunks), shared by every batch it executes.
#[derive(Debug, Default)]
pub struct ChunkSizer {
    logs: Mutex<Rate>,
    metrics: Mutex<Rate>,
}

impl ChunkSizer {
    fn of(&self, kind: Kind) -> &Mutex<Rate> {
        match kind {
            Kind::Metrics => &self.metrics,
            _ => &self.logs,
        }
    }

    /// Rows the next chunk of `kind` takes (see [`Rate::size`]).
    pub fn size(&self, kind: Kind, chunk_time: Duration) -> Option<i64> {
        self.rate(kind).size(chunk_time)
    }

    /// Feeds a committed chunk of `kind` (see [`Rate::record`]).
    pub fn record(&self, kind: Kind, rows: i64, took: Duration, chunk_time: Duration) {
        let mut r = self.of(kind).lock().unwrap_or_else(|e| e.into_inner());
        r.record(rows, took, chunk_time);
    }

    /// The current state of `kind`'s sizing.
    pub fn rate(&self, kind: Kind) -> Rate {
        *self.of(kind).lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_process_starts_at_the_first_chunk_and_a_zero_chunk_time_means_whole_batches() {
        let r = Rate::default();
        assert_eq!(r.size(100 * MS), Some(FIRST_CHUNK));
        assert_eq!(r.size(Duration::ZERO), None);
        assert_eq!(r.rows_per_sec(), None);
    }

    #[test]
    fn a_steady_rate_converges_on_rate_times_chunk_time() {
        // 50,000 rows a second, 100 ms chunks: 5,000 rows.
        let mut r = Rate::default();
        let mut sizes = Vec::new();
        for _ in 0..10 {
            let n = r.size(100 * MS).unwrap();
            r.record(n, Duration::from_secs_f64(n as f64 / 50_000.0), 100 * MS);
            sizes.push(r.size(100 * MS).unwrap());
        }
        assert_eq!(&sizes[..3], &[2_000, 4_000, 5_000], "{sizes:?}");
        assert!(sizes[3..].iter().all(|&n| n == 5_000), "{sizes:?}");
    }

    #[test]
    fn one_slow_chunk_at_most_halves_the_size() {
        let mut r = Rate::default();
        for _ in 0..20 {
            r.record(5_000, 100 * MS, 100 * MS);
        }
        assert_eq!(r.size(100 * MS), Some(5_000));
        // A checkpoint: one chunk takes 100 times as long.
        r.record(5_000, 10_000 * MS, 100 * MS);
        assert_eq!(r.size(100 * MS), Some(2_500), "never below half");
        // Back to normal: the size grows back, at most doubling per chunk.
        let mut last = 2_500;
        for _ in 0..30 {
            r.record(
                last,
                Duration::from_secs_f64(last as f64 / 50_000.0),
                100 * MS,
            );
            let n = r.size(100 * MS).unwrap();
            assert!(n <= last * 2, "{last} -> {n}");
            last = n;
        }
        assert!(last > 4_000, "recovers: {last}");
    }

    #[test]
    fn a_tiny_chunk_time_gives_the_minimum_never_a_row_or_two() {
        let mut r = Rate::default();
        for _ in 0..20 {
            let n = r.size(MS).unwrap();
            // A fixed cost of 3 ms per chunk dominates small chunks.
            r.record(n, 3 * MS + Duration::from_micros(n as u64), MS);
        }
        assert_eq!(r.size(MS), Some(MIN_CHUNK));
    }

    #[test]
    fn a_huge_rate_stops_at_the_maximum() {
        let mut r = Rate::default();
        for _ in 0..40 {
            r.record(
                r.size(Duration::from_secs(60)).unwrap(),
                MS,
                Duration::from_secs(60),
            );
        }
        assert_eq!(r.size(Duration::from_secs(60)), Some(MAX_CHUNK));
    }

    #[test]
    fn an_empty_or_instant_chunk_changes_nothing() {
        let mut r = Rate::default();
        r.record(0, 50 * MS, 100 * MS);
        r.record(-3, 50 * MS, 100 * MS);
        r.record(500, Duration::ZERO, 100 * MS);
        assert_eq!(r, Rate::default());
    }

    #[test]
    fn kinds_are_sized_apart() {
        let s = ChunkSizer::default();
        s.record(Kind::Metrics, 1_000, 1_000 * MS, 100 * MS);
        assert_eq!(s.size(Kind::Metrics, 100 * MS), Some(500));
        assert_eq!(s.size(Kind::Logs, 100 * MS), Some(FIRST_CHUNK));
    }
}
