//! Settings: the database URL, policy ages, batch timeouts, and the
//! checks that turn a bad value into a one-line error naming the setting.

use crate::error::{Error, Result};
use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Utc};
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;
use std::time::Duration;

/// How old a row must be before it is archived, per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `scenario_logs.received_at` older than this many days moves (R1).
    pub logs_age_days: u32,
    /// `scenario_metrics.timestamp` older than this many days is aggregated (R2).
    pub metrics_age_days: u32,
    /// `reports.created_at` older than this many days goes to the object store (R3).
    pub reports_age_days: u32,
    /// Rows whose time is before this UTC day (or infinite) are never
    /// archived: a sentinel (`'-infinity'`, 1970-01-01, a BC date) is a bug
    /// in the application's data, not a month to make a partition for.
    /// They are counted and named in the dry run and `planner status`.
    pub floor: NaiveDate,
}

/// The default [`Policy::floor`]: 2000-01-01.
pub const DEFAULT_FLOOR: NaiveDate = NaiveDate::from_ymd_opt(2000, 1, 1).expect("a valid date");

impl Default for Policy {
    fn default() -> Self {
        Policy {
            logs_age_days: 365,
            metrics_age_days: 730,
            reports_age_days: 180,
            floor: DEFAULT_FLOOR,
        }
    }
}

impl Policy {
    /// The floor as an instant: midnight UTC of its day.
    pub fn floor_time(&self) -> DateTime<Utc> {
        self.floor.and_time(NaiveTime::MIN).and_utc()
    }
}

/// Parses `--timestamp-floor`: a date (YYYY-MM-DD) from year 1 on and
/// before today (a later floor would silently archive nothing).
pub fn timestamp_floor(s: &str) -> std::result::Result<NaiveDate, String> {
    match NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
        Ok(d) if d.year() >= 1 && d < Utc::now().date_naive() => Ok(d),
        Ok(_) => Err(format!(
            "{s:?} is not before today: every row would be below it and nothing archived"
        )),
        _ => Err(format!("{s:?} is not a date YYYY-MM-DD from year 1 on")),
    }
}

/// Parses an instant given on the command line (`planner restore --from`,
/// `--to`): RFC 3339 (`2024-03-01T12:00:00Z`, `2024-03-01 12:00:00+02:00`)
/// or a date (`2024-03-01`: its midnight UTC), from year 1 to 9999.
pub fn instant(s: &str) -> std::result::Result<DateTime<Utc>, String> {
    let t = s.trim();
    let parsed = DateTime::parse_from_rfc3339(t)
        .map(|d| d.with_timezone(&Utc))
        .or_else(|_| {
            NaiveDate::parse_from_str(t, "%Y-%m-%d").map(|d| d.and_time(NaiveTime::MIN).and_utc())
        });
    match parsed {
        Ok(d) if (1..=9999).contains(&d.year()) => Ok(d),
        Ok(_) => Err(format!("{s:?} is outside the years 1 to 9999")),
        Err(_) => Err(format!(
            "{s:?} is not a time: RFC 3339 (2024-03-01T00:00:00Z) or a date (2024-03-01, midnight UTC)"
        )),
    }
}

/// Parses `DATABASE_URL`. Accepts the spec's `postgresql+asyncpg://` form.
/// Errors never echo the URL, which may hold a password.
pub fn database_options(url: Option<&str>, application: &str) -> Result<PgConnectOptions> {
    let raw = url
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            Error::config(
                "DATABASE_URL",
                "not set (e.g. postgresql://user:pass@host:5432/db)",
            )
        })?;
    let normalized = normalize_database_url(raw)?;
    let opts = PgConnectOptions::from_str(&normalized).map_err(|e| {
        Error::config(
            "DATABASE_URL",
            format!(
                "cannot be parsed: {}",
                redact(&e.to_string(), raw, "<DATABASE_URL>")
            ),
        )
    })?;
    Ok(opts.application_name(application).options([
        // A batch waits at most this long for a row lock held by the
        // application; past it the batch is retried instead of stalling.
        ("lock_timeout", "30s"),
        // TCP keepalives, sent by the server (sqlx 0.9 sets no socket
        // options on its side): a client that vanished without a word (a
        // NAT that dropped the connection, a host that died) has its
        // session ended, its transaction rolled back and its locks (the
        // planner's advisory lock included) released within about a minute
        // instead of the kernel's two hours. A planner notices the loss of
        // its lock connection sooner than that (see `LOCK_HEARTBEAT`).
        ("tcp_keepalives_idle", "30"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "3"),
        // Unacknowledged data (a reply to a client that is gone) ends the
        // session after this long too (milliseconds).
        ("tcp_user_timeout", "60000"),
    ]))
}

/// Limits for the sessions that execute batches (not the planner's, whose
/// planning and dry-run counts may rightly run long).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchTimeouts {
    /// `statement_timeout`: the server cancels a batch statement running
    /// longer (SQLSTATE 57014): the batch is retried, and parked after the
    /// delivery limit if it times out every time. Zero: no limit.
    pub statement: Duration,
    /// `idle_in_transaction_session_timeout`: the server ends the session
    /// of a worker that stalls (frozen, cut off) inside a batch
    /// transaction, releasing the row locks it holds. Zero: no limit.
    pub idle_in_transaction: Duration,
}

impl Default for BatchTimeouts {
    /// A 5,000-row batch statement takes well under a second on a healthy
    /// server; a minute (twice the lock timeout, so a row-lock wait is
    /// reported as such) means something is wrong. Inside a batch's
    /// transaction the worker waits on nothing but the database, so 30 s
    /// idle means it is stuck.
    fn default() -> Self {
        BatchTimeouts {
            statement: Duration::from_secs(60),
            idle_in_transaction: Duration::from_secs(30),
        }
    }
}

/// What the client adds to the statement timeout before it gives a silent
/// session up ([`BatchTimeouts::client_deadline`]).
pub const CLIENT_GRACE: Duration = Duration::from_secs(10);

impl BatchTimeouts {
    /// How long a transaction of a batch may wait for the database before
    /// the worker gives its session up as lost (a network partition): the
    /// statement timeout and [`CLIENT_GRACE`]. A chunk is a few statements
    /// sized to take about the chunk time, the server cancels any of them
    /// past the statement timeout and says so; one that has said nothing
    /// for longer is not slow but gone. `None` with no statement timeout.
    pub fn client_deadline(&self) -> Option<Duration> {
        (!self.statement.is_zero()).then(|| self.statement + CLIENT_GRACE)
    }
}

/// The options of a batch-executing session: `opts` with `t`'s limits.
pub fn batch_options(opts: &PgConnectOptions, t: BatchTimeouts) -> PgConnectOptions {
    opts.clone().options([
        (
            "statement_timeout",
            format!("{}ms", t.statement.as_millis()),
        ),
        (
            "idle_in_transaction_session_timeout",
            format!("{}ms", t.idle_in_transaction.as_millis()),
        ),
    ])
}

/// Parses a timeout as PostgreSQL writes one: `500ms`, `60s`, `2min`, `1h`,
/// or a bare number of seconds; `0` is no limit. At most a day.
pub fn parse_timeout(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let bad = || format!("{s:?} is not a timeout (e.g. 500ms, 60s, 2min, 1h; 0 for none)");
    let n: u64 = n.parse().map_err(|_| bad())?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if d > Duration::from_secs(86_400) {
        return Err(format!("{s:?} is longer than a day"));
    }
    Ok(d)
}

fn normalize_database_url(raw: &str) -> Result<String> {
    let (scheme, rest) = raw.split_once("://").ok_or_else(|| {
        Error::config(
            "DATABASE_URL",
            "not a URL: expected postgresql://user:pass@host:5432/db",
        )
    })?;
    let scheme = scheme.split('+').next().unwrap_or_default();
    match scheme {
        "postgres" | "postgresql" => Ok(format!("postgresql://{rest}")),
        other => Err(Error::config(
            "DATABASE_URL",
            format!("unsupported scheme {other:?}: expected postgresql://"),
        )),
    }
}

/// Removes a URL (shown as `placeholder`) and its user-info (user:password)
/// from a message that might quote them.
pub(crate) fn redact(message: &str, url: &str, placeholder: &str) -> String {
    let mut m = message.replace(url, placeholder);
    if let Some((_, rest)) = url.split_once("://")
        && let Some((userinfo, _)) = rest.split_once('@')
        && !userinfo.is_empty()
    {
        m = m.replace(userinfo, "<credentials>");
        if let Some((_, password)) = userinfo.split_once(':')
            && !password.is_empty()
        {
            m = m.replace(password, "<password>");
        }
    }
    m
}

/// Describes the server a set of options points at, without the password.
pub fn describe(opts: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("<default>")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_rfc3339_or_dates_and_anything_else_is_named() {
        let d = instant("2024-03-01").unwrap();
        assert_eq!(d.to_rfc3339(), "2024-03-01T00:00:00+00:00");
        let t = instant("2024-03-01T12:30:00+02:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2024-03-01T10:30:00+00:00");
        for bad in [
            "",
            "yesterday",
            "2024-13-01",
            "2024-02-30",
            "-1",
            "abc",
            "2024-03-01T25:00:00Z",
        ] {
            let e = instant(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn asyncpg_urls_are_accepted() {
        let o = database_options(
            Some("postgresql+asyncpg://u:secret@db.example:6543/mock"),
            "t",
        )
        .unwrap();
        assert_eq!(describe(&o), "db.example:6543/mock");
    }

    #[test]
    fn bad_database_urls_name_the_variable_and_hide_the_password() {
        for bad in ["mysql://u:hunter2@h/db", "hunter2", ""] {
            let e = database_options(Some(bad), "t").unwrap_err().to_string();
            assert!(e.starts_with("DATABASE_URL: "), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e = database_options(None, "t").unwrap_err().to_string();
        assert!(e.contains("DATABASE_URL: not set"), "{e}");
    }

    #[test]
    fn timeouts_parse_as_postgresql_writes_them() {
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_timeout("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_timeout("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "-1s", "1.5s", "10 parsecs", "2d", "25h"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        let o = batch_options(
            &database_options(Some("postgresql://u@h/db"), "t").unwrap(),
            BatchTimeouts::default(),
        );
        let all = o.get_options().unwrap();
        for want in [
            "lock_timeout=30s",
            "tcp_keepalives_idle=30",
            "statement_timeout=60000ms",
            "idle_in_transaction_session_timeout=30000ms",
        ] {
            assert!(all.contains(want), "{all}");
        }
    }
}
