-- Which subject's event wrote a row: the subject's own profile id. Merges re-point rows to the
-- surviving profile; a split (ProfileSplit on the identity topic) moves back exactly the rows
-- whose origin left. Rows written before this migration have no origin and stay where they are
-- on a split (a rebuild from the log fills it in).
ALTER TABLE interactions ADD COLUMN origin UUID;
ALTER TABLE transactions ADD COLUMN origin UUID;
ALTER TABLE capsule_views ADD COLUMN origin UUID;
ALTER TABLE customer_identities ADD COLUMN origin UUID;
