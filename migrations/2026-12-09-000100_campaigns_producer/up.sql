-- Who created a campaign through `POST /v1/campaigns`: the producer of the API
-- key, so the campaign routes can show a producer only its own campaigns (any
-- other is a 404, as `GET /v1/jobs/{id}` does for jobs). NULL for campaigns
-- created before this column existed (or on a router without the key guard);
-- only `admin` keys read or change those.
-- Nullable without a default: a catalogue-only change, no table rewrite, and the
-- previous release (which never names the column) keeps working.
ALTER TABLE campaigns ADD COLUMN producer text;
