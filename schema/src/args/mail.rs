//! The mail fan-out's internal tasks. Producers never enqueue these directly:
//! they go through `/v1/campaigns`, which enqueues the planner.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{TaskOptions, TaskSpec};

/// `mail.plan_campaign`: splits a campaign's unplanned pending recipients into
/// chunks (deterministic ids, recorded) and enqueues one sender job per chunk.
pub struct PlanCampaign;
/// Arguments of `mail.plan_campaign`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanCampaignArgs {
    /// The campaign to plan.
    pub campaign_id: Uuid,
}
impl TaskSpec for PlanCampaign {
    const NAME: &'static str = "mail.plan_campaign";
    const PUBLIC: bool = false;
    type Args = PlanCampaignArgs;
    fn options() -> TaskOptions {
        TaskOptions {
            max_attempts: 10,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            timeout: Duration::from_secs(600),
            concurrency: 2,
            ..TaskOptions::on_queue("mail")
        }
    }
}

/// `mail.send_chunk`: sends one chunk's recipients, claiming each in the
/// ledger before talking to the SMTP server.
pub struct SendChunk;
/// Arguments of `mail.send_chunk`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendChunkArgs {
    /// The campaign.
    pub campaign_id: Uuid,
    /// The chunk (see `campaign_chunks`).
    pub chunk_id: Uuid,
}
impl TaskSpec for SendChunk {
    const NAME: &'static str = "mail.send_chunk";
    const PUBLIC: bool = false;
    type Args = SendChunkArgs;
    fn options() -> TaskOptions {
        TaskOptions {
            // Retries carry deferred (4xx) recipients and in-doubt checks, so allow many.
            max_attempts: 50,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            // Far inside RabbitMQ's 30-minute consumer timeout.
            timeout: Duration::from_secs(20 * 60),
            concurrency: 4,
            ..TaskOptions::on_queue("mail")
        }
    }
}
