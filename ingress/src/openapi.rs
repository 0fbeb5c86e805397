//! The OpenAPI document, generated from the handlers' annotations (utoipa) and
//! served at `/openapi.json` so it imports into Postman and drives fuzzing.

use utoipa::OpenApi;

use crate::problem::Problem;
use crate::routes::{health, jobs, schedules, stats};

/// The whole API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Conveyor", description = "Durable jobs over HTTP: enqueue, inspect, operate."),
    paths(jobs::enqueue, jobs::status, schedules::list, schedules::ticks, stats::stats, health::healthz, health::readyz, health::metrics),
    components(schemas(Problem, jobs::EnqueueRequest, jobs::Accepted, jobs::JobStatus, conveyor_schema::JobState,
        schedules::ScheduleView, schedules::Tick, stats::StatsResponse, stats::StatsRows, stats::JobStatsRow,
        stats::MailStatsRow, stats::WebhookStatsRow, conveyor_schema::stats::Family, conveyor_schema::stats::Granularity)),
    tags((name = "jobs", description = "Enqueue jobs and read their status"),
         (name = "schedules", description = "Periodic jobs and the ticks they fired"),
         (name = "stats", description = "Hourly and daily rollups as JSON or CSV"),
         (name = "operations", description = "Probes and metrics"))
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn serve() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
