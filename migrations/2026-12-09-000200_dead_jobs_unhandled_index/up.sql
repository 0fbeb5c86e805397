-- The queue monitor counts each queue's dead jobs that are neither replayed nor
-- discarded on every poll (`conveyor_dead_jobs`). `dead_jobs` is never pruned,
-- and no index led with `queue` or left out the handled records, so each poll
-- read the whole table. This index holds only the unhandled records, by queue,
-- so the count reads just them; the dead-job listing's "unhandled" filter, by
-- queue and newest first, can walk it too.
--
-- Built CONCURRENTLY (outside a transaction, see metadata.toml), so workers go
-- on recording dead jobs while it is built. Should the build fail, it leaves an
-- invalid index of this name: drop it and run the migration again.
CREATE INDEX CONCURRENTLY dead_jobs_unhandled
    ON dead_jobs (queue, dead_at)
    WHERE replayed_at IS NULL AND discarded_at IS NULL;
