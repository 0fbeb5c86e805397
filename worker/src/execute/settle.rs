//! Settling a delivery once its outcome is known: publishing what the outcome
//! needs (a retry's next attempt, a dead letter, a delay's hop) and waiting for
//! the confirm, committing the job's state, and only then acknowledging the
//! delivery, or returning it to its queue when the publish failed or the
//! worker is draining.

use std::sync::Arc;
use std::time::Duration;

use conveyor_platform::amqp::{Outgoing, PublishError};
use conveyor_schema::Envelope;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::acks::ChannelAcks;
use crate::dead_letters::DeadLetter;
use crate::runner;
use crate::runtime::Runtime;
use crate::state_writer::{Commit, Refused, StateChange};

/// How long a finished job's outcome waits for a reconnecting publisher
/// (which backs off up to 5 s) before its delivery is returned to the queue.
const OUTCOME_PUBLISH_WAIT: Duration = Duration::from_secs(10);

/// Publishes `message` (confirmed), commits `change` and the dead-job record
/// `dead` together, then acks. If the publish fails the delivery is returned to
/// the queue to be handled again. With a record, `message` is the job's dead
/// letter; without one, `change` is a retry's and `message` its next attempt
/// (or there is neither: a delay). Should PostgreSQL refuse what is committed,
/// the delivery is acked all the same (see the module header).
///
/// Boxed: this is the path of retries, dead letters and delays, and inline its
/// state would be most of every delivery's future, which is moved to the heap
/// once per delivery.
pub(super) fn finish_with<'a>(
    rt: &'a Runtime,
    settle: &'a Settle,
    message: &'a Outgoing,
    change: Option<StateChange>,
    dead: Option<DeadLetter>,
) -> BoxFuture<'a, ()> {
    finish(rt, settle, message, change, dead).boxed()
}

async fn finish(
    rt: &Runtime,
    settle: &Settle,
    message: &Outgoing,
    change: Option<StateChange>,
    dead: Option<DeadLetter>,
) {
    let mut published = rt.publisher.publish(message).await;
    // The task has run: returning the delivery would run it again. While the
    // publisher is reconnecting, wait for it rather than fail at once.
    if matches!(published, Err(PublishError::Unavailable(_)))
        && rt.publisher.wait_connected(OUTCOME_PUBLISH_WAIT).await
    {
        published = rt.publisher.publish(message).await;
    }
    if let Err(err) = published {
        tracing::error!(error = %err, routing_key = %message.routing_key, "could not publish; returning the delivery to its queue");
        if let Some(change) = &change {
            runner::release(rt, change.id, change.attempt).await;
        }
        return settle.requeue().await;
    }
    let committed = match (change, dead) {
        (change, Some(dead)) => crate::dead_letters::commit(rt, change, dead).await,
        (Some(change), None) => match rt.states.commit(change).await {
            Commit::Refused(refused) => {
                tracing::warn!(
                    error = refused.error,
                    "the job's `retrying` state was refused; its next attempt is published and carries it on"
                );
                true
            }
            other => other.is_committed(),
        },
        (None, None) => true,
    };
    if committed {
        settle.ack();
    }
}

/// Dead-letters the delivery of a job whose `succeeded` state PostgreSQL
/// refused (`refused`): its body goes to the dead-letter queue with the
/// database's error as the reason, is recorded (the job's row brought to
/// `dead` in a minimal form with the record), and the delivery is acked.
pub(super) async fn dead_letter_refused(
    rt: Arc<Runtime>,
    queue: Arc<str>,
    settle: Settle,
    data: Vec<u8>,
    refused: Box<Refused>,
) {
    let state = refused
        .change
        .as_ref()
        .map_or("", |change| change.state.as_str());
    let reason = format!(
        "the database refused this job's `{state}` state: {}",
        refused.error
    );
    // It was read before, so it reads again.
    let record = match Envelope::decode(&data) {
        Ok(envelope) => DeadLetter {
            refused_state: refused.change.as_ref().map(|change| change.state),
            ..DeadLetter::of(&envelope, &queue, &reason)
        },
        Err(_) => DeadLetter::unreadable(None, &queue, &data, &reason),
    };
    tracing::warn!(job.id = %record.id, task = %record.task, reason, "dead-lettering a job whose state the database refused");
    rt.metrics
        .jobs_dead
        .with_label_values(&[record.task.as_str(), &queue])
        .inc();
    let dead = Outgoing::dead_letter(&rt.topology, &queue, data, record.id, &record.task, &reason);
    finish_with(&rt, &settle, &dead, None, Some(record)).await
}

/// How one delivery is settled: acked with its channel's next batch (only
/// after the commit that records its outcome), or returned to the queue.
///
/// It holds a token of the consumer's task tracker until it is dropped, so a
/// draining worker also waits for outcomes still being committed after their
/// handler ended (see [`StateWriter::commit_then`](crate::state_writer::StateWriter::commit_then)).
pub(super) struct Settle {
    acks: Arc<ChannelAcks>,
    tag: u64,
    _draining: TaskTrackerToken,
}

impl Settle {
    /// Settles delivery `tag` on `acks`, keeping the drain waiting until then.
    pub(super) fn new(acks: Arc<ChannelAcks>, tag: u64, draining: TaskTrackerToken) -> Self {
        Self {
            acks,
            tag,
            _draining: draining,
        }
    }

    pub(super) fn ack(&self) {
        self.acks.ack(self.tag);
    }

    pub(super) async fn requeue(&self) {
        self.acks.requeue(self.tag).await;
    }
}

/// Returns a delivery that is not run (or stopped running) because the worker
/// is draining, once the broker has confirmed cancelling the consumers
/// ([`Runtime::consumers_cancelled`]). Returned before that, the broker could
/// deliver it straight back to this consumer, and closing the connection would
/// return it again: on RabbitMQ 3.10 two counts toward the delivery limit for
/// one stopped worker. The consumer waits at most 2 s for that confirmation,
/// before the grace period starts. Should the connection be lost meanwhile,
/// the broker has returned the delivery already.
pub(super) async fn requeue_for_shutdown(rt: &Runtime, settle: &Settle, lost: &CancellationToken) {
    tokio::select! {
        _ = rt.consumers_cancelled.cancelled() => settle.requeue().await,
        _ = lost.cancelled() => {}
    }
}
