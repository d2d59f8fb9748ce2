-- Identifiers keep when they were first seen (which decides which profile claims them), not
-- when they were last seen: the upkeep of a per-identifier last_seen rewrote one row per
-- identifier of every event, the largest write of a projection batch (docs/benchmarks.md).
-- The profile's own last_seen (customers) stays exact.
--
-- CASCADE drops the read view over this table (`<prefix>_read.customer_identities`) when this
-- generation is live; the projector re-creates the read views right after its migrations
-- (generation::upgrade), so during an upgrade that view is missing for that moment only.
ALTER TABLE customer_identities DROP COLUMN last_seen CASCADE;
