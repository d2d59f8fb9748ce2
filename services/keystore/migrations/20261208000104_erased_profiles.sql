-- The erasure ledger's profiles: the profile ids of erased clusters (UUIDv5 of erased subject
-- tokens, or ids identity handed out for them). They link to no one; consumers skip identity
-- events that name one (a merge or split of an erased person), so a replay or a restore
-- never re-creates a trace of them, not even a merge between two nameless profiles.
CREATE TABLE IF NOT EXISTS erased_profiles (
    profile_id UUID PRIMARY KEY
);
