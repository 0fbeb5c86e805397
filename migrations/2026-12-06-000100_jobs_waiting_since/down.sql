CREATE INDEX jobs_waiting ON jobs (queue, enqueued_at) WHERE state IN ('queued', 'retrying');
DROP INDEX IF EXISTS jobs_waiting_since;
