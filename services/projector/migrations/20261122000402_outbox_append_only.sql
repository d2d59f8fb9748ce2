-- The profile outbox becomes append-only: one row per (batch, changed profile), numbered.
-- The keyed upsert it replaces waited on the row locks the relay held while it read
-- snapshots and produced them, which stalled every batch touching a profile being relayed.
-- The relay now coalesces rows per profile itself, and one relay at a time (advisory lock)
-- keeps publications in the order of the changes.
CREATE TABLE profile_outbox_v2 (
    seq        BIGSERIAL PRIMARY KEY,
    profile_id UUID    NOT NULL,
    deleted    BOOLEAN NOT NULL
);
INSERT INTO profile_outbox_v2 (profile_id, deleted)
SELECT profile_id, deleted FROM profile_outbox ORDER BY profile_id;
DROP TABLE profile_outbox;
ALTER TABLE profile_outbox_v2 RENAME TO profile_outbox;

