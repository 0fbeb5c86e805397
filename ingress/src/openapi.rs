//! The OpenAPI document, generated from the handlers' annotations (utoipa) and
//! served at `/openapi.json` so it imports into Postman and drives fuzzing.

use utoipa::OpenApi;

use crate::problem::Problem;
use crate::routes::{admin, campaigns, health, jobs, schedules, stats};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

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
        admin::list, admin::show, admin::replay, admin::discard, admin::queues,
        health::healthz, health::readyz, health::metrics
    ),
    components(schemas(
        Problem, jobs::EnqueueRequest, jobs::Accepted, jobs::JobStatus, conveyor_schema::JobState,
        campaigns::CreateCampaign, campaigns::RecipientInput, campaigns::AddRecipients, campaigns::AddedRecipients,
        campaigns::CampaignStatus, campaigns::RecipientCounts, campaigns::RecipientPage, campaigns::RecipientView,
        campaigns::Transition, conveyor_schema::models::CampaignState, conveyor_schema::models::RecipientState,
        schedules::ScheduleView, schedules::Tick, stats::StatsResponse, stats::StatsRows, stats::JobStatsRow,
        stats::MailStatsRow, stats::WebhookStatsRow, conveyor_schema::stats::Family, conveyor_schema::stats::Granularity,
        admin::DeadJobView, admin::ActionView, admin::ReplayRequest, admin::ReplayResult,
        admin::DiscardResult, crate::monitor::Snapshot, crate::monitor::QueueStats, crate::monitor::DelayedCount
    )),
    modifiers(&AdminToken),
    tags((name = "jobs", description = "Enqueue jobs and read their status"),
         (name = "campaigns", description = "Mail fan-out: campaigns, recipients and their delivery ledger"),
         (name = "schedules", description = "Periodic jobs and the ticks they fired"),
         (name = "stats", description = "Hourly and daily rollups as JSON or CSV"),
         (name = "operations", description = "Probes and metrics"),
         (name = "admin", description = "Dead jobs, queues and workers; needs the admin token (later: an API key with the `admin` scope)"))
)]
pub struct ApiDoc;

/// Declares the `admin_token` bearer scheme the admin paths refer to.
struct AdminToken;

impl utoipa::Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `GET /openapi.json`.
pub async fn serve() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
