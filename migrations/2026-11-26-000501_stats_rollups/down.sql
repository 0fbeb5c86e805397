DROP TABLE stats_sealed_days;
DROP TABLE webhook_stats_daily;
DROP TABLE webhook_stats_hourly;
DROP TABLE mail_stats_daily;
DROP TABLE mail_stats_hourly;
DROP TABLE job_stats_daily;
DROP TABLE job_stats_hourly;
DROP INDEX jobs_finished_at;
