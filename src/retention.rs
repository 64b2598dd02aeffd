//! Retention (R12): what is past its retention period leaves the archive.
//!
//! - `scenario_logs_archive` (7 years) and `scenario_metrics_archive`
//!   (5 years) lose whole monthly partitions: a partition goes only when its
//!   upper bound is at or before the cut-off, so no row younger than the
//!   retention period is ever dropped. Only partitions the archiver made
//!   (named `<table>_YYYY_MM` in the parent's schema, bounds exactly that
//!   UTC month) are touched; anything else is reported and left alone.
//! - `reports_archive` metadata (5 years, by `created_at`) is deleted once
//!   the report's local file is gone (`deleted_locally`): a row that still
//!   points at a local file is kept, so the file is never orphaned.
//!
//! A table with unfinished batches of its kind (pending, or dead awaiting a
//! redrive) is held back whole: such a batch may yet write into an old month. The run holds the planner's advisory
//! lock (no planner creates partitions meanwhile), drops each partition in a
//! short transaction with a lock timeout (retried, so the application never
//! queues behind it), and is recorded in `archive_jobs` as job type
//! `retention`.

use crate::config::Policy;
use crate::error::{Error, Result};
use crate::ledger;
use crate::partitions::{next_month, partition_name, retry_ddl};
use crate::schema;
use crate::vocabulary::{JobType, Kind};
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Retention periods, in years (the spec's by default), as `planner
/// retention` takes them.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Periods {
    /// Years `scenario_logs_archive` keeps.
    #[arg(long = "logs-years", env = "ARCHIVER_LOGS_RETENTION_YEARS", default_value_t = 7,
          value_parser = clap::value_parser!(i32).range(1..=100))]
    pub logs_years: i32,
    /// Years `scenario_metrics_archive` keeps.
    #[arg(long = "metrics-years", env = "ARCHIVER_METRICS_RETENTION_YEARS", default_value_t = 5,
          value_parser = clap::value_parser!(i32).range(1..=100))]
    pub metrics_years: i32,
    /// Years `reports_archive` keeps a report's metadata (by `created_at`).
    #[arg(long = "reports-metadata-years", env = "ARCHIVER_REPORTS_METADATA_RETENTION_YEARS",
          default_value_t = 5, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub reports_metadata_years: i32,
}

impl Periods {
    /// Each period must outlast the archive age of its kind, or rows would
    /// be dropped as soon as they are archived.
    pub fn check(&self, policy: &Policy) -> Result<()> {
        let checks = [
            (
                "--logs-years",
                self.logs_years,
                "--logs-age-days",
                policy.logs_age_days,
            ),
            (
                "--metrics-years",
                self.metrics_years,
                "--metrics-age-days",
                policy.metrics_age_days,
            ),
            (
                "--reports-metadata-years",
                self.reports_metadata_years,
                "--reports-age-days",
                policy.reports_age_days,
            ),
        ];
        for (flag, years, age_flag, age_days) in checks {
            if i64::from(years) * 365 <= i64::from(age_days) {
                return Err(Error::config(
                    flag,
                    format!(
                        "{years} year(s) does not outlast {age_flag} {age_days}: rows would be dropped as soon as they are archived"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// One monthly partition past retention.
#[derive(Debug, Clone)]
pub struct Expired {
    /// Its parent.
    pub table: &'static str,
    /// `<table>_YYYY_MM`.
    pub name: String,
    /// The UTC month it holds.
    pub month: DateTime<Utc>,
    /// The name to use in SQL: schema-qualified where the search path
    /// would not find it, quoted where needed (`oid::regclass`).
    qualified: String,
    /// Its rows: counted by a dry run, and as it is dropped.
    pub rows: i64,
    /// Its size on disk, indexes included.
    pub bytes: i64,
}

/// What a retention run finds (a dry run) or does.
#[derive(Debug, Default)]
pub struct Findings {
    /// Per archive table: (table, retention years, cut-off).
    pub cutoffs: Vec<(&'static str, i32, DateTime<Utc>)>,
    /// Partitions past retention (dropped, unless a dry run).
    pub expired: Vec<Expired>,
    /// Why a table or partition was left alone.
    pub held: Vec<String>,
    /// `reports_archive` rows past retention whose file is gone.
    pub report_rows: i64,
    /// Rows past retention kept because their local file is still there.
    pub report_rows_held: i64,
    /// The `archive_jobs` row of the run (none for a dry run).
    pub job: Option<Uuid>,
    /// Rows actually removed so far (what the job row records).
    pub removed: i64,
}

impl Findings {
    /// Rows found past retention (a dry run's estimate of what a run removes).
    pub fn rows(&self) -> i64 {
        self.expired.iter().map(|e| e.rows).sum::<i64>() + self.report_rows
    }
}

/// The archive tables that lose partitions, with their kind and period.
fn tables(p: &Periods) -> [(&'static str, Kind, i32); 2] {
    [
        (schema::LOGS_ARCHIVE, Kind::Logs, p.logs_years),
        (schema::METRICS_ARCHIVE, Kind::Metrics, p.metrics_years),
    ]
}

/// Finds what is past retention and, unless `dry_run`, removes it. The
/// caller holds the planner lock.
pub async fn run(pool: &PgPool, periods: &Periods, dry_run: bool) -> Result<Findings> {
    let mut f = Findings::default();
    for (table, kind, years) in tables(periods) {
        let cutoff = cutoff(pool, years).await?;
        f.cutoffs.push((table, years, cutoff));
        let (expired, mut held) = expired_partitions(pool, table, cutoff, dry_run).await?;
        let open = ledger::unfinished_batches(pool, kind).await?;
        if open > 0 && !expired.is_empty() {
            held.push(format!(
                "{table}: {} partition(s) past retention kept: {open} {kind} batch(es) are not done (pending or dead); run again once they are",
                expired.len()
            ));
        } else {
            f.expired.extend(expired);
        }
        f.held.extend(held);
    }
    let (rows, rows_held) = report_rows(pool, periods.reports_metadata_years).await?;
    f.report_rows = rows;
    f.report_rows_held = rows_held;
    if dry_run {
        return Ok(f);
    }
    ledger::close_interrupted(pool, JobType::Retention).await?;
    let job = ledger::start_retention_job(pool).await?;
    f.job = Some(job);
    match remove(pool, periods, &mut f).await {
        Ok(()) => {
            ledger::finish_retention_job(pool, job, f.removed, None).await?;
            Ok(f)
        }
        Err(e) => {
            if let Err(also) =
                ledger::finish_retention_job(pool, job, f.removed, Some(&e.to_string())).await
            {
                tracing::error!(%job, "could not record the retention job's failure: {also}");
            }
            Err(e)
        }
    }
}

async fn cutoff(pool: &PgPool, years: i32) -> Result<DateTime<Utc>> {
    Ok(
        sqlx::query_scalar("SELECT now() - make_interval(years => $1)")
            .bind(years)
            .fetch_one(pool)
            .await?,
    )
}

/// `scenario_logs_archive_2019_03` → 2019-03-01T00:00:00Z.
fn month_of(table: &str, name: &str) -> Option<DateTime<Utc>> {
    let suffix = name.strip_prefix(table)?.strip_prefix('_')?;
    let (y, m) = suffix.split_once('_')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let d = NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)?;
    Some(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0)?))
}

/// The bound PostgreSQL prints (in UTC) for the partition of `month`.
fn expected_bound(month: DateTime<Utc>) -> String {
    let f = "%Y-%m-%d %H:%M:%S+00";
    format!(
        "FOR VALUES FROM ('{}') TO ('{}')",
        month.format(f),
        next_month(month).format(f)
    )
}

/// The archiver's partitions of `table` whose whole range is before
/// `cutoff`, and the reasons any other child was left alone.
async fn expired_partitions(
    pool: &PgPool,
    table: &'static str,
    cutoff: DateTime<Utc>,
    count_rows: bool,
) -> Result<(Vec<Expired>, Vec<String>)> {
    // Bounds are printed in the session's time zone: UTC for this
    // transaction, whatever the server's or the URL's setting.
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL TIME ZONE 'UTC'")
        .execute(&mut *tx)
        .await?;
    let children = sqlx::query(
        "SELECT c.relname::text AS name, c.oid::regclass::text AS qualified,
                pg_get_expr(c.relpartbound, c.oid) AS bound,
                pg_total_relation_size(c.oid) AS bytes,
                c.relnamespace = p.relnamespace AS same_schema
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                            JOIN pg_class p ON p.oid = i.inhparent
         WHERE i.inhparent = to_regclass($1)
         ORDER BY c.relname",
    )
    .bind(table)
    .fetch_all(&mut *tx)
    .await?;
    let (mut expired, mut held) = (Vec::new(), Vec::new());
    for row in children {
        let name: String = row.get("name");
        let bound: Option<String> = row.get("bound");
        let Some(month) = month_of(table, &name) else {
            held.push(format!(
                "{name}: not a monthly partition of the archiver; left alone"
            ));
            continue;
        };
        if !row.get::<bool, _>("same_schema") {
            held.push(format!("{name}: not in the schema of {table}; left alone"));
            continue;
        }
        if bound.as_deref() != Some(expected_bound(month).as_str())
            || partition_name(table, month) != name
        {
            held.push(format!(
                "{name}: its bounds ({}) are not the UTC month its name says; left alone",
                bound.unwrap_or_default()
            ));
            continue;
        }
        if next_month(month) <= cutoff {
            let qualified: String = row.get("qualified");
            // A real run counts each partition as it drops it.
            let rows = if count_rows {
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM {qualified}"
                )))
                .fetch_one(&mut *tx)
                .await?
            } else {
                0
            };
            expired.push(Expired {
                table,
                name,
                month,
                qualified,
                rows,
                bytes: row.get("bytes"),
            });
        }
    }
    tx.commit().await?;
    Ok((expired, held))
}

/// `reports_archive` rows past retention: (file gone, file still there).
async fn report_rows(pool: &PgPool, years: i32) -> Result<(i64, i64)> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE deleted_locally) AS gone,
                count(*) FILTER (WHERE NOT deleted_locally) AS kept
         FROM reports_archive WHERE created_at < now() - make_interval(years => $1)",
    )
    .bind(years)
    .fetch_one(pool)
    .await?;
    Ok((row.get("gone"), row.get("kept")))
}

async fn remove(pool: &PgPool, periods: &Periods, f: &mut Findings) -> Result<()> {
    for e in &mut f.expired {
        e.rows = drop_partition(pool, e, f.job).await?;
        f.removed += e.rows;
        tracing::info!(partition = %e.name, rows = e.rows, "dropped a partition past retention");
    }
    f.report_rows = delete_report_rows(pool, periods.reports_metadata_years).await?;
    f.removed += f.report_rows;
    Ok(())
}

/// Counts and drops one partition in a short transaction, recording the
/// drop in `archive_dropped_partitions` (parent table, month, this run's
/// job) in the same commit, so `planner verify` can tell a month dropped
/// by policy from rows gone missing. Dropping a partition locks its
/// parent: wait at most 2 s for it, and retry rather than queue the
/// archive's readers behind us.
async fn drop_partition(pool: &PgPool, e: &Expired, job: Option<Uuid>) -> Result<i64> {
    let (table, name) = (e.table, e.qualified.as_str());
    let attempt = || async {
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {name}")))
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
            .execute(&mut *tx)
            .await?;
        // A month dropped again (a late row made its partition anew): the
        // latest drop is the one on record.
        sqlx::query(
            "INSERT INTO archive_dropped_partitions (table_name, month, job_id)
             VALUES ($1, ($2 AT TIME ZONE 'UTC')::date, $3)
             ON CONFLICT (table_name, month)
             DO UPDATE SET job_id = EXCLUDED.job_id, dropped_at = now()",
        )
        .bind(table)
        .bind(e.month)
        .bind(job)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<_, Error>(rows)
    };
    retry_ddl(&format!("dropping {name} of {table}"), attempt).await
}

/// Deletes, 10,000 at a time, the metadata rows past retention whose local
/// file is gone.
async fn delete_report_rows(pool: &PgPool, years: i32) -> Result<i64> {
    let mut total = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM reports_archive WHERE id IN (
                 SELECT id FROM reports_archive
                 WHERE created_at < now() - make_interval(years => $1) AND deleted_locally
                 LIMIT 10000)",
        )
        .bind(years)
        .execute(pool)
        .await?
        .rows_affected();
        total += n as i64;
        if n == 0 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_archivers_monthly_names_parse() {
        let t = "scenario_logs_archive";
        assert_eq!(
            month_of(t, "scenario_logs_archive_2019_03"),
            Some(Utc.with_ymd_and_hms(2019, 3, 1, 0, 0, 0).unwrap())
        );
        assert_eq!(month_of(t, "scenario_logs_archive_2019_13"), None);
        assert_eq!(month_of(t, "scenario_logs_archive_2019_3"), None);
        assert_eq!(month_of(t, "scenario_logs_archive_old"), None);
        assert_eq!(month_of(t, "scenario_metrics_archive_2019_03"), None);
    }

    #[test]
    fn the_expected_bound_is_one_utc_month() {
        let m = Utc.with_ymd_and_hms(2019, 12, 1, 0, 0, 0).unwrap();
        assert_eq!(
            expected_bound(m),
            "FOR VALUES FROM ('2019-12-01 00:00:00+00') TO ('2020-01-01 00:00:00+00')"
        );
    }
}
