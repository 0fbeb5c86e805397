DROP FUNCTION runner_at_work(text, timestamptz, bigint, bigint);
ALTER TABLE jobs DROP COLUMN runner;
