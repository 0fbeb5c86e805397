//! The database's half of a poll: waiting-job ages, live workers, unhandled
//! dead jobs and the last minute's rates, each read through an index so a
//! poll costs the same however many jobs and dead jobs the tables hold. The
//! poll also prunes `workers` rows silent past `monitor.worker_prune_after_ms`.
//!
//! Every liveness test compares `workers.last_seen_at`, which the workers
//! stamp with the database's `now()`, with the database's `now()`, so no
//! process's clock takes part.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use conveyor_schema::pool::{self, PgPool};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Double, Text};

use super::PollSettings;
use super::rates::{Counts, MinuteRates};

/// What one poll read from the database.
#[derive(Default)]
pub(super) struct DbStats {
    /// Per logical queue, seconds the oldest waiting job has waited.
    pub oldest: HashMap<String, f64>,
    /// Per logical queue, live workers consuming it.
    pub live_workers: HashMap<String, i64>,
    /// Workers heartbeating now.
    pub workers_live: i64,
    /// Workers silent past `gone_after` without a clean stop.
    pub workers_gone: i64,
    /// Per logical queue, dead jobs neither replayed nor discarded.
    pub dead_jobs: HashMap<String, i64>,
    /// Per logical queue, the last minute's events.
    pub rates: HashMap<String, Counts>,
}

/// Waiting since the job became runnable: its enqueue, its delay's end
/// (`not_before`, recorded as `next_attempt_at` while queued) or its retry's due
/// time. Jobs not due yet are left out: they are delayed, not waiting.
/// `jobs_waiting_since` is ordered by that time, so each queue's answer is its
/// first entry there, however long the backlog. Its one parameter is the
/// logical queues (`text[]`); public so a test can check how it is planned.
pub const OLDEST_WAITING: &str = "
SELECT q.queue, EXTRACT(EPOCH FROM now() - w.since)::float8 AS value
FROM unnest($1::text[]) AS q(queue)
CROSS JOIN LATERAL (
    SELECT min(GREATEST(enqueued_at, COALESCE(next_attempt_at, enqueued_at))) AS since
    FROM jobs
    WHERE jobs.queue = q.queue AND state IN ('queued', 'retrying')
      AND GREATEST(enqueued_at, COALESCE(next_attempt_at, enqueued_at)) <= now()) w
WHERE w.since IS NOT NULL";

/// Each queue's dead jobs neither replayed nor discarded. `dead_jobs` is never
/// pruned; the partial index `dead_jobs_unhandled` holds only these records,
/// by queue, so the count reads them and nothing else. Public so a test can
/// check how it is planned.
pub const UNHANDLED_DEAD_JOBS: &str = "
SELECT queue, '' AS state, count(*) AS n FROM dead_jobs
WHERE replayed_at IS NULL AND discarded_at IS NULL
GROUP BY queue";

#[derive(QueryableByName)]
struct QueueNumber {
    #[diesel(sql_type = Text)]
    queue: String,
    #[diesel(sql_type = Double)]
    value: f64,
}

#[derive(QueryableByName)]
struct QueueStateCount {
    #[diesel(sql_type = Text)]
    queue: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Reads one poll's numbers, or says why it could not.
pub(super) async fn poll(
    db: &PgPool,
    queues: &[String],
    rates: &Arc<Mutex<MinuteRates>>,
    settings: PollSettings,
) -> Result<DbStats, String> {
    let queues = queues.to_vec();
    let rates = rates.clone();
    let gone_ms = settings.gone_after.as_millis() as f64;
    let prune_ms = settings.prune_after.as_millis() as f64;
    pool::run(db, move |conn| {
        let mut stats = DbStats::default();
        let oldest: Vec<QueueNumber> = diesel::sql_query(OLDEST_WAITING)
            .bind::<Array<Text>, _>(&queues)
            .load(conn)?;
        stats.oldest = oldest.into_iter().map(|r| (r.queue, r.value)).collect();
        diesel::sql_query(
            "DELETE FROM workers WHERE last_seen_at < now() - make_interval(secs => $1 / 1000.0)",
        )
        .bind::<Double, _>(prune_ms)
        .execute(conn)?;
        let per_queue: Vec<QueueNumber> = diesel::sql_query(
            "SELECT q AS queue, count(*)::float8 AS value FROM workers, unnest(queues) AS q
             WHERE stopped_at IS NULL AND last_seen_at >= now() - make_interval(secs => $1 / 1000.0)
             GROUP BY q",
        )
        .bind::<Double, _>(gone_ms)
        .load(conn)?;
        stats.live_workers = per_queue
            .into_iter()
            .map(|r| (r.queue, r.value as i64))
            .collect();
        let states: Vec<QueueStateCount> = diesel::sql_query(
            "SELECT '' AS queue,
                    CASE WHEN stopped_at IS NULL AND last_seen_at >= now() - make_interval(secs => $1 / 1000.0)
                         THEN 'live' WHEN stopped_at IS NULL THEN 'gone' ELSE 'stopped' END AS state,
                    count(*) AS n
             FROM workers GROUP BY 2",
        )
        .bind::<Double, _>(gone_ms)
        .load(conn)?;
        for row in states {
            match row.state.as_str() {
                "live" => stats.workers_live = row.n,
                "gone" => stats.workers_gone = row.n,
                _ => {}
            }
        }
        let dead: Vec<QueueStateCount> = diesel::sql_query(UNHANDLED_DEAD_JOBS).load(conn)?;
        stats.dead_jobs = dead.into_iter().map(|r| (r.queue, r.n)).collect();
        let mut rates = rates.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        rates.poll(conn)?;
        stats.rates = queues
            .iter()
            .map(|queue| (queue.clone(), rates.last_minute(queue)))
            .collect();
        Ok(stats)
    })
    .await
    .map_err(|err| err.to_string())
}
