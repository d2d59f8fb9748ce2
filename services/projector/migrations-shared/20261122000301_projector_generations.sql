-- Which schema holds the live read models. A rebuild fills a new generation's schema
-- from the log and swaps this pointer (and the cdp_read views) in one transaction.
CREATE TABLE IF NOT EXISTS projector_generations (
    prefix      TEXT        NOT NULL,
    generation  INTEGER     NOT NULL,
    state       TEXT        NOT NULL CHECK (state IN ('building', 'live', 'retired')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (prefix, generation)
);
CREATE UNIQUE INDEX IF NOT EXISTS projector_one_live ON projector_generations (prefix) WHERE state = 'live';

-- Every read of a profile through the API.
CREATE TABLE IF NOT EXISTS profile_access_audit (
    id          BIGSERIAL   PRIMARY KEY,
    accessed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    principal   TEXT        NOT NULL,
    route       TEXT        NOT NULL,
    profile_id  UUID,
    lookup      TEXT
);
CREATE INDEX IF NOT EXISTS profile_access_audit_profile ON profile_access_audit (profile_id, accessed_at DESC);
