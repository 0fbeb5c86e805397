//! The broker's half of a poll: each queue's ready messages and consumers,
//! asked with a passive `queue.declare` (plain AMQP, no management plugin).
//!
//! Only the broker's NOT_FOUND (reply code 404) means a queue is missing, and
//! a missing queue truly holds nothing and has no consumers, so it reads 0.
//! Any other refusal (RESOURCE_LOCKED, ACCESS_REFUSED, a lost connection, ...)
//! fails the whole poll: the counts are unknown, and reading them as 0 would
//! tell an autoscaler the queue is empty.

use std::collections::HashMap;

use conveyor_platform::amqp::{Topology, close_channel_quietly};
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};

/// Broker counts: per broker queue name, (ready, consumers).
pub(super) type BrokerCounts = HashMap<String, (u32, u32)>;

/// Every queue of `topology`, or why the broker could not say.
pub(super) async fn poll(conn: &Connection, topology: &Topology) -> Result<BrokerCounts, String> {
    let mut channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    let mut counts = BrokerCounts::new();
    for name in topology.queue_names() {
        match passive(&channel, &name).await {
            Ok(found) => {
                counts.insert(name, found);
            }
            // A missing queue closes the channel; carry on with a new one.
            Err(err) if not_found(&err) => {
                tracing::debug!(queue = %name, "queue not found while polling");
                counts.insert(name, (0, 0));
                channel = conn.create_channel().await.map_err(|e| e.to_string())?;
            }
            Err(err) => return Err(format!("asking for queue {name}: {err}")),
        }
    }
    close_channel_quietly(&channel, "polled").await;
    Ok(counts)
}

async fn passive(channel: &Channel, name: &str) -> lapin::Result<(u32, u32)> {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(
            ShortString::from(name.to_owned()),
            options,
            FieldTable::default(),
        )
        .await?;
    Ok((queue.message_count(), queue.consumer_count()))
}

/// True when the broker answered NOT_FOUND (404): the queue does not exist.
fn not_found(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
    )
}
