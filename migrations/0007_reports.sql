-- Reports (R3): what the archive keeps about each stored object, and a place
-- for per-item failures (a missing or refused file fails that report only).
ALTER TABLE reports_archive
    ADD COLUMN object_key        VARCHAR(500),
    ADD COLUMN stored_size_bytes BIGINT,
    ADD COLUMN sha256            VARCHAR(64),
    ADD COLUMN encoding          VARCHAR(10);

CREATE TABLE archive_item_failures (
    batch_id  UUID NOT NULL REFERENCES archive_batches (id),
    item_id   UUID NOT NULL,
    reason    TEXT NOT NULL,
    failed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, item_id)
);
CREATE INDEX archive_item_failures_item_idx ON archive_item_failures (item_id);
