//! The contract every Conveyor part agrees on.
//!
//! Ingress, worker and tasks never depend on each other; they meet here. This
//! crate holds the wire format of a job (the [`envelope`]), the list of tasks
//! that exist with their argument types and options (the [`catalogue()`]), and
//! the database tables as Diesel sees them ([`db`] and [`models`]). It holds no
//! I/O: nothing here opens a socket.

pub mod args;
pub mod catalogue;
pub mod db;
pub mod envelope;
pub mod job_state;
pub mod json_pointer;
pub mod models;
pub mod nul;
pub mod pool;
pub mod prepared;
pub mod stats;
pub mod timestamptz;

pub use catalogue::{
    ArgsError, MAX_TASK_NAME_LEN, TaskDescriptor, TaskOptions, TaskSpec, catalogue, find_task,
};
pub use envelope::{ENVELOPE_VERSION, Envelope, EnvelopeError, TraceContext};
pub use job_state::JobState;
