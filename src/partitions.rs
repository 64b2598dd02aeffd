//! Monthly range partitions of the archive tables, named `<table>_YYYY_MM`
//! with UTC month bounds. Created ahead of the batches that need them, each in
//! a short transaction of its own: creating a partition locks the parent, so
//! it must never happen inside a batch.

use crate::error::{Class, Error, Result};
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use sqlx::PgPool;

/// The first instant of the UTC month holding `t`.
pub fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    let d = NaiveDate::from_ymd_opt(t.year(), t.month(), 1).expect("day 1 exists");
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

/// The first instant of the following UTC month.
pub fn next_month(t: DateTime<Utc>) -> DateTime<Utc> {
    let m = month_start(t);
    let (y, mo) = if m.month() == 12 {
        (m.year() + 1, 1)
    } else {
        (m.year(), m.month() + 1)
    };
    Utc.from_utc_datetime(
        &NaiveDate::from_ymd_opt(y, mo, 1)
            .expect("day 1 exists")
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists"),
    )
}

/// `scenario_logs_archive` + March 2025 → `scenario_logs_archive_2025_03`.
pub fn partition_name(table: &str, month: DateTime<Utc>) -> String {
    format!("{table}_{:04}_{:02}", month.year(), month.month())
}

/// Makes sure `table` has a partition for every month from `from` to `to`
/// inclusive. Returns how many it created.
pub async fn ensure_months(
    pool: &PgPool,
    table: &'static str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<usize> {
    let mut created = 0;
    let mut month = month_start(from);
    while month <= to {
        let name = partition_name(table, month);
        // NULL: no such relation; false: a relation that is not our partition.
        let attached: Option<bool> = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = c.oid AND inhparent = to_regclass($2))
             FROM pg_class c WHERE c.oid = to_regclass($1)",
        )
        .bind(&name)
        .bind(table)
        .fetch_optional(pool)
        .await?;
        if attached == Some(false) {
            return Err(Error::Schema(format!(
                "{name} exists but is not a partition of {table}; rename it or attach it"
            )));
        }
        if attached.is_none() {
            create(pool, table, &name, month).await?;
            created += 1;
        }
        month = next_month(month);
    }
    if created > 0 {
        tracing::info!("created {created} monthly partition(s) of {table}");
    }
    Ok(created)
}

async fn create(pool: &PgPool, table: &str, name: &str, month: DateTime<Utc>) -> Result<()> {
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ('{}') TO ('{}')",
        month.format("%Y-%m-%d %H:%M:%S+00"),
        next_month(month).format("%Y-%m-%d %H:%M:%S+00"),
    );
    let attempt = || async {
        let mut tx = pool.begin().await?;
        // Wait briefly for workers of an earlier job that are writing to the
        // parent; give up and retry rather than queue the application behind us.
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(ddl.clone()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok::<_, Error>(())
    };
    retry_ddl(&format!("creating partition {name}"), attempt).await?;
    tracing::debug!("created partition {name}");
    Ok(())
}

/// Runs `attempt`, a short DDL transaction that waits briefly for its
/// locks, again with jittered backoff (8 times at most) while its failure
/// may pass: a lock timeout, a lost connection.
pub(crate) async fn retry_ddl<T, F, Fut>(what: &str, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_jitter()
                .with_max_times(8),
        )
        .when(|e: &Error| e.class() != Class::Permanent)
        .notify(|e, d| tracing::warn!("{what}: {e}; retrying in {d:?}"))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_roll_over_years_in_utc() {
        let t = Utc.with_ymd_and_hms(2025, 12, 31, 23, 59, 59).unwrap();
        assert_eq!(
            month_start(t),
            Utc.with_ymd_and_hms(2025, 12, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            next_month(t),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            partition_name("scenario_logs_archive", t),
            "scenario_logs_archive_2025_12"
        );
    }
}
