//! `/v1/campaigns`: create a mailing, add recipients, start, pause, resume,
//! cancel, re-send in-doubt recipients, and watch progress.
//!
//! The ingress only writes the campaign and its ledger and enqueues the
//! planner (`mail.plan_campaign`); workers do the sending (see `conveyor_tasks::mail`).

pub mod control;
pub mod create;
pub mod read;
pub mod types;

pub use control::{cancel, pause, resend_unknown, resume, send};
pub use create::{add_recipients, create};
pub use read::{recipients, status};
pub use types::*;

use conveyor_platform::amqp::Outgoing;
use conveyor_schema::args::mail::{PlanCampaign, PlanCampaignArgs};
use conveyor_schema::models::NewJob;
use conveyor_schema::{Envelope, TaskSpec};
use uuid::Uuid;

use crate::problem::Problem;
use crate::state::AppState;

/// Enqueues the planner for `campaign_id` (recorded and confirmed, like any job).
async fn enqueue_planner(state: &AppState, campaign_id: Uuid) -> Result<Uuid, Problem> {
    let args = serde_json::to_value(PlanCampaignArgs { campaign_id }).map_err(Problem::internal)?;
    let envelope = Envelope::new(PlanCampaign::NAME, args);
    let options = PlanCampaign::options();
    let record = NewJob::queued(&envelope, &options);
    let message = Outgoing::job(&state.topology, options.queue, &envelope);
    state
        .recorder
        .submit(record, message)
        .await
        .map_err(|err| Problem::unavailable(format!("could not enqueue the planner: {err}"), 1))?;
    Ok(envelope.id)
}

/// The campaign's state name, with its row locked until the transaction ends
/// (so concurrent transitions and appends are serialised); `None` if absent.
fn locked_state(conn: &mut diesel::PgConnection, id: Uuid) -> diesel::QueryResult<Option<String>> {
    use conveyor_schema::db::campaigns;
    use diesel::prelude::*;
    campaigns::table
        .find(id)
        .select(campaigns::state)
        .for_update()
        .first(conn)
        .optional()
}
