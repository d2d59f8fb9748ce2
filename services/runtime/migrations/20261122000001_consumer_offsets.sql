-- Offsets of effectively-once consumers, written in the same transaction as the rows
-- they produced. `next_offset` is the next offset to read (last applied + 1); -1 means the
-- partition is known but nothing has been applied yet.
CREATE TABLE IF NOT EXISTS cdp_consumer_offsets (
    group_id    TEXT        NOT NULL,
    topic       TEXT        NOT NULL,
    partition   INTEGER     NOT NULL,
    next_offset BIGINT      NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);
