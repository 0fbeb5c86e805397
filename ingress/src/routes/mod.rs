//! HTTP routes, one file per resource.

pub mod health;
pub mod jobs;
