//! Worker heartbeats: each worker upserts its row in `workers` every
//! `monitor.heartbeat_ms`, so operators (dashboard, `conveyor_workers` metric,
//! backlog per worker) see which workers are alive and how busy they are.
//!
//! A worker that stops cleanly stamps `stopped_at`; one that dies simply goes
//! quiet, is shown as gone after `monitor.worker_gone_after_ms`, and is pruned
//! by the ingress after `monitor.worker_prune_after_ms`.
//!
//! `last_seen_at` and `stopped_at` are the database's `now()`, never this
//! process's clock: liveness is judged against the database's `now()` (the
//! ingress's poller and pruning), so a worker whose clock runs behind would
//! otherwise count as gone while it works, and one whose clock runs ahead
//! would outlive its death.

use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::pool::{self, PgPool};
use diesel::prelude::*;
use diesel::sql_types::{Array, Bool, Integer, Text, Timestamptz};
use prometheus::core::Collector;
use tokio_util::sync::CancellationToken;

/// What a heartbeat says about this process.
#[derive(Clone)]
pub struct Identity {
    /// Worker id.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Logical queues consumed.
    pub queues: Vec<String>,
    /// Process start.
    pub started_at: DateTime<Utc>,
}

/// Beats every `every` until `stop`, then records a clean stop.
pub async fn run(
    db: PgPool,
    metrics: Metrics,
    me: Identity,
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        if let Err(err) = beat(&db, &metrics, &me, false).await {
            tracing::warn!(error = %err, "heartbeat failed");
        }
    }
    if let Err(err) = beat(&db, &metrics, &me, true).await {
        tracing::warn!(error = %err, "could not record the worker's stop");
    }
}

async fn beat(
    db: &PgPool,
    metrics: &Metrics,
    me: &Identity,
    stopping: bool,
) -> Result<(), pool::DbError> {
    let me = me.clone();
    let in_flight = in_flight(metrics);
    pool::run(db, move |conn| record(conn, &me, in_flight, stopping)).await?;
    Ok(())
}

/// Upserts `me`'s row with `in_flight` attempts running, seen at the
/// database's `now()`, and stopped then too when `stopping`.
pub fn record(
    conn: &mut PgConnection,
    me: &Identity,
    in_flight: i32,
    stopping: bool,
) -> QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO workers (id, host, pid, version, started_at, queues, in_flight,
                              last_seen_at, stopped_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now(), CASE WHEN $8 THEN now() END)
         ON CONFLICT (id) DO UPDATE SET
             host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version,
             started_at = EXCLUDED.started_at, queues = EXCLUDED.queues,
             in_flight = EXCLUDED.in_flight, last_seen_at = EXCLUDED.last_seen_at,
             stopped_at = COALESCE(EXCLUDED.stopped_at, workers.stopped_at)",
    )
    .bind::<Text, _>(&me.id)
    .bind::<Text, _>(&me.host)
    .bind::<Integer, _>(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
    .bind::<Text, _>(env!("CARGO_PKG_VERSION"))
    .bind::<Timestamptz, _>(me.started_at)
    .bind::<Array<Text>, _>(&me.queues)
    .bind::<Integer, _>(in_flight)
    .bind::<Bool, _>(stopping)
    .execute(conn)?;
    Ok(())
}

/// Attempts running now, summed over tasks.
fn in_flight(metrics: &Metrics) -> i32 {
    let total: f64 = metrics
        .jobs_in_flight
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_gauge().value())
        .sum();
    total as i32
}
