-- A mailing: one template, many recipients, sent in chunks by workers.
CREATE TABLE campaigns (
    id               uuid PRIMARY KEY,
    name             text        NOT NULL,
    template         text        NOT NULL,
    from_addr        text        NOT NULL,
    reply_to         text,
    vars             jsonb       NOT NULL DEFAULT '{}',
    rate_per_sec     double precision CHECK (rate_per_sec > 0),
    state            text        NOT NULL CHECK (state IN ('draft', 'sending', 'paused', 'completed', 'cancelled')),
    -- Incremented each time pending recipients are re-planned (resume, resend-unknown), so chunk ids stay unique.
    plan_generation  integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    send_started_at  timestamptz,
    completed_at     timestamptz
);

-- The per-recipient ledger: one row per (campaign, address), the proof that nobody gets a campaign twice.
CREATE TABLE campaign_recipients (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id      uuid        NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    email            text        NOT NULL,
    vars             jsonb       NOT NULL DEFAULT '{}',
    state            text        NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'sending', 'sent', 'failed', 'unknown')),
    -- The chunk this recipient was planned into (NULL: not planned yet).
    chunk_id         uuid,
    -- Who claimed the row for sending, and until when the claim is trusted.
    claimed_by       text,
    claimed_at       timestamptz,
    claim_expires_at timestamptz,
    -- SMTP attempts (4xx replies are retried with backoff).
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_reply       text,
    sent_at          timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX campaign_recipients_unique_address ON campaign_recipients (campaign_id, lower(email));
CREATE INDEX campaign_recipients_by_state ON campaign_recipients (campaign_id, state, id);
CREATE INDEX campaign_recipients_by_chunk ON campaign_recipients (chunk_id, id) WHERE chunk_id IS NOT NULL;

-- Chunks handed to sender jobs. The id is derived from (campaign, generation, first recipient), so a replayed
-- planner finds the chunk it already made instead of making a second one.
CREATE TABLE campaign_chunks (
    id               uuid PRIMARY KEY,
    campaign_id      uuid        NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    plan_generation  integer     NOT NULL,
    first_recipient  bigint      NOT NULL,
    last_recipient   bigint      NOT NULL,
    recipients       integer     NOT NULL,
    published_at     timestamptz,
    finished_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX campaign_chunks_unpublished ON campaign_chunks (campaign_id) WHERE published_at IS NULL;

-- Shared send-rate reservations: each key ('campaign:<id>', 'global') hands out send slots in time,
-- so a rate holds across every worker together.
CREATE TABLE send_rate_slots (
    key              text PRIMARY KEY,
    next_slot_at     timestamptz NOT NULL
);
