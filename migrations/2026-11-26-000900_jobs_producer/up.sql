-- Who enqueued a job through `POST /v1/jobs`: the producer of the API key, so
-- `GET /v1/jobs/{id}` can show a producer only its own jobs. NULL for jobs made
-- by Conveyor itself (schedules, campaigns, webhooks, replays) and for jobs
-- recorded before this column existed; only `admin` keys read those.
-- Nullable without a default: a catalogue-only change, no table rewrite, and the
-- previous release (which never names the column) keeps working.
ALTER TABLE jobs ADD COLUMN producer text;
