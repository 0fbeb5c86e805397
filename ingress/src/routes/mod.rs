//! HTTP routes, one file per resource.

pub mod admin;
pub mod health;
pub mod jobs;
