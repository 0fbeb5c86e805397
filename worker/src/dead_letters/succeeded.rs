//! An inbox copy of a job that already succeeded is acknowledged, not
//! recorded as dead.
//!
//! The broker dead-letters a message for its delivery limit whatever its job's
//! record says. A job can run and commit `succeeded` while its delivery goes
//! back to its queue unacked (its worker killed, or its channel closed, after
//! the commit). That copy is acknowledged unrun by the next worker that takes
//! it (see `execute`), but each return counts toward the limit, those acks can
//! be lost too, and workers stopped holding it return it unstarted. A
//! dead-job record for that copy, and its message in `<q>.dlq`, would offer
//! the succeeded job for a replay that runs it again, and would contradict its
//! row, which stays `succeeded` (the state writer never moves a job out of a
//! final state). So [`record_from_inbox`](super::record_from_inbox) first
//! reads the job's record ([`read`], which also decides a return to the work
//! queue, see `resets`), and a copy of a `succeeded` job is
//! acknowledged, logged and counted
//! (`conveyor_jobs_delivery_limit_already_succeeded_total`) instead
//! ([`acked_if_succeeded`]).
//!
//! The other final state, `dead` (Conveyor has no `cancelled`), keeps the
//! recording road: recording is idempotent, so a record that exists stays as
//! it is (replayed or discarded included), and the job's state does not move;
//! the `.dlq` gets a second copy of the message, which is only the raw archive
//! (replays read the table). That road is what writes a record missing for a
//! `dead` row (PostgreSQL refused even its fallback form), so it is kept.
//!
//! A record that cannot be read (the database unreachable) is read again, with
//! backoff as the state writer retries its commits, while the delivery is held
//! (holding it does not count toward the inbox's delivery limit). Recording the
//! copy without knowing could record a succeeded job, and returning it to the
//! inbox each time would count toward that limit, which moves it to the `.dlq`
//! unrecorded. Should draining start first, it goes back to the inbox once.

use std::time::Duration;

use conveyor_schema::{Envelope, JobState};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use uuid::Uuid;

use crate::execute::recorded_attempt;
use crate::runtime::Runtime;

/// A job's recorded state and attempt, as `execute::recorded_attempt` reads
/// them (`None`: no record).
pub(super) type Recorded = Option<(Option<JobState>, i32)>;

/// The first wait before reading a record again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// The longest wait between two reads of a record.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The record of job `id`, read again with backoff until it can be; `None`
/// when draining started first.
pub(super) async fn read(rt: &Runtime, id: Uuid) -> Option<Recorded> {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match recorded_attempt(rt, id).await {
            Ok(recorded) => return Some(recorded),
            Err(err) => {
                tracing::warn!(job.id = %id, error = %err, retry_in_ms = backoff.as_millis() as u64, "could not read the record of a job the broker dead-lettered; reading it again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = rt.shutdown.cancelled() => return None,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Acknowledges `delivery` (the inbox copy of `envelope`, dead-lettered from
/// `queue`) when `recorded` shows its job succeeded; `false`, leaving it
/// untouched, otherwise.
pub(super) async fn acked_if_succeeded(
    rt: &Runtime,
    queue: &str,
    delivery: &Delivery,
    envelope: &Envelope,
    recorded: Recorded,
) -> bool {
    if !matches!(recorded, Some((Some(JobState::Succeeded), _))) {
        return false;
    }
    tracing::warn!(
        job.id = %envelope.id,
        task = %envelope.task,
        queue,
        attempt = envelope.attempt,
        "the broker's delivery limit caught a copy of a job that had already succeeded; acknowledged it without a dead-job record"
    );
    if let Err(err) = delivery.acker.ack(BasicAckOptions::default()).await {
        tracing::debug!(error = %err, "inbox ack failed; the redelivered copy will be acknowledged again");
    }
    rt.metrics
        .jobs_delivery_limit_already_succeeded
        .with_label_values(&[envelope.task.as_str(), queue])
        .inc();
    true
}
