//! Database load: other sessions active (`--max-active-sessions`, the
//! PostgreSQL counterpart of pt-online-schema-change's `--max-load
//! Threads_running`), and the round trip of `SELECT 1` against its idle
//! baseline (`--probe-factor`).

use super::{Governor, Reason, Wait};
use crate::error::Result;
use sqlx::PgPool;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the sessions are counted again while waiting.
pub const POLL: Duration = Duration::from_millis(500);

/// Round trips the probe's median is taken over.
const RECENT: usize = 5;

/// The baseline rises this much a second while no round trip is below it,
/// so that a network that became slower for good stops slowing the fleet
/// (a 3× change is taken for the new normal within about two minutes).
const DRIFT: f64 = 0.01;

/// Round trips under this are all alike (loopback jitter is not load).
const MIN_BASELINE: f64 = 0.0005;

/// The probe's memory: the baseline (the fastest round trip seen, rising
/// slowly since) and the latest round trips.
#[derive(Debug, Default, Clone)]
pub struct Probe {
    baseline: Option<(f64, Instant)>,
    recent: VecDeque<f64>,
}

impl Probe {
    /// Records a round trip taken at `now`.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let s = rtt.as_secs_f64();
        if self.baseline(now).is_none_or(|b| s < b) {
            self.baseline = Some((s, now));
        }
        self.recent.push_back(s);
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    /// The idle baseline at `now` (seconds), risen by [`DRIFT`] since set.
    pub fn baseline(&self, now: Instant) -> Option<f64> {
        self.baseline.map(|(b, at)| {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            b * (1.0 + DRIFT).powf(secs.min(3600.0))
        })
    }

    /// The median of the recent round trips (seconds).
    pub fn median(&self) -> Option<f64> {
        if self.recent.len() < RECENT.div_ceil(2) {
            return None;
        }
        let mut v: Vec<f64> = self.recent.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }

    /// How many times over `factor` × baseline the recent median is, when
    /// it is over (`None`: go on).
    pub fn over(&self, factor: f64, now: Instant) -> Option<f64> {
        let base = self.baseline(now)?.max(MIN_BASELINE);
        let ratio = self.median()? / (factor * base);
        (ratio > 1.0).then_some(ratio)
    }
}

/// How long to slow down for a probe `ratio` times over its limit: in
/// proportion to the chunk time, between 50 ms and a second.
pub fn slowdown(ratio: f64, chunk_time: Duration) -> Duration {
    let unit = if chunk_time.is_zero() {
        Duration::from_millis(100)
    } else {
        chunk_time
    };
    unit.mul_f64(ratio.min(100.0))
        .clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Waits while the database is busier than the settings allow.
pub async fn wait(g: &Governor, pool: &PgPool, stop: &CancellationToken) -> Result<()> {
    if let Some(max) = g.opts.max_active_sessions {
        let mut wait = Wait::new(g, Reason::ActiveSessions);
        loop {
            let active = g.reading(pool).await?.active;
            if active <= i64::from(max) {
                wait.done("other sessions quietened");
                break;
            }
            if wait.started() {
                tracing::warn!(
                    "{active} other sessions active, over --max-active-sessions {max}; waiting before the next chunk"
                );
            }
            super::give_up_after(&wait, g, || {
                format!("{active} other sessions active (over --max-active-sessions {max})")
            })?;
            wait.pause(POLL, stop).await?;
        }
    }
    if let Some(factor) = g.opts.probe_factor {
        let mut wait = Wait::new(g, Reason::Probe);
        loop {
            g.reading(pool).await?;
            let over = g.probe_over(factor);
            let Some(ratio) = over else {
                wait.done("round trips back near their baseline");
                break;
            };
            if wait.started() {
                tracing::warn!(
                    "round trip of SELECT 1 is {:.1}× --probe-factor {factor} × its baseline; slowing down",
                    ratio
                );
            }
            super::give_up_after(&wait, g, || {
                format!(
                    "round trips of SELECT 1 at {ratio:.1}× --probe-factor {factor} × their baseline"
                )
            })?;
            let d = slowdown(ratio, g.opts.chunk_time).max(super::reading::FRESH);
            wait.pause(d, stop).await?;
        }
    }
    Ok(())
}

impl Governor {
    /// Records a probe round trip.
    pub(super) fn observe_probe(&self, rtt: Duration, at: Instant) {
        if let Ok(mut p) = self.probe.lock() {
            p.observe(rtt, at);
        }
    }

    fn probe_over(&self, factor: f64) -> Option<f64> {
        self.probe.lock().ok()?.over(factor, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_probe_slows_down_only_when_the_median_rises() {
        let t = Instant::now();
        let mut p = Probe::default();
        for _ in 0..5 {
            p.observe(MS, t);
        }
        assert_eq!(p.over(3.0, t), None);
        // One slow round trip is not load: the median holds.
        p.observe(MS * 50, t);
        assert_eq!(p.over(3.0, t), None);
        // Three of five are: over.
        p.observe(MS * 5, t);
        p.observe(MS * 5, t);
        let r = p.over(3.0, t).expect("over");
        assert!((r - 5.0 / 3.0).abs() < 1e-9, "{r}");
        assert_eq!(p.baseline(t), Some(0.001));
    }

    #[test]
    fn the_baseline_rises_so_a_slower_network_is_taken_for_normal() {
        let t = Instant::now();
        let mut p = Probe::default();
        p.observe(MS, t);
        for _ in 0..5 {
            p.observe(MS * 4, t);
        }
        assert!(p.over(3.0, t).is_some());
        // Minutes later, with every round trip still 4 ms: not over any more.
        let later = t + Duration::from_secs(150);
        assert!(p.baseline(later).unwrap() > 0.004 / 3.0);
        assert_eq!(p.over(3.0, later), None);
        // And a faster round trip lowers it again at once.
        p.observe(MS, later);
        assert_eq!(p.baseline(later), Some(0.001));
    }

    #[test]
    fn loopback_jitter_is_not_load_and_few_samples_decide_nothing() {
        let t = Instant::now();
        let mut p = Probe::default();
        p.observe(Duration::from_micros(40), t);
        p.observe(Duration::from_micros(300), t);
        assert_eq!(p.over(2.0, t), None, "two samples");
        p.observe(Duration::from_micros(300), t);
        // 300 µs is 7.5× a 40 µs baseline, but under 2 × the 0.5 ms floor.
        assert_eq!(p.over(2.0, t), None);
    }

    #[test]
    fn slowdowns_are_bounded() {
        assert_eq!(slowdown(2.0, MS * 100), MS * 200);
        assert_eq!(slowdown(1000.0, MS * 100), Duration::from_secs(1));
        assert_eq!(slowdown(1.01, Duration::ZERO), MS * 101);
        assert_eq!(slowdown(1.0, MS), MS * 50);
    }
}
