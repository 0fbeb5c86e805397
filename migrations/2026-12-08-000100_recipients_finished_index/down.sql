DROP INDEX CONCURRENTLY IF EXISTS campaign_recipients_finished;
