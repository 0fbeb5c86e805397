//! `mail.send_chunk`: deliver one chunk, one claimed group of recipients at a time.
//!
//! For each group: if the campaign is throttled, reserve its send slots
//! (shared rate) and wait for the first, before anyone is claimed; then claim
//! up to `smtp_concurrency` due recipients (a throttled group only as many as
//! have slots, at most a second's worth) if the campaign is still sending
//! (committed), talk to the SMTP server for each, then record every outcome,
//! committed together with the next group's claim. A throttled group is
//! recorded on its own instead, and its conversation slots go back to the
//! worker's other chunks, which would otherwise wait for the slow chunk's end.
//! A 250 marks the row `sent`; a 5xx marks it `failed` with the reply; a 4xx, or
//! a conversation that broke or timed out before the message was written, defers
//! it with backoff, and counts towards `mail.max_smtp_attempts`. When no
//! conversation can be had at all (the server is unreachable or refuses us at
//! its greeting, STARTTLS or AUTH, whatever the code), no recipient is at fault:
//! the group's untried recipients go back to `pending` uncounted and the job
//! fails with the server's reason, so its retries (backoff up to 5 minutes, 50
//! attempts, then the dead-letter queue) wait for the server or for the
//! operator to fix `mail.smtp_url`. A conversation that broke or timed out
//! after the message was written marks it `unknown` (the server may have
//! it). Rows left claimed by a dead worker become `unknown` once their claim
//! expires. `unknown` rows are
//! never re-sent automatically; so a recipient is claimed only when it is about
//! to be handed to the SMTP server, and one that never was goes back to `pending`.
//! What the server said is known nowhere else, so a database error while a
//! group's outcomes are recorded (a failover, a pool checkout that timed out)
//! does not lose them: the write is retried with backoff while the group's
//! claims hold, and a repeat records nothing twice and claims no second group
//! (`ledger::record_and_claim`). Only if it never succeeds does the job fail,
//! logging each recipient whose outcome is lost; those turn `unknown`.
//! On shutdown the group in flight is finished, except that recipients of a
//! throttled group still waiting for their send slot are given back, and the
//! job goes back to its queue; the rest of the chunk stays `pending`. A group
//! is claimed only if it can end before the attempt's timeout; else the job is
//! retried. On pause the chunk's pending recipients go back to the planner, if
//! the campaign is still paused when they do (else the sender carries on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use conveyor_schema::TaskSpec;
use conveyor_schema::args::mail::{self, SendChunkArgs};
use conveyor_schema::models::CampaignState;
use conveyor_schema::pool::{self, PgPool};
use diesel::{PgConnection, QueryResult};
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
        let ttl = settings.claim_ttl;
        let group = settings.smtp_concurrency.max(1);
        // The worker drops an attempt at the task's timeout, claimed recipients
        // and all: no group is claimed that could still be at work by then (its
        // last send starts `spread` after the claim and takes at most this).
        let deadline = Instant::now() + <mail::SendChunk as TaskSpec>::options().timeout;
        let send_timeout = mail.transport.timeout();
        // The conversation slots are taken before a claim (so claimed rows never
        // wait for one) and kept for the groups that follow, unless throttled.
        let mut slots = None;
        let mut outcomes: Vec<Outcome> = Vec::new();
        // Until when the claims of the group in `outcomes` hold.
        let mut held: Option<Instant> = None;
        // The last step's claim stamp; each step's is later.
        let mut token = DateTime::<Utc>::MIN_UTC;
        loop {
            let mut stopping = ctx.shutdown.is_cancelled();
            // A throttled group's send slots are reserved, and the first one
            // awaited, before anyone is claimed: a failed reservation or a
            // shutdown meanwhile leaves nobody claimed. (A throttled group's
            // outcomes are recorded already, so an error here loses none.)
            let pace = if stopping {
                None
            } else {
                reserve_slots(&ctx, campaign_id, chunk_id, campaign.rate_per_sec, group).await?
            };
            if let Some(wait) = pace.and_then(|p| (p.start - Utc::now()).to_std().ok()) {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctx.shutdown.cancelled() => stopping = true,
                }
            }
            let (limit, spread) = pace.map_or((group, Duration::ZERO), |p| (p.n, p.spread()));
            if !stopping && slots.is_none() {
                slots = Some(tokio::select! {
                    slots = mail.conversations.clone().acquire_many_owned(limit.max(1) as u32) => {
                        slots.map_err(|_| anyhow::anyhow!("mail service closed"))?
                    }
                    _ = ctx.shutdown.cancelled() => return Err(TaskError::Interrupted),
                });
            }
            // Out of time: record, claim nobody, and let a retry carry on.
            let in_time = Instant::now() + spread + send_timeout < deadline;
            // The last group's outcomes are recorded in the same commit as the
            // next claim, which is trusted until the group's last send has had
            // its claim TTL.
            let claimer = worker.clone();
            let next = (!stopping && in_time).then_some(((ttl + spread).as_secs_f64(), limit));
            token = (Utc::now().trunc_subsecs(6)).max(token + chrono::Duration::microseconds(1));
            // Retried while the recorded group's claims hold, and while a claim
            // a failed run may have committed would: the repeat returns it.
            let (step, claimed_from) = record_retrying(
                db,
                chunk_id,
                std::mem::take(&mut outcomes),
                held.take().unwrap_or(Instant::now() + ttl).min(deadline),
                move |c, sent| {
                    ledger::record_and_claim(c, &claimer, sent, campaign_id, chunk_id, next, token)
                },
            )
            .await?;
            let (state, claimed) = step;
            if state != Some(CampaignState::Sending) && !claimed.is_empty() {
                // A claim a failed run of this step committed before the
                // campaign left `sending`: nobody was sent, so back to pending.
                let (ids, claimer) = (
                    claimed.iter().map(|r| r.id).collect::<Vec<_>>(),
                    worker.clone(),
                );
                pool::run(db, move |c| ledger::give_back(c, &claimer, chunk_id, &ids)).await?;
            }
            if stopping {
                return Err(TaskError::Interrupted);
            }
            match state {
                Some(CampaignState::Sending) => {}
                Some(CampaignState::Paused) => {
                    match pool::run(db, move |c| {
                        ledger::release_pending(c, campaign_id, chunk_id)
                    })
                    .await?
                    {
                        Some(released) => {
                            tracing::info!(chunk.id = %chunk_id, released, "campaign paused; released the rest of the chunk");
                            return Ok(());
                        }
                        // Resumed or cancelled since: look at the state again
                        // (the next group takes its conversation slots afresh).
                        None => {
                            slots = None;
                            continue;
                        }
                    }
                }
                _ => return Ok(()),
            }
            if claimed.is_empty() {
                break;
            }
            held = Some(claimed_from + ttl + spread);
            let sends = claimed.iter().enumerate().map(|(i, recipient)| {
                let envelope = &envelope;
                let mail = &mail;
                let shutdown = &ctx.shutdown;
                async move {
                    if let Some(pace) = pace {
                        let due = pace.start + pace.spacing * i as u32;
                        if let Ok(wait) = (due - Utc::now()).to_std() {
                            // Not handed to the SMTP server yet: on shutdown
                            // it is given back rather than left claimed.
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = shutdown.cancelled() => return None,
                            }
                        }
                    }
                    Some(
                        message::send_one(
                            mail,
                            envelope,
                            recipient.id,
                            &recipient.email,
                            &recipient.vars,
                        )
                        .await,
                    )
                }
            });
            let deliveries = join_all(sends).await;
            let mut unsent = Vec::new();
            let mut unavailable = None;
            outcomes = claimed
                .iter()
                .zip(deliveries)
                .filter_map(|(recipient, delivery)| match delivery {
                    Some(Ok(delivery)) => Some(outcome(settings, recipient, delivery)),
                    // No conversation: the server or our configuration is at
                    // fault, not the recipient, who goes back untried.
                    Some(Err(message::Unavailable(why))) => {
                        unsent.push(recipient.id);
                        unavailable = Some(why);
                        None
                    }
                    None => {
                        unsent.push(recipient.id);
                        None
                    }
                })
                .collect();
            if pace.is_some() || unavailable.is_some() {
                // A throttled group took its time: record it now (and give back
                // those a shutdown kept from being sent, or the server would
                // not talk to), and let the worker's other chunks have the
                // conversations before the next.
                let recorder = worker.clone();
                let until = held.take().unwrap_or_else(Instant::now).min(deadline);
                record_retrying(
                    db,
                    chunk_id,
                    std::mem::take(&mut outcomes),
                    until,
                    move |c, sent| {
                        ledger::record(c, &recorder, sent)?;
                        ledger::give_back(c, &recorder, chunk_id, &unsent)
                    },
                )
                .await?;
                slots = None;
            }
            if let Some(why) = unavailable {
                // The job's retries (with backoff) wait for the server; when
                // they run out, the dead letter carries this reason.
                return Err(anyhow::anyhow!(
                    "{why} (no recipient was tried; the chunk's stay pending)"
                )
                .into());
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

/// The first wait before recording a group's outcomes again; it doubles up
/// to [`RECORD_RETRY_MAX`].
const RECORD_RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two tries at recording a group's outcomes.
const RECORD_RETRY_MAX: Duration = Duration::from_secs(2);

/// Runs `write`, which records `outcomes` (what the SMTP server said, known
/// nowhere else), until it succeeds; returns what it returned and when the
/// run that succeeded began (no claim it made is older).
///
/// A failure (the database failing over, a pool checkout timing out) is
/// retried with backoff for as long as the claims on those recipients hold,
/// that is until `until`: a retry after that could land on a row that is
/// `unknown` and handed to an operator to resend. `write` must be safe to
/// repeat (see [`ledger::record_and_claim`]). It is not cut short by a
/// shutdown: the shutdown's own last step is such a write, and the worker's
/// grace period bounds it. Giving up, it logs each recipient whose outcome is
/// lost (they will turn `unknown` when their claims expire) and fails with the
/// last error.
async fn record_retrying<T, F>(
    db: &PgPool,
    chunk_id: uuid::Uuid,
    outcomes: Vec<Outcome>,
    until: Instant,
    write: F,
) -> Result<(T, Instant), TaskError>
where
    T: Send + 'static,
    F: Fn(&mut PgConnection, &[Outcome]) -> QueryResult<T> + Clone + Send + 'static,
{
    let outcomes: Arc<[Outcome]> = outcomes.into();
    let mut wait = RECORD_RETRY_FIRST;
    loop {
        let (write, sent) = (write.clone(), outcomes.clone());
        let began = Instant::now();
        let err = match pool::run(db, move |c| write(c, &sent)).await {
            Ok(done) => return Ok((done, began)),
            Err(err) => err,
        };
        if Instant::now() + wait >= until {
            let lost: Vec<String> = outcomes
                .iter()
                .map(|o| format!("{}:{}", o.id, o.state))
                .collect();
            tracing::error!(
                chunk.id = %chunk_id,
                error = %err,
                lost = %lost.join(" "),
                "could not record what the SMTP server said before the claims expired; these recipients (ledger id:outcome) will turn unknown"
            );
            return Err(err.into());
        }
        tracing::warn!(
            chunk.id = %chunk_id,
            error = %err,
            recipients = outcomes.len(),
            retry_in_ms = wait.as_millis() as u64,
            "recording a group's outcomes failed; retrying while their claims hold"
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RECORD_RETRY_MAX);
    }
}

/// At most this long passes between a throttled group's first send and its
/// last: a throttled group holds no more recipients than are due in it, so
/// none is claimed long before it is sent.
const PACE_WINDOW: Duration = Duration::from_secs(1);

/// Send slots reserved for a throttled group before it is claimed.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Recipients to claim, as many as slots were reserved (0: none is due).
    n: usize,
    /// When the first may be sent.
    start: DateTime<Utc>,
    /// Between two sends, at the slowest rate that applies.
    spacing: Duration,
}

impl Pace {
    /// From the group's first send to its last.
    fn spread(&self) -> Duration {
        self.spacing
            .saturating_mul(u32::try_from(self.n.saturating_sub(1)).unwrap_or(u32::MAX))
    }
}

/// For a throttled campaign (its own rate, the global ceiling or both),
/// reserves send slots for the chunk's next group against each; `None` when
/// unthrottled. The group is the chunk's due recipients, at most `group` of
/// them and at most a [`PACE_WINDOW`]'s worth at the slowest rate (at least one).
async fn reserve_slots(
    ctx: &JobContext,
    campaign_id: uuid::Uuid,
    chunk_id: uuid::Uuid,
    campaign_rate: Option<f64>,
    group: usize,
) -> Result<Option<Pace>, TaskError> {
    let global = ctx.services.mail.settings.global_rate_per_sec;
    let Some(slowest) = [campaign_rate, global]
        .into_iter()
        .flatten()
        .reduce(f64::min)
    else {
        return Ok(None);
    };
    let most = group
        .min((slowest * PACE_WINDOW.as_secs_f64()) as usize)
        .max(1);
    let campaign_key = campaign_rate.map(|_| format!("campaign:{campaign_id}"));
    let (n, start) = pool::run(&ctx.services.db, move |c| {
        let n = ledger::due(c, chunk_id, most)?;
        if n == 0 {
            return Ok((n, Utc::now()));
        }
        let limits: Vec<(&str, f64)> = [
            campaign_key.as_deref().zip(campaign_rate),
            global.map(|rate| ("global", rate)),
        ]
        .into_iter()
        .flatten()
        .collect();
        Ok((n, rate::reserve(c, &limits, n)?))
    })
    .await?;
    Ok(Some(Pace {
        n,
        start,
        spacing: Duration::from_secs_f64(1.0 / slowest),
    }))
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
