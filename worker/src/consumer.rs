//! The consume loop: attach to the work queues, hand each delivery to a
//! handler task, reconnect when the broker goes away, and drain on shutdown.
//!
//! Reconnects back off (see [`Backoff`]) whether the broker refused the
//! connection or accepted it and then refused the consumers (a queue whose
//! leader is still being elected, a missing queue); the delay starts small
//! again once a connection was consuming. A reconnect declares the topology in
//! the background, except after the broker said a queue does not exist: then
//! the next connection declares it before consuming.
//!
//! The drain cancels the consumers first, and only once the broker confirmed
//! that (or did not answer within [`CANCEL_TIMEOUT`]) are the deliveries that
//! will not run returned (`Runtime::consumers_cancelled`). Returned earlier, the
//! broker could deliver one straight back to this consumer, and closing the
//! connection would return it again: on RabbitMQ 3.10 each return counts toward
//! the queue's delivery limit, so one stop would count twice.

use std::sync::Arc;
use std::time::Duration;

use conveyor_platform::amqp::{Nodes, close_quietly};
use futures::stream::{self, BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::ChannelAcks;
use crate::execute::jitter;
use crate::readiness::Consuming;
use crate::runtime::Runtime;
use crate::{dead_letters, execute};

/// Longest the drain waits for the broker to confirm its consumers cancelled.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// Consumer settings.
pub struct ConsumeOptions {
    /// Broker node URLs.
    pub urls: Vec<String>,
    /// Logical queues to consume, each with its prefetch window.
    pub queues: Vec<(String, u16)>,
    /// In-flight jobs may finish within this after shutdown starts.
    pub grace: Duration,
    /// Connection name for the management UI.
    pub name: String,
}

/// Consumes until shutdown, then drains: stops new deliveries at once (waiting
/// at most [`CANCEL_TIMEOUT`] for the broker to confirm), lets running jobs
/// finish within the grace period and returns the rest to the queue.
pub async fn run(rt: Arc<Runtime>, options: ConsumeOptions, consuming: Consuming) {
    let tracker = TaskTracker::new();
    let mut backoff = Backoff::new();
    let urls: Vec<&str> = options.urls.iter().map(String::as_str).collect();
    let nodes = Nodes::new(&urls);
    // Declare the topology and wait for it before consuming: on the first
    // connection, and after the broker said a queue is missing.
    let mut declare_first = true;
    let mut connection: Option<(Connection, Consumed)> = None;
    // A job's outcome may have to be published (its retry, its dead letter).
    // Consuming before this worker's publisher is connected would return such
    // a job to the queue after it ran, to run again, as often as it came back
    // before the publisher was up.
    while !rt.shutdown.is_cancelled() && !rt.publisher.is_ready() {
        tokio::select! {
            _ = rt.shutdown.cancelled() => {}
            _ = rt.publisher.wait_connected(Duration::from_secs(1)) => {}
        }
    }
    while !rt.shutdown.is_cancelled() {
        let conn = tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            conn = nodes.connect(&options.name) => conn,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                let delay = jitter(backoff.next_delay());
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "worker cannot reach the broker");
                tokio::select! {
                    _ = rt.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        let lost = CancellationToken::new();
        let session = Session {
            rt: &rt,
            conn: &conn,
            options: &options,
            tracker: &tracker,
            consuming: &consuming,
            lost: &lost,
        };
        match session.consume(&mut declare_first).await {
            Ok(consumed) => {
                connection = Some((conn, consumed));
                break;
            }
            Err(err) => {
                lost.cancel();
                if missing_queue(&err) {
                    declare_first = true;
                }
                // A connection that was consuming is retried soon; one that
                // never got all its consumers attached waits longer each time.
                if consuming.detached() {
                    backoff.reset();
                }
                let delay = jitter(backoff.next_delay());
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "consumer lost its connection; reconnecting");
                close_quietly(&conn, "reconnecting").await;
                tokio::select! {
                    _ = rt.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    // Shutdown between connections: no consumer to cancel.
    rt.consumers_cancelled.cancel();
    consuming.detached();
    tracker.close();
    let in_flight = tracker.len();
    tracing::info!(
        in_flight,
        grace_ms = options.grace.as_millis() as u64,
        "draining"
    );
    if tokio::time::timeout(options.grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = tracker.len(),
            "grace period over; returning unfinished jobs to the queue"
        );
    }
    if let Some((conn, consumed)) = connection {
        for channel_acks in &consumed.acks {
            channel_acks.flush().await;
        }
        // Closing returns every unacknowledged delivery to its queue.
        close_quietly(&conn, "worker shutting down").await;
        drop(consumed);
    }
}

/// One connection's consumers.
struct Session<'a> {
    rt: &'a Arc<Runtime>,
    conn: &'a Connection,
    options: &'a ConsumeOptions,
    tracker: &'a TaskTracker,
    consuming: &'a Consuming,
    /// Cancelled when this connection is given up.
    lost: &'a CancellationToken,
}

impl Session<'_> {
    /// Consumes until shutdown (`Ok`, with the acks still to flush) or a broker
    /// error (`Err`). With `declare_first` it declares the topology and waits
    /// for that before consuming, and clears the flag once it succeeded;
    /// otherwise the declaration runs in the background (see `Topology::declare_on`).
    async fn consume(&self, declare_first: &mut bool) -> anyhow::Result<Consumed> {
        let (rt, conn, options) = (self.rt, self.conn, self.options);
        rt.topology.declare_on(conn, *declare_first).await?;
        *declare_first = false;
        let mut streams = SelectAll::new();
        let mut consumers: Vec<(Channel, ShortString)> = Vec::new();
        let mut all_acks = Vec::new();
        for (queue, prefetch) in &options.queues {
            let tag = ShortString::from(format!("{}/{queue}", options.name));
            let work_queue = ShortString::from(rt.topology.work_queue(queue));
            let (channel, consumer) = within_setup_timeout(async {
                let channel = conn.create_channel().await?;
                channel
                    .basic_qos(*prefetch, BasicQosOptions::default())
                    .await?;
                let consumer = channel
                    .basic_consume(
                        work_queue,
                        tag,
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok((channel, consumer))
            })
            .await?;
            consumers.push((channel.clone(), consumer.tag()));
            let acks = ChannelAcks::start(channel, self.lost.clone());
            all_acks.push(acks.clone());
            let queue: Arc<str> = Arc::from(queue.as_str());
            streams.push(until_cancelled(
                consumer.tag(),
                consumer.map(move |delivery| (queue.clone(), Inbox::Work(acks.clone()), delivery)),
            ));
        }
        // The dead-letter inbox of each queue, on its own confirm-mode channel:
        // the recorder republishes to the `.dlq` on it before acking.
        for (queue, _) in &options.queues {
            let tag = ShortString::from(format!("{}/{queue}/dlq-inbox", options.name));
            let inbox = ShortString::from(rt.topology.dead_letter_inbox(queue));
            let (channel, consumer) = within_setup_timeout(async {
                let channel = conn.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                channel.basic_qos(16, BasicQosOptions::default()).await?;
                let consumer = channel
                    .basic_consume(
                        inbox,
                        tag,
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok((channel, consumer))
            })
            .await?;
            consumers.push((channel.clone(), consumer.tag()));
            let queue: Arc<str> = Arc::from(queue.as_str());
            streams.push(until_cancelled(
                consumer.tag(),
                consumer.map(move |delivery| {
                    (queue.clone(), Inbox::DeadLetters(channel.clone()), delivery)
                }),
            ));
        }
        self.consuming.attached(
            consumers
                .iter()
                .map(|(channel, _)| channel.clone())
                .collect(),
        );
        tracing::info!(queues = ?options.queues, "consuming (queue, prefetch)");
        loop {
            let next = tokio::select! {
                _ = rt.shutdown.cancelled() => break,
                next = streams.next() => next,
            };
            match next {
                Some(Event::Delivery((queue, Inbox::Work(acks), Ok(delivery)))) => {
                    acks.delivered(delivery.delivery_tag);
                    // Boxed: the handler's state machine is large, and tokio
                    // would otherwise copy it whole into the task and again
                    // when the task finishes (a tenth of a no-op drain's CPU).
                    // Tracked by the token it carries, not by the task: the
                    // token lives until the delivery is settled, which for a
                    // success is after the handler ended (`commit_then`).
                    tokio::spawn(Box::pin(execute::handle(
                        rt.clone(),
                        queue,
                        delivery.into(),
                        acks,
                        self.tracker.token(),
                        self.lost.clone(),
                    )));
                }
                Some(Event::Delivery((queue, Inbox::DeadLetters(channel), Ok(delivery)))) => {
                    self.tracker.spawn(dead_letters::record_from_inbox(
                        rt.clone(),
                        queue,
                        channel,
                        delivery,
                    ));
                }
                Some(Event::Delivery((_, _, Err(err)))) => return Err(err.into()),
                Some(Event::Cancelled(tag)) => {
                    anyhow::bail!("the broker cancelled consumer {tag}")
                }
                None => anyhow::bail!("the broker closed the consumers"),
            }
        }
        // All at once, and not waiting on a broker that does not answer (a node
        // going away, a queue electing its leader): the drain must go on to its
        // grace period and final flush whatever the broker does.
        let cancels = consumers
            .iter()
            .map(|(channel, tag)| channel.basic_cancel(tag.clone(), BasicCancelOptions::default()));
        if tokio::time::timeout(CANCEL_TIMEOUT, futures::future::join_all(cancels))
            .await
            .is_err()
        {
            tracing::warn!(
                "the broker did not confirm cancelling the consumers within 2 s; draining all the same"
            );
        }
        rt.consumers_cancelled.cancel();
        let channels = consumers.into_iter().map(|(channel, _)| channel).collect();
        Ok(Consumed {
            acks: all_acks,
            channels,
        })
    }
}

/// What a session that ended in shutdown leaves to settle before its
/// connection closes.
struct Consumed {
    /// Each work queue channel's acks, still to flush.
    acks: Vec<Arc<ChannelAcks>>,
    /// Every consume channel, held until the connection has closed: dropping a
    /// channel's last handle closes it, and a channel close that races the
    /// connection's made lapin log a connection error at every clean shutdown.
    #[expect(dead_code, reason = "held, never read")]
    channels: Vec<Channel>,
}

/// A delivery, or the end of one consumer.
#[expect(
    clippy::large_enum_variant,
    reason = "one event per delivery, moved once out of the stream; boxing would allocate per delivery"
)]
enum Event {
    /// From this logical queue and inbox.
    Delivery((Arc<str>, Inbox, lapin::Result<Delivery>)),
    /// The broker cancelled the consumer with this tag (its queue was deleted,
    /// say): that queue gets no more deliveries on this connection.
    Cancelled(ShortString),
}

/// A consumer's deliveries, then [`Event::Cancelled`] when its stream ends.
/// `SelectAll` would otherwise drop the finished stream silently and go on
/// with the others, leaving one queue unconsumed while the worker looks ready.
fn until_cancelled(
    tag: ShortString,
    deliveries: impl Stream<Item = (Arc<str>, Inbox, lapin::Result<Delivery>)> + Send + 'static,
) -> BoxStream<'static, Event> {
    deliveries
        .map(Event::Delivery)
        .chain(stream::once(async move { Event::Cancelled(tag) }))
        .boxed()
}

/// Where a delivery came from.
enum Inbox {
    /// A work queue, acked in batches.
    Work(Arc<ChannelAcks>),
    /// A dead-letter inbox, on this confirm channel.
    DeadLetters(Channel),
}

/// Opening a channel and its consumer may take this long; a queue stuck in a
/// leader election makes the consumer reconnect rather than hang.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

async fn within_setup_timeout<T>(
    setup: impl Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(result) => Ok(result?),
        Err(_) => anyhow::bail!("opening a consumer took longer than {SETUP_TIMEOUT:?}"),
    }
}

/// True when the broker refused because a queue does not exist (its
/// definitions were lost, or someone deleted the queue). A reconnect's
/// background declaration cannot help then: closing the failed connection
/// cuts it off, so the next connection has to declare before consuming.
fn missing_queue(err: &anyhow::Error) -> bool {
    err.downcast_ref::<lapin::Error>().is_some_and(|err| {
        matches!(
            err.kind(),
            lapin::ErrorKind::ProtocolError(amqp)
                if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
        )
    })
}

/// Delays between attempts to connect and consume: 100 ms, doubling up to 5 s,
/// and 100 ms again after a connection that was consuming is lost. The caller
/// adds jitter, so many workers losing the same node do not return in step.
#[derive(Debug)]
struct Backoff {
    /// The delay [`Backoff::next_delay`] returns next.
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The delay before the next attempt; each call doubles the following one, up to 5 s.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    /// A connection consumed: the next failure is retried after the first delay again.
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_seconds_and_resets() {
        let mut backoff = Backoff::new();
        let ms: Vec<u128> = (0..8).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1_600, 3_200, 5_000, 5_000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
        assert_eq!(backoff.next_delay(), Duration::from_millis(200));
    }

    #[test]
    fn only_a_missing_queue_asks_for_declaring_first() {
        use lapin::protocol::{AMQPError, AMQPHardError};
        let amqp = |kind| {
            anyhow::Error::from(lapin::Error::from(lapin::ErrorKind::ProtocolError(
                AMQPError::new(kind, "test".into()),
            )))
        };
        assert!(missing_queue(&amqp(AMQPErrorKind::Soft(
            AMQPSoftError::NOTFOUND
        ))));
        assert!(!missing_queue(&amqp(AMQPErrorKind::Soft(
            AMQPSoftError::RESOURCELOCKED
        ))));
        assert!(!missing_queue(&amqp(AMQPErrorKind::Hard(
            AMQPHardError::CONNECTIONFORCED
        ))));
        assert!(!missing_queue(&anyhow::anyhow!("NOT_FOUND in a message")));
    }

    #[test]
    fn jittered_delays_stay_between_half_and_all() {
        for _ in 0..1_000 {
            let delay = jitter(Duration::from_millis(400));
            assert!(
                (Duration::from_millis(200)..=Duration::from_millis(400)).contains(&delay),
                "{delay:?}"
            );
        }
    }
}
