-- Dead letters an effectively-once consumer has produced, by origin. A batch whose commit
-- failed after its dead letters were produced is applied again; the letters recorded here are
-- not produced a second time. No personal data: the origin and the failure kind.
CREATE TABLE IF NOT EXISTS cdp_dead_letters (
    group_id    TEXT        NOT NULL,
    topic       TEXT        NOT NULL,
    partition   INTEGER     NOT NULL,
    "offset"    BIGINT      NOT NULL,
    kind        TEXT        NOT NULL,
    produced_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition, "offset")
);
