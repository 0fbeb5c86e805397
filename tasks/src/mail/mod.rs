//! The mail fan-out: a planner that splits a campaign into chunks, and chunk
//! senders that never send a recipient the same campaign twice.
//!
//! The guarantee rests on the ledger (`campaign_recipients`): a row is claimed
//! (`sending`, with worker id and expiry) and committed *before* the SMTP
//! conversation, and marked `sent` and committed after the server's 250 (a
//! database error meanwhile is retried while the claim holds, so the 250 is
//! not lost). A worker killed mid-conversation leaves a `sending` row whose
//! claim expires; such a row is in doubt and becomes `unknown`, never re-sent
//! automatically.
//! So a redelivered or replayed job can repeat work, but never a delivery.

mod ledger;
mod message;
mod plan;
mod rate;
mod send_chunk;
mod smtp;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use conveyor_templates::MailTemplates;

pub use plan::PlanCampaign;
pub use send_chunk::SendChunk;
pub use smtp::{SendError, SmtpPool};

/// Tunables of the fan-out.
#[derive(Debug, Clone)]
pub struct MailSettings {
    /// Recipients per chunk job.
    pub chunk_size: usize,
    /// SMTP conversations one worker holds at once, over all its chunk jobs
    /// (also the most recipients that can be in doubt when a worker is killed).
    pub smtp_concurrency: usize,
    /// How long a claim is trusted; must exceed the SMTP timeout.
    pub claim_ttl: Duration,
    /// Send-rate ceiling across all campaigns and workers.
    pub global_rate_per_sec: Option<f64>,
    /// SMTP attempts per recipient before a 4xx counts as failed.
    pub max_smtp_attempts: u32,
    /// First delay after a 4xx reply; doubles per attempt.
    pub retry_backoff: Duration,
    /// Unsubscribe link; `{campaign}` and `{recipient}` are replaced.
    pub unsubscribe_url: String,
}

/// What the mail tasks need, built once per worker.
pub struct MailServices {
    /// Pooled SMTP connections (`TCP_NODELAY`; see `smtp`).
    pub transport: SmtpPool,
    /// Mail templates.
    pub templates: MailTemplates,
    /// Tunables.
    pub settings: MailSettings,
    /// Bounds SMTP conversations across all chunks of this worker to
    /// `smtp_concurrency`, which is also the most recipients a killed worker can leave in doubt.
    pub conversations: Arc<Semaphore>,
}

impl MailServices {
    /// Builds the SMTP pool from a URL such as `smtp://user:pass@host:587?tls=required`
    /// or `smtp://127.0.0.1:2525?tls=none`. Connections open lazily.
    pub fn new(
        smtp_url: &str,
        pool_size: u32,
        timeout: Duration,
        templates: MailTemplates,
        settings: MailSettings,
    ) -> anyhow::Result<Self> {
        let transport = SmtpPool::new(smtp_url, pool_size, timeout)?;
        let conversations = Arc::new(Semaphore::new(settings.smtp_concurrency.max(1)));
        Ok(Self {
            transport,
            templates,
            settings,
            conversations,
        })
    }
}
