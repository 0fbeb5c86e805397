DROP INDEX IF EXISTS jobs_finished_at_brin;
DROP INDEX IF EXISTS jobs_waiting;
DROP TABLE IF EXISTS dead_job_actions;
DROP TABLE IF EXISTS dead_jobs;
DROP TABLE IF EXISTS workers;
