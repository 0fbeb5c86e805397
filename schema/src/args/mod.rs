//! Argument types of every task, grouped by family (one file each).
//!
//! Each task has a zero-sized marker type implementing
//! [`TaskSpec`](crate::TaskSpec) that ties its name, argument type and options together.

pub mod diag;
pub mod mail;
pub mod stats;
