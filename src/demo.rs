//! Realistic demo data, generated inside PostgreSQL: logs, metric samples and
//! reports (with small files on disk) spread evenly over a span of days. Used
//! by the README's demo, the tests and the benchmark.

use crate::error::Result;
use sqlx::PgPool;
use std::path::Path;

/// How much to load.
#[derive(Debug, Clone)]
pub struct DemoSize {
    /// Log rows.
    pub logs: i64,
    /// Metric samples.
    pub metrics: i64,
    /// Reports (each with a file).
    pub reports: i64,
    /// Scenarios the rows spread over.
    pub scenarios: i64,
    /// Days back from now that the data spans.
    pub span_days: i64,
}

impl Default for DemoSize {
    fn default() -> Self {
        DemoSize {
            logs: 200_000,
            metrics: 100_000,
            reports: 60,
            scenarios: 100,
            span_days: 3 * 365,
        }
    }
}

/// Inserts `n` log rows: ~200-character previews, 4 sources, times spread
/// evenly over `span_days` in arrival order (so the heap is in time order,
/// as a real log table's is). Row `g` belongs to scenario `g % scenarios`.
pub async fn load_logs(pool: &PgPool, n: i64, scenarios: i64, span_days: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO scenario_logs (id, scenario_id, received_at, message_hash, message_preview, source,
                                    size_bytes, has_pii, token_count, sqs_blocks)
         SELECT gen_random_uuid(),
                ('00000000-0000-0000-0000-' || lpad(to_hex(g % $2), 12, '0'))::uuid,
                -- arrival order, as in a real append-only table, ±30 min jitter
                now() - make_interval(days => $3::int) * (1 - g::float8 / $1)
                      + (random() - 0.5) * interval '1 hour',
                md5(g::text) || md5((g + 1)::text),
                repeat(md5((g * 7)::text), 6) || ' ' || substr(md5(g::text), 1, 10),
                (ARRAY['sqs', 'sns', 'lambda', 'api'])[1 + g % 4],
                100 + (g % 5000), (g % 17 = 0), 10 + g % 400, 1 + g % 4
         FROM generate_series(1, $1::bigint) g",
    )
    .bind(n)
    .bind(scenarios)
    .bind(span_days)
    .execute(pool)
    .await?;
    Ok(())
}

/// Inserts `n` metric samples: every scenario reports 5 metrics, times
/// spread evenly over `span_days` in arrival order (so the heap is in time
/// order, as a real append-only metrics table's is), ±30 min jitter, all at
/// least half an hour in the past. Sample `g` belongs to scenario
/// `g % scenarios` and metric `(g / scenarios) % 5`; `extra_data` names the
/// scenario's region.
pub async fn load_metrics(pool: &PgPool, n: i64, scenarios: i64, span_days: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO scenario_metrics (id, scenario_id, \"timestamp\", metric_type, metric_name, value, unit, extra_data)
         SELECT gen_random_uuid(),
                ('00000000-0000-0000-0000-' || lpad(to_hex(g % $2), 12, '0'))::uuid,
                now() - make_interval(days => $3::int) * (1 - g::float8 / $1)
                      + (random() - 0.5) * interval '1 hour' - interval '1 hour',
                'performance',
                (ARRAY['cpu', 'mem', 'latency', 'rps', 'errors'])[1 + (g / $2) % 5],
                round((random() * 1000)::numeric, 6),
                (ARRAY['percent', 'bytes', 'ms', 'count', 'count'])[1 + (g / $2) % 5],
                jsonb_build_object('region', (ARRAY['us-east-1', 'eu-west-1'])[1 + g % $2 % 2])
         FROM generate_series(1, $1::bigint) g",
    )
    .bind(n)
    .bind(scenarios)
    .bind(span_days)
    .execute(pool)
    .await?;
    Ok(())
}

/// Writes `n` report files (CSV and PDF-like) under `dir` and their rows.
pub async fn load_reports(
    pool: &PgPool,
    n: i64,
    scenarios: i64,
    span_days: i64,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        crate::error::Error::config("REPORTS_ROOT", format!("{}: {e}", dir.display()))
    })?;
    // Absolute paths, as the application records them.
    let dir = &dir.canonicalize().map_err(|e| {
        crate::error::Error::config("REPORTS_ROOT", format!("{}: {e}", dir.display()))
    })?;
    for i in 0..n {
        let (format, body) = if i % 3 == 0 {
            ("pdf", format!("%PDF-1.4\n% demo report {i}\n").repeat(200))
        } else {
            (
                "csv",
                (0..500)
                    .map(|r| format!("{r},{i},{},ok\n", r * i))
                    .collect(),
            )
        };
        let path = dir.join(format!("report-{i:05}.{format}"));
        std::fs::write(&path, &body).map_err(|e| {
            crate::error::Error::config("REPORTS_ROOT", format!("{}: {e}", path.display()))
        })?;
        sqlx::query(
            "INSERT INTO reports (scenario_id, format, file_path, file_size_bytes, generated_by, created_at)
             VALUES (('00000000-0000-0000-0000-' || lpad(to_hex($1::bigint % $2), 12, '0'))::uuid,
                     $3, $4, $5, 'demo', now() - make_interval(days => ($6::bigint * $7 / GREATEST($8, 1))::int))",
        )
        .bind(i)
        .bind(scenarios)
        .bind(format)
        .bind(path.to_string_lossy().to_string())
        .bind(body.len() as i64)
        .bind(i)
        .bind(span_days)
        .bind(n)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Loads all three kinds, then refreshes statistics and the visibility map
/// (so the planner's scan is index-only, as it is on a settled table).
pub async fn load(pool: &PgPool, size: &DemoSize, reports_dir: &Path) -> Result<()> {
    load_logs(pool, size.logs, size.scenarios, size.span_days).await?;
    load_metrics(pool, size.metrics, size.scenarios, size.span_days).await?;
    load_reports(
        pool,
        size.reports,
        size.scenarios,
        size.span_days,
        reports_dir,
    )
    .await?;
    sqlx::query("VACUUM ANALYZE scenario_logs")
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE scenario_metrics")
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE reports").execute(pool).await?;
    Ok(())
}
