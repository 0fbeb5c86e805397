//! The service-wide poller: queue depths from the broker, waiting-job ages,
//! per-minute rates and live workers from PostgreSQL, turned into the `conveyor_queue_*`,
//! `conveyor_workers` and `conveyor_dead_jobs` gauges and into the snapshot the
//! dashboard shows.
//!
//! It runs in the ingress, so a deployment exports one set of these however
//! many workers it has. The broker is asked with passive `queue.declare`, which
//! returns the ready-message and consumer counts of a queue over plain AMQP, so
//! the management plugin is not needed (see `broker.rs`). The poller also prunes
//! `workers` rows silent for longer than `monitor.worker_prune_after_ms` (see
//! `database.rs`).
//!
//! # When a poll fails
//!
//! Each poll asks the broker and the database; either may fail (a lost
//! connection, a poll past its time limit, any broker refusal other than
//! NOT_FOUND, a query error). A gauge is exported only from a half that
//! answered on the latest poll: while the broker does not, the ingress stops
//! exporting `conveyor_queue_messages_ready` and `conveyor_queue_consumers`;
//! while the database does not, `conveyor_queue_oldest_job_age_seconds`,
//! `conveyor_workers` and `conveyor_dead_jobs`; while either does not,
//! `conveyor_queue_backlog_per_worker`. They come back with the next poll that
//! reads them. Prometheus marks the vanished series stale, so no query reads a
//! frozen or made-up number as current:
//!
//! - the `absent()` rules `ConveyorMonitorSilent` (broker) and
//!   `ConveyorMonitorDatabaseSilent` fire (`deploy/prometheus/rules.yml`);
//! - `ConveyorNoConsumers` cannot fire, nor stay quiet, on a stale count;
//! - KEDA's query returns nothing, which `ignoreNullValues: "false"` turns into
//!   a scaler error, so the HPA keeps its replica count instead of scaling on
//!   an old or zero backlog (`deploy/autoscaling/keda-scaledobject.yaml`).
//!
//! With several ingresses, the `max` the rules and KEDA take covers those
//! still polling. The snapshot (`GET /v1/admin/queues`, the dashboard) keeps
//! the numbers a failing half last gave, with its error and when it last
//! answered (`broker_read_at`, `database_read_at`).

mod broker;
mod database;
mod rates;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_platform::Config;
use conveyor_platform::amqp::{DELAY_LEVELS_MS, Topology, close_quietly, connect};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::pool::PgPool;
use lapin::Connection;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::broker::BrokerCounts;
use self::database::DbStats;
pub use self::database::{OLDEST_WAITING, UNHANDLED_DEAD_JOBS};
use self::rates::MinuteRates;

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
    /// Jobs published (recorded) in the last counted minute: new, scheduled and
    /// replayed ones. The counted minute ends `amqp.publish_timeout_ms` + 8 s
    /// ago (13 s by default), when every commit recording its events has landed.
    pub published_last_minute: i64,
    /// Attempts started in the last counted minute (when a job's next attempt
    /// starts within about `amqp.publish_timeout_ms` + 8 s of its previous one,
    /// only the later counts).
    pub started_last_minute: i64,
    /// Jobs that succeeded in the last counted minute.
    pub succeeded_last_minute: i64,
    /// Failed attempts rescheduled for a retry in the last counted minute.
    pub retried_last_minute: i64,
    /// Jobs that died in the last counted minute.
    pub dead_last_minute: i64,
}

/// What the dashboard shows between polls.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Snapshot {
    /// When the last poll ended; null before the first poll.
    pub polled_at: Option<DateTime<Utc>>,
    /// Why the broker could not be asked on the last poll; null when it
    /// answered. While set, the broker's numbers here (ready, consumers, dead
    /// letters, delayed, backlog per worker) are those read at
    /// `broker_read_at`, and `/metrics` leaves out the gauges made from them.
    pub broker_error: Option<String>,
    /// When the broker last answered a poll; null before it first did.
    pub broker_read_at: Option<DateTime<Utc>>,
    /// Why the database could not be read on the last poll; null when it
    /// was. While set, the database's numbers here (dead jobs, oldest waiting,
    /// live workers, backlog per worker, the last minute's counts) are those
    /// read at `database_read_at`, and `/metrics` leaves out the gauges made
    /// from them.
    pub database_error: Option<String>,
    /// When the database was last read; null before it first was.
    pub database_read_at: Option<DateTime<Utc>>,
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
    /// How long a publish may wait for its confirm (`amqp.publish_timeout_ms`):
    /// an event's commit may land that much after the event, so the per-minute
    /// counts wait for it (see `rates.rs`).
    pub publish_timeout: Duration,
}

impl PollSettings {
    /// From `[monitor]` and `amqp.publish_timeout_ms`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            every: Duration::from_millis(config.monitor.queue_poll_ms),
            gone_after: Duration::from_millis(config.monitor.worker_gone_after_ms),
            prune_after: Duration::from_millis(config.monitor.worker_prune_after_ms),
            publish_timeout: config.publish_timeout(),
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
    let rates = Arc::new(Mutex::new(MinuteRates::new(settings.publish_timeout)));
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
            Some(conn) => tokio::time::timeout(POLL_TIMEOUT, broker::poll(conn, &topology))
                .await
                .unwrap_or_else(|_| Err("the broker did not answer the poll in time".to_owned())),
            None => Err("not connected to the broker".to_owned()),
        };
        let db_stats = database::poll(&db, &topology.queues, &rates, settings).await;
        let old = snapshot.read().map(|s| s.clone()).unwrap_or_default();
        log_changes(&old, &broker, &db_stats);
        let workers = db_stats
            .as_ref()
            .ok()
            .map(|db| [("live", db.workers_live), ("gone", db.workers_gone)]);
        let next = assemble(&topology, broker, db_stats, &old, Utc::now());
        export(&metrics, &next, workers);
        if let Ok(mut current) = snapshot.write() {
            *current = next;
        }
    }
    if let Some(conn) = connection {
        close_quietly(&conn, "ingress stopping").await;
    }
}

/// Logs a half of the poll that starts failing, fails differently, or answers again.
fn log_changes(
    old: &Snapshot,
    broker: &Result<BrokerCounts, String>,
    db: &Result<DbStats, String>,
) {
    let halves = [
        ("broker", &old.broker_error, broker.as_ref().err()),
        ("database", &old.database_error, db.as_ref().err()),
    ];
    for (part, before, now) in halves {
        match (before, now) {
            (Some(_), None) => tracing::info!(part, "queue monitor reads it again"),
            (before, Some(err)) if before.as_ref() != Some(err) => {
                tracing::warn!(part, error = %err, "queue monitor could not read it; its gauges are not exported until it can");
            }
            _ => {}
        }
    }
}

/// The snapshot after one poll: fresh numbers from each half that answered,
/// the `old` ones (and the error) for a half that did not.
fn assemble(
    topology: &Topology,
    broker: Result<BrokerCounts, String>,
    db: Result<DbStats, String>,
    old: &Snapshot,
    now: DateTime<Utc>,
) -> Snapshot {
    let (counts, broker_error) = split(broker);
    let (db, database_error) = split(db);
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
            stats.ready = ready;
            stats.consumers = consumers;
            stats.dead_letters =
                get(topology.dead_letter_queue(queue)).0 + get(topology.dead_letter_inbox(queue)).0;
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
        }
        stats.backlog_per_worker = f64::from(stats.ready) / stats.live_workers.max(1) as f64;
        queues.push(stats);
    }
    let delayed = match &counts {
        Some(counts) => DELAY_LEVELS_MS
            .iter()
            .map(|ms| DelayedCount {
                delay_ms: *ms,
                ready: counts.get(&topology.delay_queue(*ms)).map_or(0, |c| c.0),
            })
            .collect(),
        None => old.delayed.clone(),
    };
    Snapshot {
        polled_at: Some(now),
        broker_read_at: if counts.is_some() {
            Some(now)
        } else {
            old.broker_read_at
        },
        broker_error,
        database_read_at: if db.is_some() {
            Some(now)
        } else {
            old.database_read_at
        },
        database_error,
        queues,
        delayed,
    }
}

fn split<T>(result: Result<T, String>) -> (Option<T>, Option<String>) {
    match result {
        Ok(value) => (Some(value), None),
        Err(err) => (None, Some(err)),
    }
}

/// Sets the service-wide gauges from `snapshot`'s fresh numbers and the
/// workers by state (`None` when the database failed), and removes those whose
/// half failed on this poll (see the module's header).
fn export(metrics: &Metrics, snapshot: &Snapshot, workers: Option<[(&str, i64); 2]>) {
    let broker_ok = snapshot.broker_error.is_none();
    let database_ok = snapshot.database_error.is_none();
    for stats in &snapshot.queues {
        let queue = stats.queue.as_str();
        let work = [queue, "work"];
        let dead_letter = [queue, "dead_letter"];
        if broker_ok {
            let ready = &metrics.queue_messages_ready;
            ready.with_label_values(&work).set(i64::from(stats.ready));
            ready
                .with_label_values(&dead_letter)
                .set(i64::from(stats.dead_letters));
            metrics
                .queue_consumers
                .with_label_values(&[queue])
                .set(i64::from(stats.consumers));
        } else {
            // Absent already (before the first answer) is fine: nothing to remove.
            let _ = metrics.queue_messages_ready.remove_label_values(&work);
            let _ = metrics
                .queue_messages_ready
                .remove_label_values(&dead_letter);
            let _ = metrics.queue_consumers.remove_label_values(&[queue]);
        }
        if database_ok {
            metrics
                .queue_oldest_job_age
                .with_label_values(&[queue])
                .set(stats.oldest_waiting_seconds);
            metrics
                .dead_jobs
                .with_label_values(&[queue])
                .set(stats.dead_jobs);
        } else {
            let _ = metrics.queue_oldest_job_age.remove_label_values(&[queue]);
            let _ = metrics.dead_jobs.remove_label_values(&[queue]);
        }
        if broker_ok && database_ok {
            metrics
                .queue_backlog_per_worker
                .with_label_values(&[queue])
                .set(stats.backlog_per_worker);
        } else {
            let _ = metrics
                .queue_backlog_per_worker
                .remove_label_values(&[queue]);
        }
    }
    for delayed in &snapshot.delayed {
        let queue = format!("delay.{}", delayed.delay_ms);
        let labels = [queue.as_str(), "delay"];
        if broker_ok {
            metrics
                .queue_messages_ready
                .with_label_values(&labels)
                .set(i64::from(delayed.ready));
        } else {
            let _ = metrics.queue_messages_ready.remove_label_values(&labels);
        }
    }
    match workers {
        Some(workers) => {
            for (state, n) in workers {
                metrics.workers.with_label_values(&[state]).set(n);
            }
        }
        None => {
            for state in ["live", "gone"] {
                let _ = metrics.workers.remove_label_values(&[state]);
            }
        }
    }
}
