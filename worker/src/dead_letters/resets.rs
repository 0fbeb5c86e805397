//! Giving a message back to its work queue when the broker dead-lettered it
//! for its delivery limit without its attempt ever having started.
//!
//! On RabbitMQ 3.10 every return of a message to its queue counts toward
//! `x-delivery-limit`, run or not: a requeueing nack, and a channel or
//! connection closing with unacked deliveries. A worker scaled in returns the
//! prefetched deliveries it had not started, one that is killed returns all,
//! so a healthy job can reach the limit without ever having run. The limit is
//! there for poison messages that crash their worker each time they run.
//!
//! So when the job's record shows its attempt never started (see
//! [`never_started`]), the inbox copy is published again to the work queue,
//! a fresh message whose delivery count starts at zero, carrying
//! [`LIMIT_RESETS_HEADER`] one higher; only after the broker confirms it is
//! the inbox copy acked. After `amqp.delivery_limit_resets` such returns, or
//! when the attempt did start, it is dead-lettered as before.
//!
//! A worker that crashes after starting an attempt but before its `running`
//! state is committed (the state writer commits it in a batch, while the task
//! already runs) leaves a record that says "never started": such a message is
//! returned at most `amqp.delivery_limit_resets` times, so a crash loop is
//! still dead-lettered, after `(resets + 1) × delivery_limit` deliveries.
//!
//! A redelivered inbox copy (its worker died between the confirm and the ack)
//! may be returned a second time: two copies of one attempt in the work queue.
//! The header marks both as possible second copies, so the worker checks the
//! job's record before running either (see `execute`), as for a keyed job.

use conveyor_schema::Envelope;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::succeeded::Recorded;
use super::{publish_confirmed, return_to_inbox};
use crate::runtime::Runtime;

/// How many times a message was returned to its work queue after reaching
/// the broker's delivery limit unstarted.
pub const LIMIT_RESETS_HEADER: &str = "conveyor-limit-resets";

/// Headers the broker writes on dead-lettering and redelivery: a fresh publish
/// must not carry them (its history starts again).
const BROKER_HEADERS: [&str; 8] = [
    "x-death",
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// What became of an inbox copy offered for a return to its queue.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Returned {
    /// Published to its work queue and acked (or, the publish failing,
    /// returned to the inbox to be handled again): nothing more to do.
    Settled,
    /// Not eligible (its attempt started, or it was returned often enough):
    /// dead-letter it.
    No,
}

/// Returns `delivery` (the inbox copy of `envelope`, dead-lettered from
/// `queue` for its delivery limit) to its work queue when its job's
/// `recorded` state shows its attempt never started and it was returned fewer
/// than `amqp.delivery_limit_resets` times.
pub(super) async fn return_unstarted(
    rt: &Runtime,
    queue: &str,
    channel: &Channel,
    delivery: &Delivery,
    envelope: &Envelope,
    recorded: Recorded,
) -> Returned {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let resets = resets_of(&headers);
    if resets >= rt.delivery_limit_resets || !never_started(recorded, envelope.attempt) {
        return Returned::No;
    }
    let resets = resets + 1;
    let properties = delivery
        .properties
        .clone()
        .with_headers(fresh_headers(&headers, resets));
    let work_queue = rt.topology.work_queue(queue);
    if let Err(outcome) = publish_confirmed(channel, work_queue, delivery, properties).await {
        tracing::error!(job.id = %envelope.id, %outcome, "could not return an unstarted job to its queue; returning it to the inbox");
        return_to_inbox(delivery).await;
        return Returned::Settled;
    }
    tracing::info!(
        job.id = %envelope.id,
        task = %envelope.task,
        attempt = envelope.attempt,
        resets,
        "the broker's delivery limit caught a job whose attempt never started; returned it to its queue"
    );
    rt.metrics
        .jobs_delivery_limit_resets
        .with_label_values(&[envelope.task.as_str(), queue])
        .inc();
    if let Err(err) = delivery.acker.ack(BasicAckOptions::default()).await {
        tracing::debug!(error = %err, "inbox ack failed; the redelivered copy may return the job a second time, which the worker checks before running it");
    }
    Returned::Settled
}

/// The count in [`LIMIT_RESETS_HEADER`], 0 without one.
fn resets_of(headers: &FieldTable) -> u32 {
    let count = match headers.inner().get(LIMIT_RESETS_HEADER) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortUInt(n)) => i64::from(*n),
        _ => 0,
    };
    u32::try_from(count.max(0)).unwrap_or(u32::MAX)
}

/// `headers` without the broker's, with [`LIMIT_RESETS_HEADER`] set to `resets`.
fn fresh_headers(headers: &FieldTable, resets: u32) -> FieldTable {
    let mut fresh = FieldTable::default();
    for (key, value) in headers.inner() {
        if !BROKER_HEADERS.contains(&key.as_str()) {
            fresh.insert(key.clone(), value.clone());
        }
    }
    fresh.insert(
        ShortString::from(LIMIT_RESETS_HEADER),
        AMQPValue::LongLongInt(i64::from(resets)),
    );
    fresh
}

/// Whether a message of `attempt` never started, given its job's recorded
/// `(state, attempts)` (`None`: no record). A start commits `running` with
/// `attempts` set to the attempt, and the state writer only ever moves
/// `attempts` forward, so the attempt started if the record is at it or
/// beyond (or is final). A record below it (`queued` at 0, or the attempt
/// before it `retrying`, or still `running` when the retry overtook its
/// commit) has never seen it start; nor has a job without a record.
///
/// `runs` (every start, redeliveries included) would not tell: an earlier
/// attempt run twice after a crash makes it reach `attempt` unstarted.
fn never_started(recorded: Recorded, attempt: u32) -> bool {
    match recorded {
        None => true,
        Some((state, attempts)) => {
            state.is_some_and(|state| !state.is_final()) && i64::from(attempts) < i64::from(attempt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_schema::JobState::*;

    #[test]
    fn an_attempt_below_the_record_never_started() {
        assert!(never_started(None, 1));
        assert!(never_started(Some((Some(Queued), 0)), 1));
        assert!(never_started(Some((Some(Retrying), 1)), 2));
        // The retry's message was confirmed before `retrying` was committed.
        assert!(never_started(Some((Some(Running), 1)), 2));
    }

    #[test]
    fn an_attempt_at_or_past_the_record_or_a_final_job_started() {
        assert!(!never_started(Some((Some(Running), 1)), 1));
        assert!(!never_started(Some((Some(Retrying), 1)), 1));
        assert!(!never_started(Some((Some(Running), 3)), 2));
        assert!(!never_started(Some((Some(Succeeded), 0)), 1));
        assert!(!never_started(Some((Some(Dead), 0)), 1));
        assert!(!never_started(Some((None, 0)), 1));
    }

    #[test]
    fn a_fresh_copy_drops_the_brokers_headers_and_counts_the_reset() {
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::Void);
        headers.insert("x-delivery-count".into(), AMQPValue::LongInt(3));
        headers.insert("x-first-death-reason".into(), AMQPValue::Void);
        headers.insert(
            "x-conveyor-producer".into(),
            AMQPValue::LongString("p".into()),
        );
        headers.insert(LIMIT_RESETS_HEADER.into(), AMQPValue::LongLongInt(2));
        assert_eq!(resets_of(&headers), 2);
        let fresh = fresh_headers(&headers, 3);
        let keys: Vec<&str> = fresh.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, [LIMIT_RESETS_HEADER, "x-conveyor-producer"]);
        assert_eq!(resets_of(&fresh), 3);
        assert_eq!(resets_of(&FieldTable::default()), 0);
    }
}
