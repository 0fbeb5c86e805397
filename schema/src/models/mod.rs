//! Row types, one file per table.

pub mod job;

pub use job::{Job, NewJob};
pub mod schedule_tick;

pub use schedule_tick::ScheduleTick;
