//! `/v1/campaigns`: create a mailing, add recipients, start, pause, resume,
//! cancel, re-send in-doubt recipients, and watch progress.
//!
//! The ingress only writes the campaign and its ledger and enqueues the
//! planner (`mail.plan_campaign`); workers do the sending (see `conveyor_tasks::mail`).
//!
//! A campaign belongs to the producer of the key that created it
//! (`campaigns.producer`): a key without `admin` sees and changes only its
//! producer's campaigns, and any other is a 404 exactly like an unknown id, so a
//! producer cannot probe for others' ids (`owner`). `admin` sees every one,
//! including those created before the column existed (no producer).

pub mod control;
pub mod create;
pub mod read;
pub mod types;

pub use control::{cancel, pause, resend_unknown, resume, send};
pub use create::{add_recipients, create};
pub use read::{recipients, status};
pub use types::*;

use axum::Extension;
use conveyor_platform::amqp::Outgoing;
use conveyor_schema::args::mail::{PlanCampaign, PlanCampaignArgs};
use conveyor_schema::db::campaigns;
use conveyor_schema::models::NewJob;
use conveyor_schema::{Envelope, TaskSpec};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::Bool;
use uuid::Uuid;

use crate::auth::Principal;
use crate::problem::Problem;
use crate::state::AppState;

/// Whose campaigns the caller may see and change: `None` for every campaign
/// (a key with `admin`), else only those its producer created. The guard sets
/// a principal on every `/v1` route; like `GET /v1/jobs/{id}`, a router without
/// it applies no key rule.
pub(crate) fn owner(principal: Option<Extension<Principal>>) -> Option<String> {
    principal
        .filter(|Extension(p)| !p.has("admin"))
        .map(|Extension(p)| p.producer)
}

/// The campaigns `owner` (see [`owner`]) may see: its producer's, or all for
/// `None`. A campaign with no producer matches only `None`.
fn visible_to(
    owner: Option<String>,
) -> Box<dyn BoxableExpression<campaigns::table, Pg, SqlType = Bool>> {
    match owner {
        Some(owner) => Box::new(campaigns::producer.is_not_distinct_from(owner)),
        None => Box::new(true.into_sql::<Bool>()),
    }
}

/// 404 for a campaign that does not exist or that the caller may not see: the
/// same answer for both.
fn no_such_campaign(id: Uuid) -> Problem {
    Problem::not_found(format!("no campaign {id}"))
}

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
/// (so concurrent transitions and appends are serialised); `None` if absent or
/// not visible to `owner` (see [`owner`]).
fn locked_state(
    conn: &mut PgConnection,
    id: Uuid,
    owner: Option<String>,
) -> QueryResult<Option<String>> {
    campaigns::table
        .find(id)
        .filter(visible_to(owner))
        .select(campaigns::state)
        .for_update()
        .first(conn)
        .optional()
}
