-- The queue monitor asks on every poll for each queue's oldest job waiting to
-- start: runnable since its enqueue, its delay's end or its retry's due time
-- (`next_attempt_at`). `jobs_waiting` was ordered by `enqueued_at`, so the poll
-- read every waiting job to find that time: ~110 ms per poll with a backlog of
-- a million jobs, growing with the backlog. Ordered by the time itself, the
-- answer is the first entry of each queue.
--
-- Built CONCURRENTLY (outside a transaction, see metadata.toml), so enqueues and
-- state commits go on while it is built. Should the build fail, it leaves an
-- invalid index of this name: drop it and run the migration again.
CREATE INDEX CONCURRENTLY jobs_waiting_since
    ON jobs (queue, GREATEST(enqueued_at, COALESCE(next_attempt_at, enqueued_at)))
    WHERE state IN ('queued', 'retrying');
