-- What a scoped request erased: the cluster's tokens and profile ids, so `cdp erasure verify`
-- knows what to search every store for. Random tokens and ids derived from them, whose vault
-- rows are gone: they link to no one (the compliance topic carries the same in ErasureScoped).
ALTER TABLE erasure_requests ADD COLUMN IF NOT EXISTS scope_tokens TEXT[] NOT NULL DEFAULT '{}';
ALTER TABLE erasure_requests ADD COLUMN IF NOT EXISTS scope_profiles UUID[] NOT NULL DEFAULT '{}';
