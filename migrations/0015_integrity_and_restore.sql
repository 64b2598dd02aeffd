-- Integrity (planner verify) and restore (planner restore): what each batch
-- put in the archive, what was later taken back out of it, and why a month
-- may be gone.
--
-- content_digest: the sum (exact, NUMERIC) of a 64-bit hash of every
-- column of every row the batch wrote to the archive (schema::LOGS_ROW_DIGEST
-- for logs; the aggregates' digest for metrics), computed in the statement
-- that moves them and added up chunk by chunk. A sum, not a XOR: order does
-- not matter, and a row counted twice does not cancel out. NULL on batches
-- recorded before this migration: they have nothing to verify against.
-- samples_value_sum: a metrics batch's samples' value sum (its samples'
-- count is rows_deleted).
-- restored_rows / restored_digest: rows a restore took back out of the
-- archive from this batch, and their digest; verify expects the archive to
-- hold what the batch wrote minus what was restored.
ALTER TABLE archive_batches
    ADD COLUMN content_digest NUMERIC,
    ADD COLUMN samples_value_sum NUMERIC,
    ADD COLUMN restored_rows BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN restored_digest NUMERIC NOT NULL DEFAULT 0;
ALTER TABLE archive_batches
    ALTER COLUMN content_digest SET DEFAULT 0,
    ALTER COLUMN samples_value_sum SET DEFAULT 0;

-- A restore's batches are keyset ranges over the archive, executed like any
-- other batch.
ALTER TABLE archive_batches DROP CONSTRAINT archive_batches_kind_check;
ALTER TABLE archive_batches ADD CONSTRAINT archive_batches_kind_check
    CHECK (kind IN ('logs', 'metrics', 'reports', 'restore'));

-- A restore (job type 'restore'): what it brings back, and the hold that
-- keeps the restored rows out of archiving until hold_until (a hold of 0
-- days: hold_until is the restore's start, no hold).
CREATE TABLE archive_restores (
    job_id      UUID PRIMARY KEY REFERENCES archive_jobs (id),
    kind        VARCHAR(20) NOT NULL CHECK (kind = 'logs'),
    scenario_id UUID NOT NULL,
    from_ts     TIMESTAMPTZ,          -- inclusive; NULL: from the oldest row
    to_ts       TIMESTAMPTZ,          -- exclusive; NULL: to the newest row
    hold_until  TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (from_ts IS NULL OR to_ts IS NULL OR from_ts < to_ts)
);
CREATE INDEX archive_restores_hold_idx ON archive_restores (hold_until);

-- Archive partitions retention dropped, so verify can tell a month dropped
-- by policy from rows gone missing.
CREATE TABLE archive_dropped_partitions (
    table_name VARCHAR(63) NOT NULL,
    month      DATE NOT NULL,
    job_id     UUID REFERENCES archive_jobs (id),
    dropped_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, month)
);
