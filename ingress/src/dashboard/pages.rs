//! The dashboard's page handlers (the dead-job pages are in `dead`): each
//! reads what it shows and renders one template.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use conveyor_schema::JobState;
use conveyor_schema::db::{jobs, workers};
use conveyor_schema::models::{Job, WorkerRow};
use conveyor_schema::pool;
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text, Timestamptz};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{Fragment, render};
use crate::state::AppState;

pub(super) fn is_fragment(f: &Fragment) -> bool {
    f.fragment.as_deref() == Some("1")
}

pub(super) fn unavailable(err: impl std::fmt::Display) -> Response {
    crate::problem::Problem::unavailable(err.to_string(), 1).into_response()
}

/// How the pages show a time.
fn shown_time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub async fn queues(State(state): State<AppState>, Query(f): Query<Fragment>) -> Response {
    let snapshot = state.snapshot.read().map(|s| s.clone()).unwrap_or_default();
    render(
        "queues.html",
        "queues",
        is_fragment(&f),
        minijinja::context! { title => "Queues", snapshot },
    )
}

/// Every worker that sent a heartbeat, newest first. A running worker is
/// `gone` once its last heartbeat is older than `worker_gone_after` by the
/// database's clock, which stamps the heartbeats: the ingress's own clock may
/// be off, and would then show live workers as gone (or dead ones as live).
pub async fn workers(State(state): State<AppState>, Query(f): Query<Fragment>) -> Response {
    let rows = pool::run(&state.db, |conn| {
        workers::table
            .order(workers::started_at.desc())
            .select((WorkerRow::as_select(), sql::<Timestamptz>("now()")))
            .load::<(WorkerRow, DateTime<Utc>)>(conn)
    })
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(err) => return unavailable(err),
    };
    let shown: Vec<Value> = rows
        .into_iter()
        .map(|(w, db_now)| {
            let status = if w.stopped_at.is_some() {
                "stopped"
            } else if w.last_seen_at < db_now - state.worker_gone_after {
                "gone"
            } else {
                "live"
            };
            serde_json::json!({
                "id": w.id, "status": status, "host": w.host, "pid": w.pid, "version": w.version,
                "queues": w.queues, "in_flight": w.in_flight,
                "started_at": shown_time(w.started_at),
                "last_seen_at": shown_time(w.last_seen_at),
            })
        })
        .collect();
    render(
        "workers.html",
        "workers",
        is_fragment(&f),
        minijinja::context! { title => "Workers", workers => shown },
    )
}

/// Job search fields.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
pub struct JobSearch {
    id: Option<String>,
    task: Option<String>,
    state: Option<String>,
    fragment: Option<String>,
}

pub async fn jobs(State(state): State<AppState>, Query(query): Query<JobSearch>) -> Response {
    let fragment = query.fragment.as_deref() == Some("1");
    let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
    let (id, task, wanted) = (
        nonempty(&query.id),
        nonempty(&query.task),
        nonempty(&query.state),
    );
    let mut error = None;
    let id = match id.map(|s| Uuid::parse_str(s.trim())) {
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            error = Some("That is not a job id (a UUID).");
            None
        }
        None => None,
    };
    let found = pool::run(&state.db, move |conn| {
        newest_jobs(conn, id, task.as_deref(), wanted.as_deref())
    })
    .await;
    let found = match found {
        Ok(found) => found,
        Err(err) => return unavailable(err),
    };
    let shown: Vec<Value> = found
        .into_iter()
        .map(|j| {
            serde_json::json!({
                "id": j.id, "task": j.task, "queue": j.queue, "state": j.state, "attempts": j.attempts,
                "max_attempts": j.max_attempts, "last_error": j.last_error, "replay_of": j.replay_of,
                "enqueued_at": j.enqueued_at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
                "finished_at": j.finished_at.map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()),
            })
        })
        .collect();
    let states: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
    render(
        "jobs.html",
        "jobs",
        fragment,
        minijinja::context! { title => "Jobs", jobs => shown, query, states, error },
    )
}

/// How many jobs the jobs page lists, newest first.
const JOBS_LISTED: usize = 50;

/// The windows of recent jobs tried in turn by [`newest_jobs`] before the whole table.
const RECENT_WINDOWS: [chrono::TimeDelta; 3] = [
    chrono::TimeDelta::minutes(1),
    chrono::TimeDelta::hours(1),
    chrono::TimeDelta::days(1),
];

/// How far an enqueuer's clock may run ahead of the database's (see [`newest_jobs`]).
const CLOCK_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// The [`JOBS_LISTED`] newest jobs (by `enqueued_at`) matching the search.
///
/// Sorting the whole table for them took ~200 ms at 2 million rows, and the
/// page refreshes every 3 s. So the search first looks only at rows changed
/// within a recent window, which `jobs_updated_at_brin` narrows to the table's
/// last pages: a row's `updated_at` is never earlier than its enqueueing, so a
/// job enqueued within the window was changed within it too (give or take
/// [`CLOCK_MARGIN`]). Once a window holds a full page, no older job belongs on
/// it; otherwise the next, wider window is tried, and last the whole table.
fn newest_jobs(
    conn: &mut PgConnection,
    id: Option<Uuid>,
    task: Option<&str>,
    state: Option<&str>,
) -> QueryResult<Vec<Job>> {
    let mut search = |window: Option<chrono::TimeDelta>| {
        let mut q = jobs::table.select(Job::as_select()).into_boxed();
        if let Some(id) = id {
            q = q.filter(jobs::id.eq(id));
        }
        if let Some(task) = task {
            q = q.filter(jobs::task.eq(task));
        }
        if let Some(state) = state {
            q = q.filter(jobs::state.eq(state));
        }
        if let Some(window) = window {
            let since = Utc::now() - window;
            q = q
                .filter(jobs::enqueued_at.gt(since))
                .filter(jobs::updated_at.gt(since - CLOCK_MARGIN));
        }
        q.order(jobs::enqueued_at.desc())
            .limit(JOBS_LISTED as i64)
            .load::<Job>(conn)
    };
    if id.is_none() {
        for window in RECENT_WINDOWS {
            let found = search(Some(window))?;
            if found.len() == JOBS_LISTED {
                return Ok(found);
            }
        }
    }
    search(None)
}

#[derive(QueryableByName)]
struct JsonRow {
    #[diesel(sql_type = Nullable<Text>)]
    row: Option<String>,
}

/// Up to 100 rows of `table` as JSON objects, or `None` when the table does not
/// exist (campaigns arrive with their own feature).
async fn optional_table(
    state: &AppState,
    table: &'static str,
) -> Result<Option<Vec<Value>>, pool::DbError> {
    pool::run(&state.db, move |conn| {
        let exists: Vec<JsonRow> = diesel::sql_query("SELECT to_regclass($1)::text AS row")
            .bind::<Text, _>(table)
            .load(conn)?;
        if exists.first().and_then(|r| r.row.as_ref()).is_none() {
            return Ok(None);
        }
        let rows: Vec<JsonRow> = diesel::sql_query(format!(
            "SELECT row_to_json(t)::text AS row FROM {table} t LIMIT 100"
        ))
        .load(conn)?;
        Ok(Some(
            rows.into_iter()
                .filter_map(|r| r.row.and_then(|s| serde_json::from_str(&s).ok()))
                .collect(),
        ))
    })
    .await
}

async fn table_page(state: AppState, f: Fragment, table: &'static str, title: &str) -> Response {
    let rows = match optional_table(&state, table).await {
        Ok(rows) => rows,
        Err(err) => return unavailable(err),
    };
    let exists = rows.is_some();
    let rows = rows.unwrap_or_default();
    let columns: Vec<String> = rows
        .first()
        .and_then(Value::as_object)
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    render(
        "table.html",
        table,
        is_fragment(&f),
        minijinja::context! { title, exists, rows, columns },
    )
}

pub async fn campaigns(State(state): State<AppState>, Query(f): Query<Fragment>) -> Response {
    table_page(state, f, "campaigns", "Campaigns").await
}

/// Every schedule in force (from the configuration, built-in ones included)
/// with its last tick and that tick's job, and its next tick: what
/// `GET /v1/schedules` answers.
pub async fn schedules(State(state): State<AppState>, Query(f): Query<Fragment>) -> Response {
    let views = match crate::routes::schedules::in_force(&state).await {
        Ok(views) => views,
        Err(err) => return unavailable(err),
    };
    let shown: Vec<Value> = views
        .into_iter()
        .map(|s| {
            let last_tick = s.last_tick.map(|t| {
                serde_json::json!({
                    "tick_at": shown_time(t.tick_at), "job_id": t.job_id, "catch_up": t.catch_up,
                    "published_at": t.published_at.map(shown_time), "job_state": t.job_state,
                })
            });
            serde_json::json!({
                "name": s.name, "cron": s.cron, "timezone": s.timezone, "task": s.task,
                "args": s.args.to_string(), "catch_up": s.catch_up, "last_tick": last_tick,
                "next_tick_at": s.next_tick_at.map(shown_time),
            })
        })
        .collect();
    render(
        "schedules.html",
        "schedules",
        is_fragment(&f),
        minijinja::context! { title => "Schedules", schedules => shown },
    )
}
