-- The suppression registry: the one thing kept about an erased person. An entry is the HMAC,
-- under the suppression key (derived from the master key), of an erased identifier's vault
-- digest, with the erasure request that made it: no token, profile or record. The vault
-- creates no token for an identifier whose entry is here.
CREATE TABLE IF NOT EXISTS suppressions (
    entry      BYTEA PRIMARY KEY CHECK (octet_length(entry) = 32),
    request_id UUID  NOT NULL
);

-- The erasure ledger: erased tokens. Random, and their vault rows are gone, so they link to
-- no one; consumers skip events naming one, so replays and restores never re-create them.
CREATE TABLE IF NOT EXISTS erased_tokens (
    token TEXT PRIMARY KEY
);
