-- Rejected webhook requests, counted per UTC minute, source and reason, for the
-- webhook statistics (issue 5: "rejected by reason").
--
-- Rejections are unauthenticated and touch nothing else: the ingress only
-- counts them in memory and adds the counts here in one batched upsert about
-- once a second (ingress/src/webhook_rejections.rs). So a flood of bad requests
-- costs at most one row per (minute, source, reason), whatever its rate.
-- `source` is a configured source name, or '(unknown)' for any other path
-- segment, so an attacker cannot make rows by inventing names; `reason` is one
-- of a fixed set (bad_headers, too_large, stale_timestamp, bad_signature,
-- invalid_body, in_progress, unavailable, unknown_source). Rolled up into
-- webhook_stats_* as outcome 'rejected'; deleted by `stats.retention`.
CREATE TABLE webhook_rejections (
    minute   timestamptz NOT NULL,
    source   text        NOT NULL,
    reason   text        NOT NULL,
    requests bigint      NOT NULL CHECK (requests > 0),
    PRIMARY KEY (minute, source, reason)
);
