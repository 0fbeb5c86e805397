//! Row types, one file per table.

pub mod dead_job;
pub mod job;
pub mod worker;

pub use dead_job::{DeadJob, DeadJobAction, NewDeadJobAction};
pub use job::{Job, NewJob};
pub use worker::WorkerRow;
