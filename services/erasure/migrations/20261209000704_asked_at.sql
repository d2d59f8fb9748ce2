-- When the services were last asked to erase a scoped request (ErasureScoped published):
-- a request still waiting for an answer this long after is asked again.
ALTER TABLE erasure_requests ADD COLUMN IF NOT EXISTS asked_at TIMESTAMPTZ;
