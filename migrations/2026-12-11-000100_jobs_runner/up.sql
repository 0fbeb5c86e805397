-- The worker whose attempt the record's `running` state belongs to (its id in
-- `workers`). A redelivered copy of a job whose attempt is running under a
-- worker that is still alive waits for that attempt instead of running beside
-- it (see worker/src/runner.rs). Adding a nullable column without a default
-- rewrites nothing.
ALTER TABLE jobs ADD COLUMN runner text;
