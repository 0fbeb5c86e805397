//! Row types, one file per table.

pub mod job;

pub use job::{Job, NewJob};
