//! The OpenAPI document, generated from the handlers' annotations (utoipa) and
//! served at `/openapi.json` so it imports into Postman and drives fuzzing.

use utoipa::OpenApi;

use crate::problem::Problem;
use crate::routes::{campaigns, health, jobs, schedules, stats};

/// The whole API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Conveyor", description = "Durable jobs over HTTP: enqueue, inspect, operate."),
    paths(
        jobs::enqueue, jobs::status,
        campaigns::create::create, campaigns::create::add_recipients, campaigns::read::status,
        campaigns::read::recipients, campaigns::control::send, campaigns::control::pause,
        campaigns::control::resume, campaigns::control::cancel, campaigns::control::resend_unknown,
        schedules::list, schedules::ticks, stats::stats,
        health::healthz, health::readyz, health::metrics
    ),
    components(schemas(
        Problem, jobs::EnqueueRequest, jobs::Accepted, jobs::JobStatus, conveyor_schema::JobState,
        campaigns::CreateCampaign, campaigns::RecipientInput, campaigns::AddRecipients, campaigns::AddedRecipients,
        campaigns::CampaignStatus, campaigns::RecipientCounts, campaigns::RecipientPage, campaigns::RecipientView,
        campaigns::Transition, conveyor_schema::models::CampaignState, conveyor_schema::models::RecipientState,
        schedules::ScheduleView, schedules::Tick, stats::StatsResponse, stats::StatsRows, stats::JobStatsRow,
        stats::MailStatsRow, stats::WebhookStatsRow, conveyor_schema::stats::Family, conveyor_schema::stats::Granularity
    )),
    tags((name = "jobs", description = "Enqueue jobs and read their status"),
         (name = "campaigns", description = "Mail fan-out: campaigns, recipients and their delivery ledger"),
         (name = "schedules", description = "Periodic jobs and the ticks they fired"),
         (name = "stats", description = "Hourly and daily rollups as JSON or CSV"),
         (name = "operations", description = "Probes and metrics"))
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn serve() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
