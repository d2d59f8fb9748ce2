-- Per-subject data keys, wrapped (AES-256-GCM) by the master key. A subject has one live
-- key version; erasure deletes every wrapped key of the subject and records when, so data
-- sealed with those versions is unreadable everywhere, for good.
CREATE TABLE IF NOT EXISTS subject_keys (
    subject_id   TEXT        NOT NULL,
    key_version  INTEGER     NOT NULL,
    wrapped_key  BYTEA,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    destroyed_at TIMESTAMPTZ,
    PRIMARY KEY (subject_id, key_version),
    CHECK ((wrapped_key IS NULL) = (destroyed_at IS NOT NULL))
);
