//! What every handler can reach.

use conveyor_platform::amqp::{Publisher, Topology};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::pool::PgPool;
use tokio_util::sync::CancellationToken;

use crate::recorder::Recorder;

/// Shared by all handlers. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The database pool.
    pub db: PgPool,
    /// Confirmed publishing.
    pub publisher: Publisher,
    /// Group-commits new jobs.
    pub recorder: Recorder,
    /// Queue names.
    pub topology: Topology,
    /// This process's metrics.
    pub metrics: Metrics,
    /// Webhook sources and their keys.
    pub webhooks: crate::webhooks::SharedSources,
    /// Cancelled when the ingress starts shutting down (readiness fails at once).
    pub shutdown: CancellationToken,
}
