DROP INDEX CONCURRENTLY IF EXISTS webhook_events_recorded_at;
