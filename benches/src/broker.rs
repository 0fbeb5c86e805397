//! Broker helpers: queue depth, purge, and removing a bench namespace.

use conveyor_platform::amqp::{Topology, connect};
use lapin::options::{BasicCancelOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};

/// A connection and one channel for housekeeping.
pub struct Admin {
    /// Kept open while the channel is used.
    pub connection: Connection,
    /// Housekeeping channel.
    pub channel: Channel,
}

impl Admin {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let connection = connect(&[url], "conveyor-bench-admin").await?;
        let channel = connection.create_channel().await?;
        Ok(Self {
            connection,
            channel,
        })
    }

    /// Ready messages in `queue` (which must exist).
    pub async fn depth(&self, queue: &str) -> anyhow::Result<u32> {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let queue = self
            .channel
            .queue_declare(
                ShortString::from(queue.to_owned()),
                options,
                FieldTable::default(),
            )
            .await?;
        Ok(queue.message_count())
    }

    /// Drops every ready message of `queue`.
    pub async fn purge(&self, queue: &str) -> anyhow::Result<()> {
        self.channel
            .queue_purge(
                ShortString::from(queue.to_owned()),
                QueuePurgeOptions::default(),
            )
            .await?;
        Ok(())
    }

    /// Declares Conveyor's topology for `topology`'s namespace.
    pub async fn declare(&self, topology: &Topology) -> anyhow::Result<()> {
        topology.declare(&self.channel).await?;
        Ok(())
    }

    /// Deletes every queue and exchange of the namespace.
    pub async fn delete(&self, topology: &Topology) -> anyhow::Result<()> {
        topology.delete(&self.channel).await?;
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, ShortString::from("done")).await;
    }
}

/// Declares a durable queue `name` of `queue_type` (`quorum` or `classic`) for
/// the bare-broker scenarios.
pub async fn declare_queue(
    channel: &Channel,
    name: &ShortString,
    queue_type: &str,
) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(queue_type.into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.queue_declare(name.clone(), durable, args).await?;
    Ok(())
}

/// Cancels `consumer`, then closes its `channel`, each awaited. Left to the
/// drops, lapin sends both at once, and a `cancel-ok` arriving on the closing
/// channel is a connection error that takes the rest of the run with it.
pub async fn stop_consuming(channel: &Channel, consumer: &Consumer) -> anyhow::Result<()> {
    channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await?;
    channel.close(200, ShortString::from("done")).await?;
    Ok(())
}
