//! A row of `api_keys`: one producer's key, stored as the hash of its secret.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::db::api_keys;

/// An API key as stored (never the key itself).
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = api_keys, check_for_backend(diesel::pg::Pg))]
pub struct ApiKey {
    /// The non-secret lookup part of the key (`cvk_<id>_…`).
    pub id: String,
    /// The producer the key belongs to (idempotency keys and rate limits are per producer key).
    pub producer: String,
    /// SHA-256 of the secret part.
    pub secret_hash: Vec<u8>,
    /// What listings show, e.g. `cvk_<id>_ab12…`.
    pub display_prefix: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// After this the key is refused.
    pub expires_at: Option<DateTime<Utc>>,
    /// Set by `conveyor keys revoke`; the key is refused from then on.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Token-bucket refill rate; `None` uses the configured default.
    pub rate_per_sec: Option<f64>,
    /// Token-bucket size; `None` uses the configured default.
    pub burst: Option<i32>,
}
