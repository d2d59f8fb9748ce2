-- The projector's read models. Applied inside a generation schema (search_path), so a
-- rebuild can build a complete new set beside the live one. Every column is derived from
-- the log only (no now()), so a replay rebuilds the same rows.

CREATE TABLE customers (
    profile_id     UUID        PRIMARY KEY,
    first_seen     TIMESTAMPTZ NOT NULL,
    last_seen      TIMESTAMPTZ NOT NULL,
    data_source    TEXT        NOT NULL,  -- source of the earliest event
    first_event_id UUID        NOT NULL,
    active         BOOLEAN     NOT NULL DEFAULT true
);

-- One row per profile and trait: the value asserted last by event time (ties: event id).
CREATE TABLE customer_traits (
    profile_id  UUID        NOT NULL,
    trait       TEXT        NOT NULL,
    value       TEXT,
    sealed      BYTEA,        -- the PII as its subject sealed it (for the profiles topic)
    subject_id  TEXT        NOT NULL,
    asserted_at TIMESTAMPTZ NOT NULL,
    event_id    UUID        NOT NULL,
    PRIMARY KEY (profile_id, trait)
);

CREATE TABLE customer_identities (
    kind        TEXT        NOT NULL,
    namespace   TEXT        NOT NULL DEFAULT '',
    value_hash  TEXT        NOT NULL,
    profile_id  UUID        NOT NULL,
    first_seen  TIMESTAMPTZ NOT NULL,
    last_seen   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kind, namespace, value_hash)
);
CREATE INDEX customer_identities_profile ON customer_identities (profile_id);

CREATE TABLE interactions (
    event_id         UUID        PRIMARY KEY,
    profile_id       UUID        NOT NULL,
    occurred_at      TIMESTAMPTZ NOT NULL,
    interaction_type TEXT        NOT NULL,
    channel          TEXT,
    touchpoint       TEXT,
    duration_ms      BIGINT,
    outcome          TEXT,
    properties       JSONB,
    source           TEXT        NOT NULL
);
CREATE INDEX interactions_profile_time ON interactions (profile_id, occurred_at DESC, event_id DESC);
CREATE INDEX interactions_time ON interactions (occurred_at);

CREATE TABLE transactions (
    event_id       UUID          PRIMARY KEY,
    profile_id     UUID          NOT NULL,
    occurred_at    TIMESTAMPTZ   NOT NULL,
    order_id       TEXT          NOT NULL,
    status         TEXT          NOT NULL,
    amount         NUMERIC(18,4) NOT NULL,
    currency       CHAR(3)       NOT NULL,
    items          JSONB         NOT NULL,
    payment_method TEXT,
    coupon         TEXT,
    source         TEXT          NOT NULL
);
CREATE INDEX transactions_profile_time ON transactions (profile_id, occurred_at DESC, event_id DESC);
CREATE INDEX transactions_order ON transactions (order_id);

-- Current consent per purpose: the change latest by event time (ties: event id).
CREATE TABLE consents (
    profile_id        UUID        NOT NULL,
    purpose           TEXT        NOT NULL,
    status            TEXT        NOT NULL,
    basis             TEXT        NOT NULL,
    policy_version    TEXT,
    changed_at        TIMESTAMPTZ NOT NULL,
    evidence_event_id UUID        NOT NULL,
    PRIMARY KEY (profile_id, purpose)
);

CREATE TABLE capsules (
    capsule_id       UUID        PRIMARY KEY,
    owner_profile_id UUID,
    title            TEXT,
    content_type     TEXT,
    storage_path     TEXT,
    settings         JSONB,
    created_at       TIMESTAMPTZ,
    created_event_id UUID,
    visibility       TEXT,
    published_at     TIMESTAMPTZ,
    published_event_id UUID,
    deleted_at       TIMESTAMPTZ,
    deleted_event_id UUID,
    deleted_reason   TEXT
);
CREATE INDEX capsules_owner ON capsules (owner_profile_id);

CREATE TABLE capsule_contents (
    content_id   UUID        PRIMARY KEY,
    capsule_id   UUID        NOT NULL,
    content_type TEXT        NOT NULL,
    storage_path TEXT,
    size_bytes   BIGINT,
    body         TEXT,
    added_at     TIMESTAMPTZ NOT NULL,
    event_id     UUID        NOT NULL
);
CREATE INDEX capsule_contents_capsule ON capsule_contents (capsule_id);

CREATE TABLE capsule_views (
    event_id     UUID        PRIMARY KEY,
    capsule_id   UUID        NOT NULL,
    profile_id   UUID        NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    channel      TEXT,
    duration_ms  BIGINT
);
CREATE INDEX capsule_views_capsule ON capsule_views (capsule_id, occurred_at);
CREATE INDEX capsule_views_profile ON capsule_views (profile_id, occurred_at);

-- Merges applied (loser now belongs to winner).
CREATE TABLE profile_merges (
    loser          UUID PRIMARY KEY,
    winner         UUID NOT NULL,
    link_id        UUID NOT NULL,
    cause_event_id UUID NOT NULL
);

-- Transactional outbox of profiles whose snapshot must be (re)published.
CREATE TABLE profile_outbox (
    profile_id UUID    PRIMARY KEY,
    deleted    BOOLEAN NOT NULL
);

CREATE VIEW customer_360 AS
SELECT c.profile_id, c.first_seen, c.last_seen, c.active, c.data_source,
       max(t.value) FILTER (WHERE t.trait = 'first_name')  AS first_name,
       max(t.value) FILTER (WHERE t.trait = 'last_name')   AS last_name,
       max(t.value) FILTER (WHERE t.trait = 'email')       AS email,
       max(t.value) FILTER (WHERE t.trait = 'phone')       AS phone,
       max(t.value) FILTER (WHERE t.trait = 'birth_date')  AS birth_date,
       max(t.value) FILTER (WHERE t.trait = 'street')      AS street,
       max(t.value) FILTER (WHERE t.trait = 'city')        AS city,
       max(t.value) FILTER (WHERE t.trait = 'postal_code') AS postal_code,
       max(t.value) FILTER (WHERE t.trait = 'region')      AS region,
       max(t.value) FILTER (WHERE t.trait = 'country')     AS country,
       max(t.value) FILTER (WHERE t.trait = 'custom_traits') AS custom_traits,
       (SELECT jsonb_object_agg(s.purpose, s.status) FROM consents s WHERE s.profile_id = c.profile_id) AS consent_status
  FROM customers c LEFT JOIN customer_traits t ON t.profile_id = c.profile_id
 GROUP BY c.profile_id;
