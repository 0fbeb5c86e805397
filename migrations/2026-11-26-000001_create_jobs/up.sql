-- One row per job: created by whoever publishes it, updated by the worker that runs it.
CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    task            text        NOT NULL,
    queue           text        NOT NULL,
    state           text        NOT NULL CHECK (state IN ('queued', 'running', 'retrying', 'succeeded', 'dead')),
    args            jsonb       NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    -- Times any attempt was started; above `attempts` when a delivery was redelivered after a crash.
    runs            integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL,
    last_error      text,
    -- Every failed attempt: [{"attempt": n, "at": timestamp, "error": text}, ...]
    errors          jsonb       NOT NULL DEFAULT '[]',
    idempotency_key text,
    replay_of       uuid,
    enqueued_at     timestamptz NOT NULL,
    started_at      timestamptz,
    finished_at     timestamptz,
    next_attempt_at timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX jobs_task_enqueued_at ON jobs (task, enqueued_at);
