//! Conveyor's task implementations.
//!
//! A task is a type implementing [`Task`]: its name, argument type and options
//! come from its [`TaskSpec`](conveyor_schema::TaskSpec) in `schema`, and its
//! body is an async `run` given a [`JobContext`]. Task code knows nothing of
//! AMQP or HTTP: it enqueues follow-up jobs through the [`Enqueue`] trait that
//! the worker implements, and reaches the database through the pool in the
//! context. Every task is registered in [`registry()`], the one list.

pub mod context;
pub mod diag;
pub mod error;
pub mod mail;
pub mod registry;
pub mod stats;
pub mod webhooks;

pub use context::{Enqueue, JobContext, Services};
pub use error::{MAX_RETRY_AFTER, TaskError};
pub use registry::{ErasedTask, Registry, Task, registry};
