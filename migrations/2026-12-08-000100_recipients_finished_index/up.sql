-- The mail rollups count recipients by when they reached a final state:
-- `sent_at` for a sent one, `updated_at` for a failed or unknown one (the ledger
-- writes `sent_at` only on a 250, so bucketing by it alone counted no failed or
-- unknown recipient at all). No index served the window either: every rollup
-- read the whole ledger (~480 ms for 3 million rows; 5 ms through this index
-- for three hours, 79 ms for two days). Only final rows enter it, once each.
-- The expression and predicate must stay as the rollup spells them
-- (`tasks/src/stats/rollup.rs`, `FINISHED_AT`), or the planner will not use it.
--
-- Built CONCURRENTLY (outside a transaction, see metadata.toml), so senders go
-- on recording outcomes while it is built. Should the build fail, it leaves an
-- invalid index of this name: drop it and run the migration again.
CREATE INDEX CONCURRENTLY campaign_recipients_finished
    ON campaign_recipients ((coalesce(sent_at, updated_at)))
    WHERE state IN ('sent', 'failed', 'unknown');
