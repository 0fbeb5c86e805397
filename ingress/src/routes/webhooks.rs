//! `POST /v1/webhooks/{source}/profiles`: signed profile webhooks (Standard Webhooks).
//!
//! Checks run cheapest first and nothing is written until all pass: known
//! source (404), headers present and well-formed, with at most
//! [`webhook_signature::MAX_SIGNATURES`] signatures (400), declared and actual
//! size within the limit (413, before any hashing), timestamp within the
//! source's tolerance (401), a valid signature over the raw bytes (401), then
//! the body's shape (400/422). Only then is the `webhook-id` claimed (a repeat
//! answers 200) and the `webhook.profile_sync` job recorded and published (202
//! after the broker's confirm). A rejection is counted, by reason, in the
//! metrics and (batched, see [`crate::webhook_rejections`]) in the database.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use conveyor_platform::amqp::Outgoing;
use conveyor_platform::webhook_signature;
use conveyor_schema::args::webhooks::{ProfileEvent, ProfileSync, ProfileSyncArgs};
use conveyor_schema::models::NewJob;
use conveyor_schema::{Envelope, TaskSpec};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::json_body;
use crate::problem::Problem;
use crate::state::AppState;
use crate::webhooks::{self, Claim, Source};

/// The answer to an accepted (202) or repeated (200) webhook.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookAccepted {
    /// The `webhook.profile_sync` job that applies it.
    pub job_id: Uuid,
    /// Where to read that job's status.
    pub status_url: String,
    /// True when this `webhook-id` had already been accepted (nothing new was enqueued).
    pub duplicate: bool,
}

/// The three Standard Webhooks headers, checked for shape.
struct Signed<'a> {
    id: &'a str,
    timestamp: i64,
    signature: &'a str,
}

fn bad_headers(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-webhook-headers",
        "Missing or malformed webhook headers",
        detail,
    )
}

fn unauthorized(kind: &str, title: &str, detail: &str) -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, kind, title, detail)
}

fn signed_headers(headers: &HeaderMap) -> Result<Signed<'_>, Problem> {
    let get = |name: &str| -> Result<&str, Problem> {
        let value = headers
            .get(name)
            .ok_or_else(|| bad_headers(format!("the `{name}` header is missing")))?
            .to_str()
            .map_err(|_| bad_headers(format!("the `{name}` header is not visible ASCII")))?
            .trim();
        if value.is_empty() {
            return Err(bad_headers(format!("the `{name}` header is empty")));
        }
        Ok(value)
    };
    let id = get("webhook-id")?;
    if id.len() > 256 {
        return Err(bad_headers("`webhook-id` is longer than 256 characters"));
    }
    let timestamp = get("webhook-timestamp")?
        .parse::<i64>()
        .map_err(|_| bad_headers("`webhook-timestamp` is not an integer (Unix seconds)"))?;
    let signature = get("webhook-signature")?;
    let well_formed = signature.split(' ').filter(|s| !s.is_empty()).all(|entry| {
        entry
            .split_once(',')
            .is_some_and(|(version, sig)| !version.is_empty() && !sig.is_empty())
    });
    if !well_formed {
        return Err(bad_headers(
            "`webhook-signature` must be space-separated `version,base64` entries",
        ));
    }
    webhook_signature::check_signature_count(signature).map_err(|too_many| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "too-many-signatures",
            "Too many signatures",
            too_many.to_string(),
        )
    })?;
    Ok(Signed {
        id,
        timestamp,
        signature,
    })
}

/// Receive a signed profile webhook.
#[utoipa::path(
    post, path = "/v1/webhooks/{source}/profiles", tag = "webhooks",
    params(
        ("source" = String, Path, description = "A source configured under `[webhooks.sources]`"),
        ("webhook-id" = String, Header, description = "Unique id of this webhook (deduplicated per source)"),
        ("webhook-timestamp" = i64, Header, description = "Unix seconds when it was signed"),
        ("webhook-signature" = String, Header, description = "Space-separated `v1,<base64 HMAC>` / `v1a,<base64 Ed25519>` signatures"),
    ),
    request_body(content = Object, content_type = "application/json",
        description = "`{\"action\": \"UPDATE\"|\"IMPORT_HEADSHOT\"|\"DELETE\", \"profile_id\", \"occurred_at\", \"data\"}`; `occurred_at` (RFC 3339) from 4714-11-24 00:00:00 UTC BC to 24 h past the server's clock"),
    responses(
        (status = 202, description = "Verified, recorded and confirmed by the broker", body = WebhookAccepted),
        (status = 200, description = "This webhook-id was already accepted; nothing new enqueued", body = WebhookAccepted),
        (status = 400, description = "Missing or malformed webhook headers, more than 10 entries in `webhook-signature` (problem type `too-many-signatures`), or malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid signature, or timestamp outside the tolerance", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown source", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The same webhook-id is being recorded right now; retry", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over `webhooks.body_limit_bytes`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown action or invalid fields (with a JSON pointer), e.g. an `occurred_at` before 4714-11-24 BC or more than 24 h ahead of the server's clock", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker or database unavailable; retry. Of type `in-doubt`, it names the job that may run all the same, and the webhook-id stays claimed for it: a repeat gets 409 for up to a minute, then submits that same job", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn receive(
    State(state): State<AppState>,
    Path(source_name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(source) = state.webhooks.by_name.get(&source_name) else {
        count(&state, "unknown", "unknown_source");
        state.webhook_rejections.record(None, "unknown_source");
        return Problem::not_found(format!("no webhook source `{source_name}`")).into_response();
    };
    match verified(&state, &source_name, source, &headers, body).await {
        Ok(response) => response,
        Err((reason, problem)) => {
            count(&state, &source_name, reason);
            state.webhook_rejections.record(Some(&source_name), reason);
            problem.into_response()
        }
    }
}

fn count(state: &AppState, source: &str, outcome: &str) {
    state
        .metrics
        .webhooks_received
        .with_label_values(&[source, outcome])
        .inc();
}

type Rejection = (&'static str, Problem);

async fn verified(
    state: &AppState,
    source_name: &str,
    source: &Source,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    let signed = signed_headers(headers).map_err(|p| ("bad_headers", p))?;
    let raw = json_body::read_within(headers, body, state.webhooks.body_limit, false)
        .await
        .map_err(|p| ("too_large", p))?;
    let now = Utc::now().timestamp();
    if !webhook_signature::timestamp_is_fresh(signed.timestamp, now, source.tolerance_secs) {
        let detail = format!(
            "`webhook-timestamp` is more than {} s from the server's clock",
            source.tolerance_secs
        );
        return Err((
            "stale_timestamp",
            unauthorized(
                "stale-timestamp",
                "Webhook timestamp outside the tolerance",
                &detail,
            ),
        ));
    }
    let valid = webhook_signature::verify(
        &source.keys,
        signed.id,
        signed.timestamp,
        &raw,
        signed.signature,
    )
    .map_err(|too_many| {
        // Checked with the other headers already; kept so the cap holds here too.
        ("bad_headers", bad_headers(too_many.to_string()))
    })?;
    if !valid {
        return Err((
            "bad_signature",
            unauthorized(
                "invalid-signature",
                "Invalid webhook signature",
                "no signature matches the body under this source's keys",
            ),
        ));
    }
    let event: ProfileEvent = json_body::decode(&raw).map_err(|p| ("invalid_body", p))?;
    event
        .received(Utc::now())
        .map_err(|err| ("invalid_body", Problem::invalid(err.pointer, err.message)))?;
    let unavailable = |err: String| ("unavailable", Problem::unavailable(err, 1));

    let args = ProfileSyncArgs {
        source: source_name.to_owned(),
        webhook_id: signed.id.to_owned(),
        event,
    };
    let args_json = serde_json::to_value(&args).map_err(|e| unavailable(e.to_string()))?;
    let envelope = Envelope::new(ProfileSync::NAME, args_json);
    let retention = i64::try_from(source.retention_secs).unwrap_or(i64::MAX);
    let expires_at =
        chrono::DateTime::from_timestamp(signed.timestamp.saturating_add(retention), 0)
            .unwrap_or_else(|| Utc::now() + chrono::Duration::days(1));
    let claimed = state
        .webhook_ledger
        .claim(source_name, signed.id, envelope.id, expires_at)
        .await
        .map_err(unavailable)?;
    let event = |outcome| webhooks::NewEvent {
        source: source_name.to_owned(),
        webhook_id: signed.id.to_owned(),
        profile_id: Some(args.event.profile_id.clone()),
        action: Some(args.event.action.as_str().to_owned()),
        outcome,
    };
    let job_id = match claimed {
        Claim::Fresh(id) => id,
        Claim::Accepted(existing) => {
            count(state, source_name, "duplicate");
            state.webhook_ledger.record_event(event("duplicate")).await;
            return Ok(answer(StatusCode::OK, existing, true));
        }
        Claim::InProgress => {
            let mut problem = Problem::new(
                StatusCode::CONFLICT,
                "delivery-in-progress",
                "Webhook being recorded",
                "a delivery with this webhook-id is being recorded right now; retry shortly",
            );
            problem.retry_after = Some(1);
            return Err(("in_progress", problem));
        }
    };
    // A claim taken over from an abandoned request keeps that request's job id.
    let envelope = Envelope {
        id: job_id,
        ..envelope
    };
    let options = ProfileSync::options();
    let record = NewJob::queued(&envelope, &options);
    let message = Outgoing::job(&state.topology, options.queue, &envelope);
    if let Err(err) = state.recorder.submit(record, message).await {
        if err.may_have_been_enqueued() {
            // The job may run: the claim stays, so a repeat cannot make a second one.
            return Err((
                "unavailable",
                Problem::in_doubt(err.to_string(), vec![job_id]),
            ));
        }
        webhooks::release(&state.db, source_name, signed.id, job_id).await;
        return Err(unavailable(err.to_string()));
    }
    count(state, source_name, "accepted");
    state.webhook_ledger.record_event(event("accepted")).await;
    Ok(answer(StatusCode::ACCEPTED, job_id, false))
}

fn answer(status: StatusCode, job_id: Uuid, duplicate: bool) -> Response {
    let body = WebhookAccepted {
        job_id,
        status_url: format!("/v1/jobs/{job_id}"),
        duplicate,
    };
    (status, Json(body)).into_response()
}
