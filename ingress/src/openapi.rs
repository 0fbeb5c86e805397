//! The OpenAPI document, generated from the handlers' annotations (utoipa) and
//! served at `/openapi.json` so it imports into Postman and drives fuzzing.

use utoipa::OpenApi;

use crate::problem::Problem;
use crate::routes::{
    admin, campaigns, health, job_batches, jobs, profiles, schedules, stats, webhooks,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};

/// The whole API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Conveyor", description = "Durable jobs over HTTP: enqueue, inspect, operate. \
        Every route of the JSON API is described here, this document included; the dashboard's \
        server-rendered HTML pages (`/dashboard…`) are not."),
    paths(
        jobs::enqueue, job_batches::enqueue_batch, jobs::status,
        campaigns::create::create, campaigns::create::add_recipients, campaigns::read::status,
        campaigns::read::recipients, campaigns::control::send, campaigns::control::pause,
        campaigns::control::resume, campaigns::control::cancel, campaigns::control::resend_unknown,
        schedules::list, schedules::ticks, stats::stats, webhooks::receive, profiles::show,
        admin::list, admin::show, admin::replay, admin::discard, admin::queues,
        admin::bulk::replay_matching, admin::bulk::discard_matching,
        health::healthz, health::readyz, health::metrics, serve
    ),
    components(schemas(
        Problem, jobs::EnqueueRequest, jobs::Accepted, job_batches::BatchRequest,
        job_batches::BatchOutcome, job_batches::BatchItem, jobs::JobStatus, conveyor_schema::JobState,
        campaigns::CreateCampaign, campaigns::RecipientInput, campaigns::AddRecipients, campaigns::AddedRecipients,
        campaigns::CampaignStatus, campaigns::RecipientCounts, campaigns::RecipientPage, campaigns::RecipientView,
        campaigns::Transition, conveyor_schema::models::CampaignState, conveyor_schema::models::RecipientState,
        schedules::ScheduleView, schedules::Tick, stats::StatsResponse, stats::StatsRows, stats::JobStatsRow,
        stats::MailStatsRow, stats::WebhookStatsRow, conveyor_schema::stats::Family, conveyor_schema::stats::Granularity,
        admin::DeadJobView, admin::ActionView, admin::ReplayRequest, admin::ReplayResult,
        admin::DiscardResult, admin::bulk::BulkFilter, admin::bulk::BulkReplayRequest,
        admin::bulk::BulkDiscardRequest, admin::bulk::BulkResult, admin::bulk::BulkItem, crate::monitor::Snapshot, crate::monitor::QueueStats, crate::monitor::DelayedCount,
        webhooks::WebhookAccepted, profiles::ProfileView, profiles::HeadshotView
    )),
    modifiers(&ApiKey, &HeaderLimit),
    tags((name = "jobs", description = "Enqueue jobs and read their status"),
         (name = "campaigns", description = "Mail fan-out: campaigns, recipients and their delivery ledger"),
         (name = "schedules", description = "Periodic jobs and the ticks they fired"),
         (name = "stats", description = "Hourly and daily rollups as JSON or CSV"),
         (name = "webhooks", description = "Signed inbound webhooks and the profiles they sync"),
         (name = "operations", description = "Probes and metrics"),
         (name = "admin", description = "Dead jobs, queues and workers; needs an API key with the `admin` scope"))
)]
pub struct ApiDoc;

/// Declares the `api_key` bearer scheme and requires it on every `/v1` path
/// except the signed webhooks.
struct ApiKey;

impl utoipa::Modify for ApiKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer cvk_<id>_<secret>`, made with `conveyor keys create`",
                    ))
                    .build(),
            ),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") || path.starts_with("/v1/webhooks/") {
                continue;
            }
            for operation in operations_mut(item) {
                operation.security = Some(vec![SecurityRequirement::new(
                    "api_key",
                    Vec::<String>::new(),
                )]);
            }
        }
    }
}

/// Adds the 431 every route answers when the request's headers exceed
/// `ingress.max_header_bytes` (checked in front of all routes, see `hardening`).
struct HeaderLimit;

impl utoipa::Modify for HeaderLimit {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let response = ResponseBuilder::new()
            .description("Request headers over `ingress.max_header_bytes`")
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in operations_mut(item) {
                operation
                    .responses
                    .responses
                    .insert("431".into(), response.clone().into());
            }
        }
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", operation_id = "openapi_document", responses(
    (status = 200, description = "The OpenAPI document of this API", content_type = "application/json", body = Object),
))]
pub async fn serve() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// Every operation of a path item.
fn operations_mut(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.post,
        &mut item.put,
        &mut item.patch,
        &mut item.delete,
    ]
    .into_iter()
    .flatten()
}
