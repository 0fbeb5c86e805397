//! The service-wide poller: queue depths from the broker, waiting-job ages,
//! per-minute rates and live workers from PostgreSQL, turned into the `conveyor_queue_*`,
//! `conveyor_workers` and `conveyor_dead_jobs` gauges and into the snapshot the
//! dashboard shows.
//!
//! It runs in the ingress, so a deployment exports one set of these however
//! many workers it has. The broker is asked with passive `queue.declare`, which
//! returns the ready-message and consumer counts of a queue over plain AMQP, so
//! the management plugin is not needed. The poller also prunes `workers` rows
//! silent for longer than `monitor.worker_prune_after_ms`.

mod rates;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_platform::Config;
use conveyor_platform::amqp::{
    DELAY_LEVELS_MS, Topology, close_channel_quietly, close_quietly, connect,
};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::pool::{self, PgPool};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Double, Text};
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::rates::{Counts, MinuteRates};

/// One logical queue as last polled.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct QueueStats {
    /// Logical queue name.
    pub queue: String,
    /// Messages ready in the work queue.
    pub ready: u32,
    /// Consumers attached to the work queue.
    pub consumers: u32,
    /// Messages in the dead-letter queue (and its inbox).
    pub dead_letters: u32,
    /// Dead-job records neither replayed nor discarded.
    pub dead_jobs: i64,
    /// Age of the oldest job waiting to start, in seconds, counted from when it
    /// became runnable (a delayed job or a retry waiting out its backoff is not waiting).
    pub oldest_waiting_seconds: f64,
    /// Live workers consuming this queue.
    pub live_workers: i64,
    /// Ready messages per live worker (ready when no worker is live).
    pub backlog_per_worker: f64,
    /// Jobs published (recorded) in the last minute: new, scheduled and replayed ones.
    pub published_last_minute: i64,
    /// Attempts started in the last minute (when a job's next attempt starts
    /// within about two seconds of its previous one, only the later counts).
    pub started_last_minute: i64,
    /// Jobs that succeeded in the last minute.
    pub succeeded_last_minute: i64,
    /// Failed attempts rescheduled for a retry in the last minute.
    pub retried_last_minute: i64,
    /// Jobs that died in the last minute.
    pub dead_last_minute: i64,
}

/// What the dashboard shows between polls.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Snapshot {
    /// When the snapshot was taken; `None` before the first poll.
    pub polled_at: Option<DateTime<Utc>>,
    /// The broker could not be asked on the last poll (the numbers are older).
    pub broker_error: Option<String>,
    /// Per logical queue.
    pub queues: Vec<QueueStats>,
    /// Messages in each delay queue.
    pub delayed: Vec<DelayedCount>,
}

/// Messages waiting in one delay queue.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct DelayedCount {
    /// The queue's delay, in milliseconds.
    pub delay_ms: u64,
    /// Messages in it.
    pub ready: u32,
}

/// The latest snapshot, shared with the handlers.
pub type SharedSnapshot = Arc<RwLock<Snapshot>>;

/// Timing of the poller.
#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    /// Between polls.
    pub every: Duration,
    /// A worker silent this long is gone.
    pub gone_after: Duration,
    /// A worker silent this long is deleted.
    pub prune_after: Duration,
}

impl PollSettings {
    /// From `[monitor]`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            every: Duration::from_millis(config.monitor.queue_poll_ms),
            gone_after: Duration::from_millis(config.monitor.worker_gone_after_ms),
            prune_after: Duration::from_millis(config.monitor.worker_prune_after_ms),
        }
    }
}

/// One poll of the broker may take this long.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls until `stop`, updating `metrics` and `snapshot`.
pub async fn run(
    urls: Vec<String>,
    topology: Topology,
    db: PgPool,
    metrics: Metrics,
    snapshot: SharedSnapshot,
    settings: PollSettings,
    stop: CancellationToken,
) {
    let mut connection: Option<Connection> = None;
    let rates = Arc::new(Mutex::new(MinuteRates::default()));
    let mut ticker = tokio::time::interval(settings.every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        if connection.as_ref().is_none_or(|c| !c.status().connected()) {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            connection = connect(&urls, "conveyor-ingress-monitor").await.ok();
        }
        let broker = match &connection {
            // Bounded: a passive declare waits on the queue's leader, which can
            // take seconds while a node is lost; the next tick tries again.
            Some(conn) => tokio::time::timeout(POLL_TIMEOUT, poll_broker(conn, &topology))
                .await
                .unwrap_or_else(|_| Err("the broker did not answer the poll in time".to_owned())),
            None => Err("not connected to the broker".to_owned()),
        };
        let db_stats = poll_database(&db, &topology.queues, &rates, settings).await;
        let next = assemble(&topology, broker, db_stats, &metrics, &snapshot);
        if let Ok(mut current) = snapshot.write() {
            *current = next;
        }
    }
    if let Some(conn) = connection {
        close_quietly(&conn, "ingress stopping").await;
    }
}

/// Broker counts: per broker queue name, (ready, consumers).
type BrokerCounts = HashMap<String, (u32, u32)>;

async fn poll_broker(conn: &Connection, topology: &Topology) -> Result<BrokerCounts, String> {
    let mut channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    let mut counts = BrokerCounts::new();
    for name in topology.queue_names() {
        match passive(&channel, &name).await {
            Ok(found) => {
                counts.insert(name, found);
            }
            // A missing queue closes the channel; carry on with a new one.
            Err(err) => {
                tracing::debug!(queue = %name, error = %err, "queue not found while polling");
                channel = conn.create_channel().await.map_err(|e| e.to_string())?;
            }
        }
    }
    close_channel_quietly(&channel, "polled").await;
    Ok(counts)
}

async fn passive(channel: &Channel, name: &str) -> lapin::Result<(u32, u32)> {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(
            ShortString::from(name.to_owned()),
            options,
            FieldTable::default(),
        )
        .await?;
    Ok((queue.message_count(), queue.consumer_count()))
}

#[derive(Default)]
struct DbStats {
    oldest: HashMap<String, f64>,
    live_workers: HashMap<String, i64>,
    workers_live: i64,
    workers_gone: i64,
    dead_jobs: HashMap<String, i64>,
    rates: HashMap<String, Counts>,
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

async fn poll_database(
    db: &PgPool,
    queues: &[String],
    rates: &Arc<Mutex<MinuteRates>>,
    settings: PollSettings,
) -> Option<DbStats> {
    let queues = queues.to_vec();
    let rates = rates.clone();
    let gone_ms = settings.gone_after.as_millis() as f64;
    let prune_ms = settings.prune_after.as_millis() as f64;
    let result = pool::run(db, move |conn| {
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
        let dead: Vec<QueueStateCount> = diesel::sql_query(
            "SELECT queue, '' AS state, count(*) AS n FROM dead_jobs
             WHERE replayed_at IS NULL AND discarded_at IS NULL GROUP BY queue",
        )
        .load(conn)?;
        stats.dead_jobs = dead.into_iter().map(|r| (r.queue, r.n)).collect();
        let mut rates = rates.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        rates.poll(conn)?;
        stats.rates = queues
            .iter()
            .map(|queue| (queue.clone(), rates.last_minute(queue)))
            .collect();
        Ok(stats)
    })
    .await;
    match result {
        Ok(stats) => Some(stats),
        Err(err) => {
            tracing::warn!(error = %err, "queue monitor could not read the database");
            None
        }
    }
}

fn assemble(
    topology: &Topology,
    broker: Result<BrokerCounts, String>,
    db: Option<DbStats>,
    metrics: &Metrics,
    previous: &SharedSnapshot,
) -> Snapshot {
    let old = previous.read().map(|s| s.clone()).unwrap_or_default();
    let (counts, broker_error) = match broker {
        Ok(counts) => (Some(counts), None),
        Err(err) => (None, Some(err)),
    };
    let mut queues = Vec::new();
    for queue in &topology.queues {
        let before = old.queues.iter().find(|q| &q.queue == queue);
        let mut stats = before.cloned().unwrap_or(QueueStats {
            queue: queue.clone(),
            ..Default::default()
        });
        if let Some(counts) = &counts {
            let get = |name: String| counts.get(&name).copied().unwrap_or_default();
            let (ready, consumers) = get(topology.work_queue(queue));
            let dead =
                get(topology.dead_letter_queue(queue)).0 + get(topology.dead_letter_inbox(queue)).0;
            stats.ready = ready;
            stats.consumers = consumers;
            stats.dead_letters = dead;
            metrics
                .queue_messages_ready
                .with_label_values(&[queue.as_str(), "work"])
                .set(i64::from(ready));
            metrics
                .queue_messages_ready
                .with_label_values(&[queue.as_str(), "dead_letter"])
                .set(i64::from(dead));
            metrics
                .queue_consumers
                .with_label_values(&[queue.as_str()])
                .set(i64::from(consumers));
        }
        if let Some(db) = &db {
            stats.oldest_waiting_seconds = db.oldest.get(queue).copied().unwrap_or(0.0).max(0.0);
            stats.live_workers = db.live_workers.get(queue).copied().unwrap_or(0);
            stats.dead_jobs = db.dead_jobs.get(queue).copied().unwrap_or(0);
            let rates = db.rates.get(queue).copied().unwrap_or_default();
            stats.published_last_minute = rates.published;
            stats.started_last_minute = rates.started;
            stats.succeeded_last_minute = rates.succeeded;
            stats.retried_last_minute = rates.retried;
            stats.dead_last_minute = rates.dead;
            metrics
                .queue_oldest_job_age
                .with_label_values(&[queue.as_str()])
                .set(stats.oldest_waiting_seconds);
            metrics
                .dead_jobs
                .with_label_values(&[queue.as_str()])
                .set(stats.dead_jobs);
        }
        stats.backlog_per_worker = f64::from(stats.ready) / stats.live_workers.max(1) as f64;
        metrics
            .queue_backlog_per_worker
            .with_label_values(&[queue.as_str()])
            .set(stats.backlog_per_worker);
        queues.push(stats);
    }
    if let Some(db) = &db {
        metrics
            .workers
            .with_label_values(&["live"])
            .set(db.workers_live);
        metrics
            .workers
            .with_label_values(&["gone"])
            .set(db.workers_gone);
    }
    let delayed = match &counts {
        Some(counts) => DELAY_LEVELS_MS
            .iter()
            .map(|ms| {
                let ready = counts.get(&topology.delay_queue(*ms)).map_or(0, |c| c.0);
                metrics
                    .queue_messages_ready
                    .with_label_values(&[format!("delay.{ms}").as_str(), "delay"])
                    .set(i64::from(ready));
                DelayedCount {
                    delay_ms: *ms,
                    ready,
                }
            })
            .collect(),
        None => old.delayed,
    };
    Snapshot {
        polled_at: Some(Utc::now()),
        broker_error,
        queues,
        delayed,
    }
}
