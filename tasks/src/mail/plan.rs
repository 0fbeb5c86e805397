//! `mail.plan_campaign`: chunk the campaign and hand each chunk to a sender job.
//!
//! Safe to run any number of times: chunk ids are derived from (campaign,
//! plan generation, first recipient) and recorded, recipients are assigned to a
//! chunk once, and only chunks not yet confirmed as published are published.
//! A redelivered or replayed planner therefore makes no second chunk and, as
//! sender jobs reuse the chunk id as job id, no second job record.
//!
//! The campaign is read once per round, but each chunk is made only while the
//! campaign is still sending at that read's plan generation (checked under a
//! lock on the campaign row, see `ledger::plan_next_chunk`). A planner that was
//! overtaken by a pause, cancel, resume or resend-unknown stops there; the
//! chunks it made but did not publish are published by the planner of the
//! resume (every planner publishes all unpublished chunks of its campaign).

use conveyor_schema::Envelope;
use conveyor_schema::args::mail::{self, PlanCampaignArgs, SendChunkArgs};
use conveyor_schema::models::CampaignState;
use conveyor_schema::pool;

use super::ledger::{self, Planned};
use crate::{JobContext, Task, TaskError};

/// Sender jobs published per broker round trip.
/// Chunks planned per round before they are handed to sender jobs.
const ROUND: usize = 16;
/// Sender jobs enqueued together.
const PUBLISH_BATCH: usize = 200;

/// The planner.
pub struct PlanCampaign;

impl Task for PlanCampaign {
    type Spec = mail::PlanCampaign;

    async fn run(&self, args: PlanCampaignArgs, ctx: JobContext) -> Result<(), TaskError> {
        let db = &ctx.services.db;
        let chunk_size = ctx.services.mail.settings.chunk_size;
        let campaign_id = args.campaign_id;
        let mut planned = 0usize;
        let mut published = 0usize;
        // Plan and hand over in rounds, so sending starts while the rest is planned.
        loop {
            let Some(campaign) = pool::run(db, move |c| ledger::campaign(c, campaign_id)).await?
            else {
                return Err(TaskError::permanent(anyhow::anyhow!(
                    "campaign {campaign_id} does not exist"
                )));
            };
            if campaign.campaign_state() != CampaignState::Sending {
                tracing::info!(campaign.id = %campaign_id, state = %campaign.state, "campaign not sending; planner stops");
                return Ok(());
            }
            let mut round = 0usize;
            while round < ROUND && !ctx.shutdown.is_cancelled() {
                let campaign = campaign.clone();
                match pool::run(db, move |c| {
                    ledger::plan_next_chunk(c, &campaign, chunk_size)
                })
                .await?
                {
                    Planned::Chunk(_) => round += 1,
                    Planned::Nothing => break,
                    Planned::Stale => {
                        tracing::info!(campaign.id = %campaign_id, "campaign paused, cancelled or re-planned during the round; planner stops");
                        return Ok(());
                    }
                    Planned::Exists(chunk) => {
                        return Err(TaskError::permanent(anyhow::anyhow!(
                            "chunk {chunk} of campaign {campaign_id} is recorded already, but the recipients it would take are unplanned; not reassigning them (pause and resume the campaign to plan them afresh)"
                        )));
                    }
                }
            }
            planned += round;
            published += publish_unpublished(&ctx, campaign_id).await?;
            if round < ROUND || ctx.shutdown.is_cancelled() {
                break;
            }
        }
        if ctx.shutdown.is_cancelled() {
            return Err(TaskError::Interrupted);
        }
        pool::run(db, move |c| ledger::complete_if_done(c, campaign_id)).await?;
        tracing::info!(campaign.id = %campaign_id, planned, published, "campaign planned");
        Ok(())
    }
}

/// Enqueues a sender job for every chunk of the campaign not yet confirmed as
/// published, then marks them published; returns how many.
async fn publish_unpublished(
    ctx: &JobContext,
    campaign_id: uuid::Uuid,
) -> Result<usize, TaskError> {
    let db = &ctx.services.db;
    let chunks = pool::run(db, move |c| ledger::unpublished_chunks(c, campaign_id)).await?;
    for batch in chunks.chunks(PUBLISH_BATCH) {
        let jobs = batch
            .iter()
            .map(|&chunk_id| {
                let args = serde_json::to_value(SendChunkArgs {
                    campaign_id,
                    chunk_id,
                })
                .unwrap_or_default();
                // The chunk's id, and a key, so that a worker does not run a
                // second message of a chunk job (this planner retried after
                // publishing it) while the first runs or after it finished.
                Envelope {
                    id: chunk_id,
                    idempotency_key: Some(format!("campaign:{campaign_id}/chunk:{chunk_id}")),
                    ..Envelope::new(<mail::SendChunk as conveyor_schema::TaskSpec>::NAME, args)
                }
            })
            .collect();
        ctx.services.enqueue.enqueue(jobs).await?;
        let ids = batch.to_vec();
        pool::run(db, move |c| ledger::mark_published(c, &ids)).await?;
    }
    Ok(chunks.len())
}
