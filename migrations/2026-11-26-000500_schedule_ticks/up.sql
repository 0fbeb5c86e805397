-- One row per fired tick of a schedule. The primary key is the claim: every worker
-- tries `INSERT ... ON CONFLICT DO NOTHING` and only the one whose insert lands
-- records the job (in the same transaction) and publishes it.
CREATE TABLE schedule_ticks (
    schedule     text        NOT NULL,
    tick_at      timestamptz NOT NULL,
    -- The one job this tick enqueued (its record is created in the claiming transaction).
    job_id       uuid        NOT NULL,
    -- True when the tick was missed during downtime and fired by `catch_up = "once"`.
    catch_up     boolean     NOT NULL DEFAULT false,
    -- The worker that claimed it, or last took over its publication.
    claimed_by   text        NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Set once the broker confirmed the job's message; NULL rows are re-published.
    published_at timestamptz,
    PRIMARY KEY (schedule, tick_at)
);

CREATE INDEX schedule_ticks_unpublished ON schedule_ticks (claimed_at) WHERE published_at IS NULL;
