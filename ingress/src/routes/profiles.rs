//! `GET /v1/profiles/{id}`: a profile as synced from webhooks.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use conveyor_schema::db::profiles;
use conveyor_schema::models::Profile;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::problem::Problem;
use crate::state::AppState;

/// A synced profile.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProfileView {
    /// The producer's profile id.
    pub id: String,
    /// The source of the latest applied change.
    pub source: String,
    /// E-mail address.
    pub email: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Locale.
    pub locale: Option<String>,
    /// The stored headshot, when one was imported.
    pub headshot: Option<HeadshotView>,
    /// occurred_at of the newest change applied.
    pub source_updated_at: Option<DateTime<Utc>>,
    /// When this copy last changed.
    pub updated_at: DateTime<Utc>,
}

/// A stored headshot's reference.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeadshotView {
    /// Lowercase hex SHA-256 of the image.
    pub sha256: String,
    /// Its content type.
    pub content_type: Option<String>,
    /// Its size.
    pub size_bytes: Option<i32>,
    /// Where it was fetched from.
    pub url: Option<String>,
}

impl From<Profile> for ProfileView {
    fn from(p: Profile) -> Self {
        Self {
            headshot: p.headshot_sha256.map(|sha256| HeadshotView {
                sha256,
                content_type: p.headshot_content_type,
                size_bytes: p.headshot_size_bytes,
                url: p.headshot_url,
            }),
            id: p.id,
            source: p.source,
            email: p.email,
            display_name: p.display_name,
            locale: p.locale,
            source_updated_at: p.source_updated_at,
            updated_at: p.updated_at,
        }
    }
}

/// Read a synced profile.
#[utoipa::path(
    get, path = "/v1/profiles/{id}", tag = "webhooks", operation_id = "show_profile",
    params(("id" = String, Path, description = "The producer's profile id")),
    responses(
        (status = 200, description = "The profile", body = ProfileView),
        (status = 404, description = "No such profile, or it was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ProfileView>, Problem> {
    let key = id.clone();
    let profile = conveyor_schema::pool::run(&state.db, move |conn| {
        profiles::table
            .find(key)
            .filter(profiles::deleted_at.is_null())
            .select(Profile::as_select())
            .first(conn)
            .optional()
    })
    .await
    .map_err(|err| Problem::unavailable(err.to_string(), 1))?
    .ok_or_else(|| Problem::not_found(format!("no profile `{id}`")))?;
    Ok(Json(profile.into()))
}
