-- Identifiers a blocked pattern matched in an event (evaluated by ingest on the plaintext and
-- named in the record's cdp-blocked-identifiers header): they never link in that event, also
-- when the event is re-derived.
ALTER TABLE identity_observations ADD COLUMN blocked BIGINT[] NOT NULL DEFAULT '{}';
