-- The queue monitor counts the last minute's events (published, started,
-- succeeded, retried, dead) from the rows changed lately. A BRIN index finds
-- the table's recent pages at almost no cost to writes: new rows and new row
-- versions land at the end of the heap, so `updated_at` follows the page order.
CREATE INDEX jobs_updated_at_brin ON jobs USING brin (updated_at) WITH (autosummarize = on);
