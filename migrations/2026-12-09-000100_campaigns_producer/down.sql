ALTER TABLE campaigns DROP COLUMN producer;
