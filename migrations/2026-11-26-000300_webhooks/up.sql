-- Signed inbound webhooks that sync user profiles (issue 4).

-- One row per profile id, written only by `webhook.profile_sync` jobs. Changes are
-- applied in `occurred_at` order: each aspect keeps the time of the event it
-- holds, and an older event is skipped. A DELETE clears the personal fields and
-- leaves a tombstone (`deleted_at`) that no later event undoes.
CREATE TABLE profiles (
    id                    text PRIMARY KEY,
    -- Source of the latest applied event.
    source                text        NOT NULL,
    email                 text,
    display_name          text,
    locale                text,
    -- occurred_at of the UPDATE whose fields are stored.
    fields_updated_at     timestamptz,
    headshot_sha256       text,
    headshot_content_type text,
    headshot_size_bytes   integer,
    headshot_url          text,
    -- occurred_at of the IMPORT_HEADSHOT whose image is stored.
    headshot_updated_at   timestamptz,
    -- Newest occurred_at applied, any action (the DELETE's once deleted).
    source_updated_at     timestamptz,
    deleted_at            timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- Downloaded images, content-addressed. `data` is NULL when
-- `webhooks.headshots.storage = "directory"` (the file is `<dir>/<sha256>`).
CREATE TABLE headshots (
    sha256       text PRIMARY KEY,
    content_type text        NOT NULL,
    size_bytes   integer     NOT NULL,
    data         bytea,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- webhook-ids already accepted, per source: a repeat is answered 200 without a
-- new job. Kept until `expires_at` (timestamp + 2 × tolerance + margin), after
-- which the timestamp check alone refuses a replay.
CREATE TABLE webhook_deliveries (
    source      text        NOT NULL,
    webhook_id  text        NOT NULL,
    job_id      uuid        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (source, webhook_id)
);
CREATE INDEX webhook_deliveries_expires_at ON webhook_deliveries (expires_at);

-- What happened to each authenticated webhook, for statistics: `accepted` and
-- `duplicate` at the ingress; `applied`, `unchanged`, `skipped_stale`,
-- `skipped_deleted` and `failed` when the worker applies it. Rejected requests
-- (bad headers, signature, timestamp, size, body, unknown source) get no row
-- here: they are unauthenticated and must have no side effect on jobs or
-- profiles. They are counted by reason in the ingress's Prometheus metrics and,
-- aggregated per minute, in `webhook_rejections` (migration 001000).
CREATE TABLE webhook_events (
    id          bigserial PRIMARY KEY,
    source      text        NOT NULL,
    webhook_id  text        NOT NULL,
    profile_id  text,
    action      text,
    outcome     text        NOT NULL CHECK (outcome IN
                    ('accepted', 'duplicate', 'applied', 'unchanged', 'skipped_stale', 'skipped_deleted', 'failed')),
    detail      text,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_source_recorded_at ON webhook_events (source, recorded_at);
