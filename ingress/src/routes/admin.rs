//! The admin API (`/v1/admin/*`): dead jobs (list, show, replay, discard),
//! queues and workers. Behind [`crate::admin_auth`]. The bulk operations
//! (every dead job a filter matches) are in [`bulk`].
//!
//! The dead-job listing is paged by keyset, newest first in `(dead_at, id)`
//! order: while records remain, the answer's `Link: <…>; rel="next"` header
//! names the next page (the same query with `after=<cursor>`), so every record
//! can be reached, each once, however many share a `dead_at`.

pub mod bulk;

use std::time::Instant;

use axum::Extension;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use conveyor_schema::models::{DeadJob, DeadJobAction};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::admin_auth::Actor;
use crate::dead_jobs::{
    self, DiscardOptions, DiscardOutcome, Filter, MAX_LIMIT, Position, ReplayError, ReplayOptions,
    ReplayOutcome,
};
use crate::json_body::StrictJson;
use crate::monitor::Snapshot;
use crate::problem::Problem;
use crate::state::AppState;

/// A dead job as the admin API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadJobView {
    /// The dead job's id (its job id).
    pub id: Uuid,
    /// Task name (empty when unreadable).
    pub task: String,
    /// Logical queue.
    pub queue: String,
    /// The envelope as dead-lettered (`null` when unreadable).
    #[schema(value_type = Option<Object>)]
    pub envelope: Option<Value>,
    /// Raw body when the envelope was unreadable.
    pub body: Option<String>,
    /// Attempts made.
    pub attempts: i32,
    /// Every failure: `[{"attempt", "at", "error"}]`.
    #[schema(value_type = Vec<Object>)]
    pub errors: Value,
    /// Final reason.
    pub reason: String,
    /// RabbitMQ's `x-death` history, when the broker dead-lettered it.
    #[schema(value_type = Option<Vec<Object>>)]
    pub x_death: Option<Value>,
    /// `worker` or `broker`.
    pub source: String,
    /// When it died.
    pub dead_at: DateTime<Utc>,
    /// Job created by the latest replay.
    pub replayed_as: Option<Uuid>,
    /// When it was last replayed.
    pub replayed_at: Option<DateTime<Utc>>,
    /// Times replayed.
    pub replay_count: i32,
    /// When discarded.
    pub discarded_at: Option<DateTime<Utc>>,
    /// Audit trail, oldest first (only on `GET /v1/admin/dead-jobs/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<ActionView>>,
}

/// One audited action.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ActionView {
    /// `replay` or `discard`.
    pub action: String,
    /// Who.
    pub actor: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Job a replay created.
    pub new_job_id: Option<Uuid>,
    /// Extra facts.
    #[schema(value_type = Object)]
    pub detail: Value,
}

impl From<DeadJob> for DeadJobView {
    fn from(d: DeadJob) -> Self {
        Self {
            id: d.id,
            task: d.task,
            queue: d.queue,
            envelope: d.envelope,
            body: d.body,
            attempts: d.attempts,
            errors: d.errors,
            reason: d.reason,
            x_death: d.x_death,
            source: d.source,
            dead_at: d.dead_at,
            replayed_as: d.replayed_as,
            replayed_at: d.replayed_at,
            replay_count: d.replay_count,
            discarded_at: d.discarded_at,
            actions: None,
        }
    }
}

impl From<DeadJobAction> for ActionView {
    fn from(a: DeadJobAction) -> Self {
        Self {
            action: a.action,
            actor: a.actor,
            at: a.at,
            new_job_id: a.new_job_id,
            detail: a.detail,
        }
    }
}

/// Filters of the dead-job listing.
#[derive(Debug, Default, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadJobQuery {
    /// Exact task name.
    pub task: Option<String>,
    /// Exact logical queue.
    pub queue: Option<String>,
    /// Dead at or after this time (RFC 3339, from 4714-11-24 00:00:00 UTC BC).
    pub since: Option<DateTime<Utc>>,
    /// The final reason contains this text (case-insensitive).
    pub error_contains: Option<String>,
    /// Include discarded records.
    #[serde(default)]
    pub include_discarded: bool,
    /// Include records already replayed.
    #[serde(default)]
    pub include_replayed: bool,
    /// At most this many, 1 to 10000 (default 100).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<i64>,
    /// Where the page starts: the cursor in the previous page's `next` link.
    #[param(value_type = Option<String>)]
    #[schema(value_type = Option<String>)]
    pub after: Option<After>,
}

/// The `after` of the listing: a [`Position`] written by an earlier page.
#[derive(Debug, Clone, Copy)]
pub struct After(pub Position);

impl<'de> Deserialize<'de> for After {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(Self).map_err(|_| {
            serde::de::Error::custom(format!(
                "`after` must be the cursor of an earlier page's `next` link, not `{text}`"
            ))
        })
    }
}

impl From<DeadJobQuery> for Filter {
    fn from(q: DeadJobQuery) -> Self {
        Filter {
            task: q.task,
            queue: q.queue,
            since: q.since,
            error_contains: q.error_contains,
            include_discarded: q.include_discarded,
            include_replayed: q.include_replayed,
            limit: q.limit.unwrap_or(100),
            after: q.after.map(|After(position)| position),
            ..Default::default()
        }
    }
}

/// The `Link` header naming the page after `next`: this request's query
/// (`raw`) with `after` set to it.
fn next_link(raw: Option<&str>, next: Position) -> String {
    let after = format!("after={next}");
    let query: Vec<&str> = raw
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("after"))
        .chain([after.as_str()])
        .collect();
    format!("</v1/admin/dead-jobs?{}>; rel=\"next\"", query.join("&"))
}

fn db_problem(err: impl std::fmt::Display) -> Problem {
    Problem::unavailable(err.to_string(), 1)
}

fn parse_id(id: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(id).map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-id",
            "Invalid id",
            format!("`{id}` is not a UUID"),
        )
    })
}

/// List dead jobs, newest first (by `dead_at`, then id), a page at a time.
#[utoipa::path(get, path = "/v1/admin/dead-jobs", tag = "admin", operation_id = "list_dead_jobs", params(DeadJobQuery),
    responses((status = 200, description = "A page of matching dead jobs", body = Vec<DeadJobView>,
                headers(("link" = String, description = "`<…?…&after=<cursor>>; rel=\"next\"`: the next page, present while records remain"))),
              (status = 400, description = "Bad query parameter (`limit` out of 1 to 10000, `since` before 4714-11-24 BC, `after` not a cursor)", body = Problem, content_type = "application/problem+json"),
              (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    query: Result<Query<DeadJobQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(query) = query.map_err(|err| Problem::bad_query(err.body_text()))?;
    if query
        .limit
        .is_some_and(|limit| !(1..=MAX_LIMIT).contains(&limit))
    {
        return Err(Problem::bad_query(format!(
            "`limit` must be between 1 and {MAX_LIMIT}"
        )));
    }
    if let Some(since) = query.since {
        conveyor_schema::timestamptz::check("since", since)
            .map_err(|err| Problem::bad_query(err.to_string()))?;
    }
    let (found, next) = dead_jobs::page(&state.db, query.into())
        .await
        .map_err(db_problem)?;
    let page: Vec<DeadJobView> = found.into_iter().map(Into::into).collect();
    Ok(match next {
        Some(next) => (
            [(header::LINK, next_link(raw.as_deref(), next))],
            Json(page),
        )
            .into_response(),
        None => Json(page).into_response(),
    })
}

/// One dead job with its audit trail.
#[utoipa::path(get, path = "/v1/admin/dead-jobs/{id}", tag = "admin", operation_id = "show_dead_job",
    params(("id" = String, Path, description = "Dead job id")), 
    responses((status = 200, description = "The dead job", body = DeadJobView),
              (status = 404, description = "No such dead job", body = Problem, content_type = "application/problem+json")))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeadJobView>, Problem> {
    let id = parse_id(&id)?;
    let (dead, actions) = dead_jobs::show(&state.db, id)
        .await
        .map_err(db_problem)?
        .ok_or_else(|| Problem::not_found(format!("no dead job {id}")))?;
    let mut view = DeadJobView::from(dead);
    view.actions = Some(actions.into_iter().map(Into::into).collect());
    Ok(Json(view))
}

/// How to replay one dead job.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Replay even if already replayed or discarded.
    #[serde(default)]
    pub force: bool,
    /// Validate only; publish nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Replacement arguments, validated like a new job's.
    #[schema(value_type = Option<Object>)]
    pub args: Option<Value>,
}

/// What a replay did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplayResult {
    /// The dead job.
    pub id: Uuid,
    /// `replayed`, `would_replay`, `already_replayed` or `discarded`.
    pub outcome: String,
    /// The new job (when replayed), or the earlier replay's job (when already replayed).
    pub job_id: Option<Uuid>,
}

/// The result row of `outcome` for dead job `id`.
pub fn replay_result(id: Uuid, outcome: &ReplayOutcome) -> ReplayResult {
    let (name, job_id) = match outcome {
        ReplayOutcome::Replayed { new_job_id } => ("replayed", Some(*new_job_id)),
        ReplayOutcome::WouldReplay { .. } => ("would_replay", None),
        ReplayOutcome::AlreadyReplayed { replayed_as } => ("already_replayed", *replayed_as),
        ReplayOutcome::Discarded => ("discarded", None),
    };
    ReplayResult {
        id,
        outcome: name.to_owned(),
        job_id,
    }
}

/// The problem for a failed replay.
pub fn replay_problem(err: ReplayError) -> Problem {
    match err {
        ReplayError::NotFound(_) => Problem::not_found(err.to_string()),
        ReplayError::InvalidArgs { pointer, message } => Problem::invalid(pointer, message),
        ReplayError::Unreadable { .. } | ReplayError::UnknownTask(_) => Problem::new(
            StatusCode::CONFLICT,
            "not-replayable",
            "Not replayable",
            err.to_string(),
        ),
        ReplayError::InDoubt { job, .. } => Problem::in_doubt(err.to_string(), vec![job]),
        ReplayError::Publish(_) | ReplayError::Db(_) | ReplayError::OutOfTime(_) => {
            Problem::unavailable(err.to_string(), 1)
        }
    }
}

/// Replay one dead job as a fresh job (new id, attempt 1, `replay_of` set).
#[utoipa::path(post, path = "/v1/admin/dead-jobs/{id}/replay", tag = "admin",
    params(("id" = String, Path, description = "Dead job id")), 
    request_body(content = ReplayRequest, content_type = "application/json"),
    responses((status = 200, description = "Replayed, or why nothing was done", body = ReplayResult),
              (status = 404, description = "No such dead job", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Unreadable or unknown task", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Edited args invalid", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "Nothing done (database or broker unavailable, or its row held by another replay or discard past the request's time), or in doubt (`job_ids`: replaying again makes that same job)", body = Problem, content_type = "application/problem+json")))]
pub async fn replay(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Extension(budget): Extension<bulk::Budget>,
    Path(id): Path<String>,
    StrictJson { value: request, .. }: StrictJson<ReplayRequest>,
) -> Result<Json<ReplayResult>, Problem> {
    let began = Instant::now();
    let id = parse_id(&id)?;
    let options = ReplayOptions {
        force: request.force,
        dry_run: request.dry_run,
        args: request.args,
        actor: format!("http:{actor}"),
        bulk: None,
        deadline: Some(budget.deadline(began)),
    };
    let outcome = dead_jobs::replay(&state.db, &state.publisher, &state.topology, id, options)
        .await
        .map_err(replay_problem)?;
    if let ReplayOutcome::Replayed { .. } = outcome
        && let Ok(Some((dead, _))) = dead_jobs::show(&state.db, id).await
    {
        state
            .metrics
            .jobs_published
            .with_label_values(&[dead.task.as_str(), dead.queue.as_str()])
            .inc();
    }
    Ok(Json(replay_result(id, &outcome)))
}

/// What a discard did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DiscardResult {
    /// The dead job.
    pub id: Uuid,
    /// `discarded` or `already_discarded`.
    pub outcome: String,
}

/// Discard one dead job (hidden from the default listing, audited).
#[utoipa::path(post, path = "/v1/admin/dead-jobs/{id}/discard", tag = "admin",
    params(("id" = String, Path, description = "Dead job id")), 
    responses((status = 200, description = "Discarded", body = DiscardResult),
              (status = 404, description = "No such dead job", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "Nothing done: database unavailable, or its row held by another replay or discard past the request's time", body = Problem, content_type = "application/problem+json")))]
pub async fn discard(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Extension(budget): Extension<bulk::Budget>,
    Path(id): Path<String>,
) -> Result<Json<DiscardResult>, Problem> {
    let began = Instant::now();
    let id = parse_id(&id)?;
    let options = DiscardOptions {
        actor: format!("http:{actor}"),
        deadline: Some(budget.deadline(began)),
        ..Default::default()
    };
    let outcome = dead_jobs::discard_with(&state.db, id, options)
        .await
        .map_err(db_problem)?;
    let outcome = match outcome {
        DiscardOutcome::NotFound => return Err(Problem::not_found(format!("no dead job {id}"))),
        DiscardOutcome::Discarded | DiscardOutcome::WouldDiscard => "discarded",
        DiscardOutcome::AlreadyDiscarded => "already_discarded",
    };
    Ok(Json(DiscardResult {
        id,
        outcome: outcome.to_owned(),
    }))
}

/// Queue depths, consumers, oldest waiting job and backlog per worker, as last polled.
#[utoipa::path(get, path = "/v1/admin/queues", tag = "admin", 
    responses((status = 200, description = "Latest poll", body = Snapshot)))]
pub async fn queues(State(state): State<AppState>) -> Json<Snapshot> {
    Json(state.snapshot.read().map(|s| s.clone()).unwrap_or_default())
}
