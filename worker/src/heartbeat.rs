//! Worker heartbeats: each worker upserts its row in `workers` every
//! `monitor.heartbeat_ms`, so operators (dashboard, `conveyor_workers` metric,
//! backlog per worker) see which workers are alive and how busy they are.
//!
//! A worker that stops cleanly stamps `stopped_at`; one that dies simply goes
//! quiet, is shown as gone after `monitor.worker_gone_after_ms`, and is pruned
//! by the ingress after `monitor.worker_prune_after_ms`.
//!
//! The heartbeat has a connection of its own, outside the pool, on which it
//! holds this worker's advisory lock (`runner::try_lock`) for as long as the
//! process lives: other workers read from it whether this one still runs the
//! attempts its `running` records name (see `runner`). Should the connection
//! break, the next beat opens another and takes the lock again; a beat that
//! finds the lock still held by the broken session's backend beats all the
//! same and tries again at the next.
//!
//! `last_seen_at` and `stopped_at` are the database's `now()`, never this
//! process's clock: liveness is judged against the database's `now()` (the
//! ingress's poller and pruning), so a worker whose clock runs behind would
//! otherwise count as gone while it works, and one whose clock runs ahead
//! would outlive its death.

use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::pool::dedicated_url;
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

/// Beats every `every` until `stop` on its own connection to `database_url`,
/// then records a clean stop and closes that connection.
pub async fn run(
    database_url: &str,
    metrics: Metrics,
    me: Identity,
    every: Duration,
    stop: CancellationToken,
) {
    let mut presence = Presence {
        url: dedicated_url(database_url, &format!("conveyor-worker {}", me.id)),
        conn: None,
        locked: false,
    };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        if let Err(err) = beat(&mut presence, &metrics, &me, false).await {
            tracing::warn!(error = %err, "heartbeat failed");
        }
    }
    if let Err(err) = beat(&mut presence, &metrics, &me, true).await {
        tracing::warn!(error = %err, "could not record the worker's stop");
    }
}

/// The heartbeat's own connection, and whether it holds this worker's lock.
struct Presence {
    url: String,
    conn: Option<PgConnection>,
    locked: bool,
}

async fn beat(
    presence: &mut Presence,
    metrics: &Metrics,
    me: &Identity,
    stopping: bool,
) -> anyhow::Result<()> {
    let (me, url, locked) = (me.clone(), presence.url.clone(), presence.locked);
    let in_flight = in_flight(metrics);
    let held = presence.conn.take();
    let (conn, locked, beaten) = tokio::task::spawn_blocking(move || {
        let mut conn = match held {
            Some(conn) => conn,
            None => match PgConnection::establish(&url) {
                Ok(conn) => conn,
                Err(err) => return (None, false, Err(err.into())),
            },
        };
        let locked = locked || held_or_new_lock(&mut conn, &me.id);
        match record(&mut conn, &me, in_flight, stopping) {
            Ok(()) => (Some(conn), locked, Ok(())),
            // A broken connection is dropped, and its lock with it; the next
            // beat opens another.
            Err(err) => (None, false, Err(err.into())),
        }
    })
    .await?;
    presence.conn = conn;
    presence.locked = locked;
    beaten
}

/// Takes this worker's lock on `conn` unless another session holds it; a
/// failure to ask is logged and tried again at the next beat.
fn held_or_new_lock(conn: &mut PgConnection, worker_id: &str) -> bool {
    match crate::runner::try_lock(conn, worker_id) {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(
                "this worker's lock is still held by an earlier session; trying again at the next heartbeat"
            );
            false
        }
        Err(err) => {
            tracing::warn!(error = %err, "could not take this worker's lock; trying again at the next heartbeat");
            false
        }
    }
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
