//! Metrics: batches of whole aggregate groups. A group is (scenario, type,
//! name, unit, UTC day); batch bounds are (day, scenario_id) keys, so every
//! sample of a group falls in the same batch. Walked a window of days at a
//! time through the (UTC day, scenario_id) expression index, counting per
//! day, and per scenario only on days larger than a batch; a batch may span
//! several small days, or a slice of the scenarios of a large one.

use super::{Eligible, Sink};
use crate::error::Result;
use crate::ledger::Key;
use crate::partitions;
use crate::schema::{DAY_FROM_START, METRICS, METRICS_ARCHIVE, METRICS_DAY as DAY};
use crate::vocabulary::Kind;
use chrono::{DateTime, Duration, Utc};
use sqlx::postgres::PgArguments;
use sqlx::query::QueryAs;
use sqlx::{PgPool, Postgres, Row};
use uuid::Uuid;

/// Decides where batches end, given (key, samples) in key order. A key's
/// samples are never split; a batch closes once it reaches `batch_size`, or
/// before a key that would take it past `batch_size`.
#[derive(Debug)]
pub(crate) struct Cutter {
    batch_size: i64,
    lo: Key,
    last: Option<Key>,
    acc: i64,
}

impl Cutter {
    pub(crate) fn new(batch_size: i64, lo: Key) -> Self {
        Cutter {
            batch_size,
            lo,
            last: None,
            acc: 0,
        }
    }

    /// Feeds one key; returns up to two finished batches (lo, hi, samples).
    pub(crate) fn feed(&mut self, key: Key, n: i64) -> Vec<(Key, Key, i64)> {
        let mut out = Vec::new();
        if self.acc > 0 && self.acc + n > self.batch_size {
            out.extend(self.close());
        }
        self.acc += n;
        self.last = Some(key);
        if self.acc >= self.batch_size {
            out.extend(self.close());
        }
        out
    }

    /// The last, partial batch.
    pub(crate) fn close(&mut self) -> Option<(Key, Key, i64)> {
        let hi = self.last.take()?;
        let batch = (self.lo, hi, self.acc);
        self.lo = hi;
        self.acc = 0;
        Some(batch)
    }
}

pub(super) async fn eligible(
    pool: &PgPool,
    after: Option<Key>,
    floor: Key,
    cutoff: DateTime<Utc>,
    batch_size: i64,
) -> Result<Eligible> {
    let sql = format!(
        "SELECT count(*) AS n,
                count(DISTINCT (scenario_id, metric_type, metric_name, unit, {DAY})) AS groups,
                min(\"timestamp\") AS oldest, max(\"timestamp\") AS newest
         FROM {METRICS}
         WHERE ({DAY}, scenario_id) > {DAY_FROM_START} AND {DAY} < ($3 AT TIME ZONE 'UTC')"
    );
    let from = super::start(after, floor);
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(from.ts)
        .bind(from.id)
        .bind(cutoff)
        .fetch_one(pool)
        .await?;
    let mut batches = Count(0);
    walk(pool, after, floor, cutoff, batch_size, &mut batches).await?;
    Ok(Eligible {
        kind: Kind::Metrics,
        cutoff,
        rows: row.get("n"),
        bytes: None,
        groups: Some(row.get("groups")),
        missing: None,
        oldest: row.get("oldest"),
        newest: row.get("newest"),
        batches: batches.0,
        pending: None,
        out_of_range: None,
    })
}

pub(super) async fn cut(
    pool: &PgPool,
    after: Option<Key>,
    floor: Key,
    cutoff: DateTime<Utc>,
    batch_size: i64,
    sink: &mut Sink,
) -> Result<()> {
    let from = super::start(after, floor);
    if let Some(first) = next_day(pool, Some(from.ts), true, cutoff).await? {
        // From the first batch's lower bound: late samples in a month
        // between earlier runs' batches and this run's first day need
        // their partition too.
        let lo = super::resume(after, floor).map_or(first, |a| a.ts);
        partitions::ensure_months(pool, METRICS_ARCHIVE, lo.max(floor.ts), cutoff).await?;
    }
    walk(pool, after, floor, cutoff, batch_size, sink).await
}

/// Where the batches a walk cuts go.
trait Emit {
    async fn emit(&mut self, lo: Key, hi: Key, samples: i64) -> Result<()>;
}

/// A dry run only counts them.
struct Count(i64);

impl Emit for Count {
    async fn emit(&mut self, _: Key, _: Key, _: i64) -> Result<()> {
        self.0 += 1;
        Ok(())
    }
}

/// A real run records and publishes them as they are cut.
impl Emit for Sink {
    async fn emit(&mut self, lo: Key, hi: Key, samples: i64) -> Result<()> {
        self.push(lo, hi, samples).await
    }
}

/// A planning query covers about this many batches' worth of samples (its
/// days chosen from the density of the window before), and between one and
/// MAX_WINDOW_DAYS days: a handful of index-only walks per year of backlog,
/// each returning a row per day (per scenario on days larger than a batch).
const WINDOW_BATCHES: i64 = 20;
const FIRST_WINDOW_DAYS: i64 = 7;
const MAX_WINDOW_DAYS: i64 = 92;

/// Walks eligible (day, scenario) keys above `after` in order, a window of
/// days at a time, and emits each batch the [`Cutter`] closes.
async fn walk(
    pool: &PgPool,
    after: Option<Key>,
    floor: Key,
    cutoff: DateTime<Utc>,
    batch_size: i64,
    out: &mut impl Emit,
) -> Result<()> {
    let from = super::start(after, floor);
    let Some(mut day) = next_day(pool, Some(from.ts), true, cutoff).await? else {
        return Ok(());
    };
    let mut cutter = Cutter::new(
        batch_size,
        super::resume(after, floor).unwrap_or(Key {
            ts: day - Duration::days(1),
            id: Uuid::max(),
        }),
    );
    let after = Some(from);
    let mut days = FIRST_WINDOW_DAYS;
    loop {
        let until = (day + Duration::days(days)).min(cutoff);
        let mut samples = 0;
        for (key, n) in key_counts(pool, day, after, until, batch_size).await? {
            samples += n;
            for (lo, hi, n) in cutter.feed(key, n) {
                out.emit(lo, hi, n).await?;
            }
        }
        let span = (until - day).num_days().max(1);
        days = (WINDOW_BATCHES * batch_size * span)
            .checked_div(samples)
            .unwrap_or(MAX_WINDOW_DAYS)
            .clamp(1, MAX_WINDOW_DAYS);
        match next_day(pool, Some(until), true, cutoff).await? {
            Some(d) => day = d,
            None => break,
        }
    }
    if let Some((lo, hi, n)) = cutter.close() {
        out.emit(lo, hi, n).await?;
    }
    Ok(())
}

/// The first day with eligible samples at (`inclusive`) or after `from`.
async fn next_day(
    pool: &PgPool,
    from: Option<DateTime<Utc>>,
    inclusive: bool,
    cutoff: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>> {
    let op = if inclusive { ">=" } else { ">" };
    let sql = format!(
        "SELECT min({DAY}) AT TIME ZONE 'UTC' FROM {METRICS}
         WHERE {DAY} {op} COALESCE($1 AT TIME ZONE 'UTC', '-infinity') AND {DAY} < ($2 AT TIME ZONE 'UTC')"
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(from)
        .bind(cutoff)
        .fetch_one(pool)
        .await?)
}

/// Cutting keys with their samples, in key order, for days in [`from`,
/// `until`) and keys above `after`. A day that fits in one batch comes as
/// one key, (day, the greatest id), which takes in every scenario of it; only
/// a day with more than `batch_size` samples comes as one key per scenario,
/// so that it can be split. Sparse days thus cost the planner one count
/// each, read off the index in order.
async fn key_counts(
    pool: &PgPool,
    from: DateTime<Utc>,
    after: Option<Key>,
    until: DateTime<Utc>,
    batch_size: i64,
) -> Result<Vec<(Key, i64)>> {
    let range = format!(
        "({DAY}, scenario_id) > {DAY_FROM_START}
         AND {DAY} >= ($3 AT TIME ZONE 'UTC') AND {DAY} < ($4 AT TIME ZONE 'UTC')"
    );
    let days = format!(
        "SELECT {DAY} AT TIME ZONE 'UTC' AS day, count(*) AS n FROM {METRICS}
         WHERE {range} GROUP BY {DAY} ORDER BY {DAY}"
    );
    // $1..$4 of both queries: the key to start after, and the window.
    fn bind_range<'q, O>(
        q: QueryAs<'q, Postgres, O, PgArguments>,
        from: DateTime<Utc>,
        after: Option<Key>,
        until: DateTime<Utc>,
    ) -> QueryAs<'q, Postgres, O, PgArguments> {
        q.bind(after.map(|k| k.ts))
            .bind(after.map(|k| k.id))
            .bind(from)
            .bind(until)
    }
    let days: Vec<(DateTime<Utc>, i64)> = bind_range(
        sqlx::query_as(sqlx::AssertSqlSafe(days)),
        from,
        after,
        until,
    )
    .fetch_all(pool)
    .await?;
    let big: Vec<DateTime<Utc>> = days
        .iter()
        .filter(|&&(_, n)| n > batch_size)
        .map(|&(d, _)| d)
        .collect();
    let mut split: Vec<(DateTime<Utc>, Uuid, i64)> = Vec::new();
    if !big.is_empty() {
        let sql = format!(
            "SELECT {DAY} AT TIME ZONE 'UTC', scenario_id, count(*) FROM {METRICS}
             WHERE {range} AND {DAY} = ANY(SELECT d AT TIME ZONE 'UTC' FROM unnest($5::timestamptz[]) d)
             GROUP BY {DAY}, scenario_id ORDER BY {DAY}, scenario_id"
        );
        split = bind_range(sqlx::query_as(sqlx::AssertSqlSafe(sql)), from, after, until)
            .bind(&big)
            .fetch_all(pool)
            .await?;
    }
    let mut split = split.into_iter().peekable();
    let mut keys = Vec::with_capacity(days.len() + split.len());
    for (day, n) in days {
        if n <= batch_size {
            keys.push((
                Key {
                    ts: day,
                    id: Uuid::max(),
                },
                n,
            ));
            continue;
        }
        while let Some((d, id, n)) = split.next_if(|&(d, _, _)| d == day) {
            keys.push((Key { ts: d, id }, n));
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn key(day: u32, s: u128) -> Key {
        Key {
            ts: Utc.with_ymd_and_hms(2024, 1, day, 0, 0, 0).unwrap(),
            id: Uuid::from_u128(s),
        }
    }

    #[test]
    fn batches_hold_whole_keys_and_stay_near_the_size() {
        let start = key(1, 0);
        let mut c = Cutter::new(10, start);
        let mut out = Vec::new();
        for (k, n) in [
            (key(2, 1), 4),
            (key(2, 2), 4),
            (key(2, 3), 4),
            (key(3, 1), 25),
            (key(4, 1), 3),
        ] {
            out.extend(c.feed(k, n));
        }
        out.extend(c.close());
        let expected = vec![
            (start, key(2, 2), 8),
            (key(2, 2), key(2, 3), 4),
            (key(2, 3), key(3, 1), 25), // one key larger than a batch: alone
            (key(3, 1), key(4, 1), 3),
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn every_key_lands_in_exactly_one_batch() {
        let mut c = Cutter::new(7, key(1, 0));
        let keys: Vec<(Key, i64)> = (1..=60)
            .map(|i| (key(2 + (i / 10) as u32, i as u128), (i % 5 + 1) as i64))
            .collect();
        let mut out = Vec::new();
        for &(k, n) in &keys {
            out.extend(c.feed(k, n));
        }
        out.extend(c.close());
        // Batches chain: each starts where the previous ended.
        for w in out.windows(2) {
            assert_eq!(w[0].1, w[1].0);
        }
        assert_eq!(
            out.iter().map(|b| b.2).sum::<i64>(),
            keys.iter().map(|k| k.1).sum::<i64>()
        );
        for (lo, hi, n) in &out {
            let inside: i64 = keys
                .iter()
                .filter(|(k, _)| k > lo && k <= hi)
                .map(|k| k.1)
                .sum();
            assert_eq!(inside, *n);
        }
    }
}
