//! The query API (R10): a scenario's logs, live only or with the archive, as
//! whole typed rows (the spec's Python example returned only first columns).

use crate::error::Result;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// One log row, live or archived.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LogRow {
    /// Row id.
    pub id: Uuid,
    /// Scenario.
    pub scenario_id: Uuid,
    /// When the application received it.
    pub received_at: DateTime<Utc>,
    /// Message hash.
    pub message_hash: String,
    /// Up to 500 characters of the message.
    pub message_preview: Option<String>,
    /// Source system.
    pub source: String,
    /// Message size.
    pub size_bytes: i32,
    /// Contains personal data.
    pub has_pii: bool,
    /// Tokens.
    pub token_count: i32,
    /// SQS blocks.
    pub sqs_blocks: i32,
    /// When it was archived; `None` while live.
    pub archived_at: Option<DateTime<Utc>>,
    /// Whether it comes from the archive.
    pub is_archived: bool,
}

/// Whether to look in the archive too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only `scenario_logs` (faster).
    Live,
    /// `v_scenario_logs_all`: live and archived.
    WithArchive,
}

/// A scenario's logs, newest first, at most `limit`.
pub async fn get_logs(
    pool: &PgPool,
    scenario_id: Uuid,
    scope: Scope,
    limit: i64,
) -> Result<Vec<LogRow>> {
    let sql = match scope {
        Scope::Live => {
            "SELECT id, scenario_id, received_at, message_hash, message_preview, source, size_bytes,
                    has_pii, token_count, sqs_blocks, NULL::timestamptz AS archived_at, false AS is_archived
             FROM scenario_logs WHERE scenario_id = $1 ORDER BY received_at DESC, id LIMIT $2"
        }
        Scope::WithArchive => {
            "SELECT id, scenario_id, received_at, message_hash, message_preview, source, size_bytes,
                    has_pii, token_count, sqs_blocks, archived_at, is_archived
             FROM v_scenario_logs_all WHERE scenario_id = $1 ORDER BY received_at DESC, id LIMIT $2"
        }
    };
    Ok(sqlx::query_as(sql)
        .bind(scenario_id)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// One metric row: a live sample, or an archived daily aggregate.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct MetricRow {
    /// Row id (deterministic per group for aggregates).
    pub id: Uuid,
    /// Scenario.
    pub scenario_id: Uuid,
    /// Sample time, or the UTC day's start for an aggregate.
    pub timestamp: DateTime<Utc>,
    /// Metric type.
    pub metric_type: String,
    /// Metric name.
    pub metric_name: String,
    /// The value, or the aggregate's average (6 decimals).
    pub value: sqlx::types::BigDecimal,
    /// Unit.
    pub unit: String,
    /// Extra data (for an aggregate: the pairs all its samples share).
    pub extra_data: Option<serde_json::Value>,
    /// When it was archived; `None` while live.
    pub archived_at: Option<DateTime<Utc>>,
    /// A daily aggregate.
    pub is_aggregated: Option<bool>,
    /// Comes from the archive.
    pub is_archived: bool,
    /// Samples it stands for (1 for a live sample).
    pub sample_count: Option<i32>,
}

/// A scenario's metrics at or after `since`, oldest first, at most `limit`.
pub async fn get_metrics(
    pool: &PgPool,
    scenario_id: Uuid,
    scope: Scope,
    since: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<MetricRow>> {
    let sql = match scope {
        Scope::Live => {
            r#"SELECT id, scenario_id, "timestamp", metric_type, metric_name, value, unit, extra_data,
                      NULL::timestamptz AS archived_at, false AS is_aggregated, false AS is_archived,
                      1 AS sample_count
               FROM scenario_metrics WHERE scenario_id = $1 AND "timestamp" >= $2
               ORDER BY "timestamp", id LIMIT $3"#
        }
        Scope::WithArchive => {
            r#"SELECT id, scenario_id, "timestamp", metric_type, metric_name, value, unit, extra_data,
                      archived_at, is_aggregated, is_archived, sample_count
               FROM v_scenario_metrics_all WHERE scenario_id = $1 AND "timestamp" >= $2
               ORDER BY "timestamp", id LIMIT $3"#
        }
    };
    Ok(sqlx::query_as(sql)
        .bind(scenario_id)
        .bind(since)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}
