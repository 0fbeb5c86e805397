//! Talking to RabbitMQ: connecting to one of several nodes, the queue topology,
//! and confirmed publishing with automatic reconnection.

mod connect;
mod publisher;
mod topology;

pub use connect::{ConnectError, Nodes, close_channel_quietly, close_quietly, connect};
pub use publisher::{Outgoing, PublishError, Publisher};
pub use topology::{DELAY_LEVELS_MS, Topology, delay_level_for};

/// Header carrying the reason a message was dead-lettered by a worker.
pub const ERROR_HEADER: &str = "x-conveyor-error";
/// Header carrying the task name (for RabbitMQ-native tooling that cannot read the body).
pub const TASK_HEADER: &str = "x-conveyor-task";
/// Header carrying the producer that enqueued the job over HTTP. A worker
/// that creates the job's record (because the ingress could not) writes it there,
/// so the producer can read the job. A header, not an envelope field, so that
/// workers of earlier releases, which refuse unknown envelope fields, still read the job.
pub const PRODUCER_HEADER: &str = "x-conveyor-producer";
/// Header selecting a delay queue on the delay exchange (no `x-` prefix: the
/// headers exchange ignores such keys when matching).
pub const DELAY_HEADER: &str = "conveyor-delay";
