//! HTTP routes, one file per resource.

pub mod health;
pub mod jobs;
pub mod profiles;
pub mod webhooks;
