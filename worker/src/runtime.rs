//! What every delivery handler of one worker process shares.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use conveyor_platform::amqp::{Publisher, Topology};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::pool::PgPool;
use conveyor_tasks::{Registry, Services};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::state_writer::StateWriter;

/// Shared state of a running worker.
pub struct Runtime {
    /// Task implementations by name.
    pub registry: Registry,
    /// Queue names.
    pub topology: Topology,
    /// Publishes retries, dead letters and follow-up jobs.
    pub publisher: Publisher,
    /// Group-commits job states.
    pub states: StateWriter,
    /// This process's metrics.
    pub metrics: Metrics,
    /// Handed to every task.
    pub services: Services,
    /// The database pool.
    pub db: PgPool,
    /// Cancelled when draining starts.
    pub shutdown: CancellationToken,
    /// Cancelled once draining has stopped the consumers: the broker confirmed
    /// cancelling them (or did not answer within the consumer's 2 s), or none
    /// was attached. A delivery returned for shutdown waits for it (see
    /// `execute::requeue_for_shutdown`).
    pub consumers_cancelled: CancellationToken,
    /// Per-task concurrency limits.
    pub permits: HashMap<&'static str, Arc<Semaphore>>,
    /// `amqp.delivery_limit_resets`: how often a message the broker's delivery
    /// limit caught unstarted goes back to its queue (see `dead_letters::resets`).
    pub delivery_limit_resets: u32,
    /// This worker's id, as a `running` record names it (`jobs.runner`).
    pub runner: Arc<str>,
    /// `monitor.worker_gone_after_ms`: a runner silent this long is gone (see `runner`).
    pub runner_gone_after: Duration,
}

impl Runtime {
    /// The concurrency limiter of `task`.
    pub fn permits_for(&self, task: &str) -> Option<Arc<Semaphore>> {
        self.permits.get(task).cloned()
    }
}
