//! State changes: send, pause, resume, cancel, resend-unknown.
//!
//! Each is one guarded UPDATE (`… WHERE state IN (allowed)`), so concurrent
//! calls cannot both win; resend-unknown's move of its recipients back to
//! `pending` commits in the same transaction. Those that need the planner
//! enqueue it after the commit. `send` and `resume` of a campaign that is
//! `sending` already change nothing and enqueue the planner again (a second
//! planner plans only recipients in no chunk, and a chunk's sender job is
//! run once), so a call whose answer was lost, or whose campaign was left
//! sending with no planner (the ingress died after the commit, or the undo
//! below failed), can simply be made again.
//!
//! If the planner's publish fails the change is undone and the caller gets a
//! 503 saying nothing changed, but only while nothing has acted on it: the
//! campaign is still in the state this call made (`sending`, of the plan
//! generation it left), so a `cancel` or `pause` that came in meanwhile
//! stands, and no planner has made a chunk of that generation. The undo locks
//! the campaign row, as the planner does to make a chunk, so one of them goes
//! first: a planner whose publish was in doubt (or confirmed but not recorded)
//! and that runs after the undo finds the campaign not sending and stops
//! without planning; one that ran first keeps the campaign sending (undoing it
//! would leave its chunks' senders to find a campaign not sending and stop,
//! with their recipients assigned to chunks that are published already), and
//! the 503 says so. A 503 whose undo failed says the campaign may be sending
//! with no planner and that `send` again enqueues one.
//!
//! A key without `admin` changes only the campaigns its producer created; any
//! other is a 404, exactly like an unknown id, and is left as it is.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use conveyor_schema::db::{campaign_chunks, campaign_recipients, campaigns};
use conveyor_schema::models::CampaignState;
use diesel::prelude::*;
use uuid::Uuid;

use super::types::Transition;
use super::{enqueue_planner, no_such_campaign, owner};
use crate::auth::Principal;
use crate::problem::Problem;
use crate::state::AppState;

/// A state change asked for.
#[derive(Debug, Clone, Copy)]
struct Change {
    /// The states it applies to (else 409).
    from: &'static [CampaignState],
    /// The state it makes.
    to: CampaignState,
    /// Whether it bumps the plan generation (a fresh set of chunk ids).
    replan: bool,
    /// resend-unknown: recipients in doubt (`unknown`) become `pending`
    /// again, in no chunk, in the same transaction.
    reopen_unknown: bool,
}

/// A transition made: what [`undo`] needs to take it back.
#[derive(Debug, Clone)]
struct Made {
    /// Whether the campaign changed; `false` for a `send` or `resume` of a
    /// campaign that was `sending` already, which only enqueues the planner.
    changed: bool,
    /// The state the campaign was in.
    previous: CampaignState,
    /// The plan generation it was left with.
    generation: i32,
    /// Its `send_started_at` before (`None` for a campaign never sent): the
    /// first `send` sets it, and an undone one must not leave it set.
    send_started_at: Option<DateTime<Utc>>,
    /// The recipients resend-unknown made `pending` (they were `unknown`).
    reopened: Vec<i64>,
}

/// Makes `change` to the campaign, if it is in one of `change.from`; one that
/// is `change.to` already (`send` or `resume` of a sending campaign) is left as
/// it is unless the change reopens recipients. Returns what it made.
/// 404, changing nothing, when the campaign does not exist or `owner` (see
/// [`super::owner`]) may not see it.
async fn transition(
    state: &AppState,
    id: Uuid,
    owner: Option<String>,
    change: Change,
) -> Result<Made, Problem> {
    let Change {
        from,
        to,
        replan,
        reopen_unknown,
    } = change;
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
            let previous = CampaignState::parse(&current).unwrap_or(CampaignState::Draft);
            if previous == to && !reopen_unknown {
                let (generation, send_started_at) = campaigns::table
                    .find(id)
                    .select((campaigns::plan_generation, campaigns::send_started_at))
                    .get_result::<(i32, Option<DateTime<Utc>>)>(conn)?;
                return Ok(Some(Ok(Made {
                    changed: false,
                    previous,
                    generation,
                    send_started_at,
                    reopened: Vec::new(),
                })));
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
            let reopened = if reopen_unknown {
                diesel::update(
                    campaign_recipients::table
                        .filter(campaign_recipients::campaign_id.eq(id))
                        .filter(campaign_recipients::state.eq("unknown")),
                )
                .set((
                    campaign_recipients::state.eq("pending"),
                    campaign_recipients::chunk_id.eq(None::<Uuid>),
                    campaign_recipients::next_attempt_at.eq(None::<DateTime<Utc>>),
                ))
                .returning(campaign_recipients::id)
                .get_results::<i64>(conn)?
            } else {
                Vec::new()
            };
            Ok(Some(Ok(Made {
                changed: true,
                previous,
                generation,
                send_started_at,
                reopened,
            })))
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
        Some(Ok(made)) => Ok(made),
    }
}

/// What [`undo`] found.
#[derive(Debug)]
enum Undone {
    /// The campaign is as it was before the call.
    Restored,
    /// Left as it is (the state named): another transition came in since.
    Changed(String),
    /// Left `sending`: a planner has made a chunk of the generation since.
    Planned,
    /// The undo itself failed (the cause).
    Failed(String),
}

/// Puts the campaign back in its previous state, with the `send_started_at`
/// it had and resend-unknown's recipients `unknown` again, after a failed
/// planner publish, if it is still `sending` as `made` left it and no planner
/// has made a chunk of that generation; see the module header. The campaign
/// row is locked meanwhile, as a planner locks it to make a chunk.
async fn undo(state: &AppState, id: Uuid, made: Made) -> Undone {
    let undone = conveyor_schema::pool::run(&state.db, move |conn| {
        conn.transaction(|conn| {
            let current: Option<(String, i32)> = campaigns::table
                .find(id)
                .select((campaigns::state, campaigns::plan_generation))
                .for_update()
                .first(conn)
                .optional()?;
            let Some((current, generation)) = current else {
                return Ok(Undone::Changed("deleted".into()));
            };
            if current != CampaignState::Sending.as_str() || generation != made.generation {
                return Ok(Undone::Changed(current));
            }
            let planned = diesel::select(diesel::dsl::exists(
                campaign_chunks::table
                    .filter(campaign_chunks::campaign_id.eq(id))
                    .filter(campaign_chunks::plan_generation.eq(made.generation)),
            ))
            .get_result::<bool>(conn)?;
            if planned {
                return Ok(Undone::Planned);
            }
            diesel::update(campaigns::table.find(id))
                .set((
                    campaigns::state.eq(made.previous.as_str()),
                    campaigns::send_started_at.eq(made.send_started_at),
                    campaigns::updated_at.eq(diesel::dsl::now),
                ))
                .execute(conn)?;
            if !made.reopened.is_empty() {
                diesel::update(
                    campaign_recipients::table
                        .filter(campaign_recipients::id.eq_any(&made.reopened))
                        .filter(campaign_recipients::state.eq("pending"))
                        .filter(campaign_recipients::chunk_id.is_null()),
                )
                .set(campaign_recipients::state.eq("unknown"))
                .execute(conn)?;
            }
            Ok(Undone::Restored)
        })
    })
    .await;
    match undone {
        Ok(Undone::Changed(now)) => {
            tracing::info!(campaign.id = %id, state = %now, "campaign changed since; its failed transition is not undone");
            Undone::Changed(now)
        }
        Ok(Undone::Planned) => {
            tracing::info!(campaign.id = %id, "campaign planned since; its failed transition is not undone");
            Undone::Planned
        }
        Ok(undone) => undone,
        Err(err) => {
            tracing::error!(campaign.id = %id, error = %err, "could not undo a campaign transition");
            Undone::Failed(err.to_string())
        }
    }
}

/// Enqueues the planner for the transition `made`; on failure, undoes it
/// (see [`undo`]) and answers a 503 that says what the campaign was left as.
async fn start_planning(
    state: &AppState,
    id: Uuid,
    made: Made,
) -> Result<Json<Transition>, Problem> {
    let mut problem = match enqueue_planner(state, id).await {
        Ok(job) => {
            return Ok(Json(Transition {
                state: CampaignState::Sending,
                planner_job_id: Some(job),
                recipients: None,
            }));
        }
        Err(problem) => problem,
    };
    let left = if made.changed {
        match undo(state, id, made).await {
            Undone::Restored => "; nothing changed".to_owned(),
            Undone::Changed(now) => {
                format!("; the campaign has changed since (it is {now}), and that stands")
            }
            Undone::Planned => {
                "; a planner has planned the campaign since, so it is sending (`send` again answers 200)"
                    .to_owned()
            }
            Undone::Failed(err) => format!(
                "; the change could not be undone ({err}): the campaign may be sending with no planner, and `send` again enqueues one"
            ),
        }
    } else {
        "; the campaign is sending as before, and `send` again enqueues the planner".to_owned()
    };
    problem.detail.push_str(&left);
    Err(problem)
}

/// The 503 of a change that enqueues the planner.
const PLANNER_503: &str = "The planner could not be enqueued. `detail` says what the campaign was left as: as it was (nothing changed; a planner whose publish was in doubt finds it not sending and does nothing); as a call made meanwhile left it; or sending, because a planner has planned it since or the undo failed, and then `send` again enqueues the planner";

/// Start sending a draft campaign.
///
/// A campaign already sending is left as it is and gets its planner again.
#[utoipa::path(post, path = "/v1/campaigns/{id}/send", tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "Sending; the planner job was enqueued (a campaign that was sending already is left as it is, and its planner plans only recipients no planner has taken)", body = Transition),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Paused, completed or cancelled", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = PLANNER_503, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn send(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
) -> Result<Json<Transition>, Problem> {
    let change = Change {
        from: &[CampaignState::Draft, CampaignState::Sending],
        to: CampaignState::Sending,
        replan: false,
        reopen_unknown: false,
    };
    let made = transition(&state, id, owner(principal), change).await?;
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
    let change = Change {
        from: &[CampaignState::Sending],
        to: CampaignState::Paused,
        replan: false,
        reopen_unknown: false,
    };
    transition(&state, id, owner(principal), change).await?;
    Ok(Json(Transition {
        state: CampaignState::Paused,
        planner_job_id: None,
        recipients: None,
    }))
}

/// Resume a paused campaign: the remaining recipients are planned afresh.
///
/// A campaign already sending is left as it is and gets its planner again.
#[utoipa::path(post, path = "/v1/campaigns/{id}/resume", tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "Sending again; the planner job was enqueued (a campaign that was sending already is left as it is, and its planner plans only recipients no planner has taken)", body = Transition),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Draft, completed or cancelled", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = PLANNER_503, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resume(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
) -> Result<Json<Transition>, Problem> {
    let change = Change {
        from: &[CampaignState::Paused, CampaignState::Sending],
        to: CampaignState::Sending,
        replan: true,
        reopen_unknown: false,
    };
    let made = transition(&state, id, owner(principal), change).await?;
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
    let change = Change {
        from: &[
            CampaignState::Draft,
            CampaignState::Sending,
            CampaignState::Paused,
        ],
        to: CampaignState::Cancelled,
        replan: false,
        reopen_unknown: false,
    };
    transition(&state, id, owner(principal), change).await?;
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
        (status = 200, description = "Unknown recipients are pending again (in the same commit as the state change); the planner job was enqueued", body = Transition),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Campaign draft, paused or cancelled", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable (nothing changed), or the planner could not be enqueued: `detail` says what the campaign was left as, as for `send` (undone, the recipients are `unknown` again)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resend_unknown(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
) -> Result<Json<Transition>, Problem> {
    let change = Change {
        from: &[CampaignState::Sending, CampaignState::Completed],
        to: CampaignState::Sending,
        replan: true,
        reopen_unknown: true,
    };
    let made = transition(&state, id, owner(principal), change).await?;
    let reopened = made.reopened.len() as u64;
    let mut result = start_planning(&state, id, made).await?;
    result.recipients = Some(reopened);
    Ok(result)
}
