CREATE INDEX jobs_finished_at_brin ON jobs USING brin (finished_at);
