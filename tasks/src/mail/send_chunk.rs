//! `mail.send_chunk`: deliver one chunk, one claimed group of recipients at a time.
//!
//! For each group: claim up to `smtp_concurrency` due recipients if the
//! campaign is still sending (committed), reserve send slots (shared rate),
//! talk to the SMTP server for each, then record every outcome, committed
//! together with the next group's claim. A throttled group is recorded on its
//! own instead, and its conversation slots go back to the worker's other
//! chunks, which would otherwise wait for the slow chunk's end.
//! A 250 marks the row `sent`; a 5xx marks it `failed` with the reply; a 4xx, or
//! a connection failure or timeout before the message was written, defers it
//! with backoff. A conversation that broke or timed out after the message was
//! written marks it `unknown` (the server may have it). Rows left claimed by a
//! dead worker become `unknown` once their claim expires. `unknown` rows are
//! never re-sent automatically.
//! On shutdown the group in flight is finished and the job goes back to its
//! queue; the rest of the chunk stays `pending`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_schema::args::mail::{self, SendChunkArgs};
use conveyor_schema::models::CampaignState;
use conveyor_schema::pool;
use futures::future::join_all;
use lettre::message::Mailbox;

use super::ledger::{self, Outcome};
use super::message::{self, Delivery};
use super::rate;
use crate::{JobContext, Task, TaskError};

/// The chunk sender.
pub struct SendChunk;

impl Task for SendChunk {
    type Spec = mail::SendChunk;

    async fn run(&self, args: SendChunkArgs, ctx: JobContext) -> Result<(), TaskError> {
        let db = &ctx.services.db;
        let mail = ctx.services.mail.clone();
        let settings = &mail.settings;
        let SendChunkArgs {
            campaign_id,
            chunk_id,
        } = args;
        let Some(campaign) = pool::run(db, move |c| ledger::campaign(c, campaign_id)).await? else {
            return Err(TaskError::permanent(anyhow::anyhow!(
                "campaign {campaign_id} does not exist"
            )));
        };
        let from: Mailbox = campaign
            .from_addr
            .parse()
            .map_err(|e| TaskError::permanent(anyhow::anyhow!("campaign from address: {e}")))?;
        let reply_to: Option<Mailbox> = match &campaign.reply_to {
            Some(addr) => Some(
                addr.parse()
                    .map_err(|e| TaskError::permanent(anyhow::anyhow!("campaign reply_to: {e}")))?,
            ),
            None => None,
        };
        let envelope = message::Envelope {
            campaign_id,
            template: &campaign.template,
            from: &from,
            reply_to: reply_to.as_ref(),
            vars: &campaign.vars,
        };
        let expired = pool::run(db, move |c| ledger::expire_claims(c, chunk_id)).await?;
        if expired > 0 {
            tracing::warn!(chunk.id = %chunk_id, expired, "recipients in doubt after an expired claim marked unknown");
        }
        let worker = ctx.services.worker_id.clone();
        let ttl_secs = settings.claim_ttl.as_secs_f64();
        let group = settings.smtp_concurrency.max(1);
        // The conversation slots are taken before a claim (so claimed rows never
        // wait for one) and kept for the groups that follow, unless throttled.
        let mut slots = None;
        let mut outcomes: Vec<Outcome> = Vec::new();
        loop {
            let stopping = ctx.shutdown.is_cancelled();
            if !stopping && slots.is_none() {
                slots = Some(tokio::select! {
                    slots = mail.conversations.clone().acquire_many_owned(group as u32) => {
                        slots.map_err(|_| anyhow::anyhow!("mail service closed"))?
                    }
                    _ = ctx.shutdown.cancelled() => return Err(TaskError::Interrupted),
                });
            }
            // The last group's outcomes are recorded in the same commit as the next claim.
            let (sent, claimer) = (std::mem::take(&mut outcomes), worker.clone());
            let next = (!stopping).then_some((ttl_secs, group));
            let (state, claimed) = pool::run(db, move |c| {
                ledger::record_and_claim(c, &claimer, &sent, campaign_id, chunk_id, next)
            })
            .await?;
            if stopping {
                return Err(TaskError::Interrupted);
            }
            match state {
                Some(CampaignState::Sending) => {}
                Some(CampaignState::Paused) => {
                    let released =
                        pool::run(db, move |c| ledger::release_pending(c, chunk_id)).await?;
                    tracing::info!(chunk.id = %chunk_id, released, "campaign paused; released the rest of the chunk");
                    return Ok(());
                }
                _ => return Ok(()),
            }
            if claimed.is_empty() {
                break;
            }
            let (start, spacing) =
                reserve_slots(&ctx, campaign_id, campaign.rate_per_sec, claimed.len()).await?;
            let sends = claimed.iter().enumerate().map(|(i, recipient)| {
                let envelope = &envelope;
                let mail = &mail;
                async move {
                    if let Some(spacing) = spacing {
                        let due = start + spacing * i as u32;
                        if let Ok(wait) = (due - Utc::now()).to_std() {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    message::send_one(
                        mail,
                        envelope,
                        recipient.id,
                        &recipient.email,
                        &recipient.vars,
                    )
                    .await
                }
            });
            let deliveries = join_all(sends).await;
            outcomes = claimed
                .iter()
                .zip(deliveries)
                .map(|(recipient, delivery)| outcome(settings, recipient, delivery))
                .collect();
            if spacing.is_some() {
                // A throttled group took its time: record it now and let the
                // worker's other chunks have the conversations before the next.
                let (sent, recorder) = (std::mem::take(&mut outcomes), worker.clone());
                pool::run(db, move |c| ledger::record(c, &recorder, &sent)).await?;
                slots = None;
            }
        }
        drop(slots);
        let left = pool::run(db, move |c| ledger::leftovers(c, chunk_id)).await?;
        if left.pending > 0 || left.sending > 0 {
            let due = [left.next_due, left.claims_expire]
                .into_iter()
                .flatten()
                .max();
            let wait = due
                .and_then(|due| (due - Utc::now()).to_std().ok())
                .unwrap_or_default()
                .max(Duration::from_millis(100));
            return Err(TaskError::retry_after(
                wait,
                anyhow::anyhow!(
                    "{} recipient(s) deferred, {} claimed elsewhere; checking again later",
                    left.pending,
                    left.sending
                ),
            ));
        }
        pool::run(db, move |c| {
            ledger::finish_chunk(c, chunk_id)?;
            ledger::complete_if_done(c, campaign_id)
        })
        .await?;
        Ok(())
    }
}

/// Reserves `n` slots against the campaign's rate and the global ceiling;
/// returns the first slot and the spacing between sends (`None`: unthrottled).
async fn reserve_slots(
    ctx: &JobContext,
    campaign_id: uuid::Uuid,
    campaign_rate: Option<f64>,
    n: usize,
) -> Result<(DateTime<Utc>, Option<Duration>), TaskError> {
    let global = ctx.services.mail.settings.global_rate_per_sec;
    if campaign_rate.is_none() && global.is_none() {
        return Ok((Utc::now(), None));
    }
    let campaign_key = campaign_rate.map(|_| format!("campaign:{campaign_id}"));
    let start = pool::run(&ctx.services.db, move |c| {
        let mut start = Utc::now();
        if let (Some(rate), Some(key)) = (campaign_rate, campaign_key.as_deref()) {
            start = start.max(rate::reserve(c, key, rate, n)?);
        }
        if let Some(rate) = global {
            start = start.max(rate::reserve(c, "global", rate, n)?);
        }
        Ok(start)
    })
    .await?;
    let slowest = [campaign_rate, global]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);
    Ok((start, Some(Duration::from_secs_f64(1.0 / slowest))))
}

fn outcome(
    settings: &super::MailSettings,
    recipient: &ledger::Claimed,
    delivery: Delivery,
) -> Outcome {
    match delivery {
        Delivery::Sent(reply) => Outcome {
            id: recipient.id,
            state: "sent",
            reply,
            next_attempt_at: None,
        },
        Delivery::Failed(reply) => Outcome {
            id: recipient.id,
            state: "failed",
            reply,
            next_attempt_at: None,
        },
        Delivery::Unknown(reply) => Outcome {
            id: recipient.id,
            state: "unknown",
            reply,
            next_attempt_at: None,
        },
        Delivery::Deferred(reply)
            if recipient.attempts
                >= i32::try_from(settings.max_smtp_attempts).unwrap_or(i32::MAX) =>
        {
            Outcome {
                id: recipient.id,
                state: "failed",
                reply: format!("gave up after {} attempts: {reply}", recipient.attempts),
                next_attempt_at: None,
            }
        }
        Delivery::Deferred(reply) => {
            let doublings = u32::try_from(recipient.attempts.saturating_sub(1))
                .unwrap_or(0)
                .min(16);
            let delay = settings.retry_backoff.saturating_mul(1 << doublings);
            Outcome {
                id: recipient.id,
                state: "pending",
                reply,
                next_attempt_at: Some(Utc::now() + delay),
            }
        }
    }
}
