-- The projector's outbox of records other than profile snapshots: its answers to erasures
-- (ErasureApplied on the compliance topic), relayed by cdp_runtime::outbox. Only erasure
-- batches write it, and they hold the merge lock exclusively, so seq follows commit order.
CREATE TABLE projector_outbox (
    seq     BIGSERIAL PRIMARY KEY,
    topic   TEXT      NOT NULL,
    key     BYTEA,
    value   BYTEA,
    headers BYTEA     NOT NULL DEFAULT ''  -- see cdp_runtime::outbox::encode_headers
);

CREATE TABLE projector_outbox_relay (
    one   BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    dirty BOOLEAN NOT NULL
);
INSERT INTO projector_outbox_relay (dirty) VALUES (false);
