-- Rollups: one table per family and granularity, recomputed from raw rows and
-- upserted (see tasks/src/stats). Buckets are UTC hours and UTC days.

-- Windows are found by finish time.
CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- Jobs that finished in the bucket, per task.
CREATE TABLE job_stats_hourly (
    bucket      timestamptz NOT NULL,
    task        text        NOT NULL,
    succeeded   bigint      NOT NULL,
    -- Finished jobs that needed more than one attempt.
    retried     bigint      NOT NULL,
    dead        bigint      NOT NULL,
    -- Duration of the final attempt (finished_at - started_at), milliseconds.
    p50_ms      double precision,
    p95_ms      double precision,
    max_ms      double precision,
    computed_at timestamptz NOT NULL,
    PRIMARY KEY (bucket, task)
);
CREATE TABLE job_stats_daily (LIKE job_stats_hourly INCLUDING ALL);

-- Mail deliveries per campaign, bucketed by `campaign_recipients.sent_at`.
CREATE TABLE mail_stats_hourly (
    bucket      timestamptz NOT NULL,
    campaign_id uuid        NOT NULL,
    sent        bigint      NOT NULL,
    failed      bigint      NOT NULL,
    unknown     bigint      NOT NULL,
    computed_at timestamptz NOT NULL,
    PRIMARY KEY (bucket, campaign_id)
);
CREATE TABLE mail_stats_daily (LIKE mail_stats_hourly INCLUDING ALL);

-- Webhook events per source and outcome (and rejection reason, '' when none),
-- bucketed by `webhook_events.received_at`.
CREATE TABLE webhook_stats_hourly (
    bucket      timestamptz NOT NULL,
    source      text        NOT NULL,
    outcome     text        NOT NULL,
    reason      text        NOT NULL DEFAULT '',
    events      bigint      NOT NULL,
    computed_at timestamptz NOT NULL,
    PRIMARY KEY (bucket, source, outcome, reason)
);
CREATE TABLE webhook_stats_daily (LIKE webhook_stats_hourly INCLUDING ALL);

-- UTC days whose rollups were recomputed one last time before retention
-- started deleting their raw job records; never recomputed again.
CREATE TABLE stats_sealed_days (
    day       timestamptz PRIMARY KEY,
    sealed_at timestamptz NOT NULL DEFAULT now()
);
