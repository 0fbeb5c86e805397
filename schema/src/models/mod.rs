//! Row types, one file per table.

pub mod campaign;
pub mod dead_job;
pub mod job;
pub mod worker;

pub use campaign::{Campaign, CampaignState, NewCampaign, NewRecipient, Recipient, RecipientState};
pub mod schedule_tick;

pub use dead_job::{DeadJob, DeadJobAction, NewDeadJobAction};
pub use job::{Job, NewJob};
pub use schedule_tick::ScheduleTick;
pub use worker::WorkerRow;
