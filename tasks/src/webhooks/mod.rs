//! Tasks fed by signed inbound webhooks (see `conveyor_schema::args::webhooks`).

pub mod headshot;
mod headshot_sweep;
mod profile_sync;

pub use headshot::HeadshotPolicy;
pub use headshot_sweep::HeadshotSweep;
pub use profile_sync::{Decision, ProfileSync, decide};
