//! Streaming replicas' lag: read from `pg_stat_replication` on the primary,
//! and from each `--replica-url` directly.
//!
//! On the primary a replica's position is what its last reply said; a
//! standby replies when WAL arrives and every `wal_receiver_status_interval`
//! (10 s), not when it replays. `replay_lag` (PostgreSQL 15, checked with a
//! paused standby in tests/it/governor.rs) keeps growing while replay is
//! paused, but only at each reply; it is NULL once the replica is caught up
//! and idle, and it keeps its last, possibly large, value for one more reply
//! after the replica caught up. So: a replica whose last reply says it
//! replayed all that was sent lags 0; otherwise its lag is the larger of
//! `replay_lag` and the age, at that reply, of the oldest WAL position this
//! process saw the primary write that the replica had not replayed
//! ([`primary_lag`]; a floor that holds even if the server's lag tracker
//! overflows). A replica that has not replied for [`SILENT`] (or the limit,
//! if longer) lags. A replica that disconnected is no longer listed: name it
//! with `--replica-url` to wait for it even then.
//!
//! On a replica (`--replica-url`): 0 when everything received is replayed,
//! else `now() - pg_last_xact_replay_timestamp()`; unreachable, or behind
//! with no transaction replayed yet, it lags.

use super::Governor;
use crate::config;
use crate::error::{Error, Result};
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The name of the governor's own sessions on replicas.
pub const APPLICATION: &str = "archiver-governor";

/// A replica that has not replied for this long lags, whatever the limit:
/// an idle standby replies every `wal_receiver_status_interval` (10 s).
pub const SILENT: Duration = Duration::from_secs(30);

/// How long connecting to a replica and reading its lag may take; past it,
/// the replica counts as unreachable (lagging).
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// How often lagging replicas are read again while waiting.
pub const POLL: Duration = Duration::from_millis(500);

/// Replicas read directly (`--replica-url`).
#[derive(Clone, Default)]
pub struct Replicas {
    list: Vec<(String, PgConnectOptions)>,
}

impl std::fmt::Debug for Replicas {
    /// Where each replica is, never its user or password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|(name, _)| name))
            .finish()
    }
}

impl Replicas {
    /// Parses `--replica-url`s; errors name the setting and the entry (from
    /// 1), never the URL.
    pub fn parse(urls: &[SecretString]) -> Result<Replicas> {
        let mut list = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let raw = url.expose_secret();
            let bad = |reason: String| {
                let reason = config::redact(&reason, raw, "<the URL>")
                    .replace("<DATABASE_URL>", "<the URL>")
                    .replace("DATABASE_URL", "the URL");
                Error::config(
                    "ARCHIVER_REPLICA_URLS",
                    format!("entry {}: {reason}", i + 1),
                )
            };
            if raw.trim().is_empty() {
                return Err(bad(
                    "empty (e.g. postgresql://user:pass@replica:5432/db)".into()
                ));
            }
            let opts = config::database_options(Some(raw), APPLICATION).map_err(|e| match e {
                Error::Config { reason, .. } => bad(reason),
                other => bad(other.to_string()),
            })?;
            let opts = opts.options([("statement_timeout", "2000")]);
            list.push((config::describe(&opts), opts));
        }
        Ok(Replicas { list })
    }
}

/// A replica's lag as the governor judges it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    /// Which replica (`application_name@address`, or `host:port/db`).
    pub replica: String,
    /// How far behind (`Duration::MAX`: unknown, counted as lagging).
    pub lag: Duration,
    /// What was seen, for the log and the hand-back reason.
    pub why: String,
}

impl Lag {
    fn by(replica: &str, lag: Duration, why: impl Into<String>) -> Lag {
        Lag {
            replica: replica.to_string(),
            lag,
            why: why.into(),
        }
    }
}

/// A row of the primary's `pg_stat_replication`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct Primary {
    /// `application_name@client_addr`.
    pub name: String,
    /// WAL sent (bytes); `None` without the right to see it (pg_monitor).
    pub sent: Option<i64>,
    /// WAL the replica said it replayed.
    pub replay: Option<i64>,
    /// `replay_lag` in seconds; `None` when idle and caught up.
    pub replay_lag: Option<f64>,
    /// Seconds since the replica's last reply.
    pub reply_age: Option<f64>,
}

impl Primary {
    /// The rows of the reading's JSON array (malformed rows are skipped).
    pub fn from_json(v: &serde_json::Value) -> Vec<Primary> {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }
}

/// The lag of a replica listed by the primary, read at `at`, given the
/// WAL positions this process saw the primary at (`samples`, oldest first).
pub fn primary_lag(p: &Primary, at: Instant, samples: &[(Instant, u64)], limit: Duration) -> Lag {
    let name = p.name.as_str();
    let secs = |s: f64| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX);
    let (Some(sent), Some(replay), Some(age)) = (p.sent, p.replay, p.reply_age) else {
        return Lag::by(
            name,
            Duration::MAX,
            "has not reported a replay position (starting, or the role lacks pg_monitor)",
        );
    };
    let age = secs(age);
    if age > limit.max(SILENT) {
        return Lag::by(
            name,
            Duration::MAX,
            format!("has not replied for {:.0}s", age.as_secs_f64()),
        );
    }
    if replay >= sent {
        return Lag::by(name, Duration::ZERO, "replayed all it was sent");
    }
    let replied = at.checked_sub(age).unwrap_or(at);
    let unreplayed = samples
        .iter()
        .find(|(t, lsn)| *t <= replied && *lsn > replay as u64)
        .map_or(Duration::ZERO, |(t, _)| {
            replied.saturating_duration_since(*t)
        });
    let lag = secs(p.replay_lag.unwrap_or(0.0)).max(unreplayed);
    Lag::by(
        name,
        lag,
        format!(
            "lags {:.1}s ({} bytes sent not replayed)",
            lag.as_secs_f64(),
            sent - replay
        ),
    )
}

/// The sessions to `--replica-url`s, opened when first read.
#[derive(Debug, Default)]
pub struct Direct {
    pools: OnceLock<Vec<(String, PgPool)>>,
}

impl Direct {
    /// Each `--replica-url`'s lag (none without `--max-replica-lag`).
    pub async fn read(&self, opts: &super::GovernorOptions) -> Vec<Lag> {
        if opts.max_replica_lag.is_none() {
            return Vec::new();
        }
        let pools = self.pools.get_or_init(|| {
            opts.replicas
                .list
                .iter()
                .map(|(name, o)| {
                    let pool = PgPoolOptions::new()
                        .max_connections(1)
                        .acquire_timeout(READ_TIMEOUT)
                        .connect_lazy_with(o.clone());
                    (name.clone(), pool)
                })
                .collect()
        });
        futures::future::join_all(pools.iter().map(|(name, pool)| read_one(name, pool))).await
    }
}

async fn read_one(name: &str, pool: &PgPool) -> Lag {
    let query = sqlx::query(
        "SELECT pg_is_in_recovery() AS recovery,
                COALESCE(pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn(), false) AS caught_up,
                EXTRACT(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS age,
                pg_is_in_recovery() AND pg_is_wal_replay_paused() AS paused",
    )
    .fetch_one(pool);
    let row = match tokio::time::timeout(READ_TIMEOUT, query).await {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => {
            let e = e.to_string().replace(['\n', '\r'], " ");
            return Lag::by(name, Duration::MAX, format!("is unreachable ({e})"));
        }
        Err(_) => {
            return Lag::by(
                name,
                Duration::MAX,
                format!("did not answer within {READ_TIMEOUT:?}"),
            );
        }
    };
    let recovery: bool = row.try_get("recovery").unwrap_or(true);
    let caught_up: bool = row.try_get("caught_up").unwrap_or(false);
    let age: Option<f64> = row.try_get("age").unwrap_or(None);
    let paused: bool = row.try_get("paused").unwrap_or(false);
    direct_lag(name, recovery, caught_up, age, paused)
}

/// The lag a replica's own answers mean.
pub fn direct_lag(
    name: &str,
    recovery: bool,
    caught_up: bool,
    age: Option<f64>,
    paused: bool,
) -> Lag {
    let paused = if paused { ", replay paused" } else { "" };
    match (recovery, caught_up, age) {
        (false, _, _) => Lag::by(name, Duration::ZERO, "is not in recovery (promoted?)"),
        (true, true, _) => Lag::by(
            name,
            Duration::ZERO,
            format!("replayed all it received{paused}"),
        ),
        (true, false, None) => Lag::by(
            name,
            Duration::MAX,
            format!("is behind and has replayed no transaction yet{paused}"),
        ),
        (true, false, Some(s)) => {
            let lag = Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX);
            Lag::by(name, lag, format!("lags {s:.1}s{paused}"))
        }
    }
}

/// The replica lagging most (read at `at`), if any lags more than `limit`.
pub fn worst(
    primary: &[Primary],
    direct: &[Lag],
    at: Instant,
    samples: &[(Instant, u64)],
    limit: Duration,
) -> Option<Lag> {
    primary
        .iter()
        .map(|p| primary_lag(p, at, samples, limit))
        .chain(direct.iter().cloned())
        .filter(|l| l.lag > limit)
        .max_by_key(|l| l.lag)
}

/// Waits while any replica lags more than `--max-replica-lag`; hands the
/// batch back after `--max-lag-wait` of waiting.
pub async fn wait(g: &Governor, pool: &PgPool, stop: &CancellationToken) -> Result<()> {
    let Some(limit) = g.opts.max_replica_lag else {
        return Ok(());
    };
    let mut wait = super::Wait::new(g, super::Reason::ReplicaLag);
    loop {
        let r = g.reading(pool).await?;
        let samples = g.samples().await;
        let Some(lag) = worst(&r.primary, &r.direct, r.at, &samples, limit) else {
            wait.done("replicas caught up");
            return Ok(());
        };
        if wait.started() {
            tracing::warn!(
                replica = %lag.replica,
                "replica {} {}: over --max-replica-lag {:?}; waiting before the next chunk",
                lag.replica, lag.why, limit
            );
        }
        super::give_up_after(&wait, g, || {
            format!(
                "replica {} {} (over --max-replica-lag {limit:?})",
                lag.replica, lag.why
            )
        })?;
        let left = g.opts.max_lag_wait.saturating_sub(wait.elapsed());
        wait.pause(POLL.min(left).max(Duration::from_millis(10)), stop)
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_errors_never_show_the_password() {
        let ok = Replicas::parse(&[SecretString::from(
            "postgresql://u:hunter2@replica.example:6543/app",
        )])
        .unwrap();
        let shown = format!("{ok:?}");
        assert!(shown.contains("replica.example:6543/app"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        for bad in [
            "mysql://u:hunter2@h/db",
            "hunter2",
            " ",
            "postgresql://u:hunter2@h:99999999/db",
        ] {
            let urls = [
                SecretString::from("postgresql://a@h/db"),
                SecretString::from(bad),
            ];
            let e = Replicas::parse(&urls).unwrap_err().to_string();
            assert!(e.starts_with("ARCHIVER_REPLICA_URLS: entry 2: "), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    fn row(sent: i64, replay: i64, replay_lag: Option<f64>, reply_age: f64) -> Primary {
        Primary {
            name: "r@127.0.0.1".into(),
            sent: Some(sent),
            replay: Some(replay),
            replay_lag,
            reply_age: Some(reply_age),
        }
    }

    #[test]
    fn a_paused_replica_lags_by_the_age_of_what_it_has_not_replayed() {
        let now = Instant::now();
        let ago = |s: u64| now - Duration::from_secs(s);
        let samples = [(ago(20), 100), (ago(10), 200), (ago(5), 300), (ago(1), 400)];
        let limit = Duration::from_secs(2);
        // Replayed up to 150 at its reply a second ago; position 200 was
        // written 10 s ago: it lags at least 9 s, whatever replay_lag says.
        let l = primary_lag(&row(400, 150, Some(0.01), 1.0), now, &samples, limit);
        assert_eq!(l.lag.as_secs(), 9, "{l:?}");
        // Caught up: 0, even with a stale replay_lag.
        let l = primary_lag(&row(400, 400, Some(30.0), 1.0), now, &samples, limit);
        assert_eq!(l.lag, Duration::ZERO);
        // Behind only on what was written after its last reply: no lag.
        let l = primary_lag(&row(400, 300, None, 3.0), now, &samples, limit);
        assert!(l.lag < Duration::from_secs(3), "{l:?}");
        // Silent for longer than SILENT: lagging.
        let l = primary_lag(&row(400, 400, None, 45.0), now, &samples, limit);
        assert_eq!(l.lag, Duration::MAX);
        // Nothing reported: lagging.
        let l = primary_lag(&Primary::default(), now, &samples, limit);
        assert_eq!(l.lag, Duration::MAX);
    }

    #[test]
    fn a_replicas_own_answers() {
        assert_eq!(
            direct_lag("r", true, true, Some(99.0), true).lag,
            Duration::ZERO
        );
        assert_eq!(
            direct_lag("r", true, false, Some(3.5), true)
                .lag
                .as_millis(),
            3500
        );
        assert_eq!(direct_lag("r", true, false, None, false).lag, Duration::MAX);
        assert_eq!(
            direct_lag("r", false, false, None, false).lag,
            Duration::ZERO
        );
    }
}
