DROP INDEX jobs_updated_at_brin;
