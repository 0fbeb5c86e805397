//! Reading a campaign's progress and its ledger.

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use conveyor_schema::db::{campaign_recipients, campaigns};
use conveyor_schema::models::{Campaign, RecipientState};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use uuid::Uuid;

use super::types::*;
use super::{no_such_campaign, owner, visible_to};
use crate::auth::Principal;
use crate::problem::Problem;
use crate::state::AppState;

#[derive(QueryableByName)]
struct StateCount {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Recent {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// The campaign's status, or 404 when it does not exist or `owner` (see
/// [`super::owner`]) may not see it.
pub(super) async fn load_status(
    state: &AppState,
    id: Uuid,
    owner: Option<String>,
) -> Result<CampaignStatus, Problem> {
    let loaded = conveyor_schema::pool::run(&state.db, move |conn| {
        let Some(campaign) = campaigns::table
            .find(id)
            .filter(visible_to(owner))
            .select(Campaign::as_select())
            .first(conn)
            .optional()?
        else {
            return Ok(None);
        };
        let counts: Vec<StateCount> = diesel::sql_query(
            "SELECT state, count(*) AS n FROM campaign_recipients WHERE campaign_id = $1 GROUP BY state",
        )
        .bind::<SqlUuid, _>(id)
        .load(conn)?;
        let recent: Recent = diesel::sql_query(
            "SELECT count(*) AS n FROM campaign_recipients
              WHERE campaign_id = $1 AND state = 'sent' AND sent_at > now() - interval '60 seconds'",
        )
        .bind::<SqlUuid, _>(id)
        .get_result(conn)?;
        Ok(Some((campaign, counts, recent.n)))
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?;
    let Some((campaign, rows, recent)) = loaded else {
        return Err(no_such_campaign(id));
    };
    let mut counts = RecipientCounts::default();
    for row in rows {
        let slot = match RecipientState::parse(&row.state) {
            Some(RecipientState::Pending) => &mut counts.pending,
            Some(RecipientState::Sending) => &mut counts.sending,
            Some(RecipientState::Sent) => &mut counts.sent,
            Some(RecipientState::Failed) => &mut counts.failed,
            Some(RecipientState::Unknown) | None => &mut counts.unknown,
        };
        *slot += row.n;
        counts.total += row.n;
    }
    let rate = recent as f64 / 60.0;
    let left = (counts.pending + counts.sending) as f64;
    Ok(CampaignStatus {
        state: campaign.campaign_state(),
        id: campaign.id,
        name: campaign.name,
        template: campaign.template,
        from: campaign.from_addr,
        reply_to: campaign.reply_to,
        rate_per_sec: campaign.rate_per_sec,
        current_rate_per_sec: rate,
        estimated_seconds_left: (rate > 0.0 && left > 0.0).then(|| left / rate),
        counts,
        created_at: campaign.created_at,
        send_started_at: campaign.send_started_at,
        completed_at: campaign.completed_at,
    })
}

/// A campaign's state, counts per recipient state, current rate and time left.
///
/// A key without `admin` sees only the campaigns its producer created.
#[utoipa::path(
    get, path = "/v1/campaigns/{id}", tag = "campaigns", operation_id = "campaign_status",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "The campaign", body = CampaignStatus),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn status(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
) -> Result<Json<CampaignStatus>, Problem> {
    Ok(Json(load_status(&state, id, owner(principal)).await?))
}

/// The ledger, a page at a time (keyset pagination: pass `next_after` as `after`).
#[utoipa::path(
    get, path = "/v1/campaigns/{id}/recipients", tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id"), RecipientQuery),
    responses(
        (status = 200, description = "A page of recipients", body = RecipientPage),
        (status = 400, description = "Bad query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such campaign, or (without `admin`) one another producer created", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn recipients(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<Uuid>,
    Query(query): Query<RecipientQuery>,
) -> Result<Json<RecipientPage>, Problem> {
    let owner = owner(principal);
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid-query",
            "Invalid query",
            "limit must be between 1 and 1000",
        ));
    }
    let after = query.after.unwrap_or(0);
    let wanted = query.state.map(|s| s.as_str());
    let page = conveyor_schema::pool::run(&state.db, move |conn| {
        let exists = campaigns::table
            .find(id)
            .filter(visible_to(owner))
            .select(campaigns::id)
            .first::<Uuid>(conn)
            .optional()?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let mut rows = campaign_recipients::table
            .filter(campaign_recipients::campaign_id.eq(id))
            .filter(campaign_recipients::id.gt(after))
            .order(campaign_recipients::id)
            .limit(limit + 1)
            .select((
                campaign_recipients::id,
                campaign_recipients::email,
                campaign_recipients::state,
                campaign_recipients::attempts,
                campaign_recipients::last_reply,
                campaign_recipients::sent_at,
            ))
            .into_boxed();
        if let Some(wanted) = wanted {
            rows = rows.filter(campaign_recipients::state.eq(wanted));
        }
        rows.load::<(
            i64,
            String,
            String,
            i32,
            Option<String>,
            Option<chrono::DateTime<chrono::Utc>>,
        )>(conn)
            .map(Some)
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?
    .ok_or_else(|| no_such_campaign(id))?;
    let more = page.len() as i64 > limit;
    let items: Vec<RecipientView> = page
        .into_iter()
        .take(limit as usize)
        .map(
            |(id, email, state, attempts, last_reply, sent_at)| RecipientView {
                id,
                email,
                state: RecipientState::parse(&state).unwrap_or(RecipientState::Unknown),
                attempts,
                last_reply,
                sent_at,
            },
        )
        .collect();
    let next_after = if more {
        items.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(RecipientPage { items, next_after }))
}
