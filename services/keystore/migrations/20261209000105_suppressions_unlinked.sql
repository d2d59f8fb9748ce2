-- A suppression entry names no request: from a request id the compliance topic leads to the
-- erased tokens and from them to the person's pseudonymous history, so an entry that named
-- its request would let anyone holding the keys and an email walk back to that history.
ALTER TABLE suppressions DROP COLUMN IF EXISTS request_id;
