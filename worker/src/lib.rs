//! The worker runtime: consumes jobs with manual acks and runs them as actors.
//!
//! Each task (see `conveyor_tasks`) is an actor with a queue, retry policy,
//! timeout and concurrency limit. [`start`] wires the pieces together; the
//! `conveyor worker` subcommand and the integration tests both use it, so tests
//! run the real thing.

mod acks;
mod consumer;
mod dead_letters;
mod enqueuer;
mod execute;
pub mod heartbeat;
mod http;
pub mod prefetch;
mod readiness;
mod runner;
mod runtime;
pub mod scheduler;
mod state_writer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use conveyor_platform::Config;
use conveyor_platform::amqp::Publisher;
use conveyor_platform::metrics::Metrics;
use conveyor_schema::pool;
use conveyor_tasks::{Registry, Services};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use state_writer::{Batching, Commit, Refused, StateChange, StateWriter, about_the_data};

/// A started worker.
pub struct Worker {
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub http_addr: SocketAddr,
    /// Resolves when the worker has drained and stopped.
    pub finished: JoinHandle<()>,
}

/// Checks the database schema, binds the HTTP port and starts consuming.
/// Draining starts when `shutdown` is cancelled; `finished` resolves after it.
pub async fn start(
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<Worker> {
    let db_config = config.database.clone();
    tokio::task::spawn_blocking(move || conveyor_platform::migrations::ensure_current(&db_config))
        .await?
        .context("refusing to start")?;
    let db = pool::pool(
        &conveyor_platform::config::database_url(&config),
        config.database.pool_size,
    );
    let topology = conveyor_platform::amqp::Topology::for_config(&config);
    let metrics = Metrics::new();
    let worker_id = format!(
        "{}:{}:{}",
        hostname(),
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    // The publisher and state writer outlive the consumers: draining jobs still publish and commit.
    let plumbing = CancellationToken::new();
    let urls = config.amqp_urls();
    let publisher = Publisher::start(
        &urls,
        &format!("conveyor-worker-publisher {worker_id}"),
        topology.clone(),
        2,
        config.publish_timeout(),
        plumbing.clone(),
    );
    let states = StateWriter::start(
        db.clone(),
        state_writer::Batching {
            max: config.worker.state_batch_max,
            linger: std::time::Duration::from_millis(config.worker.state_linger_ms),
        },
        &metrics,
        plumbing.clone(),
    );
    let schedules =
        Arc::new(conveyor_platform::schedule::schedules(&config).context("invalid schedules")?);
    let scheduler = config.scheduler.enabled.then(|| scheduler::Scheduler {
        db: db.clone(),
        publisher: publisher.clone(),
        metrics: metrics.clone(),
        schedules,
        config: config.scheduler.clone(),
        worker_id: worker_id.clone(),
    });
    let enqueue = Arc::new(enqueuer::Enqueuer {
        db: db.clone(),
        publisher: publisher.clone(),
        metrics: metrics.clone(),
    });
    let mail = Arc::new(mail_services(&config)?);
    let services = Services {
        db: db.clone(),
        enqueue,
        worker_id: worker_id.clone(),
        mail,
        headshots: Arc::new(headshot_policy(&config.webhooks.headshots)),
    };
    let permits: HashMap<&'static str, Arc<Semaphore>> = registry
        .tasks()
        .map(|task| {
            (
                task.descriptor().name,
                Arc::new(Semaphore::new(task.descriptor().options.concurrency)),
            )
        })
        .collect();
    let queues = if config.worker.queues.is_empty() {
        topology.queues.clone()
    } else {
        config.worker.queues.clone()
    };
    for queue in &queues {
        anyhow::ensure!(
            topology.queues.contains(queue),
            "worker.queues: no task uses queue `{queue}`"
        );
    }
    let windows: Vec<(String, u16)> = queues
        .iter()
        .map(|queue| {
            let window = prefetch::window(&config.worker, &registry, queue);
            (queue.clone(), window)
        })
        .collect();
    let identity = heartbeat::Identity {
        id: worker_id.clone(),
        host: hostname(),
        queues: queues.clone(),
        started_at: chrono::Utc::now(),
    };
    let beats_stop = CancellationToken::new();
    let database_url = conveyor_platform::config::database_url(&config);
    let beat_metrics = metrics.clone();
    let beat_every = std::time::Duration::from_millis(config.monitor.heartbeat_ms);
    let beats_until = beats_stop.clone();
    let beats = tokio::spawn(async move {
        heartbeat::run(
            &database_url,
            beat_metrics,
            identity,
            beat_every,
            beats_until,
        )
        .await;
    });
    let rt = Arc::new(runtime::Runtime {
        registry,
        topology,
        publisher,
        states,
        metrics: metrics.clone(),
        services,
        db,
        shutdown: shutdown.clone(),
        consumers_cancelled: CancellationToken::new(),
        permits,
        delivery_limit_resets: config.amqp.delivery_limit_resets,
        runner: Arc::from(worker_id.as_str()),
        runner_gone_after: std::time::Duration::from_millis(config.monitor.worker_gone_after_ms),
    });
    let consuming = readiness::Consuming::default();
    let listener = tokio::net::TcpListener::bind(config.worker.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "worker.metrics_addr: cannot listen on {}",
                config.worker.metrics_addr
            )
        })?;
    let http_addr = listener.local_addr()?;
    let probe = http::Probe {
        metrics,
        consuming: consuming.clone(),
        shutdown: shutdown.clone(),
    };
    let http_stop = plumbing.clone();
    let http = tokio::spawn(async move {
        let _ = axum::serve(listener, http::router(probe))
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await;
    });
    let options = consumer::ConsumeOptions {
        urls: urls.iter().map(|u| (*u).to_owned()).collect(),
        queues: windows,
        grace: config.grace_period(),
        name: format!("conveyor-worker {worker_id}"),
    };
    tracing::info!(worker.id = %worker_id, http = %http_addr, "worker started");
    // The scheduler stops claiming ticks as soon as draining starts.
    let scheduling = scheduler.map(|s| s.spawn(shutdown.clone()));
    let finished = tokio::spawn(async move {
        consumer::run(rt, options, consuming).await;
        if let Some(scheduling) = scheduling {
            let _ = scheduling.await;
        }
        beats_stop.cancel();
        let _ = beats.await;
        plumbing.cancel();
        let _ = http.await;
        tracing::info!("worker stopped");
    });
    Ok(Worker {
        http_addr,
        finished,
    })
}

fn mail_services(config: &Config) -> anyhow::Result<conveyor_tasks::mail::MailServices> {
    use std::time::Duration;
    let mail = &config.mail;
    let settings = conveyor_tasks::mail::MailSettings {
        chunk_size: mail.chunk_size,
        smtp_concurrency: mail.smtp_concurrency,
        claim_ttl: Duration::from_millis(mail.claim_ttl_ms),
        global_rate_per_sec: mail.global_rate_per_sec,
        max_smtp_attempts: mail.max_smtp_attempts,
        retry_backoff: Duration::from_millis(mail.retry_backoff_ms),
        unsubscribe_url: mail.unsubscribe_url.clone(),
    };
    conveyor_tasks::mail::MailServices::new(
        &conveyor_platform::config::smtp_url(config),
        mail.smtp_pool_size,
        Duration::from_millis(mail.smtp_timeout_ms),
        conveyor_templates::MailTemplates::new(mail.templates_dir.clone()),
        settings,
    )
}

/// The task-side view of `[webhooks.headshots]`.
fn headshot_policy(
    config: &conveyor_platform::config::HeadshotConfig,
) -> conveyor_tasks::webhooks::HeadshotPolicy {
    use conveyor_platform::config::HeadshotStorage;
    conveyor_tasks::webhooks::HeadshotPolicy {
        allowed_hosts: config.allowed_hosts.clone(),
        allow_internal_addresses: config.allow_internal_addresses,
        max_bytes: config.max_bytes,
        timeout: std::time::Duration::from_millis(config.timeout_ms),
        content_types: config
            .content_types
            .iter()
            .map(|t| t.to_ascii_lowercase())
            .collect(),
        dir: match config.storage {
            HeadshotStorage::Database => None,
            HeadshotStorage::Directory => config.dir.clone(),
        },
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}
