//! Row types, one file per table.

pub mod campaign;
pub mod job;

pub use campaign::{Campaign, CampaignState, NewCampaign, NewRecipient, Recipient, RecipientState};
pub use job::{Job, NewJob};
pub mod schedule_tick;

pub use schedule_tick::ScheduleTick;
