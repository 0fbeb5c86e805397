//! Handling one delivery, from bytes to ack.
//!
//! The order of effects is what makes a job look as if it ran once:
//! 1. decode; an unreadable envelope or unknown task is dead-lettered with the
//!    reason, never dropped and never retried;
//! 2. run the attempt under its timeout, with panics caught;
//! 3. publish what the outcome needs (the next attempt to a delay queue, or the
//!    job to its dead-letter queue) and wait for the broker's confirm;
//! 4. commit the job's new state;
//! 5. only then acknowledge the delivery (in a batch with others: `acks`).
//!
//! Should PostgreSQL refuse the new state for what it holds (the state writer
//! isolates such a row, see `state_writer`), retrying would never commit it and
//! holding the delivery would only bring it back. A dead job's message is in
//! the dead-letter queue by then: its record is written without the state, or
//! in a fallback form (`dead_letters::commit`), and the delivery acked. A
//! retry's next attempt is published: the delivery is acked and that attempt
//! carries the job on. A success is dead-lettered like an unreadable message
//! (published to the dead-letter queue with the database's error as its
//! reason, recorded, then acked), so the job is neither lost nor run again by
//! a redelivery. Either way the job's row, which would keep its last
//! committed state (`running`), is brought to `dead` in a minimal form with
//! the record (see `state_writer`).
//!
//! A crash anywhere before 5 redelivers the message; a redelivered message whose
//! job is already final, has moved to a later attempt, or whose attempt has
//! already failed and been retried is acknowledged without running. One whose
//! attempt is running under a worker still alive waits for it (`runner`). So is a
//! keyed job's, a retry's or a returned message's (`dead_letters::resets`)
//! whose attempt is running (checked once the message holds a concurrency
//! slot). A retry's message may have a twin
//! when the attempt before it ran again after publishing it (its worker died
//! before committing `retrying`). A keyed job may be published twice under the same id:
//! by a retry of an in-doubt request (see the ingress's `idempotency`), by the
//! scheduler re-publishing a tick (`schedule:<name>@<tick>`), by a mail
//! planner re-enqueueing a chunk (`campaign:<id>/chunk:<id>`); that second
//! message must not run it a second time.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use conveyor_platform::amqp::{DELAY_LEVELS_MS, Outgoing, delay_level_for};
use conveyor_schema::db::jobs;
use conveyor_schema::{Envelope, JobState};
use conveyor_tasks::{JobContext, MAX_RETRY_AFTER, TaskError};
use diesel::prelude::*;
use futures::FutureExt;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;
use uuid::Uuid;

mod received;
mod settle;

pub use received::Received;
pub(crate) use received::message_id;
use settle::{Settle, dead_letter_refused, finish_with, requeue_for_shutdown};

use crate::acks::ChannelAcks;
use crate::dead_letters::DeadLetter;
use crate::runner::{self, Verdict};
use crate::runtime::Runtime;
use crate::state_writer::StateChange;

/// Handles one delivery from logical queue `queue`. `lost` is cancelled when
/// the delivery's connection is gone: the broker has then already returned the
/// message to its queue (another worker may hold it), so an attempt that has
/// not started yet must not start.
pub async fn handle(
    rt: Arc<Runtime>,
    queue: Arc<str>,
    delivery: Received,
    acks: Arc<ChannelAcks>,
    draining: TaskTrackerToken,
    lost: CancellationToken,
) {
    let settle = Settle::new(acks, delivery.tag, draining);
    let envelope = match Envelope::decode(&delivery.data) {
        Ok(envelope) => envelope,
        Err(err) => {
            let record = DeadLetter::unreadable(
                delivery.message_id,
                &queue,
                &delivery.data,
                &err.to_string(),
            );
            let id = record.id;
            tracing::warn!(job.id = %id, queue = %queue, error = %err, "dead-lettering an unreadable message");
            let dead = Outgoing::dead_letter(
                &rt.topology,
                &queue,
                delivery.data.clone(),
                id,
                "",
                &err.to_string(),
            );
            return finish_with(&rt, &settle, &dead, None, Some(record)).await;
        }
    };
    let span = tracing::info_span!(
        "job",
        job.id = %envelope.id,
        task = %envelope.task,
        attempt = envelope.attempt,
        trace_id = tracing::field::Empty,
    );
    // The producer's trace (from `traceparent` on `POST /v1/jobs`), so a job's
    // log lines can be found from the request that created it.
    if let Some(trace) = &envelope.trace {
        span.record("trace_id", trace.trace_id());
    }
    run_envelope(rt, queue, delivery, settle, envelope, lost)
        .instrument(span)
        .await
}

async fn run_envelope(
    rt: Arc<Runtime>,
    queue: Arc<str>,
    delivery: Received,
    settle: Settle,
    envelope: Envelope,
    lost: CancellationToken,
) {
    let Some(task) = rt.registry.get(&envelope.task).cloned() else {
        let reason = format!("unknown task `{}`", envelope.task);
        tracing::warn!(reason, "dead-lettering");
        let dead = Outgoing::dead_letter(
            &rt.topology,
            &queue,
            delivery.data.clone(),
            envelope.id,
            &envelope.task,
            &reason,
        );
        let record = DeadLetter::of(&envelope, &queue, &reason);
        let mut change = StateChange::of(&envelope, &queue, envelope.attempt, JobState::Dead);
        change.error = Some(reason);
        change.finished_at = Some(Utc::now());
        return finish_with(&rt, &settle, &dead, Some(change), Some(record)).await;
    };
    let options = task.descriptor().options.clone();
    if let Some(not_before) = envelope.not_before {
        let remaining = (not_before - Utc::now()).to_std().unwrap_or_default();
        if remaining >= Duration::from_millis(DELAY_LEVELS_MS[0]) {
            let again =
                Outgoing::delayed(&rt.topology, &queue, &envelope, delay_level_for(remaining))
                    .by(delivery.producer.as_deref());
            return finish_with(&rt, &settle, &again, None, None).await;
        }
        // Less than the shortest delay queue: wait here rather than run early.
        tokio::time::sleep(remaining).await;
    }
    // Checked once a slot is held, so that a copy that waited for one sees what
    // the other copy did meanwhile. A retry's message (attempt > 1) may be a
    // second copy of its attempt, as a keyed job's may: the attempt before it
    // was run again after its retry was published (a worker died before
    // committing `retrying`, or the publish's confirm was lost).
    // So may a message returned to its queue after the broker's delivery limit
    // (`dead_letters::resets`): a redelivered inbox copy may return it twice.
    // And so may a delayed one (`not_before`): a worker that died between
    // confirming a hop to a shorter delay queue and acking the message it hopped
    // has the message back, hops it again, and both copies come back fresh.
    let second_copy_possible = !delivery.redelivered
        && (envelope.idempotency_key.is_some()
            || envelope.attempt > 1
            || delivery.limit_reset
            || envelope.not_before.is_some());
    let permits = rt.permits_for(task.descriptor().name);
    let mut held = false;
    let (permit, claimed, started_at) = loop {
        let permit = match &permits {
            Some(semaphore) => tokio::select! {
                permit = semaphore.clone().acquire_owned() => permit.ok(),
                _ = rt.shutdown.cancelled() => return requeue_for_shutdown(&rt, &settle, &lost).await,
                _ = lost.cancelled() => return,
            },
            None => None,
        };
        if rt.shutdown.is_cancelled() {
            return requeue_for_shutdown(&rt, &settle, &lost).await;
        }
        if lost.is_cancelled() {
            tracing::debug!("connection lost before the attempt started; the broker redelivers it");
            return;
        }
        let started_at = Utc::now();
        if !(delivery.redelivered || second_copy_possible) {
            break (permit, false, started_at);
        }
        let start = runner::Start {
            queue: &queue,
            max_attempts: options.max_attempts,
            timeout: options.timeout,
            keyed: second_copy_possible,
            started_at,
            producer: delivery.producer.as_deref(),
        };
        match runner::claim(&rt, &envelope, start).await {
            Verdict::Claimed => break (permit, true, started_at),
            Verdict::Unclaimed => break (permit, false, started_at),
            Verdict::Stale => {
                tracing::info!(
                    redelivered = delivery.redelivered,
                    "job already finished, running or moved on; acknowledging without running"
                );
                rt.metrics
                    .jobs_skipped
                    .with_label_values(&[envelope.task.as_str(), options.queue])
                    .inc();
                return settle.ack();
            }
            Verdict::Wait => {
                // Not holding a slot meanwhile: the attempt it waits for may be this worker's own.
                drop(permit);
                if !held {
                    held = true;
                    tracing::info!(
                        "this attempt is running under a worker still alive; holding the redelivered copy until it ends"
                    );
                    rt.metrics
                        .jobs_held_for_runner
                        .with_label_values(&[envelope.task.as_str(), options.queue])
                        .inc();
                }
                tokio::select! {
                    _ = tokio::time::sleep(runner::RECHECK) => {}
                    _ = rt.shutdown.cancelled() => return requeue_for_shutdown(&rt, &settle, &lost).await,
                    _ = lost.cancelled() => return,
                }
            }
        }
    };
    let labels = [envelope.task.as_str(), options.queue];
    let metrics = &rt.metrics;
    metrics.jobs_started.with_label_values(&labels).inc();
    let waited = (Utc::now() - envelope.enqueued_at)
        .to_std()
        .unwrap_or_default();
    metrics
        .job_queue_wait
        .with_label_values(&labels)
        .observe(waited.as_secs_f64());
    // A claimed start is committed already; any other is group-committed
    // while the attempt runs.
    if !claimed {
        let mut running =
            StateChange::of(&envelope, &queue, options.max_attempts, JobState::Running);
        running.started_at = Some(started_at);
        running.producer = delivery.producer.clone();
        running.runner = Some(rt.runner.clone());
        rt.states.record(running);
    }

    let ctx = JobContext {
        job_id: envelope.id,
        attempt: envelope.attempt,
        max_attempts: options.max_attempts,
        shutdown: rt.shutdown.clone(),
        services: rt.services.clone(),
    };
    let started = Instant::now();
    let in_flight = metrics.jobs_in_flight.with_label_values(&labels);
    in_flight.inc();
    let attempt = AssertUnwindSafe(task.call(envelope.args.clone(), ctx)).catch_unwind();
    let outcome = match tokio::time::timeout(options.timeout, attempt).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(TaskError::from(anyhow::anyhow!(
            "task panicked: {}",
            panic_message(&*panic)
        ))),
        Err(_) => Err(TaskError::from(anyhow::anyhow!(
            "attempt timed out after {:?}",
            options.timeout
        ))),
    };
    in_flight.dec();
    let ended = Utc::now();
    // The attempt is over: the next one may start while this one's outcome is committed.
    drop(permit);
    metrics
        .job_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    let elapsed_ms = started.elapsed().as_millis() as u64;

    let mut change = StateChange::of(&envelope, &queue, options.max_attempts, JobState::Succeeded);
    match outcome {
        Err(TaskError::Interrupted) => {
            tracing::info!(
                elapsed_ms,
                "task stopped for shutdown; returning the job to its queue"
            );
            runner::release(&rt, envelope.id, envelope.attempt).await;
            requeue_for_shutdown(&rt, &settle, &lost).await;
        }
        Ok(()) => {
            change.finished_at = Some(ended);
            tracing::debug!(elapsed_ms, "job succeeded");
            let succeeded = metrics.jobs_succeeded.with_label_values(&labels);
            // What dead-lettering the delivery needs, should its state be refused.
            let (runtime, data) = (rt.clone(), delivery.data);
            rt.states
                .commit_then(change, move |committed| match committed {
                    Ok(()) => {
                        succeeded.inc();
                        settle.ack();
                    }
                    Err(refused) => {
                        tokio::spawn(dead_letter_refused(runtime, queue, settle, data, refused));
                    }
                });
        }
        Err(err) if !err.is_permanent() && envelope.attempt < options.max_attempts => {
            let wanted = match &err {
                TaskError::Retry {
                    after: Some(after), ..
                } => (*after).min(MAX_RETRY_AFTER),
                _ => jitter(options.backoff(envelope.attempt + 1)),
            };
            let due = Utc::now() + wanted;
            tracing::warn!(error = %err, elapsed_ms, retry_in_ms = wanted.as_millis() as u64, "attempt failed; will retry");
            let mut next_envelope = envelope.next_attempt();
            next_envelope.not_before = Some(due);
            let next = Outgoing::delayed(
                &rt.topology,
                &queue,
                &next_envelope,
                delay_level_for(wanted),
            )
            .by(delivery.producer.as_deref());
            change.state = JobState::Retrying;
            change.error = Some(err.to_string());
            change.next_attempt_at = Some(due);
            metrics.jobs_retried.with_label_values(&labels).inc();
            finish_with(&rt, &settle, &next, Some(change), None).await;
        }
        Err(err) => {
            let reason = if err.is_permanent() {
                err.to_string()
            } else {
                format!("gave up after {} attempts: {err}", envelope.attempt)
            };
            tracing::error!(error = %reason, elapsed_ms, "job is dead");
            let dead = Outgoing::dead_letter(
                &rt.topology,
                &queue,
                envelope.encode(),
                envelope.id,
                &envelope.task,
                &reason,
            );
            let record = DeadLetter::of(&envelope, &queue, &reason);
            change.state = JobState::Dead;
            change.error = Some(reason);
            change.finished_at = Some(ended);
            metrics.jobs_dead.with_label_values(&labels).inc();
            finish_with(&rt, &settle, &dead, Some(change), Some(record)).await;
        }
    }
}

/// The job's recorded state and attempt (`None`: no record).
pub(crate) async fn recorded_attempt(
    rt: &Runtime,
    id: Uuid,
) -> Result<Option<(Option<JobState>, i32)>, conveyor_schema::pool::DbError> {
    let found = conveyor_schema::pool::run(&rt.db, move |conn| {
        jobs::table
            .find(id)
            .select((jobs::state, jobs::attempts))
            .first::<(String, i32)>(conn)
            .optional()
    })
    .await?;
    Ok(found.map(|(state, attempts)| (JobState::parse(&state), attempts)))
}

/// Equal jitter: between half and all of `delay`.
pub(crate) fn jitter(delay: Duration) -> Duration {
    let half = delay / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
