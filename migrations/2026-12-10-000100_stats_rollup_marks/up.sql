-- Per rollup granularity ('hour', 'day'): the end of the last window a rollup
-- run completed (every window before it was recomputed after it ended). The
-- next run recomputes from there when that is earlier than its lookback, so a
-- gap between runs (a backlog on the `default` queue, an outage, failing
-- runs) is caught up instead of leaving windows never recomputed (see
-- tasks/src/stats/rollup_tasks.rs).
CREATE TABLE stats_rollup_marks (
    granularity  text        PRIMARY KEY,
    completed_to timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
