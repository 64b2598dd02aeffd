//! The server's WAL rate, read from `pg_current_wal_lsn()` between chunks.
//!
//! The position is the server's, so the rate is everything the server
//! writes: the application's WAL as well as the archiver's. Every worker
//! reads the same server and paces itself to it, so the limit holds for
//! the fleet without the workers agreeing on anything: when the server is
//! over the limit, every worker waits.

use super::{Governor, Reason, Wait};
use crate::error::Result;
use sqlx::PgPool;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The rate is the average over (at most) this much recent time.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Longest single sleep before the rate is read again.
const STEP: Duration = Duration::from_secs(1);

/// How long to wait until the WAL written since the oldest position in the
/// window, averaged from then, is down to `rate` bytes a second (`None`: it
/// is). `samples` are (instant, position), oldest first.
pub fn pause_for(samples: &[(Instant, u64)], now: Instant, rate: f64) -> Option<Duration> {
    let (t1, l1) = *samples.last()?;
    let (t0, l0) = *samples
        .iter()
        .find(|(t, _)| now.saturating_duration_since(*t) <= WINDOW)?;
    if t0 >= t1 || l1 <= l0 {
        return None;
    }
    let due = t0 + Duration::try_from_secs_f64((l1 - l0) as f64 / rate).unwrap_or(WINDOW);
    (due > now).then(|| due - now)
}

/// Waits while the server writes WAL faster than `--max-wal-rate`.
pub async fn wait(g: &Governor, pool: &PgPool, stop: &CancellationToken) -> Result<()> {
    let Some(rate) = g.opts.max_wal_rate else {
        return Ok(());
    };
    let mut wait = Wait::new(g, Reason::WalRate);
    loop {
        g.reading(pool).await?;
        let samples = g.samples().await;
        let Some(d) = pause_for(&samples, Instant::now(), rate) else {
            wait.done("WAL rate back under --max-wal-rate");
            return Ok(());
        };
        if wait.started() {
            tracing::info!(
                "server WAL rate over --max-wal-rate {:.2} MB/s; waiting {:.1}s before the next chunk",
                rate / 1e6,
                d.as_secs_f64()
            );
        }
        super::give_up_after(&wait, g, || {
            format!("server WAL rate over --max-wal-rate {:.2} MB/s", rate / 1e6)
        })?;
        wait.pause(d.clamp(super::reading::FRESH, STEP), stop)
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_windows_average_is_down_to_the_rate() {
        let now = Instant::now();
        let ago = |ms: u64| now - Duration::from_millis(ms);
        // 3 MB in the last 2 s at a 1 MB/s limit: due 3 s after the oldest
        // sample, so 1 s from now.
        let s = [(ago(2000), 0), (ago(1000), 1_000_000), (now, 3_000_000)];
        let d = pause_for(&s, now, 1e6).unwrap();
        assert_eq!(d.as_millis(), 1000);
        // Under the limit: go.
        assert_eq!(pause_for(&s, now, 2e6), None);
        // Samples older than the window do not count.
        let s = [(ago(60_000), 0), (ago(1000), 50_000_000), (now, 50_000_100)];
        assert_eq!(pause_for(&s, now, 1e6), None);
        // One sample, or none: nothing to go on.
        assert_eq!(pause_for(&[(now, 5)], now, 1.0), None);
        assert_eq!(pause_for(&[], now, 1.0), None);
    }
}
