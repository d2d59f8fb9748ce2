-- Barriers (cdp_runtime::outbox::Release): a barrier row leaves the outbox alone, after
-- every earlier row is published and deleted and, when gate_seq is set, after the
-- service's gate queue holds no row with seq <= gate_seq.
ALTER TABLE erasure_outbox
    ADD COLUMN barrier  BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN gate_seq BIGINT;
