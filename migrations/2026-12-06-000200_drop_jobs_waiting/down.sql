CREATE INDEX CONCURRENTLY jobs_waiting ON jobs (queue, enqueued_at) WHERE state IN ('queued', 'retrying');
