-- Producers' API keys and the Idempotency-Key ledger.

-- One row per API key. The key itself (`cvk_<id>_<secret>`) is shown once at creation;
-- only the SHA-256 of its secret part is kept. `id` is the non-secret lookup part.
CREATE TABLE api_keys (
    id            text        PRIMARY KEY,
    producer      text        NOT NULL,
    -- SHA-256 of the secret part (32 bytes).
    secret_hash   bytea       NOT NULL,
    -- What `keys list` shows, e.g. `cvk_0123456789abcdef_ab12…`.
    display_prefix text       NOT NULL,
    -- `enqueue:<task or glob>`, `campaigns`, `webhooks:admin`, `admin`.
    scopes        text[]      NOT NULL,
    expires_at    timestamptz,
    revoked_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Token bucket of this key; NULL uses `auth.default_rate_per_sec` / `auth.default_burst`.
    rate_per_sec  double precision,
    burst         integer
);

-- One row per (producer, Idempotency-Key) seen on POST /v1/jobs, /v1/campaigns and
-- /v1/campaigns/{id}/send. Claimed with INSERT … ON CONFLICT DO NOTHING; the row is
-- deleted again when the first response is a 4xx or 5xx, so the key can be retried.
CREATE TABLE idempotency_keys (
    producer        text        NOT NULL,
    key             text        NOT NULL,
    -- SHA-256 over method, path and body: the same key with another request is a 422.
    request_hash    bytea       NOT NULL,
    -- `in_flight` until the first response is stored, then `done`.
    state           text        NOT NULL,
    response_status smallint,
    response_type   text,
    response_body   bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (producer, key)
);
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
