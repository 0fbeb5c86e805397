//! A row of `profiles`: what `webhook.profile_sync` maintains and `GET /v1/profiles/{id}` shows.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::db::profiles;

/// A profile as stored (a tombstone when `deleted_at` is set).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = profiles, check_for_backend(diesel::pg::Pg))]
pub struct Profile {
    /// The producer's profile id.
    pub id: String,
    /// Source of the latest applied event.
    pub source: String,
    /// E-mail address (from the newest UPDATE).
    pub email: Option<String>,
    /// Display name (from the newest UPDATE).
    pub display_name: Option<String>,
    /// Locale (from the newest UPDATE).
    pub locale: Option<String>,
    /// occurred_at of the stored fields' UPDATE.
    pub fields_updated_at: Option<DateTime<Utc>>,
    /// SHA-256 (hex) of the stored headshot; the key into `headshots`.
    pub headshot_sha256: Option<String>,
    /// The headshot's content type.
    pub headshot_content_type: Option<String>,
    /// The headshot's size.
    pub headshot_size_bytes: Option<i32>,
    /// Where the headshot was fetched from.
    pub headshot_url: Option<String>,
    /// occurred_at of the stored headshot's IMPORT_HEADSHOT.
    pub headshot_updated_at: Option<DateTime<Utc>>,
    /// Newest occurred_at applied (the DELETE's once deleted).
    pub source_updated_at: Option<DateTime<Utc>>,
    /// The tombstone: when the profile was deleted at the source.
    pub deleted_at: Option<DateTime<Utc>>,
    /// When the row was created here.
    pub created_at: DateTime<Utc>,
    /// When the row last changed here.
    pub updated_at: DateTime<Utc>,
}
