-- The dashboard's jobs page, filtered to `running` or `dead`, looks for the
-- newest few of a handful of rows. Recent windows of `jobs_updated_at_brin`
-- rarely hold a full page of them, so the search ended in a scan of the whole
-- table, every 3 s while the page is open. This index holds only those rows,
-- newest last. A job enters it when it starts and leaves it (in the next row
-- version) when it finishes, so a job whose start and end share one commit,
-- as quick jobs under load do, never enters it.
--
-- Built CONCURRENTLY (outside a transaction, see metadata.toml); should the
-- build fail, drop the invalid index of this name and run the migration again.
CREATE INDEX CONCURRENTLY jobs_running_or_dead
    ON jobs (enqueued_at)
    WHERE state IN ('running', 'dead');
