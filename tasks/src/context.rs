//! What a running task can reach: its job's identity, the database, a way to
//! enqueue follow-up jobs, shared services, and the shutdown signal.

use std::sync::Arc;

use conveyor_schema::Envelope;
use conveyor_schema::pool::PgPool;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Publishes follow-up jobs durably: records them and waits for the broker's
/// confirm. Implemented by the worker; tasks never see AMQP.
pub trait Enqueue: Send + Sync {
    /// Records and publishes every envelope; `Ok` only when all were confirmed.
    fn enqueue(&self, jobs: Vec<Envelope>) -> BoxFuture<'_, anyhow::Result<()>>;
}

/// Long-lived dependencies shared by every task in a worker process.
#[derive(Clone)]
pub struct Services {
    /// The process's PostgreSQL pool.
    pub db: PgPool,
    /// Publishes follow-up jobs.
    pub enqueue: Arc<dyn Enqueue>,
    /// This worker's identity (host:pid:uuid), recorded in claims.
    pub worker_id: String,
    /// SMTP pool, mail templates and fan-out settings.
    pub mail: Arc<crate::mail::MailServices>,
    /// How `webhook.profile_sync` fetches and stores headshots.
    pub headshots: Arc<crate::webhooks::HeadshotPolicy>,
}

/// One attempt's context.
#[derive(Clone)]
pub struct JobContext {
    /// The job id (the envelope's).
    pub job_id: Uuid,
    /// This attempt, 1-based.
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// Cancelled when the worker starts draining; long tasks stop at a safe point.
    pub shutdown: CancellationToken,
    /// Shared services.
    pub services: Services,
}
