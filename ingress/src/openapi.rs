//! The OpenAPI document, generated from the handlers' annotations (utoipa) and
//! served at `/openapi.json` so it imports into Postman and drives fuzzing.

use utoipa::OpenApi;

use crate::problem::Problem;
use crate::routes::{campaigns, health, jobs};

/// The whole API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Conveyor", description = "Durable jobs over HTTP: enqueue, inspect, operate."),
    paths(
        jobs::enqueue, jobs::status,
        campaigns::create::create, campaigns::create::add_recipients, campaigns::read::status,
        campaigns::read::recipients, campaigns::control::send, campaigns::control::pause,
        campaigns::control::resume, campaigns::control::cancel, campaigns::control::resend_unknown,
        health::healthz, health::readyz, health::metrics
    ),
    components(schemas(
        Problem, jobs::EnqueueRequest, jobs::Accepted, jobs::JobStatus, conveyor_schema::JobState,
        campaigns::CreateCampaign, campaigns::RecipientInput, campaigns::AddRecipients, campaigns::AddedRecipients,
        campaigns::CampaignStatus, campaigns::RecipientCounts, campaigns::RecipientPage, campaigns::RecipientView,
        campaigns::Transition, conveyor_schema::models::CampaignState, conveyor_schema::models::RecipientState
    )),
    tags((name = "jobs", description = "Enqueue jobs and read their status"),
         (name = "campaigns", description = "Mail fan-out: campaigns, recipients and their delivery ledger"),
         (name = "operations", description = "Probes and metrics"))
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn serve() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
