//! Rows of `campaigns` and `campaign_recipients`, and their states.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::db::{campaign_recipients, campaigns};

/// A campaign's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    /// Created; recipients may be added; nothing sent.
    Draft,
    /// Planner and senders at work.
    Sending,
    /// Senders stop at the next recipient group; resume re-plans the rest.
    Paused,
    /// No recipient is `pending` or `sending`.
    Completed,
    /// Stopped for good; pending recipients are never sent.
    Cancelled,
}

/// A recipient's delivery state in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecipientState {
    /// Not sent yet (or deferred after a 4xx reply).
    Pending,
    /// Claimed by a worker that is talking to the SMTP server now.
    Sending,
    /// The SMTP server accepted it (250).
    Sent,
    /// Permanently refused (5xx), with the reply recorded.
    Failed,
    /// In doubt: its claim expired mid-conversation (the worker died). Never re-sent automatically.
    Unknown,
}

macro_rules! stored_names {
    ($ty:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value.
            pub const ALL: &'static [$ty] = &[$(<$ty>::$variant),+];
            /// The value stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $(<$ty>::$variant => $name),+ }
            }
            /// Parses a stored value.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($name => Some(<$ty>::$variant),)+ _ => None }
            }
        }
    };
}

stored_names!(CampaignState { Draft => "draft", Sending => "sending", Paused => "paused", Completed => "completed", Cancelled => "cancelled" });
stored_names!(RecipientState { Pending => "pending", Sending => "sending", Sent => "sent", Failed => "failed", Unknown => "unknown" });

/// A campaign row.
#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = campaigns, check_for_backend(diesel::pg::Pg))]
pub struct Campaign {
    /// Id.
    pub id: Uuid,
    /// Human name.
    pub name: String,
    /// Mail template folder name.
    pub template: String,
    /// `From` mailbox.
    pub from_addr: String,
    /// `Reply-To` mailbox.
    pub reply_to: Option<String>,
    /// Variables shared by every recipient.
    pub vars: Value,
    /// Send-rate ceiling across all workers.
    pub rate_per_sec: Option<f64>,
    /// A [`CampaignState`] name.
    pub state: String,
    /// Re-plan counter (part of chunk identity).
    pub plan_generation: i32,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When `/send` was called.
    pub send_started_at: Option<DateTime<Utc>>,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
    /// The producer of the API key that created it; `None` for campaigns
    /// created before the column existed (only `admin` keys see those).
    pub producer: Option<String>,
}

impl Campaign {
    /// The parsed state.
    pub fn campaign_state(&self) -> CampaignState {
        CampaignState::parse(&self.state).unwrap_or(CampaignState::Draft)
    }
}

/// A new campaign row.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = campaigns)]
pub struct NewCampaign {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Template.
    pub template: String,
    /// From.
    pub from_addr: String,
    /// Reply-To.
    pub reply_to: Option<String>,
    /// Shared variables.
    pub vars: Value,
    /// Rate.
    pub rate_per_sec: Option<f64>,
    /// Always `draft`.
    pub state: String,
    /// The creating key's producer (only it and `admin` keys may see the
    /// campaign); `None` on a router without the key guard.
    pub producer: Option<String>,
}

/// A ledger row.
#[derive(Debug, Clone, Queryable, Selectable, Identifiable, Serialize)]
#[diesel(table_name = campaign_recipients, check_for_backend(diesel::pg::Pg))]
pub struct Recipient {
    /// Ledger id (also the keyset cursor).
    pub id: i64,
    /// Campaign.
    pub campaign_id: Uuid,
    /// Address.
    pub email: String,
    /// Per-recipient variables.
    pub vars: Value,
    /// A [`RecipientState`] name.
    pub state: String,
    /// Planned chunk.
    pub chunk_id: Option<Uuid>,
    /// Claiming worker.
    pub claimed_by: Option<String>,
    /// Claim time.
    pub claimed_at: Option<DateTime<Utc>>,
    /// Claim expiry.
    pub claim_expires_at: Option<DateTime<Utc>>,
    /// SMTP attempts.
    pub attempts: i32,
    /// Deferred until, after a 4xx.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The SMTP server's last reply.
    pub last_reply: Option<String>,
    /// When accepted.
    pub sent_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A new ledger row.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = campaign_recipients)]
pub struct NewRecipient {
    /// Campaign.
    pub campaign_id: Uuid,
    /// Address.
    pub email: String,
    /// Variables.
    pub vars: Value,
}
