-- archiver schema: the application's hot tables (only when absent), the
-- month-partitioned archive tables, the job/batch ledger and the views.
-- Corrected against the spec per DESIGN.md's errata: partitions by RANGE on the
-- time column itself (1, 9), primary keys that include it (2),
-- gen_random_uuid() (3), BIGINT sizes and counters (5), a growth view (4).

-- Hot tables, as mockupAWS has them. IF NOT EXISTS makes this a no-op on an
-- existing application database.
CREATE TABLE IF NOT EXISTS scenario_logs (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    scenario_id     UUID NOT NULL,
    received_at     TIMESTAMPTZ NOT NULL,
    message_hash    VARCHAR(64) NOT NULL,
    message_preview VARCHAR(500),
    source          VARCHAR(100) NOT NULL,
    size_bytes      INTEGER NOT NULL,
    has_pii         BOOLEAN NOT NULL,
    token_count     INTEGER NOT NULL,
    sqs_blocks      INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS scenario_metrics (
    id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    scenario_id UUID NOT NULL,
    "timestamp" TIMESTAMPTZ NOT NULL,
    metric_type VARCHAR(50) NOT NULL,
    metric_name VARCHAR(100) NOT NULL,
    value       DECIMAL(15,6) NOT NULL,
    unit        VARCHAR(20) NOT NULL,
    extra_data  JSONB DEFAULT '{}'
);

CREATE TABLE IF NOT EXISTS reports (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    scenario_id     UUID NOT NULL,
    format          VARCHAR(10) NOT NULL,
    file_path       VARCHAR(500) NOT NULL,
    file_size_bytes BIGINT,
    generated_by    VARCHAR(100),
    extra_data      JSONB DEFAULT '{}',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Archive tables. Monthly partitions (<table>_YYYY_MM, UTC month bounds) are
-- created by the planner ahead of the batches that need them, in short
-- transactions of their own, never inside a batch.
CREATE TABLE scenario_logs_archive (
    id               UUID NOT NULL,
    scenario_id      UUID NOT NULL,
    received_at      TIMESTAMPTZ NOT NULL,
    message_hash     VARCHAR(64) NOT NULL,
    message_preview  VARCHAR(500),
    source           VARCHAR(100) NOT NULL,
    size_bytes       INTEGER NOT NULL,
    has_pii          BOOLEAN NOT NULL,
    token_count      INTEGER NOT NULL,
    sqs_blocks       INTEGER NOT NULL,
    archived_at      TIMESTAMPTZ DEFAULT NOW(),
    archive_batch_id UUID,
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);
CREATE INDEX scenario_logs_archive_scenario_idx
    ON scenario_logs_archive (scenario_id, received_at DESC);

-- value_sum/min/max keep what exact merging of late samples needs (erratum 7).
CREATE TABLE scenario_metrics_archive (
    id                 UUID NOT NULL,
    scenario_id        UUID NOT NULL,
    "timestamp"        TIMESTAMPTZ NOT NULL,
    metric_type        VARCHAR(50) NOT NULL,
    metric_name        VARCHAR(100) NOT NULL,
    value              DECIMAL(15,6) NOT NULL,
    unit               VARCHAR(20) NOT NULL,
    extra_data         JSONB DEFAULT '{}',
    archived_at        TIMESTAMPTZ DEFAULT NOW(),
    archive_batch_id   UUID,
    is_aggregated      BOOLEAN DEFAULT FALSE,
    aggregation_period VARCHAR(20),
    sample_count       INTEGER,
    value_sum          NUMERIC,
    value_min          DECIMAL(15,6),
    value_max          DECIMAL(15,6),
    PRIMARY KEY (id, "timestamp")
) PARTITION BY RANGE ("timestamp");
CREATE INDEX scenario_metrics_archive_scenario_idx
    ON scenario_metrics_archive (scenario_id, "timestamp");

CREATE TABLE reports_archive (
    id               UUID PRIMARY KEY,
    scenario_id      UUID NOT NULL,
    format           VARCHAR(10) NOT NULL,
    file_path        VARCHAR(500) NOT NULL,
    file_size_bytes  BIGINT,
    generated_by     VARCHAR(100),
    extra_data       JSONB DEFAULT '{}',
    created_at       TIMESTAMPTZ NOT NULL,
    archived_at      TIMESTAMPTZ DEFAULT NOW(),
    s3_location      VARCHAR(500),
    deleted_locally  BOOLEAN DEFAULT FALSE,
    archive_batch_id UUID
);
CREATE INDEX reports_archive_scenario_idx ON reports_archive (scenario_id, created_at);

-- One row per job type per planner run (the spec's table; counters BIGINT so
-- a year of backlog cannot overflow them). The columns after created_at are
-- the archiver's own: the policy cut-off every batch of the job honours, and
-- the batch counts that let the last batch close the job.
CREATE TABLE archive_jobs (
    id                UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    job_type          VARCHAR(50) NOT NULL,
    status            VARCHAR(50) NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    started_at        TIMESTAMPTZ,
    completed_at      TIMESTAMPTZ,
    records_processed BIGINT DEFAULT 0,
    records_archived  BIGINT DEFAULT 0,
    records_deleted   BIGINT DEFAULT 0,
    bytes_archived    BIGINT DEFAULT 0,
    error_message     TEXT,
    created_at        TIMESTAMPTZ DEFAULT NOW(),
    cutoff            TIMESTAMPTZ,
    batch_size        INTEGER,
    transport         VARCHAR(20),
    batches_planned   INTEGER NOT NULL DEFAULT 0,
    batches_done      INTEGER NOT NULL DEFAULT 0,
    planning_done     BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX archive_jobs_type_status_idx ON archive_jobs (job_type, status);
CREATE INDEX archive_jobs_started_idx ON archive_jobs (started_at DESC);

-- The batch ledger: the authority on what a message may do. A batch is a
-- keyset range (lo, hi] over the kind's ordering key: (received_at, id) for
-- logs, (created_at, id) for reports, (day, scenario_id) for metrics. A NULL
-- lower bound means "from the start". Its id is the archive_batch_id stamped
-- on every row it archives.
CREATE TABLE archive_batches (
    id             UUID PRIMARY KEY,
    job_id         UUID NOT NULL REFERENCES archive_jobs (id),
    kind           VARCHAR(20) NOT NULL CHECK (kind IN ('logs', 'metrics', 'reports')),
    seq            INTEGER NOT NULL,
    lo_ts          TIMESTAMPTZ,
    lo_id          UUID,
    hi_ts          TIMESTAMPTZ NOT NULL,
    hi_id          UUID,
    planned_rows   BIGINT NOT NULL,
    status         VARCHAR(20) NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'done', 'dead')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    rows_archived  BIGINT NOT NULL DEFAULT 0,
    rows_deleted   BIGINT NOT NULL DEFAULT 0,
    bytes_archived BIGINT NOT NULL DEFAULT 0,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at   TIMESTAMPTZ,
    completed_at   TIMESTAMPTZ,
    UNIQUE (job_id, seq)
);
-- Unfinished batches are few and looked up by kind (high-water mark, rescue).
CREATE INDEX archive_batches_open_idx ON archive_batches (kind, hi_ts, hi_id)
    WHERE status <> 'done';
-- Lets the last batch of a job check for dead siblings without a scan.
CREATE INDEX archive_batches_dead_idx ON archive_batches (job_id) WHERE status = 'dead';
CREATE INDEX archive_batches_completed_idx ON archive_batches (completed_at)
    WHERE status = 'done';

-- Unified views, as in the spec.
CREATE VIEW v_scenario_logs_all AS
SELECT id, scenario_id, received_at, message_hash, message_preview, source, size_bytes,
       has_pii, token_count, sqs_blocks, NULL::timestamptz AS archived_at, false AS is_archived
FROM scenario_logs
UNION ALL
SELECT id, scenario_id, received_at, message_hash, message_preview, source, size_bytes,
       has_pii, token_count, sqs_blocks, archived_at, true AS is_archived
FROM scenario_logs_archive;

CREATE VIEW v_scenario_metrics_all AS
SELECT id, scenario_id, "timestamp", metric_type, metric_name, value, unit, extra_data,
       NULL::timestamptz AS archived_at, false AS is_aggregated, false AS is_archived
FROM scenario_metrics
UNION ALL
SELECT id, scenario_id, "timestamp", metric_type, metric_name, value, unit, extra_data,
       archived_at, is_aggregated, true AS is_archived
FROM scenario_metrics_archive;

-- The spec's statistics view. archived_at (the newest archival of each type)
-- is added at the end so the spec's "archive growth" query runs unchanged;
-- that query counts rows of this view, not archived records, so the real
-- answer to "how did the archive grow" is v_archive_growth below (erratum 4).
CREATE VIEW v_archive_statistics AS
SELECT 'logs' AS archive_type, COUNT(*) AS total_records, MIN(received_at) AS oldest_record,
       MAX(received_at) AS newest_record, SUM(size_bytes)::numeric AS total_bytes,
       MAX(archived_at) AS archived_at
FROM scenario_logs_archive
UNION ALL
SELECT 'metrics', COUNT(*), MIN("timestamp"), MAX("timestamp"), 0::numeric, MAX(archived_at)
FROM scenario_metrics_archive
UNION ALL
SELECT 'reports', COUNT(*), MIN(created_at), MAX(created_at), SUM(file_size_bytes)::numeric,
       MAX(archived_at)
FROM reports_archive;

-- Archive growth by month of archival and type, from the batch ledger.
CREATE VIEW v_archive_growth AS
SELECT date_trunc('month', completed_at) AS archive_month,
       kind AS archive_type,
       SUM(rows_archived) AS records_archived,
       SUM(bytes_archived) AS bytes_archived
FROM archive_batches
WHERE status = 'done'
GROUP BY 1, 2;
