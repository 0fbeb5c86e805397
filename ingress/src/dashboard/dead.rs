//! The dashboard's dead-job pages: the filtered listing, one record in full,
//! and the replay and discard buttons (which redirect back with a flash saying
//! what happened).
//!
//! The listing refreshes every 3 s with up to [`LISTED`] records, so it reads
//! only the columns it shows ([`ops::summaries`]): a record's envelope (up to
//! ~1 MiB), raw body, errors and `x-death` are read by the detail page alone.

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::pages::{is_fragment, unavailable};
use super::{Fragment, render};
use crate::admin_auth::Actor;
use crate::dead_jobs::{self as ops, DiscardOutcome, Filter, ReplayOptions, ReplayOutcome};
use crate::routes::admin::{ActionView, DeadJobView};
use crate::state::AppState;

/// How many records the listing shows, newest first.
const LISTED: i64 = 200;

/// The listing's filters, as the form sends them (empty fields are unset).
#[derive(Debug, Default, Serialize)]
struct Shown {
    task: Option<String>,
    queue: Option<String>,
    error_contains: Option<String>,
    include_replayed: bool,
    include_discarded: bool,
}

pub async fn dead(
    State(state): State<AppState>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Response {
    // Parsed by hand so the refresh's `fragment` and empty form fields are accepted.
    let get = |k: &str| {
        raw.iter()
            .find(|(key, v)| key == k && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    let query = Shown {
        task: get("task"),
        queue: get("queue"),
        error_contains: get("error_contains"),
        include_replayed: get("include_replayed").is_some(),
        include_discarded: get("include_discarded").is_some(),
    };
    let filter = Filter {
        task: query.task.clone(),
        queue: query.queue.clone(),
        error_contains: query.error_contains.clone(),
        include_replayed: query.include_replayed,
        include_discarded: query.include_discarded,
        limit: LISTED,
        ..Default::default()
    };
    let found = match ops::summaries(&state.db, filter).await {
        Ok((found, _)) => found,
        Err(err) => return unavailable(err),
    };
    let shown: Vec<Value> = found
        .into_iter()
        .map(|d| {
            serde_json::json!({
                "id": d.id, "task": d.task, "queue": d.queue, "attempts": d.attempts,
                "source": d.source, "dead_at": d.dead_at, "reason": d.reason,
                "replayed_as": d.replayed_as, "discarded_at": d.discarded_at,
            })
        })
        .collect();
    render(
        "dead.html",
        "dead",
        get("fragment").as_deref() == Some("1"),
        minijinja::context! { title => "Dead jobs", dead => shown, query, flash => get("flash") },
    )
}

pub async fn dead_job(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    Query(f): Query<Fragment>,
) -> Response {
    let (dead, actions) = match ops::show(&state.db, id).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            return crate::problem::Problem::not_found(format!("no dead job {id}")).into_response();
        }
        Err(err) => return unavailable(err),
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let errors = pretty(&dead.errors);
    let envelope = dead.envelope.as_ref().map(pretty);
    let x_death = dead.x_death.as_ref().map(pretty);
    let actions: Vec<ActionView> = actions.into_iter().map(Into::into).collect();
    let dead = DeadJobView::from(dead);
    render(
        "dead_job.html",
        "dead",
        is_fragment(&f),
        minijinja::context! { title => "Dead job", dead, errors, envelope, x_death, actions },
    )
}

fn back_with(flash: &str) -> Response {
    let encoded: String = url_encode(flash);
    Redirect::to(&format!("/dashboard/dead?flash={encoded}")).into_response()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn replay(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<Uuid>,
) -> Response {
    let options = ReplayOptions {
        actor: format!("dashboard:{actor}"),
        ..Default::default()
    };
    match ops::replay(&state.db, &state.publisher, &state.topology, id, options).await {
        Ok(ReplayOutcome::Replayed { new_job_id }) => {
            back_with(&format!("Replayed {id} as job {new_job_id}."))
        }
        Ok(ReplayOutcome::AlreadyReplayed { .. }) => {
            back_with(&format!("{id} was already replayed."))
        }
        Ok(ReplayOutcome::Discarded) => back_with(&format!("{id} is discarded.")),
        Ok(ReplayOutcome::WouldReplay { .. }) => back_with("Nothing done."),
        Err(err) => back_with(&format!("Could not replay {id}: {err}")),
    }
}

pub async fn discard(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<Uuid>,
) -> Response {
    match ops::discard(&state.db, id, format!("dashboard:{actor}")).await {
        Ok(DiscardOutcome::Discarded) => back_with(&format!("Discarded {id}.")),
        Ok(DiscardOutcome::AlreadyDiscarded) => {
            back_with(&format!("{id} was already discarded; nothing done."))
        }
        Ok(DiscardOutcome::NotFound) => back_with(&format!("No dead job {id}; nothing done.")),
        Ok(DiscardOutcome::WouldDiscard) => back_with("Nothing done."),
        Err(err) => back_with(&format!("Could not discard {id}: {err}")),
    }
}
