//! Row types, one file per table.

pub mod job;
pub mod profile;

pub use job::{Job, NewJob};
pub use profile::Profile;
