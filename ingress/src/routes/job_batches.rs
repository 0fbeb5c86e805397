//! `POST /v1/jobs/batch`: many jobs in one request, as Sidekiq's `push_bulk`
//! or Oban's `insert_all`.
//!
//! A producer with thousands of jobs to hand over would otherwise pay one HTTP
//! round trip, and wait for one confirm and commit, per job: its rate follows
//! the requests it keeps in flight (RUNBOOK, "Measuring throughput"). Here each
//! job is checked exactly as `POST /v1/jobs` checks it, all before anything is
//! recorded or published, so one bad job refuses the whole batch with a pointer
//! to it (`/jobs/3/args/to`). The key's bucket is charged one token per job.
//! The jobs then go to the group-commit recorder together, and each one is
//! accepted (recorded and confirmed) or refused on its own:
//! - all accepted: 202;
//! - none: 503 with `Retry-After`; nothing was enqueued unless its type is
//!   `in-doubt`, whose `job_ids` name the jobs that may run all the same;
//! - some: 207, and the body says which, so the producer resubmits only the
//!   refused ones. With an `Idempotency-Key`, a 207 is not stored: the same
//!   key and body enqueues the whole batch again under the same ids, so a
//!   refused job in doubt is not made twice and an accepted one runs once.

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::auth::rate::Short;
use crate::idempotency::IdSeed;
use crate::json_body::StrictJson;
use crate::problem::Problem;
use crate::routes::jobs::{EnqueueRequest, Origin, Prepared};
use crate::state::AppState;

/// Most jobs in one batch.
pub const MAX_BATCH_JOBS: usize = 1_000;

/// Jobs to enqueue together.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 1 000 jobs, each as `POST /v1/jobs` takes one.
    #[schema(min_items = 1, max_items = 1000)]
    pub jobs: Vec<EnqueueRequest>,
}

/// What became of each job of a batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchOutcome {
    /// Jobs recorded and confirmed by the broker.
    pub accepted: usize,
    /// Jobs refused because the broker or the database was unavailable: resubmit them.
    pub refused: usize,
    /// One entry per job, in the order of the request.
    pub jobs: Vec<BatchItem>,
}

/// One job of a batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchItem {
    /// The job id. A refused job has no record; after a confirm timeout its
    /// message may still reach a worker, which then runs it under this id.
    pub id: Uuid,
    /// True when the job was recorded and the broker confirmed its message.
    pub accepted: bool,
    /// Where to read the job's status; only when accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_url: Option<String>,
    /// Why the job was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Present and true when the refused job may run all the same: its
    /// message was, or may have been, confirmed (see the README, "When a 503 is
    /// in doubt"). Resubmitting it may run the work twice.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_doubt: bool,
}

/// Enqueue up to 1 000 jobs in one request.
#[utoipa::path(
    post, path = "/v1/jobs/batch", tag = "jobs",
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Every job recorded and confirmed by the broker", body = BatchOutcome),
        (status = 207, description = "Some jobs accepted, the others refused by an unavailable broker or database: resubmit those, or, with an Idempotency-Key, the same request with the same key", body = BatchOutcome),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown, expired or revoked API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key's `enqueue:` scopes do not cover a job's task (`pointer` names it); nothing enqueued", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A request with this Idempotency-Key is still in progress", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No jobs or more than 1 000, more jobs than the key's bucket holds, or a job as `POST /v1/jobs` would refuse it (`pointer` names it); nothing enqueued", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The key's bucket holds fewer tokens than the batch has jobs; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker or database unavailable, no job accepted; retry after `Retry-After`. Type `in-doubt`: `job_ids` may run all the same", body = Problem, content_type = "application/problem+json"),
    ),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key for the whole batch: the same key and body within 24 h replays the first 202 (header `Idempotent-Replayed: true`); after a 207, a 5xx (even one in doubt) or a lost answer, it enqueues the same jobs again, under the same ids, and a worker runs each once. Also carried in each job's envelope."),
        ("traceparent" = Option<String>, Header, description = "W3C trace context, carried in every job's envelope."),
        ("tracestate" = Option<String>, Header, description = "W3C trace state, carried with a valid `traceparent`."),
    )
)]
pub async fn enqueue_batch(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    seed: Option<Extension<IdSeed>>,
    headers: HeaderMap,
    StrictJson { value: request, .. }: StrictJson<BatchRequest>,
) -> Result<Response, Problem> {
    let origin = Origin::of(principal, seed, &headers);
    let count = request.jobs.len();
    if !(1..=MAX_BATCH_JOBS).contains(&count) {
        return Err(Problem::invalid(
            "/jobs",
            format!("a batch holds 1 to {MAX_BATCH_JOBS} jobs, not {count}"),
        ));
    }
    let jobs = request
        .jobs
        .into_iter()
        .enumerate()
        .map(|(index, job)| {
            Prepared::check(&state, &origin, index, job).map_err(|problem| within(problem, index))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(principal) = &origin.principal {
        charge(&state, principal, count)?;
    }
    let ids: Vec<Uuid> = jobs.iter().map(Prepared::id).collect();
    let outcomes = futures::future::join_all(jobs.into_iter().map(|job| job.submit(&state))).await;
    let items: Vec<BatchItem> = ids
        .into_iter()
        .zip(outcomes)
        .map(|(id, outcome)| match outcome {
            Ok(accepted) => BatchItem {
                id,
                accepted: true,
                status_url: Some(accepted.status_url),
                error: None,
                in_doubt: false,
            },
            Err(problem) => BatchItem {
                id,
                accepted: false,
                status_url: None,
                in_doubt: !problem.job_ids.is_empty(),
                error: Some(problem.detail),
            },
        })
        .collect();
    let accepted = items.iter().filter(|item| item.accepted).count();
    if accepted == 0 {
        let why = items
            .iter()
            .find_map(|item| item.error.clone())
            .unwrap_or_default();
        let in_doubt: Vec<Uuid> = items
            .iter()
            .filter(|item| item.in_doubt)
            .map(|item| item.id)
            .collect();
        if in_doubt.is_empty() {
            return Err(Problem::unavailable(
                format!("no job of the batch was enqueued: {why}"),
                1,
            ));
        }
        return Err(Problem::in_doubt(
            format!(
                "no job of the batch was accepted, but {} of them may run all the same (`job_ids`): {why}",
                in_doubt.len()
            ),
            in_doubt,
        ));
    }
    let status = if accepted == count {
        StatusCode::ACCEPTED
    } else {
        StatusCode::MULTI_STATUS
    };
    let outcome = BatchOutcome {
        accepted,
        refused: count - accepted,
        jobs: items,
    };
    Ok((status, Json(outcome)).into_response())
}

/// `problem`, found in job `index`, as the batch's problem: its pointer moves
/// under `/jobs/{index}` and its detail names the job.
fn within(mut problem: Problem, index: usize) -> Problem {
    let pointer = problem.pointer.take().unwrap_or_default();
    problem.pointer = Some(format!("/jobs/{index}{pointer}").into());
    problem.detail = format!("job {index}: {}", problem.detail);
    problem
}

/// Charges the key one token per job; the request was charged one already.
fn charge(state: &AppState, principal: &Principal, count: usize) -> Result<(), Problem> {
    let jobs = u32::try_from(count).unwrap_or(u32::MAX);
    match state.auth.take_for_jobs(principal, jobs) {
        Ok(()) => Ok(()),
        Err(Short::Wait(wait)) => Err(crate::auth::too_many(wait)),
        Err(Short::Exceeds(capacity)) => Err(Problem::invalid(
            "/jobs",
            format!(
                "a batch of {count} jobs needs {count} tokens, more than key {}'s bucket holds ({capacity}); send at most {capacity} jobs per batch",
                principal.key_id
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_problem_points_into_the_batch() {
        let problem = within(Problem::invalid("/args/to", "not an address"), 3);
        assert_eq!(problem.pointer.as_deref(), Some("/jobs/3/args/to"));
        assert_eq!(problem.detail, "job 3: not an address");
        assert_eq!(problem.status, 422);
    }
}
