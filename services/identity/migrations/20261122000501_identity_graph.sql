-- The identity graph. Identifiers are stored only as keyed hashes (never plaintext): a node is
-- (kind, namespace, value_hash). Nodes of one component share a label (a member's node id)
-- and the component's profile id. Everything except the observations is derived from them
-- and can be re-derived (see services/identity/src/resolve.rs).
CREATE TABLE identity_nodes (
    node_id     BIGSERIAL   PRIMARY KEY,
    kind        TEXT        NOT NULL,
    namespace   TEXT        NOT NULL DEFAULT '',
    value_hash  TEXT        NOT NULL,
    -- The component: a member's node id (NULL until first applied: the node alone).
    label       BIGINT,
    -- The component's profile: the projector's profile id of its subject seen first.
    profile_id  UUID,
    first_at    TIMESTAMPTZ,
    first_event UUID,
    last_at     TIMESTAMPTZ,
    last_event  UUID,
    -- The latest observation that could link it (carrying another identifier, or of a kind
    -- with a time-to-live): an event earlier than this in its component arrives late.
    link_at     TIMESTAMPTZ,
    link_event  UUID,
    -- Whether an event was about this node (it names a profile of its own).
    subject     BOOLEAN     NOT NULL DEFAULT false,
    UNIQUE (kind, namespace, value_hash)
);
CREATE INDEX identity_nodes_label ON identity_nodes ((coalesce(label, node_id)));
CREATE INDEX identity_nodes_profile ON identity_nodes (profile_id);

-- One row per distinct event id ever resolved: the event-level dedup, and the input from
-- which components are re-derived when an event arrives late or a link is severed.
CREATE TABLE identity_observations (
    event_id    UUID        PRIMARY KEY,
    occurred_at TIMESTAMPTZ NOT NULL,
    subject     BIGINT      NOT NULL,
    nodes       BIGINT[]    NOT NULL
);
-- Re-derivation reads the observations that can link: two nodes or more (and single ones of
-- kinds with a time-to-live, through the same index).
CREATE INDEX identity_observations_nodes ON identity_observations USING GIN (nodes);

-- Links: pairs of identifiers an event carried together and no rule refused, each with the
-- earliest such event as its cause ("why were these merged").
CREATE TABLE identity_links (
    link_id        UUID        PRIMARY KEY,
    from_node      BIGINT      NOT NULL,
    to_node        BIGINT      NOT NULL,
    cause_event_id UUID        NOT NULL,
    occurred_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX identity_links_from ON identity_links (from_node);
CREATE INDEX identity_links_to ON identity_links (to_node);

-- Links a rule refused: never silently dropped.
CREATE TABLE identity_refusals (
    event_id    UUID        NOT NULL,
    node        BIGINT      NOT NULL,
    other_node  BIGINT      NOT NULL,
    reason      TEXT        NOT NULL,  -- blocked | severed | expired | unique | limit
    rule_kind   TEXT,                  -- the identifier kind a unique or limit rule is about
    occurred_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (event_id, node, other_node)
);
CREATE INDEX identity_refusals_node ON identity_refusals (node);
CREATE INDEX identity_refusals_other ON identity_refusals (other_node);
CREATE INDEX identity_refusals_reason ON identity_refusals (reason, occurred_at);

-- Operator splits: an identifier that no longer links (other_node = 0) or one pair of
-- identifiers that no longer link directly.
CREATE TABLE identity_severed (
    node       BIGINT      NOT NULL,
    other_node BIGINT      NOT NULL DEFAULT 0,
    link_id    UUID,
    note       TEXT,
    severed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (node, other_node)
);

-- Transactional outbox: records for the identity topic and the resolved-events topic,
-- written in the graph's transaction and relayed to Kafka in `seq` order. Batches are
-- serialized by the graph lock, so `seq` order is commit order.
CREATE TABLE identity_outbox (
    seq           BIGSERIAL PRIMARY KEY,
    topic         TEXT      NOT NULL,
    key           BYTEA,
    value         BYTEA,
    headers       BYTEA     NOT NULL DEFAULT ''  -- see cdp_runtime::outbox::encode_headers
);

-- Whether a relay pass may have produced records it did not get to delete (then the next
-- pass asks Kafka what was published before producing again).
CREATE TABLE identity_outbox_relay (
    one   BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    dirty BOOLEAN NOT NULL
);
INSERT INTO identity_outbox_relay (dirty) VALUES (false);
