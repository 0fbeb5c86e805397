//! HTTP routes, one file per resource.

pub mod admin;
pub mod campaigns;
pub mod health;
pub mod job_batches;
pub mod jobs;
pub mod profiles;
pub mod schedules;
pub mod stats;
pub mod webhooks;
