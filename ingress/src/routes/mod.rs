//! HTTP routes, one file per resource.

pub mod admin;
pub mod campaigns;
pub mod health;
pub mod jobs;
pub mod schedules;
pub mod stats;
