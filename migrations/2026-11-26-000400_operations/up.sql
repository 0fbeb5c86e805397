-- The operator's side: worker heartbeats, durable dead-letter records and the audit of what people did with them.

-- One row per worker process, upserted on every heartbeat. A row whose last_seen_at is
-- older than `monitor.worker_gone_after_ms` is shown as gone; the ingress prunes it later.
CREATE TABLE workers (
    id           text        PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL,
    queues       text[]      NOT NULL,
    in_flight    integer     NOT NULL DEFAULT 0,
    last_seen_at timestamptz NOT NULL,
    -- Set when the worker drained and stopped cleanly.
    stopped_at   timestamptz
);

-- One row per dead job (the id is the job id), written in the same commit as the job's
-- `dead` state by the worker, or by the worker's recorder for messages the broker
-- dead-lettered itself (delivery limit). The `.dlq` queues hold the same jobs.
CREATE TABLE dead_jobs (
    id           uuid        PRIMARY KEY,
    task         text        NOT NULL,
    queue        text        NOT NULL,
    -- The envelope as it was dead-lettered; NULL when the message was not a readable envelope.
    envelope     jsonb,
    -- The raw body (lossy UTF-8) when the envelope was unreadable.
    body         text,
    attempts     integer     NOT NULL DEFAULT 0,
    -- Every failure: [{"attempt": n, "at": timestamp, "error": text}, ...]
    errors       jsonb       NOT NULL DEFAULT '[]',
    -- The final reason.
    reason       text        NOT NULL,
    -- RabbitMQ's x-death header, when the broker dead-lettered the message.
    x_death      jsonb,
    -- `worker` (the worker gave up) or `broker` (the broker's delivery limit).
    source       text        NOT NULL CHECK (source IN ('worker', 'broker')),
    dead_at      timestamptz NOT NULL DEFAULT now(),
    -- The latest replay: the job it created, and when.
    replayed_as  uuid,
    replayed_at  timestamptz,
    replay_count integer     NOT NULL DEFAULT 0,
    discarded_at timestamptz
);

CREATE INDEX dead_jobs_dead_at ON dead_jobs (dead_at);
CREATE INDEX dead_jobs_task_dead_at ON dead_jobs (task, dead_at);

-- Who did what to a dead job, and when.
CREATE TABLE dead_job_actions (
    id          bigserial   PRIMARY KEY,
    dead_job_id uuid        NOT NULL REFERENCES dead_jobs (id) ON DELETE CASCADE,
    action      text        NOT NULL CHECK (action IN ('replay', 'discard')),
    actor       text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    -- The job a replay created.
    new_job_id  uuid,
    -- Extra facts: forced, edited args.
    detail      jsonb       NOT NULL DEFAULT '{}'
);

CREATE INDEX dead_job_actions_dead_job ON dead_job_actions (dead_job_id, at);

-- The broker poller's "oldest waiting job" query reads only waiting jobs.
CREATE INDEX jobs_waiting ON jobs (queue, enqueued_at) WHERE state IN ('queued', 'retrying');

-- Finish rates on the dashboard (last minute): BRIN is nearly free to maintain on a time column.
CREATE INDEX jobs_finished_at_brin ON jobs USING brin (finished_at);
