-- The identifier vault: the keyed digest (HMAC-SHA256 with the identifier key) of a
-- normalized identifier, and the random token that stands for it everywhere else. Erasure
-- deletes the rows; nothing else links a token to a person.
CREATE TABLE IF NOT EXISTS identifier_vault (
    digest BYTEA PRIMARY KEY CHECK (octet_length(digest) = 32),
    token  TEXT  NOT NULL UNIQUE
);

-- Moves in the same transaction as any destruction of keys or vault rows; every process
-- empties its key and token caches when it sees the counter move.
CREATE TABLE IF NOT EXISTS keystore_epoch (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    epoch     BIGINT  NOT NULL
);
INSERT INTO keystore_epoch (singleton, epoch) VALUES (TRUE, 0) ON CONFLICT DO NOTHING;
