//! What every handler can reach.

use conveyor_platform::amqp::{Publisher, Topology};
use conveyor_platform::metrics::Metrics;
use std::sync::Arc;

use conveyor_platform::schedule::Schedule;
use conveyor_schema::pool::PgPool;
use tokio_util::sync::CancellationToken;

use crate::monitor::SharedSnapshot;
use crate::recorder::Recorder;

/// Shared by all handlers: one `Arc`, so the middleware and handlers that take
/// it per request clone a single pointer rather than every handle inside.
#[derive(Clone)]
pub struct AppState(Arc<Handles>);

impl AppState {
    /// Shares `handles`.
    pub fn new(handles: Handles) -> Self {
        Self(Arc::new(handles))
    }
}

impl std::ops::Deref for AppState {
    type Target = Handles;

    fn deref(&self) -> &Handles {
        &self.0
    }
}

/// What every handler can reach, behind [`AppState`].
pub struct Handles {
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
    /// Mail templates, to validate campaigns.
    pub templates: conveyor_templates::MailTemplates,
    /// Webhook sources and their keys.
    pub webhooks: crate::webhooks::SharedSources,
    /// Webhook claims and outcome events, written in batches.
    pub webhook_ledger: crate::webhooks::Ledger,
    /// Rejected webhooks, counted in memory and written in batches.
    pub webhook_rejections: crate::webhook_rejections::Rejections,
    /// Cancelled when the ingress starts shutting down (readiness fails at once).
    pub shutdown: CancellationToken,
    /// Every schedule in force (for `/v1/schedules`).
    pub schedules: Arc<Vec<Schedule>>,
    /// API keys and rate limits.
    pub auth: crate::auth::Auth,
    /// `Idempotency-Key` retention and in-flight takeover.
    pub idempotency: crate::idempotency::Settings,
    /// The queue monitor's latest poll.
    pub snapshot: SharedSnapshot,
    /// A worker silent this long is shown as gone.
    pub worker_gone_after: std::time::Duration,
}
