//! Creating a campaign and appending recipients.

use std::collections::HashSet;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use conveyor_schema::db::{campaign_recipients, campaigns};
use conveyor_schema::models::{CampaignState, NewCampaign, NewRecipient};
use diesel::prelude::*;
use lettre::Address;
use lettre::message::Mailbox;
use serde_json::Value;
use uuid::Uuid;

use super::read::load_status;
use super::types::*;
use super::{enqueue_planner, no_such_campaign, owner};
use crate::auth::Principal;
use crate::idempotency::IdSeed;
use crate::json_body::StrictJson;
use crate::problem::Problem;
use crate::state::AppState;

/// Rows per INSERT statement.
const INSERT_BATCH: usize = 1000;

/// Validates addresses and variables, and drops repeated addresses (case-insensitive).
/// Returns the rows to insert and how many repeats were dropped.
fn validate_recipients(
    campaign_id: Uuid,
    input: Vec<RecipientInput>,
) -> Result<(Vec<NewRecipient>, u64), Problem> {
    let mut seen = HashSet::with_capacity(input.len());
    let mut rows = Vec::with_capacity(input.len());
    let mut repeats = 0;
    for (index, recipient) in input.into_iter().enumerate() {
        let email = recipient.email.trim().to_owned();
        if let Err(err) = email.parse::<Address>() {
            return Err(Problem::invalid(
                format!("/recipients/{index}/email"),
                format!("recipient {index}: `{email}` is not a valid address ({err})"),
            ));
        }
        if !recipient.vars.is_object() {
            return Err(Problem::invalid(
                format!("/recipients/{index}/vars"),
                "must be a JSON object",
            ));
        }
        if !seen.insert(email.to_lowercase()) {
            repeats += 1;
            continue;
        }
        rows.push(NewRecipient {
            campaign_id,
            email,
            vars: recipient.vars,
        });
    }
    Ok((rows, repeats))
}

fn insert_recipients(conn: &mut PgConnection, rows: &[NewRecipient]) -> QueryResult<u64> {
    let mut added = 0;
    for batch in rows.chunks(INSERT_BATCH) {
        added += diesel::insert_into(campaign_recipients::table)
            .values(batch)
            .on_conflict_do_nothing()
            .execute(conn)? as u64;
    }
    Ok(added)
}

fn mailbox(pointer: &str, value: &str) -> Result<(), Problem> {
    value.parse::<Mailbox>().map(|_| ()).map_err(|err| {
        Problem::invalid(pointer, format!("`{value}` is not a valid mailbox ({err})"))
    })
}

/// Create a campaign in state `draft`, owned by the key's producer.
///
/// Only keys of that producer, and keys with `admin`, see it afterwards.
#[utoipa::path(
    post, path = "/v1/campaigns", tag = "campaigns",
    request_body(content = CreateCampaign, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = CampaignStatus),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown template, template error, invalid address (pointer names the index)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    seed: Option<Extension<IdSeed>>,
    StrictJson { value: request, .. }: StrictJson<CreateCampaign>,
) -> Result<(StatusCode, Json<CampaignStatus>), Problem> {
    if request.name.trim().is_empty() {
        return Err(Problem::invalid("/name", "must not be empty"));
    }
    mailbox("/from", &request.from)?;
    if let Some(reply_to) = &request.reply_to {
        mailbox("/reply_to", reply_to)?;
    }
    if !request.vars.is_object() {
        return Err(Problem::invalid("/vars", "must be a JSON object"));
    }
    if request
        .rate_per_sec
        .is_some_and(|r| !(r > 0.0 && r.is_finite()))
    {
        return Err(Problem::invalid(
            "/rate_per_sec",
            "must be a positive number",
        ));
    }
    if !state.templates.exists(&request.template) {
        return Err(Problem::invalid(
            "/template",
            format!("unknown mail template `{}`", request.template),
        ));
    }
    // With an `Idempotency-Key`, the id comes from the key's seed: a retry of
    // a request whose campaign was committed but whose answer was lost (its
    // ingress died, or the commit's outcome never arrived) finds that campaign
    // rather than making a second one, which would mail everyone twice.
    let id = seed.map_or_else(Uuid::now_v7, |Extension(seed)| seed.id(0));
    let (rows, repeats) = validate_recipients(id, request.recipients)?;
    let mut context = request.vars.as_object().cloned().unwrap_or_default();
    if let Some(Value::Object(first)) = rows.first().map(|r| &r.vars) {
        context.extend(first.clone());
    }
    context.insert(
        "email".into(),
        rows.first()
            .map_or("recipient@example.com", |r| r.email.as_str())
            .into(),
    );
    context.insert(
        "unsubscribe_url".into(),
        "https://example.invalid/unsubscribe".into(),
    );
    if let Err(err) = state
        .templates
        .render(&request.template, &Value::Object(context))
    {
        return Err(Problem::invalid("/template", err.to_string()));
    }
    let campaign = NewCampaign {
        id,
        name: request.name,
        template: request.template,
        from_addr: request.from,
        reply_to: request.reply_to,
        vars: request.vars,
        rate_per_sec: request.rate_per_sec,
        state: CampaignState::Draft.as_str().into(),
        producer: principal.as_ref().map(|Extension(p)| p.producer.clone()),
    };
    conveyor_schema::pool::run(&state.db, move |conn| {
        conn.transaction(|conn| {
            let created = diesel::insert_into(campaigns::table)
                .values(&campaign)
                .on_conflict_do_nothing()
                .execute(conn)?;
            // Not created: this request's first attempt made it, recipients and all.
            if created == 0 {
                return Ok(0);
            }
            insert_recipients(conn, &rows)
        })
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?;
    tracing::info!(campaign.id = %id, repeats, "campaign created");
    // Read back as the caller sees campaigns. The id is new, or derived from
    // the seed of an Idempotency-Key claimed for this producer, so the row is
    // the caller's; the filter makes sure one that is not is never shown.
    let status = load_status(&state, id, owner(principal)).await?;
    Ok((StatusCode::CREATED, Json(status)))
}

/// Append recipients (any state but `cancelled`; a `completed` campaign resumes sending).
///
/// A `sending` campaign (also one that resumes) gets the planner after the
/// commit whenever it has recipients no planner has taken yet. If the planner
/// cannot be enqueued (503), the recipients and the state stay: the same call
/// again, which adds none, enqueues it for them.
#[utoipa::path(
    post, path = "/v1/campaigns/{id}/recipients", tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    request_body(content = AddRecipients, content_type = "application/json"),
    responses(
        (status = 200, description = "Appended", body = AddedRecipients),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Campaign cancelled", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid address (pointer names the index)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable (nothing changed), or the planner could not be enqueued: the recipients are stored and the campaign is sending; the same request again enqueues the planner", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn add_recipients(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
    StrictJson { value: request, .. }: StrictJson<AddRecipients>,
) -> Result<Json<AddedRecipients>, Problem> {
    let (rows, repeats) = validate_recipients(id, request.recipients)?;
    let offered = rows.len() as u64;
    let owner = owner(principal);
    let outcome = conveyor_schema::pool::run(&state.db, move |conn| {
        conn.transaction(|conn| {
            let current = super::locked_state(conn, id, owner)?;
            let Some(current) = current else {
                return Ok(Err(no_such_campaign(id)));
            };
            let added = match CampaignState::parse(&current) {
                Some(CampaignState::Cancelled) => {
                    return Ok(Err(Problem::new(
                        StatusCode::CONFLICT,
                        "campaign-cancelled",
                        "Campaign cancelled",
                        "a cancelled campaign takes no recipients",
                    )));
                }
                _ => insert_recipients(conn, &rows)?,
            };
            let resumes = current == CampaignState::Completed.as_str() && added > 0;
            if resumes {
                diesel::update(campaigns::table.find(id))
                    .set((
                        campaigns::state.eq(CampaignState::Sending.as_str()),
                        campaigns::completed_at.eq(None::<chrono::DateTime<chrono::Utc>>),
                    ))
                    .execute(conn)?;
            }
            // What the planner takes: pending and in no chunk (this call's
            // rows, or an earlier call's whose planner was never enqueued).
            // Unlike a transition, an append is not undone when the planner's
            // publish fails: that may be in doubt, and a planner already
            // running for the campaign may have taken the new rows.
            let plan = (resumes || current == CampaignState::Sending.as_str())
                && diesel::select(diesel::dsl::exists(
                    campaign_recipients::table
                        .filter(campaign_recipients::campaign_id.eq(id))
                        .filter(campaign_recipients::state.eq("pending"))
                        .filter(campaign_recipients::chunk_id.is_null()),
                ))
                .get_result::<bool>(conn)?;
            Ok(Ok((added, plan)))
        })
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?;
    let (added, plan) = outcome?;
    if plan {
        enqueue_planner(&state, id).await?;
    }
    Ok(Json(AddedRecipients {
        added,
        duplicates: repeats + (offered - added),
    }))
}
