-- Fuzzy duplicate candidates: pairs of profiles that are probably one person although no
-- identifier links them, scored from the projector's read model (see
-- services/identity/src/candidates.rs). Profile ids and numbers only: no PII here.
CREATE TABLE identity_candidates (
    profile_a         UUID             NOT NULL,
    profile_b         UUID             NOT NULL,
    score             DOUBLE PRECISION NOT NULL,
    -- Jaro-Winkler similarity of the normalized names (best of as written and words sorted).
    name_score        DOUBLE PRECISION NOT NULL,
    -- Of the streets, when both have one.
    street_score      DOUBLE PRECISION,
    -- Whether the birth dates agree, when both have one.
    birth_date_match  BOOLEAN,
    -- open: reported; alias_published: the automatic merge published merge_event_id (an
    -- alias event); the graph's rules decide whether it links (a refusal is recorded there).
    status            TEXT             NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'alias_published')),
    merge_event_id    UUID,
    first_reported_at TIMESTAMPTZ      NOT NULL DEFAULT now(),
    scored_at         TIMESTAMPTZ      NOT NULL DEFAULT now(),
    PRIMARY KEY (profile_a, profile_b),
    CHECK (profile_a < profile_b)
);
CREATE INDEX identity_candidates_by_score ON identity_candidates (score DESC, profile_a, profile_b);
