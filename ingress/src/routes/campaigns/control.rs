//! State changes: send, pause, resume, cancel, resend-unknown.
//!
//! Each is one guarded UPDATE (`… WHERE state IN (allowed)`), so concurrent
//! calls cannot both win. Those that need the planner enqueue it after the
//! commit; if that publish fails the change is undone and the caller gets 503.
//! The undo is guarded too: it applies only while the campaign is still in the
//! state this call made (`sending`, of the plan generation it left), so a
//! `cancel` or `pause` that came in meanwhile stands.
//!
//! A key without `admin` changes only the campaigns its producer created; any
//! other is a 404, exactly like an unknown id, and is left as it is.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use conveyor_schema::db::{campaign_recipients, campaigns};
use conveyor_schema::models::CampaignState;
use diesel::prelude::*;
use uuid::Uuid;

use super::types::Transition;
use super::{enqueue_planner, no_such_campaign, owner};
use crate::auth::Principal;
use crate::problem::Problem;
use crate::state::AppState;

/// A transition made: what [`undo`] needs to take it back.
#[derive(Debug, Clone, Copy)]
struct Made {
    /// The state the campaign was in.
    previous: CampaignState,
    /// The plan generation it was left with.
    generation: i32,
    /// Its `send_started_at` before (`None` for a campaign never sent): the
    /// first `send` sets it, and an undone one must not leave it set.
    send_started_at: Option<DateTime<Utc>>,
}

/// Moves the campaign from one of `from` to `to`; returns what it made.
/// `replan` also bumps the plan generation (a fresh set of chunk ids).
/// 404, changing nothing, when the campaign does not exist or `owner` (see
/// [`super::owner`]) may not see it.
async fn transition(
    state: &AppState,
    id: Uuid,
    owner: Option<String>,
    from: &'static [CampaignState],
    to: CampaignState,
    replan: bool,
) -> Result<Made, Problem> {
    let allowed: Vec<&'static str> = from.iter().map(|s| s.as_str()).collect();
    let changed = conveyor_schema::pool::run(&state.db, move |conn| {
        conn.transaction(|conn| {
            let current = super::locked_state(conn, id, owner)?;
            let Some(current) = current else {
                return Ok(None);
            };
            if !allowed.contains(&current.as_str()) {
                return Ok(Some(Err(current)));
            }
            let bump = if replan { 1 } else { 0 };
            // `send_started_at` as it was: this statement leaves it alone.
            let (generation, send_started_at) = diesel::update(campaigns::table.find(id))
                .set((
                    campaigns::state.eq(to.as_str()),
                    campaigns::plan_generation.eq(campaigns::plan_generation + bump),
                    campaigns::updated_at.eq(diesel::dsl::now),
                ))
                .returning((campaigns::plan_generation, campaigns::send_started_at))
                .get_result::<(i32, Option<DateTime<Utc>>)>(conn)?;
            if to == CampaignState::Sending {
                diesel::update(
                    campaigns::table
                        .find(id)
                        .filter(campaigns::send_started_at.is_null()),
                )
                .set(campaigns::send_started_at.eq(diesel::dsl::now))
                .execute(conn)?;
            }
            Ok(Some(Ok((current, generation, send_started_at))))
        })
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?;
    match changed {
        None => Err(no_such_campaign(id)),
        Some(Err(current)) => Err(Problem::new(
            StatusCode::CONFLICT,
            "invalid-transition",
            "Invalid state transition",
            format!("campaign {id} is {current}; cannot become {}", to.as_str()),
        )),
        Some(Ok((previous, generation, send_started_at))) => Ok(Made {
            previous: CampaignState::parse(&previous).unwrap_or(CampaignState::Draft),
            generation,
            send_started_at,
        }),
    }
}

/// Puts the campaign back in its previous state, with the `send_started_at`
/// it had, after a failed planner publish, if it is still `sending` as `made`
/// left it; a transition since (a cancel, a pause, another resume) is kept.
async fn undo(state: &AppState, id: Uuid, made: Made) {
    let restored = conveyor_schema::pool::run(&state.db, move |conn| {
        diesel::update(
            campaigns::table
                .find(id)
                .filter(campaigns::state.eq(CampaignState::Sending.as_str()))
                .filter(campaigns::plan_generation.eq(made.generation)),
        )
        .set((
            campaigns::state.eq(made.previous.as_str()),
            campaigns::send_started_at.eq(made.send_started_at),
            campaigns::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
    })
    .await;
    match restored {
        Ok(0) => {
            tracing::info!(campaign.id = %id, "campaign changed since; its failed transition is not undone");
        }
        Ok(_) => {}
        Err(err) => {
            tracing::error!(campaign.id = %id, error = %err, "could not undo a campaign transition");
        }
    }
}

async fn start_planning(
    state: &AppState,
    id: Uuid,
    made: Made,
) -> Result<Json<Transition>, Problem> {
    match enqueue_planner(state, id).await {
        Ok(job) => Ok(Json(Transition {
            state: CampaignState::Sending,
            planner_job_id: Some(job),
            recipients: None,
        })),
        Err(problem) => {
            undo(state, id, made).await;
            Err(problem)
        }
    }
}

/// Start sending a draft campaign.
#[utoipa::path(post, path = "/v1/campaigns/{id}/send", tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "Sending; the planner job was enqueued", body = Transition),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not a draft", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Planner could not be enqueued; nothing changed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn send(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
) -> Result<Json<Transition>, Problem> {
    let made = transition(
        &state,
        id,
        owner(principal),
        &[CampaignState::Draft],
        CampaignState::Sending,
        false,
    )
    .await?;
    start_planning(&state, id, made).await
}

/// Pause sending: senders stop at their next recipient group and hand the rest back.
#[utoipa::path(post, path = "/v1/campaigns/{id}/pause", tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "Paused", body = Transition),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not sending", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn pause(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
) -> Result<Json<Transition>, Problem> {
    transition(
        &state,
        id,
        owner(principal),
        &[CampaignState::Sending],
        CampaignState::Paused,
        false,
    )
    .await?;
    Ok(Json(Transition {
        state: CampaignState::Paused,
        planner_job_id: None,
        recipients: None,
    }))
}

/// Resume a paused campaign: the remaining recipients are planned afresh.
#[utoipa::path(post, path = "/v1/campaigns/{id}/resume", tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "Sending again; the planner job was enqueued", body = Transition),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not paused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Planner could not be enqueued; nothing changed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resume(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
) -> Result<Json<Transition>, Problem> {
    let made = transition(
        &state,
        id,
        owner(principal),
        &[CampaignState::Paused],
        CampaignState::Sending,
        true,
    )
    .await?;
    start_planning(&state, id, made).await
}

/// Cancel for good: pending recipients are never sent.
#[utoipa::path(post, path = "/v1/campaigns/{id}/cancel", tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "Cancelled", body = Transition),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already completed or cancelled", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cancel(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
) -> Result<Json<Transition>, Problem> {
    transition(
        &state,
        id,
        owner(principal),
        &[
            CampaignState::Draft,
            CampaignState::Sending,
            CampaignState::Paused,
        ],
        CampaignState::Cancelled,
        false,
    )
    .await?;
    Ok(Json(Transition {
        state: CampaignState::Cancelled,
        planner_job_id: None,
        recipients: None,
    }))
}

/// Send again to recipients in doubt (`unknown`): the operator accepts that some may get it twice.
#[utoipa::path(post, path = "/v1/campaigns/{id}/resend-unknown", tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "Unknown recipients are pending again; the planner job was enqueued", body = Transition),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Campaign draft, paused or cancelled", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Planner could not be enqueued", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resend_unknown(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
) -> Result<Json<Transition>, Problem> {
    let made = transition(
        &state,
        id,
        owner(principal),
        &[CampaignState::Sending, CampaignState::Completed],
        CampaignState::Sending,
        true,
    )
    .await?;
    let moved = conveyor_schema::pool::run(&state.db, move |conn| {
        diesel::update(
            campaign_recipients::table
                .filter(campaign_recipients::campaign_id.eq(id))
                .filter(campaign_recipients::state.eq("unknown")),
        )
        .set((
            campaign_recipients::state.eq("pending"),
            campaign_recipients::chunk_id.eq(None::<Uuid>),
            campaign_recipients::next_attempt_at.eq(None::<chrono::DateTime<chrono::Utc>>),
        ))
        .execute(conn)
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?;
    let mut result = start_planning(&state, id, made).await?;
    result.recipients = Some(moved as u64);
    Ok(result)
}
