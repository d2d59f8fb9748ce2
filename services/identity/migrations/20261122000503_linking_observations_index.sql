-- Re-derivation reads the observations that can link (two identifiers or more). The index
-- over every observation made it fetch each heavy identifier's whole history (most events
-- carry one identifier) and filter it afterwards; these partial indexes find the linking
-- observations directly, and the single ones only where a kind has a time-to-live.
DROP INDEX IF EXISTS identity_observations_nodes;
CREATE INDEX identity_observations_linking ON identity_observations USING GIN (nodes)
    WHERE cardinality(nodes) > 1;
-- Single ones by their one node: a btree, cheaper to keep up than a GIN entry on the most
-- common insert.
CREATE INDEX identity_observations_single ON identity_observations ((nodes[1]))
    WHERE cardinality(nodes) = 1;
