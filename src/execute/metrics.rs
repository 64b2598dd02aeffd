//! Metrics (R2): reduce a chunk of a batch's samples to one archive row per
//! (scenario, type, name, unit, UTC day) and delete them, in one statement.
//! Chunks, like batches, are cut on (day, scenario_id) keys, so a group is
//! never split between two chunks.
//!
//! Exact and mergeable: each group's row has a deterministic id (an MD5 of
//! its key), and keeps `sample_count`, `value_sum`, `value_min` and
//! `value_max`. Samples that arrive later for a day already archived merge
//! into its row by adding counts and sums; `value` is always
//! `round(value_sum / sample_count, 6)`, never an average of averages.
//!
//! `extra_data` of an aggregate keeps the key/value pairs that every one of
//! its samples has, equal; a merge keeps the pairs both sides share. Nothing
//! is ever taken from one arbitrary sample.

use super::numeric;
use crate::error::Result;
use crate::ledger::{self, Batch, Counts, Key};
use crate::schema::{
    METRICS, METRICS_AGG_DIGEST, METRICS_ARCHIVE, METRICS_DAY as DAY, METRICS_KEYED, bind_range,
};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

/// Aggregates and deletes the samples of `batch`'s (day, scenario) range
/// `(from, upto]` that are older than its job's cut-off (a whole UTC day).
///
/// Most batches meet no archived row for their groups, and a plain INSERT
/// costs less than one that must be ready to merge (a speculative insertion
/// per row). So the batch first runs with a plain INSERT under a savepoint;
/// only if one of its groups already has a row (late samples for a day
/// archived before: a unique violation) is it rolled back to the savepoint
/// and run again with the merging INSERT.
pub async fn archive(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    from: Option<Key>,
    upto: Key,
) -> Result<Counts> {
    let range = Range { from, upto };
    sqlx::query("SAVEPOINT fresh_groups")
        .execute(&mut **tx)
        .await?;
    match run(tx, batch, range, false).await {
        Err(crate::Error::Db(e))
            if e.as_database_error()
                .is_some_and(|d| d.code().as_deref() == Some(UNIQUE_VIOLATION)) =>
        {
            sqlx::query("ROLLBACK TO SAVEPOINT fresh_groups")
                .execute(&mut **tx)
                .await?;
            tracing::debug!("groups already archived; merging");
            run(tx, batch, range, true).await
        }
        other => other,
    }
}

const UNIQUE_VIOLATION: &str = "23505";

/// A chunk's range: `(from, upto]`.
#[derive(Debug, Clone, Copy)]
struct Range {
    from: Option<Key>,
    upto: Key,
}

/// One statement: delete the samples, group them, insert (or with `merge`,
/// insert or merge) one archive row per group.
async fn run(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    range: Range,
    merge: bool,
) -> Result<Counts> {
    let group = "scenario_id, metric_type, metric_name, unit, day";
    let on_conflict = if merge { MERGE } else { "" };
    // Merging: the rows merged into, as they were before (every CTE reads
    // the statement's snapshot), summed per batch that wrote them.
    let (old, away) = if merge {
        (old_rows(), AWAY)
    } else {
        (String::new(), NO_AWAY)
    };
    let range_sql = METRICS_KEYED.range();
    let sql = format!(
        "WITH moved AS (
             DELETE FROM {METRICS} WHERE {range_sql}
             RETURNING scenario_id, metric_type, metric_name, unit, {DAY} AS day, value,
                       COALESCE(extra_data, '{{}}'::jsonb) AS extra_data
         ), g AS (
             SELECT {group}, count(*) AS n, sum(value) AS s, min(value) AS mn, max(value) AS mx,
                    array_agg(extra_data) AS ex
             FROM moved GROUP BY {group}
         ), {old}ins AS (
             INSERT INTO {METRICS_ARCHIVE} AS a
                 (id, scenario_id, \"timestamp\", metric_type, metric_name, value, unit, extra_data,
                  archived_at, archive_batch_id, is_aggregated, aggregation_period,
                  sample_count, value_sum, value_min, value_max)
             SELECT {GROUP_ID},
                    g.scenario_id, g.day AT TIME ZONE 'UTC', g.metric_type, g.metric_name,
                    round(g.s / g.n, 6), g.unit,
                    -- One sample, or all alike (the usual case): theirs. Else the pairs all share.
                    CASE WHEN g.n = 1 OR (SELECT bool_and(x = g.ex[1]) FROM unnest(g.ex) x) THEN g.ex[1]
                    ELSE COALESCE((SELECT jsonb_object_agg(p.key, p.value)
                                   FROM (SELECT e.key, e.value, count(*) AS c
                                         FROM unnest(g.ex) x, jsonb_each(x) e GROUP BY 1, 2) p
                                   WHERE p.c = g.n), '{{}}'::jsonb) END,
                    now(), $6, true, 'day', g.n, g.s, g.mn, g.mx
             FROM g
             {on_conflict}
             RETURNING sample_count, value_sum, {METRICS_AGG_DIGEST} AS digest
         )
         SELECT (SELECT count(*) FROM moved) AS samples, count(*) AS groups,
                COALESCE(sum(sample_count), 0)::bigint AS agg_samples,
                trunc(COALESCE(sum(value_sum), 0) * 1000000)::text AS value_sum_micros,
                COALESCE(sum(digest), 0)::text AS digest, {away}
         FROM ins"
    );
    let row = bind_range(
        sqlx::query(sqlx::AssertSqlSafe(sql)),
        range.from,
        range.upto,
        batch.cutoff,
    )
    .bind(batch.id)
    .fetch_one(&mut **tx)
    .await?;
    let samples: i64 = row.get("samples");
    if merge {
        let batches: Vec<Uuid> = row.get::<Option<_>, _>("away_batches").unwrap_or_default();
        let counts: Vec<i64> = row.get::<Option<_>, _>("away_samples").unwrap_or_default();
        let sums: Vec<String> = row.get::<Option<_>, _>("away_sums").unwrap_or_default();
        let digests: Vec<String> = row.get::<Option<_>, _>("away_digests").unwrap_or_default();
        let mut away = Vec::with_capacity(batches.len());
        for (((batch, samples), sum), digest) in
            batches.into_iter().zip(counts).zip(sums).zip(digests)
        {
            away.push(ledger::MergedAway {
                batch,
                samples,
                value_sum_micros: numeric(sum)?,
                digest: numeric(digest)?,
            });
        }
        ledger::move_merged(tx, &away).await?;
    }
    Ok(Counts {
        processed: samples,
        archived: row.get("groups"),
        deleted: samples,
        bytes: 0,
        digest: numeric(row.get("digest"))?,
        samples: row.get("agg_samples"),
        value_sum_micros: numeric(row.get("value_sum_micros"))?,
    })
}

/// An aggregate's id: an MD5 of its group's key (`g`'s columns).
const GROUP_ID: &str = "md5(concat_ws('|', g.scenario_id, g.metric_type, g.metric_name, g.unit, \
     to_char(g.day, 'YYYY-MM-DD')))::uuid";

/// The merging statement's rows merged into, before the merge: the batch
/// that wrote each, and what it held ([`run`]'s CTEs, after `g`).
fn old_rows() -> String {
    format!(
        "old AS (
             SELECT archive_batch_id AS batch, sample_count AS n, value_sum AS s,
                    {METRICS_AGG_DIGEST} AS d
             FROM {METRICS_ARCHIVE}
             WHERE (id, \"timestamp\") IN (SELECT {GROUP_ID}, g.day AT TIME ZONE 'UTC' FROM g)
               -- The chunk's days (`$1`, `$3`): the months outside it are
               -- pruned whatever join the planner picks.
               AND \"timestamp\" >= COALESCE($1, '-infinity'::timestamptz) AND \"timestamp\" <= $3
         ), away AS (
             SELECT batch, COALESCE(sum(n), 0)::bigint AS n,
                    trunc(COALESCE(sum(s), 0) * 1000000)::text AS s, COALESCE(sum(d), 0)::text AS d
             FROM old WHERE batch IS NOT NULL GROUP BY batch
         ), "
    )
}

/// [`old_rows`]'s sums per batch, as arrays in the statement's one row.
const AWAY: &str = "(SELECT array_agg(batch) FROM away) AS away_batches,
                (SELECT array_agg(n) FROM away) AS away_samples,
                (SELECT array_agg(s) FROM away) AS away_sums,
                (SELECT array_agg(d) FROM away) AS away_digests";

/// [`AWAY`] when nothing is merged.
const NO_AWAY: &str = "NULL::uuid[] AS away_batches";

/// How a group that already has an archive row merges into it: counts and
/// sums add up, `value` is recomputed from them, `extra_data` keeps the pairs
/// both sides share.
const MERGE: &str = r#"ON CONFLICT (id, "timestamp") DO UPDATE SET
                 sample_count = a.sample_count + EXCLUDED.sample_count,
                 value_sum = a.value_sum + EXCLUDED.value_sum,
                 value_min = LEAST(a.value_min, EXCLUDED.value_min),
                 value_max = GREATEST(a.value_max, EXCLUDED.value_max),
                 value = round((a.value_sum + EXCLUDED.value_sum) / (a.sample_count + EXCLUDED.sample_count), 6),
                 extra_data = COALESCE((SELECT jsonb_object_agg(e.key, e.value)
                                        FROM jsonb_each(a.extra_data) e
                                        WHERE EXCLUDED.extra_data -> e.key = e.value), '{}'::jsonb),
                 archived_at = now(),
                 archive_batch_id = EXCLUDED.archive_batch_id"#;
