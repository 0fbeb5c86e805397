//! The OpenAPI document, generated from the handlers' annotations (utoipa) and
//! served at `/openapi.json` so it imports into Postman and drives fuzzing.

use utoipa::OpenApi;

use crate::problem::Problem;
use crate::routes::{health, jobs, profiles, webhooks};

/// The whole API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Conveyor", description = "Durable jobs over HTTP: enqueue, inspect, operate."),
    paths(jobs::enqueue, jobs::status, webhooks::receive, profiles::show, health::healthz, health::readyz, health::metrics),
    components(schemas(Problem, jobs::EnqueueRequest, jobs::Accepted, jobs::JobStatus, conveyor_schema::JobState,
        webhooks::WebhookAccepted, profiles::ProfileView, profiles::HeadshotView)),
    tags((name = "jobs", description = "Enqueue jobs and read their status"),
         (name = "webhooks", description = "Signed inbound webhooks and the profiles they sync"),
         (name = "operations", description = "Probes and metrics"))
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn serve() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
