//! The consume loop: attach to the work queues, hand each delivery to a
//! handler task, reconnect when the broker goes away, and drain on shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conveyor_platform::amqp::Nodes;
use futures::StreamExt;
use futures::stream::SelectAll;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    let mut connection: Option<Connection> = None;
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
        let consumed = consume(&rt, &conn, &options, &tracker, &consuming, &lost).await;
        match consumed {
            Ok(()) => {
                connection = Some(conn);
                break;
            }
            Err(err) => {
                lost.cancel();
                consuming.store(false, Ordering::Relaxed);
                tracing::warn!(error = %err, "consumer lost its connection; reconnecting");
                let _ = conn.close(200, ShortString::from("reconnecting")).await;
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
    if let Some(conn) = connection {
        // Closing returns every unacknowledged delivery to its queue.
        let _ = conn
            .close(200, ShortString::from("worker shutting down"))
            .await;
    }
}

/// Consumes on `conn` until shutdown (`Ok`) or a broker error (`Err`).
async fn consume(
    rt: &Arc<Runtime>,
    conn: &Connection,
    options: &ConsumeOptions,
    tracker: &TaskTracker,
    consuming: &AtomicBool,
    lost: &CancellationToken,
) -> Result<(), lapin::Error> {
    let setup = conn.create_channel().await?;
    rt.topology.declare(&setup).await?;
    let _ = setup
        .close(200, ShortString::from("topology declared"))
        .await;
    let mut streams = SelectAll::new();
    let mut consumers: Vec<(Channel, ShortString)> = Vec::new();
    for queue in &options.queues {
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(options.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(rt.topology.work_queue(queue)),
                ShortString::from(format!("{}/{queue}", options.name)),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push((channel, consumer.tag()));
        let queue: Arc<str> = Arc::from(queue.as_str());
        streams.push(
            consumer
                .map(move |delivery| (queue.clone(), None, delivery))
                .boxed(),
        );
    }
    // The dead-letter inbox of each queue, on its own confirm-mode channel:
    // the recorder republishes to the `.dlq` on it before acking.
    for queue in &options.queues {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel.basic_qos(16, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(rt.topology.dead_letter_inbox(queue)),
                ShortString::from(format!("{}/{queue}/dlq-inbox", options.name)),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push((channel.clone(), consumer.tag()));
        let queue: Arc<str> = Arc::from(queue.as_str());
        streams.push(
            consumer
                .map(move |delivery| (queue.clone(), Some(channel.clone()), delivery))
                .boxed(),
        );
    }
    consuming.store(true, Ordering::Relaxed);
    tracing::info!(queues = ?options.queues, prefetch = options.prefetch, "consuming");
    loop {
        let next = tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            next = streams.next() => next,
        };
        match next {
            Some((queue, None, Ok(delivery))) => {
                tracker.spawn(execute::handle(rt.clone(), queue, delivery, lost.clone()));
            }
            Some((queue, Some(channel), Ok(delivery))) => {
                tracker.spawn(dead_letters::record_from_inbox(
                    rt.clone(),
                    queue,
                    channel,
                    delivery,
                ));
            }
            Some((_, _, Err(err))) => return Err(err),
            None => {
                return Err(lapin::Error::from(
                    lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
                ));
            }
        }
    }
    for (channel, tag) in consumers {
        let _ = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await;
    }
    Ok(())
}
