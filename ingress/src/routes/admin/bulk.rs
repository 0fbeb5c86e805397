//! `POST /v1/admin/dead-jobs/replay-matching` and `…/discard-matching`: the
//! admin API's side of `conveyor dlq replay|discard --all-matching`.
//!
//! Both run [`crate::dead_jobs::bulk`], the loop the CLI runs, within one
//! request: the records are handled oldest first and the answer lists what was
//! (or, on a dry run, would be) done to each. A request may not outlive the
//! ingress's request timeout, so a rate too slow to get through the matches in
//! time is refused up front (422), and every record is bounded by the
//! request's [`Deadline`]: the loop stops at the first record it leaves no
//! time for (a row another replay or discard holds, no free connection),
//! leaving it as it was, and answers 200 with `complete: false`. While
//! records remain (time ran out, or `limit` was reached) the answer's `next`
//! says where to carry on: passed back as `after`, the next call takes the
//! records past the last one handled, so none is taken twice, with `force`
//! or without, and none that died after the first call began.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{db_problem, replay_result};
use crate::admin_auth::Actor;
use crate::dead_jobs::bulk::{self, Cursor, InvalidInput, Matches, Pace, Pacer};
use crate::dead_jobs::{
    Deadline, DiscardOptions, DiscardOutcome, Filter, ReplayOptions, ReplayOutcome,
};
use crate::json_body::StrictJson;
use crate::problem::Problem;
use crate::state::AppState;

/// Records one bulk request takes unless it says otherwise.
const DEFAULT_LIMIT: i64 = 1_000;

/// How long one admin request may work on dead jobs (every wait and publish
/// included, see [`Deadline`]): set by the router from the request timeout,
/// leaving time to answer, and the publisher's confirm wait, which the last
/// of that time is kept for.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Time to work in: the request timeout less the time kept to answer.
    pub work: Duration,
    /// The publisher's confirm wait (`amqp.publish_timeout_ms`): no record
    /// starts in the last this-long of `work`.
    pub publish_timeout: Duration,
}

impl Budget {
    /// `request_timeout` less a tenth of it, at most 2 s, to answer in, for
    /// publishes that wait up to `publish_timeout` for a confirm. Start-up
    /// validation (`Config::validate`) refuses a request timeout that leaves
    /// no more than `publish_timeout` to work in.
    pub fn within(request_timeout: Duration, publish_timeout: Duration) -> Self {
        Self {
            work: request_timeout - (request_timeout / 10).min(Duration::from_secs(2)),
            publish_timeout,
        }
    }

    /// The deadline of a request that began at `began`.
    pub fn deadline(self, began: Instant) -> Deadline {
        Deadline::within(began, self.work, self.publish_timeout)
    }
}

/// Which dead jobs a bulk operation takes. `{}` matches every dead job not yet
/// replayed or discarded.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    /// Exact task name.
    pub task: Option<String>,
    /// Exact logical queue.
    pub queue: Option<String>,
    /// Dead at or after this: RFC 3339, or an age like `30m`, `2h`, `7d`.
    pub since: Option<String>,
    /// The final reason contains this text (case-insensitive).
    pub error_contains: Option<String>,
}

/// Replay every dead job a filter matches.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkReplayRequest {
    /// Which ones (required; `{}` for all).
    pub filter: BulkFilter,
    /// Replays per second at most (default: as fast as they go).
    pub rate: Option<f64>,
    /// Validate and list what would be replayed; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Also replay records already replayed or discarded.
    #[serde(default)]
    pub force: bool,
    /// Replacement arguments for every record, validated like a new job's (needs `filter.task`).
    #[schema(value_type = Option<Object>)]
    pub args: Option<Value>,
    /// At most this many records, oldest first (default 1000, at most 10000).
    pub limit: Option<i64>,
    /// The `next` of an earlier answer: carry on past the last record it handled.
    pub after: Option<String>,
}

/// Discard every dead job a filter matches.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkDiscardRequest {
    /// Which ones (required; `{}` for all).
    pub filter: BulkFilter,
    /// List what would be discarded; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// At most this many records, oldest first (default 1000, at most 10000).
    pub limit: Option<i64>,
    /// The `next` of an earlier answer: carry on past the last record it handled.
    pub after: Option<String>,
}

/// What a bulk operation did (or would do).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkResult {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Records the filter matched (at most `limit`, past `after`).
    pub matched: usize,
    /// Records handled: `matched` unless time ran out.
    pub processed: usize,
    /// Every matched record was handled (`false`: time ran out).
    pub complete: bool,
    /// Present while matching records remain (time ran out, or more than
    /// `limit` matched): pass it as `after`, with the same filter, to carry on
    /// past the last record handled here. No record is taken twice that way,
    /// with `force` or without, nor one that died after the first call began.
    pub next: Option<String>,
    /// How many records had each outcome.
    pub counts: BTreeMap<String, usize>,
    /// One entry per handled record, oldest first.
    pub results: Vec<BulkItem>,
}

/// What happened to one record.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkItem {
    /// The dead job.
    pub id: Uuid,
    /// Its task.
    pub task: String,
    /// `replayed`, `would_replay`, `already_replayed`, `discarded`, `would_discard`,
    /// `already_discarded`, `not_found` or `failed`.
    pub outcome: String,
    /// The job a replay created (or, `already_replayed`, the earlier replay's).
    pub job_id: Option<Uuid>,
    /// Why it failed.
    pub error: Option<String>,
}

fn invalid(err: InvalidInput) -> Problem {
    Problem::invalid(err.pointer, err.message)
}

fn filter(request: &BulkFilter, limit: Option<i64>) -> Result<Filter, Problem> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=bulk::MAX_RECORDS).contains(&limit) {
        return Err(Problem::invalid(
            "/limit",
            format!("must be between 1 and {}", bulk::MAX_RECORDS),
        ));
    }
    let since = request
        .since
        .as_deref()
        .map(bulk::parse_since)
        .transpose()
        .map_err(|err| Problem::invalid("/filter/since", err.message))?;
    Ok(Filter {
        task: request.task.clone(),
        queue: request.queue.clone(),
        since,
        error_contains: request.error_contains.clone(),
        limit,
        ..Default::default()
    })
}

/// The cursor in `after`, if any.
fn cursor(after: Option<&str>) -> Result<Option<Cursor>, Problem> {
    after
        .map(str::parse)
        .transpose()
        .map_err(|err: crate::dead_jobs::BadCursor| Problem::invalid("/after", err.to_string()))
}

fn result(dry_run: bool, found: &Matches, results: Vec<BulkItem>) -> BulkResult {
    let mut counts = BTreeMap::new();
    for item in &results {
        *counts.entry(item.outcome.clone()).or_default() += 1;
    }
    BulkResult {
        dry_run,
        matched: found.records.len(),
        processed: results.len(),
        complete: results.len() == found.records.len(),
        next: found.next(results.len()).map(|c| c.to_string()),
        counts,
        results,
    }
}

/// Replay every dead job matching a filter, oldest first, at a rate.
#[utoipa::path(post, path = "/v1/admin/dead-jobs/replay-matching", tag = "admin",
    request_body(content = BulkReplayRequest, content_type = "application/json"),
    responses((status = 200, description = "What was (or, on a dry run, would be) done to each matching record", body = BulkResult),
              (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid filter, rate, limit, args or after, or a rate too slow to finish within the request", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json")))]
pub async fn replay_matching(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Extension(budget): Extension<Budget>,
    StrictJson { value: request, .. }: StrictJson<BulkReplayRequest>,
) -> Result<Json<BulkResult>, Problem> {
    let began = Instant::now();
    let filter = filter(&request.filter, request.limit)?;
    let from = cursor(request.after.as_deref())?;
    let rate = request
        .rate
        .map(bulk::check_rate)
        .transpose()
        .map_err(invalid)?;
    if let Some(args) = &request.args {
        bulk::check_args(filter.task.as_deref(), args).map_err(invalid)?;
    }
    let found = bulk::matching(&state.db, &filter, request.force, from)
        .await
        .map_err(db_problem)?;
    let deadline = budget.deadline(began);
    let pace = Pace {
        rate,
        deadline: Some(deadline),
    };
    let needed = pace.least_time(found.records.len());
    let window = deadline.start_by.saturating_duration_since(began);
    if !request.dry_run && needed > window {
        return Err(Problem::invalid(
            "/rate",
            format!(
                "{} records at this rate take {} s, longer than one request may run ({} s): \
                 raise the rate, lower the limit, or use `conveyor dlq replay --all-matching`",
                found.records.len(),
                needed.as_secs(),
                window.as_secs()
            ),
        ));
    }
    let options = ReplayOptions {
        force: request.force,
        dry_run: request.dry_run,
        args: request.args,
        actor: format!("http:{actor}"),
        bulk: Some(filter.audit()),
        deadline: None,
    };
    let ids: Vec<Uuid> = found.records.iter().map(|d| d.id).collect();
    let mut results = Vec::with_capacity(ids.len());
    let mut records = found.records.iter();
    bulk::replay_each(
        &state.db,
        &state.publisher,
        &state.topology,
        &ids,
        &options,
        &mut Pacer::new(pace),
        |id, outcome| {
            let Some(dead) = records.next() else { return };
            let (outcome, job_id, error) = match outcome {
                Ok(outcome) => {
                    if let ReplayOutcome::Replayed { .. } = outcome {
                        state
                            .metrics
                            .jobs_published
                            .with_label_values(&[dead.task.as_str(), dead.queue.as_str()])
                            .inc();
                    }
                    let row = replay_result(id, &outcome);
                    (row.outcome, row.job_id, None)
                }
                Err(err) => ("failed".to_owned(), None, Some(err.to_string())),
            };
            results.push(BulkItem {
                id,
                task: dead.task.clone(),
                outcome,
                job_id,
                error,
            });
        },
    )
    .await;
    Ok(Json(result(request.dry_run, &found, results)))
}

/// Discard every dead job matching a filter (audited; they stay in the table).
#[utoipa::path(post, path = "/v1/admin/dead-jobs/discard-matching", tag = "admin",
    request_body(content = BulkDiscardRequest, content_type = "application/json"),
    responses((status = 200, description = "What was (or, on a dry run, would be) done to each matching record", body = BulkResult),
              (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid filter, limit or after", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json")))]
pub async fn discard_matching(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Extension(budget): Extension<Budget>,
    StrictJson { value: request, .. }: StrictJson<BulkDiscardRequest>,
) -> Result<Json<BulkResult>, Problem> {
    let began = Instant::now();
    let filter = filter(&request.filter, request.limit)?;
    let from = cursor(request.after.as_deref())?;
    let found = bulk::matching(&state.db, &filter, false, from)
        .await
        .map_err(db_problem)?;
    let options = DiscardOptions {
        actor: format!("http:{actor}"),
        dry_run: request.dry_run,
        bulk: Some(filter.audit()),
        deadline: None,
    };
    let ids: Vec<Uuid> = found.records.iter().map(|d| d.id).collect();
    let mut results = Vec::with_capacity(ids.len());
    let mut records = found.records.iter();
    bulk::discard_each(
        &state.db,
        &ids,
        &options,
        Some(budget.deadline(began)),
        |id, outcome| {
            let Some(dead) = records.next() else { return };
            let (outcome, error) = match outcome {
                Ok(DiscardOutcome::Discarded) => ("discarded", None),
                Ok(DiscardOutcome::WouldDiscard) => ("would_discard", None),
                Ok(DiscardOutcome::AlreadyDiscarded) => ("already_discarded", None),
                Ok(DiscardOutcome::NotFound) => ("not_found", None),
                Err(err) => ("failed", Some(err.to_string())),
            };
            results.push(BulkItem {
                id,
                task: dead.task.clone(),
                outcome: outcome.to_owned(),
                job_id: None,
                error,
            });
        },
    )
    .await;
    Ok(Json(result(request.dry_run, &found, results)))
}
