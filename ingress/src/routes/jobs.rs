//! `POST /v1/jobs` (enqueue) and `GET /v1/jobs/{id}` (status).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use chrono::{DateTime, Duration, Utc};
use conveyor_platform::amqp::{Outgoing, delay_level_for};
use conveyor_schema::db::jobs;
use conveyor_schema::models::{Job, NewJob};
use conveyor_schema::{Envelope, JobState, MAX_TASK_NAME_LEN, TraceContext, find_task};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::idempotency::IdSeed;
use crate::json_body::StrictJson;
use crate::problem::Problem;
use crate::state::AppState;

/// Longest delay accepted for a job (30 days).
const MAX_DELAY_MS: u64 = 30 * 24 * 3600 * 1000;

/// A job to enqueue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// A task name from the catalogue, e.g. `diag.noop`; at most 200 bytes
    /// (`MAX_TASK_NAME_LEN`).
    #[schema(max_length = 200)]
    pub task: String,
    /// The task's arguments; validated against its argument type (unknown fields rejected).
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub args: Value,
    /// Run no earlier than this many milliseconds from now (at most 30 days).
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// The job was recorded and the broker confirmed its message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    /// The job id.
    pub id: Uuid,
    /// Where to read the job's status.
    pub status_url: String,
}

/// A job's state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobStatus {
    /// Job id.
    pub id: Uuid,
    /// Task name.
    pub task: String,
    /// Logical queue.
    pub queue: String,
    /// Life-cycle state.
    pub state: JobState,
    /// Attempts started.
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Times an attempt was started (more than `attempts` after a crash redelivery).
    pub runs: i32,
    /// The latest failure.
    pub last_error: Option<String>,
    /// Every failure: `[{"attempt", "at", "error"}]`.
    #[schema(value_type = Vec<Object>)]
    pub errors: Value,
    /// When it was accepted.
    pub enqueued_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the next attempt is due, while retrying or delayed.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The worker that ran, or runs, the latest attempt (as the dashboard's workers page names it).
    pub worker: Option<String>,
}

impl From<Job> for JobStatus {
    fn from(job: Job) -> Self {
        Self {
            state: job.job_state(),
            id: job.id,
            task: job.task,
            queue: job.queue,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            runs: job.runs,
            last_error: job.last_error,
            errors: job.errors,
            enqueued_at: job.enqueued_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            next_attempt_at: job.next_attempt_at,
            updated_at: job.updated_at,
            worker: job.runner,
        }
    }
}

/// Enqueue a job.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body(content = EnqueueRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Recorded and confirmed by the broker", body = Accepted),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown, expired or revoked API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key's `enqueue:` scopes do not cover this task", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A request with this Idempotency-Key is still in progress", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown task, invalid args or unknown field (with a JSON pointer), or an Idempotency-Key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The key's rate limit is exhausted; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker or database unavailable; retry after `Retry-After`. Type `in-doubt` (`job_ids` names the job): not accepted, but the broker may hold, or holds, the message, so the job may run all the same; a retry with the same Idempotency-Key and body enqueues that job, not a second one", body = Problem, content_type = "application/problem+json"),
    ),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key: the same key and body within 24 h replays the first success (header `Idempotent-Replayed: true`); after a 5xx (even one in doubt) or a lost answer, it enqueues the same job again, under the same id, and a worker runs it once. Also carried in the job's envelope."),
        ("traceparent" = Option<String>, Header, description = "W3C trace context; carried in the job's envelope and logged by the worker as `trace_id` on the job's span. An invalid value is ignored, as the W3C specification asks."),
        ("tracestate" = Option<String>, Header, description = "W3C trace state; carried with a valid `traceparent` when at most 512 visible ASCII characters."),
    )
)]
pub async fn enqueue(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    seed: Option<Extension<IdSeed>>,
    headers: HeaderMap,
    StrictJson { value: request, .. }: StrictJson<EnqueueRequest>,
) -> Result<impl IntoResponse, Problem> {
    let origin = Origin::of(principal, seed, &headers);
    let job = Prepared::check(&state, &origin, 0, request)?;
    let accepted = job.submit(&state).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// Who sent a request, and what its headers carry into each job's envelope:
/// read once per request, however many jobs it holds.
pub(crate) struct Origin {
    /// The caller; `None` on a router without the key guard.
    pub(crate) principal: Option<Principal>,
    idempotency_key: Option<String>,
    /// Where a keyed request's job ids come from (the idempotency middleware's).
    seed: Option<IdSeed>,
    trace: Option<TraceContext>,
}

impl Origin {
    /// The request's caller and headers.
    pub(crate) fn of(
        principal: Option<Extension<Principal>>,
        seed: Option<Extension<IdSeed>>,
        headers: &HeaderMap,
    ) -> Self {
        Self {
            principal: principal.map(|Extension(p)| p),
            idempotency_key: idempotency_key(headers),
            seed: seed.map(|Extension(seed)| seed),
            trace: trace_context(headers),
        }
    }
}

/// A job that passed every check, ready to record and publish.
pub(crate) struct Prepared {
    record: NewJob,
    message: Outgoing,
    /// Its id comes from an `Idempotency-Key`'s seed, so a retry makes it again.
    keyed: bool,
}

impl Prepared {
    /// Checks `request`, the request's job at `index`, against the caller's
    /// scopes and the task's argument type; problems point into `request` (the
    /// batch route prefixes them).
    pub(crate) fn check(
        state: &AppState,
        origin: &Origin,
        index: usize,
        request: EnqueueRequest,
    ) -> Result<Self, Problem> {
        // No task has a longer name; the worker refuses one too. Checked
        // first, so that no answer quotes (and no scope is matched against)
        // a name of any length.
        if request.task.len() > MAX_TASK_NAME_LEN {
            return Err(Problem::invalid(
                "/task",
                format!("unknown task: the name is longer than {MAX_TASK_NAME_LEN} bytes"),
            ));
        }
        let principal = origin.principal.as_ref();
        if let Some(principal) = principal
            && !principal.may_enqueue(&request.task)
        {
            return Err(crate::auth::forbidden(format!(
                "key {} (producer `{}`) may not enqueue `{}`",
                principal.key_id, principal.producer, request.task
            ))
            .at("/task"));
        }
        let task = find_task(&request.task)
            .filter(|task| task.public)
            .ok_or_else(|| Problem::invalid("/task", format!("unknown task `{}`", request.task)))?;
        task.validate(&request.args)
            .map_err(|err| Problem::invalid(err.pointer, err.message))?;
        if request.delay_ms.is_some_and(|ms| ms > MAX_DELAY_MS) {
            return Err(Problem::invalid(
                "/delay_ms",
                format!("must be at most {MAX_DELAY_MS} (30 days)"),
            ));
        }
        let mut envelope = Envelope::new(task.name, request.args);
        if let Some(seed) = origin.seed {
            envelope.id = seed.id(index);
        }
        envelope.idempotency_key = origin.idempotency_key.clone();
        envelope.trace = origin.trace.clone();
        let queue = task.options.queue;
        let message = match request.delay_ms.filter(|ms| *ms > 0) {
            Some(ms) => {
                let delay = std::time::Duration::from_millis(ms);
                envelope.not_before =
                    Some(envelope.enqueued_at + Duration::milliseconds(ms as i64));
                Outgoing::delayed(&state.topology, queue, &envelope, delay_level_for(delay))
            }
            None => Outgoing::job(&state.topology, queue, &envelope),
        }
        .by(principal.map(|p| p.producer.as_str()));
        let record =
            NewJob::queued(&envelope, &task.options).by(principal.map(|p| p.producer.clone()));
        Ok(Self {
            record,
            message,
            keyed: origin.seed.is_some(),
        })
    }

    /// The job's id.
    pub(crate) fn id(&self) -> Uuid {
        self.record.id
    }

    /// Records and publishes the job: `Ok` once both are durable.
    pub(crate) async fn submit(self, state: &AppState) -> Result<Accepted, Problem> {
        let id = self.record.id;
        state
            .recorder
            .submit(self.record, self.message)
            .await
            .map_err(|err| {
                if err.may_have_been_enqueued() {
                    let retry = if self.keyed {
                        "a retry with the same Idempotency-Key and body enqueues this job again, not a second one"
                    } else {
                        "a retry enqueues a second job"
                    };
                    Problem::in_doubt(
                        format!("{err}; the job may run all the same, as job {id}, and {retry}"),
                        [id],
                    )
                } else {
                    Problem::unavailable(err.to_string(), 1)
                }
            })?;
        Ok(Accepted {
            id,
            status_url: format!("/v1/jobs/{id}"),
        })
    }
}

/// The request's `Idempotency-Key`, when it is one the idempotency middleware
/// accepts (1 to 255 visible ASCII characters).
fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get(crate::idempotency::HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|k| crate::idempotency::is_valid_key(k))
        .map(str::to_owned)
}

/// The request's W3C trace context; `None` without a valid `traceparent`.
fn trace_context(headers: &HeaderMap) -> Option<TraceContext> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    TraceContext::parse(header("traceparent")?, header("tracestate"))
}

/// Read a job's status.
///
/// A key without `admin` sees only the jobs its producer enqueued; any other
/// job is a 404, so a producer cannot probe for others' ids.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs", operation_id = "job_status",
    params(("id" = String, Path, description = "Job id (UUID)")),
    responses(
        (status = 200, description = "The job", body = JobStatus),
        (status = 400, description = "Not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown, expired or revoked API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key has no `enqueue:` scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job, or (without `admin`) one another producer enqueued", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn status(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, Problem> {
    // `None`: every job (admin). The guard sets a principal on every `/v1` route;
    // like `enqueue`, a router without it applies no key rule.
    let owner = principal
        .filter(|Extension(p)| !p.has("admin"))
        .map(|Extension(p)| p.producer);
    let id = Uuid::parse_str(&id).map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-id",
            "Invalid job id",
            format!("`{id}` is not a UUID"),
        )
    })?;
    let job = conveyor_schema::pool::run(&state.db, move |conn| {
        let mut query = jobs::table.find(id).select(Job::as_select()).into_boxed();
        if let Some(owner) = owner {
            query = query.filter(jobs::producer.eq(owner));
        }
        query.first(conn).optional()
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?
    .ok_or_else(|| Problem::not_found(format!("no job {id}")))?;
    Ok(Json(job.into()))
}
