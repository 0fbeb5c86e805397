-- `jobs_finished_at_brin` served the dashboard's finish rates, which now come
-- from the rows changed lately (`jobs_updated_at_brin`); the stats rollups find
-- their windows through the `jobs_finished_at` btree. Nothing reads it any
-- more, and every finished job added to it.
DROP INDEX IF EXISTS jobs_finished_at_brin;
