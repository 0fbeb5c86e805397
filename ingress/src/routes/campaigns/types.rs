//! Request and response bodies of the campaign API.

use chrono::{DateTime, Utc};
use conveyor_schema::models::{CampaignState, RecipientState};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// A new campaign (state `draft`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaign {
    /// Human name.
    pub name: String,
    /// Mail template folder name, e.g. `event_announcement`.
    pub template: String,
    /// `From` mailbox, e.g. `Events <events@example.com>`.
    pub from: String,
    /// `Reply-To` mailbox.
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Variables shared by every recipient (a JSON object).
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub vars: Value,
    /// Send-rate ceiling across all workers, messages per second.
    #[serde(default)]
    pub rate_per_sec: Option<f64>,
    /// Recipients (more can be appended later). Duplicate addresses are stored once.
    #[serde(default)]
    pub recipients: Vec<RecipientInput>,
}

/// One recipient.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipientInput {
    /// Address.
    pub email: String,
    /// Per-recipient variables (override the campaign's).
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub vars: Value,
}

/// More recipients for an existing campaign.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddRecipients {
    /// Recipients to append.
    pub recipients: Vec<RecipientInput>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// Result of appending recipients.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AddedRecipients {
    /// Newly stored.
    pub added: u64,
    /// Already in the campaign (or repeated in the request), ignored.
    pub duplicates: u64,
}

/// Recipients per ledger state.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct RecipientCounts {
    /// Not sent yet.
    pub pending: i64,
    /// Being sent now.
    pub sending: i64,
    /// Accepted by the SMTP server.
    pub sent: i64,
    /// Refused permanently.
    pub failed: i64,
    /// In doubt (a worker died mid-conversation); never re-sent automatically.
    pub unknown: i64,
    /// All recipients.
    pub total: i64,
}

/// A campaign and its progress.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CampaignStatus {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Template.
    pub template: String,
    /// From.
    pub from: String,
    /// Reply-To.
    pub reply_to: Option<String>,
    /// State.
    pub state: CampaignState,
    /// Configured rate ceiling.
    pub rate_per_sec: Option<f64>,
    /// Recipients per state.
    pub counts: RecipientCounts,
    /// Messages sent per second over the last minute.
    pub current_rate_per_sec: f64,
    /// Seconds until pending recipients are sent at the current rate (absent when idle).
    pub estimated_seconds_left: Option<f64>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// When sending started.
    pub send_started_at: Option<DateTime<Utc>>,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
}

/// Query of the recipient list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RecipientQuery {
    /// Only this state.
    pub state: Option<RecipientState>,
    /// Keyset cursor: the `next_after` of the previous page.
    pub after: Option<i64>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<i64>,
}

/// One recipient in the ledger.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecipientView {
    /// Ledger id.
    pub id: i64,
    /// Address.
    pub email: String,
    /// State.
    pub state: RecipientState,
    /// SMTP attempts.
    pub attempts: i32,
    /// The server's last reply.
    pub last_reply: Option<String>,
    /// When accepted.
    pub sent_at: Option<DateTime<Utc>>,
}

/// A page of recipients.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecipientPage {
    /// Recipients in ledger order.
    pub items: Vec<RecipientView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// Result of a state change that enqueues the planner.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Transition {
    /// The campaign's new state.
    pub state: CampaignState,
    /// The planner job enqueued, if any.
    pub planner_job_id: Option<Uuid>,
    /// Recipients affected (resend-unknown: moved back to pending).
    pub recipients: Option<u64>,
}
