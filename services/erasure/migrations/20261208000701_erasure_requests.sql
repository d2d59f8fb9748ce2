-- Erasure requests and their state machine: requested -> scoped -> completed, or refused
-- (a cluster over the size limit without force). The one place who asked and why are kept:
-- the log carries only the request id and tokens.
CREATE TABLE erasure_requests (
    request_id      UUID        PRIMARY KEY,
    state           TEXT        NOT NULL CHECK (state IN ('requested', 'scoped', 'completed', 'refused')),
    requested_by    TEXT        NOT NULL,
    reason          TEXT,
    -- Vault digests of the identifiers the request named, so that one the vault did not
    -- know yet is suppressed and one it tokenizes meanwhile is erased too. Held only until
    -- the request is scoped, then set to NULL.
    named           BYTEA[],
    suppress        BOOLEAN     NOT NULL,
    force           BOOLEAN     NOT NULL,
    requested_at    TIMESTAMPTZ NOT NULL,
    due_at          TIMESTAMPTZ NOT NULL,
    scoped_at       TIMESTAMPTZ,
    completed_at    TIMESTAMPTZ,
    outcome         TEXT,
    profiles        INT,
    tokens          INT,
    refused_links   BIGINT,
    keys_destroyed  BIGINT,
    vault_rows      BIGINT,
    suppressed      BIGINT,
    -- The services whose ErasureApplied completes the request.
    awaiting        TEXT[]      NOT NULL DEFAULT '{}'
);
CREATE INDEX erasure_requests_open ON erasure_requests (requested_at) WHERE state IN ('requested', 'scoped');

-- Each service's answer to a scoped request.
CREATE TABLE erasure_acks (
    request_id   UUID        NOT NULL,
    service      TEXT        NOT NULL,
    rows_deleted BIGINT      NOT NULL,
    tombstones   BIGINT      NOT NULL,
    stores       JSONB       NOT NULL,
    acked_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, service)
);

CREATE TABLE erasure_outbox (
    seq     BIGSERIAL PRIMARY KEY,
    topic   TEXT      NOT NULL,
    key     BYTEA,
    value   BYTEA,
    headers BYTEA     NOT NULL DEFAULT ''  -- see cdp_runtime::outbox::encode_headers
);

CREATE TABLE erasure_outbox_relay (
    one   BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    dirty BOOLEAN NOT NULL
);
INSERT INTO erasure_outbox_relay (dirty) VALUES (false);
