-- A token that changes with every write to the graph (set under the graph lock, in the
-- writing transaction). A process that caches the graph compares it to the token its cache
-- reflects: equal means nobody else wrote since, so the cache is the graph.
CREATE TABLE identity_graph_version (
    single boolean PRIMARY KEY DEFAULT true CHECK (single),
    token uuid NOT NULL
);
INSERT INTO identity_graph_version (single, token) VALUES (true, gen_random_uuid());
