//! `GET /v1/schedules` and `GET /v1/schedules/{name}/ticks`: what is
//! scheduled, when it last fired (and which job that made), when it fires next.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use conveyor_schema::JobState;
use conveyor_schema::pool::DbError;
use diesel::prelude::*;
use diesel::sql_types::{Array, Bool, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::problem::Problem;
use crate::state::AppState;

/// A schedule in force.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleView {
    /// Unique name.
    pub name: String,
    /// Cron expression (5 fields, or 6 with seconds first).
    pub cron: String,
    /// IANA time zone the cron is read in.
    pub timezone: String,
    /// Task enqueued at each tick.
    pub task: String,
    /// Its arguments.
    #[schema(value_type = Object)]
    pub args: Value,
    /// `skip` or `once`: what happens to ticks missed while no worker ran.
    pub catch_up: String,
    /// The most recent fired tick, if any.
    pub last_tick: Option<Tick>,
    /// When it fires next (by this server's clock).
    pub next_tick_at: Option<DateTime<Utc>>,
}

/// One fired tick and the one job it enqueued.
#[derive(Debug, Serialize, Deserialize, ToSchema, QueryableByName)]
pub struct Tick {
    /// The tick's time.
    #[diesel(sql_type = Timestamptz)]
    pub tick_at: DateTime<Utc>,
    /// The job enqueued for it.
    #[diesel(sql_type = SqlUuid)]
    pub job_id: Uuid,
    /// Fired late, after downtime, by `catch_up = "once"`.
    #[diesel(sql_type = Bool)]
    pub catch_up: bool,
    /// The worker that claimed it.
    #[diesel(sql_type = Text)]
    pub claimed_by: String,
    /// When it was claimed.
    #[diesel(sql_type = Timestamptz)]
    pub claimed_at: DateTime<Utc>,
    /// When the broker confirmed the job's message (`null`: not yet).
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub published_at: Option<DateTime<Utc>>,
    /// The job's state now (`null` once retention removed its record).
    #[diesel(sql_type = Nullable<Text>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<JobState>)]
    pub job_state: Option<String>,
}

#[derive(QueryableByName)]
struct LastTick {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(embed)]
    tick: Tick,
}

/// Query of `GET /v1/schedules/{name}/ticks`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TicksQuery {
    /// How many of the most recent ticks (1-1000, default 20).
    pub limit: Option<u32>,
}

const TICK_COLUMNS: &str = "t.tick_at, t.job_id, t.catch_up, t.claimed_by, t.claimed_at, \
                            t.published_at, j.state AS job_state";

/// Every schedule in force with its last and next tick.
#[utoipa::path(
    get, path = "/v1/schedules", tag = "schedules", operation_id = "list_schedules",
    responses(
        (status = 200, description = "The schedules", body = Vec<ScheduleView>),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<ScheduleView>>, Problem> {
    let views = in_force(&state)
        .await
        .map_err(|err| Problem::unavailable(err.to_string(), 1))?;
    Ok(Json(views))
}

/// Every schedule in force with its last tick (from `schedule_ticks`) and next
/// tick, in configuration order: what `GET /v1/schedules` and the dashboard show.
pub async fn in_force(state: &AppState) -> Result<Vec<ScheduleView>, DbError> {
    let names: Vec<String> = state
        .schedules
        .iter()
        .map(|s| s.name().to_owned())
        .collect();
    let rows = conveyor_schema::pool::run(&state.db, move |conn| {
        diesel::sql_query(format!(
            "SELECT n.name, {TICK_COLUMNS} FROM unnest($1::text[]) AS n(name) \
             CROSS JOIN LATERAL (SELECT * FROM schedule_ticks s WHERE s.schedule = n.name \
                                 ORDER BY s.tick_at DESC LIMIT 1) t \
             LEFT JOIN jobs j ON j.id = t.job_id"
        ))
        .bind::<Array<Text>, _>(names)
        .load::<LastTick>(conn)
    })
    .await?;
    let mut last: std::collections::HashMap<_, _> =
        rows.into_iter().map(|r| (r.name, r.tick)).collect();
    let now = Utc::now();
    let views = state
        .schedules
        .iter()
        .map(|s| ScheduleView {
            name: s.config.name.clone(),
            cron: s.config.cron.clone(),
            timezone: s.config.timezone.clone(),
            task: s.config.task.clone(),
            args: s.config.args.clone(),
            catch_up: serde_json::to_value(s.config.catch_up)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            last_tick: last.remove(s.name()),
            next_tick_at: s.next_after(now),
        })
        .collect();
    Ok(views)
}

/// The most recent ticks of one schedule, newest first.
#[utoipa::path(
    get, path = "/v1/schedules/{name}/ticks", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name"), TicksQuery),
    responses(
        (status = 200, description = "Ticks, newest first", body = Vec<Tick>),
        (status = 400, description = "Bad query parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such schedule", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ticks(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<TicksQuery>, QueryRejection>,
) -> Result<Json<Vec<Tick>>, Problem> {
    let Query(query) = query.map_err(|err| Problem::bad_query(err.body_text()))?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_query("`limit` must be between 1 and 1000"));
    }
    if !state.schedules.iter().any(|s| s.name() == name) {
        return Err(Problem::not_found(format!("no schedule `{name}`")));
    }
    let rows = conveyor_schema::pool::run(&state.db, move |conn| {
        diesel::sql_query(format!(
            "SELECT {TICK_COLUMNS} FROM schedule_ticks t LEFT JOIN jobs j ON j.id = t.job_id \
             WHERE t.schedule = $1 ORDER BY t.tick_at DESC LIMIT $2"
        ))
        .bind::<Text, _>(name)
        .bind::<Integer, _>(i32::try_from(limit).unwrap_or(20))
        .load::<Tick>(conn)
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?;
    Ok(Json(rows))
}
