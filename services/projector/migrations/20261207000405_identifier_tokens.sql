-- Identifiers are vault tokens (random, deleted from the vault by erasure), not keyed hashes.
ALTER TABLE customer_identities RENAME COLUMN value_hash TO token;
