-- Every event the ingest API refused, with the failing field paths and reasons (never the
-- values: they may be PII). Operators read it with `cdp ingest rejections`.
CREATE TABLE IF NOT EXISTS ingest_rejections (
    id          BIGSERIAL   PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    source      TEXT        NOT NULL,
    route       TEXT        NOT NULL,
    message_id  TEXT,
    errors      JSONB       NOT NULL
);
CREATE INDEX IF NOT EXISTS ingest_rejections_received_at ON ingest_rejections (received_at DESC);
