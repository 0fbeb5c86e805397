//! Confirmed publishing that survives broker restarts.
//!
//! A [`Publisher`] owns one connection with a few confirm-mode channels and a
//! background task that re-establishes them (trying every configured node, with
//! backoff) whenever the connection fails. A publish never waits for that:
//! while disconnected or blocked by a broker alarm it fails at once with
//! [`PublishError::Unavailable`], which the HTTP layer turns into 503 +
//! `Retry-After`. A message counts as published only when the broker acked it
//! and did not return it as unroutable.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Event};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    DELAY_HEADER, ERROR_HEADER, Nodes, PRODUCER_HEADER, TASK_HEADER, Topology, close_quietly,
};
use conveyor_schema::Envelope;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Exchange (`""` for the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body bytes (an encoded envelope).
    pub body: Vec<u8>,
    /// The job id, as the AMQP `message-id`.
    pub message_id: Uuid,
    /// Task name, copied to a header for native tooling.
    pub task: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
}

impl Outgoing {
    /// `envelope` to the work queue of logical `queue`.
    pub fn job(topology: &Topology, queue: &str, envelope: &Envelope) -> Self {
        Self {
            exchange: String::new(),
            routing_key: topology.work_queue(queue),
            body: envelope.encode(),
            message_id: envelope.id,
            task: envelope.task.clone(),
            headers: Vec::new(),
        }
    }

    /// `envelope` to the delay queue of `level_ms`, from where it returns to `queue`.
    pub fn delayed(topology: &Topology, queue: &str, envelope: &Envelope, level_ms: u64) -> Self {
        Self {
            exchange: topology.delay_exchange(),
            headers: vec![(DELAY_HEADER.into(), level_ms.to_string())],
            ..Self::job(topology, queue, envelope)
        }
    }

    /// The same message, carrying `producer` (when there is one) in [`PRODUCER_HEADER`].
    pub fn by(mut self, producer: Option<&str>) -> Self {
        if let Some(producer) = producer {
            self.headers
                .push((PRODUCER_HEADER.into(), producer.to_owned()));
        }
        self
    }

    /// Raw `body` (perhaps not even an envelope) to the dead-letter queue of `queue`, with the reason.
    pub fn dead_letter(
        topology: &Topology,
        queue: &str,
        body: Vec<u8>,
        id: Uuid,
        task: &str,
        error: &str,
    ) -> Self {
        Self {
            exchange: String::new(),
            routing_key: topology.dead_letter_queue(queue),
            body,
            message_id: id,
            task: task.to_owned(),
            headers: vec![(ERROR_HEADER.into(), error.chars().take(4000).collect())],
        }
    }

    fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(TASK_HEADER),
            AMQPValue::LongString(LongString::from(self.task.clone())),
        );
        for (name, value) in &self.headers {
            headers.insert(
                ShortString::from(name.clone()),
                AMQPValue::LongString(LongString::from(value.clone())),
            );
        }
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(self.message_id.to_string()))
            .with_headers(headers)
    }
}

/// Why a message was not published.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// No live connection, or the broker has blocked publishers (memory/disk alarm).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused the message.
    #[error("broker nacked the message")]
    Nacked,
    /// The message could not be routed to any queue.
    #[error("message returned as unroutable: {0}")]
    Returned(String),
    /// No confirm arrived in time.
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
    /// The channel or connection failed mid-publish.
    #[error("publish failed: {0}")]
    Channel(String),
}

impl PublishError {
    /// True when the message may have reached its queue all the same: the
    /// broker may have taken it before the channel failed or the confirm was
    /// late, and a nack reports an internal error in the queue's process, which
    /// says nothing of whether the message was already stored. A return
    /// (unroutable) or a publish never sent is certain.
    pub fn may_have_been_enqueued(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::Channel(_) | Self::Nacked)
    }
}

/// A self-healing, confirm-mode publisher. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    /// Broker nodes; each reconnect starts after the node that served last.
    nodes: Nodes,
    /// Connection name shown in the management UI.
    name: String,
    /// Declared after each (re)connect.
    topology: Topology,
    /// Confirm channels opened per connection.
    channel_count: usize,
    /// Confirm deadline.
    timeout: Duration,
    /// The current connection, `None` while (re)connecting.
    live: RwLock<Option<Arc<Live>>>,
    /// Poked by a failed publish so the maintainer reconnects without waiting for an event.
    broken: Notify,
    /// The number of the connection now live (see [`Inner::report_broken`]).
    generation: AtomicU64,
    /// Notified each time a connection becomes live, or the broker unblocks it.
    connected: Notify,
    /// Round-robin cursor over channels.
    next: AtomicUsize,
}

struct Live {
    connection: Connection,
    channels: Vec<Channel>,
    /// Which connection of this publisher this is (1, 2, …).
    generation: u64,
}

impl Inner {
    /// A publish on `live` failed: reconnect, unless `live` was replaced
    /// already. A failure that surfaces late, from a connection given up
    /// since, must not tear down the one that replaced it.
    fn report_broken(&self, live: &Live) {
        if live.generation == self.generation.load(Ordering::Acquire) {
            self.broken.notify_one();
        }
    }
}

impl Publisher {
    /// Starts the maintainer task; the first connection is made in the
    /// background (see [`wait_connected`](Self::wait_connected)). It closes the
    /// connection when `shutdown` is cancelled.
    pub fn start(
        urls: &[&str],
        name: &str,
        topology: Topology,
        channel_count: usize,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let inner = Arc::new(Inner {
            nodes: Nodes::new(urls),
            name: name.to_owned(),
            topology,
            channel_count: channel_count.max(1),
            timeout,
            live: RwLock::new(None),
            broken: Notify::new(),
            generation: AtomicU64::new(0),
            connected: Notify::new(),
            next: AtomicUsize::new(0),
        });
        tokio::spawn(maintain(inner.clone(), shutdown));
        Self { inner }
    }

    /// How long a publish waits for its confirm (`amqp.publish_timeout_ms`
    /// for the ingress and worker): every [`publish`](Self::publish) is over
    /// by then, confirmed or not.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The topology this publisher declares.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// True when a connection is open and not blocked by a broker alarm.
    pub fn is_ready(&self) -> bool {
        self.live().is_some_and(|live| {
            let status = live.connection.status();
            status.connected() && !status.blocked()
        })
    }

    /// Waits until a connection is live, up to `deadline`; false on timeout.
    pub async fn wait_connected(&self, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, async {
            loop {
                let notified = self.inner.connected.notified();
                if self.is_ready() {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }

    fn live(&self) -> Option<Arc<Live>> {
        self.inner.live.read().ok().and_then(|g| g.clone())
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), PublishError> {
        self.publish_all(std::slice::from_ref(message))
            .await
            .pop()
            .unwrap_or(Err(PublishError::Channel("nothing published".into())))
    }

    /// Publishes every message on one channel, pipelined, then waits for all
    /// confirms (up to the timeout). The result for message *i* is at index *i*.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let all = |err: PublishError| messages.iter().map(|_| Err(err.clone())).collect();
        let Some(live) = self.live() else {
            return all(PublishError::Unavailable("not connected".into()));
        };
        if live.connection.status().blocked() {
            return all(PublishError::Unavailable(
                "broker blocked publishers (resource alarm)".into(),
            ));
        }
        let index = self.inner.next.fetch_add(1, Ordering::Relaxed) % live.channels.len();
        let channel = &live.channels[index];
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        // One deadline for sending and confirming: lapin stops writing to a connection
        // the broker blocked, so a send can wait as long as the alarm lasts.
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        // All sends at once: lapin queues each message's frames (and assigns its
        // delivery tag) on the first poll, in order, so the I/O loop writes the
        // whole batch in one go instead of waking once per message.
        let sends = join_all(messages.iter().map(|message| {
            channel.basic_publish(
                ShortString::from(message.exchange.as_str()),
                ShortString::from(message.routing_key.as_str()),
                options,
                &message.body,
                message.properties(),
            )
        }));
        let Ok(sent) = tokio::time::timeout_at(deadline, sends).await else {
            if !live.connection.status().blocked() {
                self.inner.report_broken(&live);
            }
            return all(PublishError::Timeout(self.inner.timeout));
        };
        let mut pending = Vec::with_capacity(messages.len());
        for result in sent {
            match result {
                Ok(confirm) => pending.push(confirm),
                Err(err) => {
                    self.inner.report_broken(&live);
                    // Those sent may still be confirmed; we cannot know, so report failure for all.
                    return all(PublishError::Channel(err.to_string()));
                }
            }
        }
        let confirms = join_all(pending);
        match tokio::time::timeout_at(deadline, confirms).await {
            Err(_) => {
                // A connection the broker blocked (resource alarm) is healthy: keep it, so
                // `is_ready` stays false until `connection.unblocked`, instead of
                // reconnecting to a fresh, not-yet-blocked connection.
                if !live.connection.status().blocked() {
                    self.inner.report_broken(&live);
                }
                all(PublishError::Timeout(self.inner.timeout))
            }
            Ok(results) => results
                .into_iter()
                .map(|result| match result {
                    Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
                    Ok(Confirmation::Ack(Some(returned))) => {
                        Err(PublishError::Returned(returned.reply_text.to_string()))
                    }
                    Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked),
                    Err(err) => {
                        self.inner.report_broken(&live);
                        Err(PublishError::Channel(err.to_string()))
                    }
                })
                .collect(),
        }
    }
}

async fn maintain(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break,
            attempt = open(&inner, first) => attempt,
        };
        let live = match attempt {
            Ok(live) => Arc::new(live),
            Err(err) => {
                tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "publisher cannot connect");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        first = false;
        let mut events = live.connection.events_listener();
        // From here on only failures on this connection count; one reported
        // for the last before it was given up is forgotten.
        inner.generation.store(live.generation, Ordering::Release);
        let _ = inner.broken.notified().now_or_never();
        if let Ok(mut slot) = inner.live.write() {
            *slot = Some(live.clone());
        }
        inner.connected.notify_waiters();
        tracing::info!(name = %inner.name, "publisher connected");
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = inner.broken.notified() => false,
            _ = async {
                while let Some(event) = events.next().await {
                    match event {
                        Event::Error(err) => {
                            tracing::warn!(error = %err, "publisher connection failed");
                            return;
                        }
                        // Those waiting for a ready publisher (`wait_connected`) go on
                        // once the broker lifts its alarm, not only after a reconnect.
                        Event::ConnectionUnblocked => inner.connected.notify_waiters(),
                        _ => {}
                    }
                }
            } => false,
            // A safety net for a close that raises no event (e.g. a node shutting down cleanly).
            _ = watch_status(&live.connection) => false,
        };
        if let Ok(mut slot) = inner.live.write() {
            *slot = None;
        }
        close_quietly(&live.connection, "conveyor publisher closing").await;
        if stop {
            break;
        }
    }
    if let Ok(mut slot) = inner.live.write() {
        *slot = None;
    }
}

/// Resolves once `connection` is no longer connected, checking every 500 ms.
async fn watch_status(connection: &Connection) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if !connection.status().connected() {
            tracing::warn!("publisher connection closed");
            return;
        }
    }
}

/// Connects and opens the confirm channels; `first` is the process's first
/// connection (see [`Topology::declare_on`]).
async fn open(inner: &Inner, first: bool) -> anyhow::Result<Live> {
    let connection = inner.nodes.connect(&inner.name).await?;
    if let Err(err) = inner.topology.declare_on(&connection, first).await {
        close_quietly(&connection, "topology failed").await;
        return Err(err);
    }
    let mut channels = Vec::with_capacity(inner.channel_count);
    for _ in 0..inner.channel_count {
        let opened = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            lapin::Result::Ok(channel)
        };
        match tokio::time::timeout(Duration::from_secs(10), opened).await {
            Ok(Ok(channel)) => channels.push(channel),
            failed => {
                close_quietly(&connection, "channel failed").await;
                return Err(match failed {
                    Ok(Err(err)) => err.into(),
                    _ => anyhow::anyhow!("opening a confirm channel took over 10 s"),
                });
            }
        }
    }
    Ok(Live {
        connection,
        channels,
        generation: inner.generation.load(Ordering::Acquire) + 1,
    })
}
