//! Worker heartbeats: each worker upserts its row in `workers` every
//! `monitor.heartbeat_ms`, so operators (dashboard, `conveyor_workers` metric,
//! backlog per worker) see which workers are alive and how busy they are.
//!
//! A worker that stops cleanly stamps `stopped_at`; one that dies simply goes
//! quiet, is shown as gone after `monitor.worker_gone_after_ms`, and is pruned
//! by the ingress after `monitor.worker_prune_after_ms`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::db::workers;
use conveyor_schema::models::WorkerRow;
use conveyor_schema::pool::{self, PgPool};
use diesel::prelude::*;
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
        if let Err(err) = beat(&db, &metrics, &me, None).await {
            tracing::warn!(error = %err, "heartbeat failed");
        }
    }
    if let Err(err) = beat(&db, &metrics, &me, Some(Utc::now())).await {
        tracing::warn!(error = %err, "could not record the worker's stop");
    }
}

async fn beat(
    db: &PgPool,
    metrics: &Metrics,
    me: &Identity,
    stopped_at: Option<DateTime<Utc>>,
) -> Result<(), pool::DbError> {
    let row = WorkerRow {
        id: me.id.clone(),
        host: me.host.clone(),
        pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: me.started_at,
        queues: me.queues.clone(),
        in_flight: in_flight(metrics),
        last_seen_at: Utc::now(),
        stopped_at,
    };
    pool::run(db, move |conn| {
        diesel::insert_into(workers::table)
            .values(&row)
            .on_conflict(workers::id)
            .do_update()
            .set(&row)
            .execute(conn)
    })
    .await?;
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
