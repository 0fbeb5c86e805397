//! The consume loop: attach to the work queues, hand each delivery to a
//! handler task, reconnect when the broker goes away, and drain on shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conveyor_platform::amqp::{Nodes, close_quietly};
use futures::StreamExt;
use futures::stream::SelectAll;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::ChannelAcks;
use crate::runtime::Runtime;
use crate::{dead_letters, execute};

/// Consumer settings.
pub struct ConsumeOptions {
    /// Broker node URLs.
    pub urls: Vec<String>,
    /// Logical queues to consume.
    pub queues: Vec<String>,
    /// Prefetch per queue.
    pub prefetch: u16,
    /// In-flight jobs may finish within this after shutdown starts.
    pub grace: Duration,
    /// Connection name for the management UI.
    pub name: String,
}

/// Consumes until shutdown, then drains: stops new deliveries at once, lets
/// running jobs finish within the grace period and returns the rest to the queue.
pub async fn run(rt: Arc<Runtime>, options: ConsumeOptions, consuming: Arc<AtomicBool>) {
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(100);
    let urls: Vec<&str> = options.urls.iter().map(String::as_str).collect();
    let nodes = Nodes::new(&urls);
    let mut first = true;
    let mut connection: Option<(Connection, Vec<Arc<ChannelAcks>>)> = None;
    while !rt.shutdown.is_cancelled() {
        let conn = tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            conn = nodes.connect(&options.name) => conn,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "worker cannot reach the broker");
                tokio::select! {
                    _ = rt.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let lost = CancellationToken::new();
        let session = Session {
            rt: &rt,
            conn: &conn,
            options: &options,
            tracker: &tracker,
            consuming: &consuming,
            lost: &lost,
        };
        match session.consume(&mut first).await {
            Ok(acks) => {
                connection = Some((conn, acks));
                break;
            }
            Err(err) => {
                lost.cancel();
                consuming.store(false, Ordering::Relaxed);
                tracing::warn!(error = %err, "consumer lost its connection; reconnecting");
                close_quietly(&conn, "reconnecting").await;
                tokio::select! {
                    _ = rt.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
    consuming.store(false, Ordering::Relaxed);
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
    if let Some((conn, acks)) = connection {
        for channel_acks in acks {
            channel_acks.flush().await;
        }
        // Closing returns every unacknowledged delivery to its queue.
        close_quietly(&conn, "worker shutting down").await;
    }
}

/// One connection's consumers.
struct Session<'a> {
    rt: &'a Arc<Runtime>,
    conn: &'a Connection,
    options: &'a ConsumeOptions,
    tracker: &'a TaskTracker,
    consuming: &'a AtomicBool,
    /// Cancelled when this connection is given up.
    lost: &'a CancellationToken,
}

impl Session<'_> {
    /// Consumes until shutdown (`Ok`, with the acks still to flush) or a broker
    /// error (`Err`). `first` is true until the topology has been declared once
    /// (see `Topology::declare_on`).
    async fn consume(&self, first: &mut bool) -> anyhow::Result<Vec<Arc<ChannelAcks>>> {
        let (rt, conn, options) = (self.rt, self.conn, self.options);
        rt.topology.declare_on(conn, *first).await?;
        *first = false;
        let mut streams = SelectAll::new();
        let mut consumers: Vec<(Channel, ShortString)> = Vec::new();
        let mut all_acks = Vec::new();
        for queue in &options.queues {
            let tag = ShortString::from(format!("{}/{queue}", options.name));
            let work_queue = ShortString::from(rt.topology.work_queue(queue));
            let (channel, consumer) = within_setup_timeout(async {
                let channel = conn.create_channel().await?;
                channel
                    .basic_qos(options.prefetch, BasicQosOptions::default())
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
            streams.push(
                consumer
                    .map(move |delivery| (queue.clone(), Inbox::Work(acks.clone()), delivery))
                    .boxed(),
            );
        }
        // The dead-letter inbox of each queue, on its own confirm-mode channel:
        // the recorder republishes to the `.dlq` on it before acking.
        for queue in &options.queues {
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
            streams.push(
                consumer
                    .map(move |delivery| {
                        (queue.clone(), Inbox::DeadLetters(channel.clone()), delivery)
                    })
                    .boxed(),
            );
        }
        self.consuming.store(true, Ordering::Relaxed);
        tracing::info!(queues = ?options.queues, prefetch = options.prefetch, "consuming");
        loop {
            let next = tokio::select! {
                _ = rt.shutdown.cancelled() => break,
                next = streams.next() => next,
            };
            match next {
                Some((queue, Inbox::Work(acks), Ok(delivery))) => {
                    acks.delivered(delivery.delivery_tag);
                    self.tracker.spawn(execute::handle(
                        rt.clone(),
                        queue,
                        delivery,
                        acks,
                        self.lost.clone(),
                    ));
                }
                Some((queue, Inbox::DeadLetters(channel), Ok(delivery))) => {
                    self.tracker.spawn(dead_letters::record_from_inbox(
                        rt.clone(),
                        queue,
                        channel,
                        delivery,
                    ));
                }
                Some((_, _, Err(err))) => return Err(err.into()),
                None => anyhow::bail!("the broker closed the consumers"),
            }
        }
        for (channel, tag) in consumers {
            let _ = channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await;
        }
        Ok(all_acks)
    }
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
