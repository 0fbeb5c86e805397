-- The worker whose attempt the record's `running` state belongs to (its id in
-- `workers`). A copy of a job whose attempt is running under a worker that is
-- still alive waits for that attempt instead of running beside it (see
-- worker/src/runner.rs). Adding a nullable column without a default rewrites
-- nothing.
ALTER TABLE jobs ADD COLUMN runner text;

-- Whether `runner` (a worker id) is still at work on an attempt it started at
-- `started_at`: it holds its advisory lock (taken on its heartbeat's own
-- connection as `pg_advisory_lock(hashtextextended(id, 0))`, which ends with
-- its session), its heartbeat is younger than `gone_after_ms`, and the attempt
-- is younger than `attempt_bound_ms` (the task's timeout and a margin). Trying
-- the lock takes it, when free, until the caller's transaction ends.
CREATE FUNCTION runner_at_work(runner text, started_at timestamptz, gone_after_ms bigint,
                               attempt_bound_ms bigint)
RETURNS boolean LANGUAGE sql VOLATILE AS $$
    SELECT CASE
        WHEN $1 IS NOT NULL
             AND $2 > now() - $4 * interval '1 millisecond'
             AND EXISTS (SELECT 1 FROM workers w
                         WHERE w.id = $1 AND w.stopped_at IS NULL
                           AND w.last_seen_at > now() - $3 * interval '1 millisecond')
        THEN NOT pg_try_advisory_xact_lock(hashtextextended($1, 0))
        ELSE false
    END
$$;
