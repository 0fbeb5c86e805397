//! Plumbing shared by the ingress and the worker.
//!
//! Ingress and worker must never depend on each other, and `schema` must stay a
//! pure contract that task code can use without pulling in AMQP. What both
//! processes need at run time lives here: typed configuration, telemetry, the
//! database pool and migrations, the broker connection and topology, metrics,
//! and the one shutdown token.

pub mod amqp;
pub mod config;
pub mod metrics;
pub mod migrations;
pub mod schedule;
pub mod shutdown;
pub mod telemetry;

pub use config::{Config, ConfigError};

pub use conveyor_schema::pool as db;
