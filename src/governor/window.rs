//! The maintenance window (`--window 01:00-06:00 [TZ]`) and the run's
//! deadline (`--max-runtime`).
//!
//! A window is a daily span of wall-clock time in a time zone (UTC unless
//! one is named). It may cross midnight (`22:00-04:00`). On the days a
//! zone changes its clocks:
//! - a start or end that does not exist that day (skipped by a
//!   spring-forward) is the moment the clocks skip to (`02:30` on a day
//!   that jumps from 02:00 to 03:00 is 03:00);
//! - a start or end that occurs twice (fall-back) is its first occurrence.
//!
//! So a window's day can be an hour shorter or longer than usual, and a
//! window lying wholly inside a skipped hour does not open that day.

use super::Governor;
use crate::error::{Error, Result};
use chrono::{DateTime, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use std::time::Instant;

/// Longer input is refused before it is parsed (and never echoed whole).
const MAX_INPUT: usize = 64;

/// A daily window of local time in which chunks may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    start: NaiveTime,
    end: NaiveTime,
    tz: Tz,
}

impl std::str::FromStr for Window {
    type Err = String;

    /// `HH:MM-HH:MM`, optionally followed by an IANA time zone
    /// (`01:00-06:00 Europe/Berlin`); errors say what is wrong and name
    /// the setting.
    fn from_str(s: &str) -> std::result::Result<Window, String> {
        let bad = |why: String| {
            format!(
                "{why} (--window / ARCHIVER_WINDOW: HH:MM-HH:MM, optionally followed by a time zone such as Europe/Berlin)"
            )
        };
        if s.len() > MAX_INPUT {
            return Err(bad(format!(
                "{} characters is too long for a window",
                s.len()
            )));
        }
        let t = s.trim();
        if t.is_empty() {
            return Err(bad("empty window".into()));
        }
        let (span, zone) = match t.split_once(char::is_whitespace) {
            Some((span, zone)) => (span, Some(zone.trim())),
            None => (t, None),
        };
        let (a, b) = span
            .split_once('-')
            .ok_or_else(|| bad(format!("{span:?} has no '-' between start and end")))?;
        let start = clock(a).map_err(&bad)?;
        let end = clock(b).map_err(&bad)?;
        if start == end {
            return Err(bad(format!(
                "{span:?} starts where it ends; for no window at all, leave it unset"
            )));
        }
        let tz = match zone {
            None => Tz::UTC,
            Some(z) if z.contains(char::is_whitespace) => {
                return Err(bad(format!("unexpected text after the time zone in {z:?}")));
            }
            Some(z) => z.parse::<Tz>().map_err(|_| {
                bad(format!(
                    "unknown time zone {z:?} (an IANA name such as Europe/Berlin, or UTC)"
                ))
            })?,
        };
        Ok(Window { start, end, tz })
    }
}

/// The `--window` parser for clap: its error says what is wrong without
/// echoing the value whole (clap's own would print any length of input).
#[derive(Debug, Clone, Copy)]
pub struct WindowParser;

impl clap::builder::TypedValueParser for WindowParser {
    type Value = Window;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> std::result::Result<Window, clap::Error> {
        let refuse = |why: String| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{why}\n"))
                .with_cmd(cmd)
        };
        let s = value
            .to_str()
            .ok_or_else(|| refuse("--window / ARCHIVER_WINDOW is not UTF-8".into()))?;
        s.parse().map_err(refuse)
    }
}

/// `H:MM` or `HH:MM`, 00:00 to 23:59.
fn clock(s: &str) -> std::result::Result<NaiveTime, String> {
    let bad = || format!("{s:?} is not a time of day HH:MM from 00:00 to 23:59");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let digits = |x: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&x.len()) && x.bytes().all(|c| c.is_ascii_digit())
    };
    if !digits(h, 1..=2) || !digits(m, 2..=2) {
        return Err(bad());
    }
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    NaiveTime::from_hms_opt(h, m, 0)
        .filter(|_| h < 24 && m < 60)
        .ok_or_else(bad)
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-{} {}",
            self.start.format("%H:%M"),
            self.end.format("%H:%M"),
            self.tz.name()
        )
    }
}

impl Window {
    /// Whether the window is open at `now`.
    pub fn contains(&self, now: DateTime<Utc>) -> bool {
        self.closes_at(now).is_some()
    }

    /// When the window is open at `now`, the instant it closes.
    pub fn closes_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let today = now.with_timezone(&self.tz).date_naive();
        [today.pred_opt(), Some(today)]
            .into_iter()
            .flatten()
            .map(|d| self.occurrence(d))
            .find(|(open, close)| *open <= now && now < *close)
            .map(|(_, close)| close)
    }

    /// The instant the window next opens: `now` when it is open.
    pub fn next_open(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        if self.contains(now) {
            return now;
        }
        let mut day = now.with_timezone(&self.tz).date_naive();
        // An occurrence may be empty (inside a skipped hour): look further.
        for _ in 0..8 {
            let (open, close) = self.occurrence(day);
            if open > now && open < close {
                return open;
            }
            day = day.succ_opt().unwrap_or(day);
        }
        now + Duration::days(1)
    }

    /// When the window next opens after its current (or next) opening has
    /// closed: for saying "open now, until …; then from …".
    pub fn opening_after(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self.closes_at(now) {
            Some(close) => self.next_open(close),
            None => self.next_open(now),
        }
    }

    /// `t` as a person reads it: in the window's zone, and in UTC too when
    /// that is another zone.
    pub fn show(&self, t: DateTime<Utc>) -> String {
        let utc = t.format("%Y-%m-%d %H:%M UTC").to_string();
        if self.tz == Tz::UTC {
            return utc;
        }
        format!(
            "{} {} ({utc})",
            t.with_timezone(&self.tz).format("%Y-%m-%d %H:%M"),
            self.tz.name()
        )
    }

    /// What the window is at `now`, on one line: open until when, or
    /// closed until when.
    pub fn describe(&self, now: DateTime<Utc>) -> String {
        match self.closes_at(now) {
            Some(close) => format!(
                "maintenance window {self}: open now, closes at {}; next opens at {}",
                self.show(close),
                self.show(self.next_open(close))
            ),
            None => {
                let open = self.next_open(now);
                format!(
                    "maintenance window {self}: closed now; next opens at {}, closes at {}",
                    self.show(open),
                    self.show(self.closes_at(open).unwrap_or(open))
                )
            }
        }
    }

    /// The occurrence that opens on local day `day`: `(open, close)`.
    fn occurrence(&self, day: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
        let close_day = if self.end <= self.start {
            day.succ_opt().unwrap_or(day)
        } else {
            day
        };
        (
            resolve(self.tz, day.and_time(self.start)),
            resolve(self.tz, close_day.and_time(self.end)),
        )
    }
}

/// The instant a wall-clock time names in `tz`: its first occurrence when
/// it occurs twice, the moment the clocks skip to when it is skipped.
fn resolve(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.with_timezone(&Utc),
        LocalResult::None => {
            // In a gap: the first existing minute after it (gaps are at
            // most a few hours, and minute-aligned in every zone we know).
            (1..=24 * 60)
                .find_map(|m| {
                    tz.from_local_datetime(&(local + Duration::minutes(m)))
                        .earliest()
                })
                .map_or_else(|| local.and_utc(), |t| t.with_timezone(&Utc))
        }
    }
}

/// Why no chunk may start now, if none may: past the deadline, or outside
/// the window (saying when it next opens).
pub fn closed(g: &Governor) -> Option<String> {
    if let Some(why) = past_deadline(g) {
        return Some(why);
    }
    let w = g.opts.window.as_ref()?;
    let now = Utc::now();
    (!w.contains(now)).then(|| {
        format!(
            "outside the maintenance window {w}: it next opens at {}",
            w.show(w.next_open(now))
        )
    })
}

/// `Err(Error::HandBack)` outside the window or past the deadline.
pub fn check(g: &Governor) -> Result<()> {
    closed(g).map_or(Ok(()), |why| Err(Error::HandBack(why)))
}

/// Why no chunk may start any more, when the run's deadline has passed.
pub fn past_deadline(g: &Governor) -> Option<String> {
    let deadline = g.opts.deadline?;
    (Instant::now() >= deadline).then(|| {
        "past --max-runtime (ARCHIVER_MAX_RUNTIME): no chunk starts after the run's deadline"
            .to_string()
    })
}

/// Resolves when the window closes or the deadline passes, whichever comes
/// first (at once when the window is closed now; never, with neither set),
/// saying which.
pub async fn until_stop(g: &Governor) -> String {
    let closes = g.opts.window.as_ref().map(|w| {
        let now = Utc::now();
        (w, w.closes_at(now).unwrap_or(now))
    });
    let closing = async {
        match closes {
            Some((w, at)) => {
                tokio::time::sleep((at - Utc::now()).to_std().unwrap_or_default()).await;
                format!(
                    "the maintenance window {w} closed; it next opens at {}",
                    w.show(w.next_open(at))
                )
            }
            None => std::future::pending().await,
        }
    };
    let deadline = async {
        match g.opts.deadline {
            Some(d) => {
                tokio::time::sleep_until(d.into()).await;
                "past --max-runtime".to_string()
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        why = closing => why,
        why = deadline => why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Window {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn parses_and_displays() {
        assert_eq!(w("01:00-06:00").to_string(), "01:00-06:00 UTC");
        assert_eq!(w(" 1:00-6:30 ").to_string(), "01:00-06:30 UTC");
        assert_eq!(
            w("22:00-04:00 Europe/Berlin").to_string(),
            "22:00-04:00 Europe/Berlin"
        );
        assert_eq!(w("00:00-23:59 UTC").to_string(), "00:00-23:59 UTC");
        // Display parses back to the same window.
        let x = w("23:15-00:45 America/New_York");
        assert_eq!(w(&x.to_string()), x);
    }

    #[test]
    fn hostile_windows_say_what_is_wrong() {
        for (input, says) in [
            ("", "empty"),
            ("   ", "empty"),
            ("25:00-06:00", "\"25:00\" is not a time of day"),
            ("01:60-06:00", "\"01:60\" is not a time of day"),
            ("24:00-06:00", "not a time of day"),
            ("0100-0600", "\"0100\" is not a time of day"),
            ("01:00 06:00", "no '-'"),
            ("01:00", "no '-'"),
            ("01:00-", "\"\" is not a time of day"),
            ("-06:00", "\"\" is not a time of day"),
            ("01:00-06:00-07:00", "not a time of day"),
            ("01:00-01:00", "starts where it ends"),
            (
                "01:00-06:00 Mars/Olympus",
                "unknown time zone \"Mars/Olympus\"",
            ),
            ("01:00-06:00 Europe/Berlin junk", "unexpected text"),
            ("01:00-06:00junk", "not a time of day"),
            ("+1:00-06:00", "not a time of day"),
            ("01:0-06:00", "not a time of day"),
            ("001:00-06:00", "not a time of day"),
            ("01:00-06:00 europe/berlin", "unknown time zone"),
            ("１:00-06:00", "not a time of day"),
        ] {
            let e = input.parse::<Window>().unwrap_err();
            assert!(e.contains(says), "{input:?}: {e}");
            assert!(e.contains("ARCHIVER_WINDOW"), "{input:?}: {e}");
        }
        let huge = format!("01:00-06:00 {}", "A".repeat(10_000));
        let e = huge.parse::<Window>().unwrap_err();
        assert!(e.contains("too long") && e.len() < 300, "{e}");
    }

    #[test]
    fn a_window_in_a_day() {
        let x = w("01:00-06:00");
        assert!(!x.contains(utc("2024-05-10T00:59:59Z")));
        assert!(x.contains(utc("2024-05-10T01:00:00Z")));
        assert!(x.contains(utc("2024-05-10T05:59:59Z")));
        assert!(!x.contains(utc("2024-05-10T06:00:00Z")));
        assert_eq!(
            x.closes_at(utc("2024-05-10T03:00:00Z")),
            Some(utc("2024-05-10T06:00:00Z"))
        );
        assert_eq!(x.closes_at(utc("2024-05-10T07:00:00Z")), None);
        let now = utc("2024-05-10T03:00:00Z");
        assert_eq!(x.next_open(now), now);
        assert_eq!(
            x.next_open(utc("2024-05-10T06:00:00Z")),
            utc("2024-05-11T01:00:00Z")
        );
        assert_eq!(
            x.next_open(utc("2024-05-10T00:10:00Z")),
            utc("2024-05-10T01:00:00Z")
        );
        assert_eq!(x.opening_after(now), utc("2024-05-11T01:00:00Z"));
    }

    #[test]
    fn a_window_across_midnight() {
        let x = w("22:00-04:00");
        assert!(x.contains(utc("2024-05-10T23:30:00Z")));
        assert!(x.contains(utc("2024-05-11T00:00:00Z")));
        assert!(x.contains(utc("2024-05-11T03:59:00Z")));
        assert!(!x.contains(utc("2024-05-11T04:00:00Z")));
        assert!(!x.contains(utc("2024-05-11T21:59:00Z")));
        assert_eq!(
            x.closes_at(utc("2024-05-10T23:00:00Z")),
            Some(utc("2024-05-11T04:00:00Z"))
        );
        assert_eq!(
            x.closes_at(utc("2024-05-11T01:00:00Z")),
            Some(utc("2024-05-11T04:00:00Z"))
        );
        assert_eq!(
            x.next_open(utc("2024-05-11T12:00:00Z")),
            utc("2024-05-11T22:00:00Z")
        );
        // Ending at midnight.
        let x = w("20:00-00:00");
        assert!(x.contains(utc("2024-05-10T23:59:00Z")));
        assert!(!x.contains(utc("2024-05-11T00:00:00Z")));
    }

    #[test]
    fn a_window_in_a_zone() {
        // Berlin in May is UTC+2.
        let x = w("01:00-06:00 Europe/Berlin");
        assert!(x.contains(utc("2024-05-09T23:00:00Z")));
        assert!(!x.contains(utc("2024-05-10T04:00:00Z")));
        assert_eq!(
            x.next_open(utc("2024-05-10T12:00:00Z")),
            utc("2024-05-10T23:00:00Z")
        );
        assert_eq!(
            x.show(utc("2024-05-10T23:00:00Z")),
            "2024-05-11 01:00 Europe/Berlin (2024-05-10 23:00 UTC)"
        );
    }

    #[test]
    fn spring_forward_skipped_start_opens_when_the_clocks_jump() {
        // Berlin, 2024-03-31: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
        let x = w("02:30-05:00 Europe/Berlin");
        assert_eq!(
            x.next_open(utc("2024-03-30T12:00:00Z")),
            utc("2024-03-31T01:00:00Z")
        );
        assert!(!x.contains(utc("2024-03-31T00:59:00Z")));
        assert!(x.contains(utc("2024-03-31T01:00:00Z")));
        // It closes at 05:00 CEST = 03:00 UTC: a short day.
        assert_eq!(
            x.closes_at(utc("2024-03-31T01:00:00Z")),
            Some(utc("2024-03-31T03:00:00Z"))
        );
        // The day before and after, as usual: 02:30 CET = 01:30 UTC,
        // 02:30 CEST = 00:30 UTC.
        assert!(x.contains(utc("2024-03-30T01:30:00Z")));
        assert_eq!(
            x.next_open(utc("2024-03-31T12:00:00Z")),
            utc("2024-04-01T00:30:00Z")
        );
        // A window wholly inside the skipped hour does not open that day.
        let x = w("02:10-02:50 Europe/Berlin");
        assert_eq!(
            x.next_open(utc("2024-03-30T12:00:00Z")),
            utc("2024-04-01T00:10:00Z")
        );
    }

    #[test]
    fn fall_back_repeated_times_are_their_first_occurrence() {
        // Berlin, 2024-10-27: 03:00 CEST falls back to 02:00 CET (01:00 UTC);
        // 02:30 happens at 00:30 UTC and again at 01:30 UTC.
        let x = w("02:30-04:00 Europe/Berlin");
        assert_eq!(
            x.next_open(utc("2024-10-26T12:00:00Z")),
            utc("2024-10-27T00:30:00Z")
        );
        // Open through the repeated hour until 04:00 CET = 03:00 UTC: a
        // long day.
        assert!(x.contains(utc("2024-10-27T01:45:00Z")));
        assert_eq!(
            x.closes_at(utc("2024-10-27T00:30:00Z")),
            Some(utc("2024-10-27T03:00:00Z"))
        );
        // An end in the repeated hour is its first occurrence.
        let x = w("01:00-02:30 Europe/Berlin");
        assert_eq!(
            x.closes_at(utc("2024-10-26T23:30:00Z")),
            Some(utc("2024-10-27T00:30:00Z"))
        );
        assert!(!x.contains(utc("2024-10-27T01:15:00Z")));
    }

    #[test]
    fn across_midnight_on_a_dst_day() {
        // New York, 2024-03-10: 02:00 EST jumps to 03:00 EDT.
        let x = w("23:00-03:00 America/New_York");
        // Opens 23:00 EST on the 9th (04:00 UTC on the 10th), closes at
        // 03:00 EDT (07:00 UTC): three hours that night.
        let open = utc("2024-03-10T04:00:00Z");
        assert_eq!(x.next_open(utc("2024-03-09T20:00:00Z")), open);
        assert_eq!(x.closes_at(open), Some(utc("2024-03-10T07:00:00Z")));
        assert!(x.contains(utc("2024-03-10T06:59:00Z")));
        assert!(!x.contains(utc("2024-03-10T07:00:00Z")));
    }

    #[test]
    fn check_hands_back_outside_the_window_and_past_the_deadline() {
        let g = Governor::default();
        assert!(check(&g).is_ok());
        let now = Utc::now();
        let start = (now + Duration::hours(2)).format("%H:%M").to_string();
        let end = (now + Duration::hours(3)).format("%H:%M").to_string();
        let closed: Window = format!("{start}-{end}").parse().unwrap();
        let mut opts = super::super::GovernorOptions {
            window: Some(closed),
            ..Default::default()
        };
        let e = check(&Governor::new(opts.clone())).unwrap_err().to_string();
        assert!(
            e.contains("outside the maintenance window") && e.contains("next opens at"),
            "{e}"
        );
        opts.window = None;
        opts.deadline = Some(Instant::now());
        let e = check(&Governor::new(opts)).unwrap_err().to_string();
        assert!(e.contains("--max-runtime"), "{e}");
    }
}
