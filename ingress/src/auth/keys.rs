//! The API key format and the `api_keys` table: create, list, revoke, verify.
//!
//! A key reads `cvk_<id>_<secret>`: `id` (16 hex digits) is not secret and finds
//! the row; `secret` (64 hex digits, 256 random bits) is never stored, only its
//! SHA-256, compared in constant time. So lookup leaks nothing useful (ids are
//! not secret) and comparison leaks nothing through timing. The CLI and the
//! test harness call these functions; the ingress only reads.

use chrono::{DateTime, Utc};
use conveyor_schema::db::api_keys;
use conveyor_schema::models::ApiKey;
use diesel::prelude::*;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Every key starts with this.
pub const PREFIX: &str = "cvk_";

/// A scope string that is not one of the known forms.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown scope `{0}`: expected `enqueue:<task or glob>`, `campaigns`, `webhooks:admin` or `admin`"
)]
pub struct BadScope(pub String);

/// Checks one scope string.
pub fn check_scope(scope: &str) -> Result<(), BadScope> {
    match scope {
        "campaigns" | "webhooks:admin" | "admin" => Ok(()),
        s if s
            .strip_prefix("enqueue:")
            .is_some_and(|pattern| !pattern.is_empty()) =>
        {
            Ok(())
        }
        other => Err(BadScope(other.to_owned())),
    }
}

/// A new key's settings.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Producer name.
    pub producer: String,
    /// Scopes (checked with [`check_scope`]).
    pub scopes: Vec<String>,
    /// Optional expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// Optional own rate (requests per second).
    pub rate_per_sec: Option<f64>,
    /// Optional own burst.
    pub burst: Option<i32>,
}

/// The key `cvk_<id>_<secret>` split into its parts; `None` when malformed.
pub fn split(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let well_formed = id.len() == 16
        && secret.len() == 64
        && id
            .bytes()
            .chain(secret.bytes())
            .all(|b| b.is_ascii_hexdigit());
    well_formed.then_some((id, secret))
}

/// SHA-256 of a key's secret part.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// True when the two hashes are equal, in time independent of where they differ.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Creates a key; returns its row and the key itself (the only time it exists in clear).
pub fn create(conn: &mut PgConnection, new: NewKey) -> QueryResult<(ApiKey, String)> {
    let mut rng = rand::rng();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    let key = format!("{PREFIX}{id}_{secret}");
    let row = ApiKey {
        display_prefix: format!("{PREFIX}{id}_{}…", &secret[..4]),
        secret_hash: hash_secret(&secret),
        id,
        producer: new.producer,
        scopes: new.scopes,
        expires_at: new.expires_at,
        revoked_at: None,
        created_at: Utc::now(),
        rate_per_sec: new.rate_per_sec,
        burst: new.burst,
    };
    diesel::insert_into(api_keys::table)
        .values(&row)
        .execute(conn)?;
    Ok((row, key))
}

/// Every key, newest first.
pub fn list(conn: &mut PgConnection) -> QueryResult<Vec<ApiKey>> {
    api_keys::table
        .order(api_keys::created_at.desc())
        .select(ApiKey::as_select())
        .load(conn)
}

/// Revokes key `id`; `false` when there is no such key (revoking twice keeps the first time).
pub fn revoke(conn: &mut PgConnection, id: &str) -> QueryResult<bool> {
    let id = id.strip_prefix(PREFIX).unwrap_or(id);
    let id = id.split('_').next().unwrap_or(id);
    let found = api_keys::table
        .find(id)
        .select(api_keys::id)
        .first::<String>(conn)
        .optional()?;
    if found.is_none() {
        return Ok(false);
    }
    diesel::update(
        api_keys::table
            .find(id)
            .filter(api_keys::revoked_at.is_null()),
    )
    .set(api_keys::revoked_at.eq(Utc::now()))
    .execute(conn)?;
    Ok(true)
}

/// The row of key `id`, if any.
pub fn find(conn: &mut PgConnection, id: &str) -> QueryResult<Option<ApiKey>> {
    api_keys::table
        .find(id)
        .select(ApiKey::as_select())
        .first(conn)
        .optional()
}

/// True when `pattern` (`*` matches any run of characters) matches `task`.
pub fn glob_matches(pattern: &str, task: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == task,
        Some((head, tail)) => {
            let Some(rest) = task.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|i| rest.is_char_boundary(*i))
                .any(|i| glob_matches(tail, &rest[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_matches("diag.*", "diag.noop"));
        assert!(glob_matches("*", "mail.send"));
        assert!(glob_matches("diag.noop", "diag.noop"));
        assert!(!glob_matches("diag.*", "mail.send"));
        assert!(!glob_matches("diag.noop", "diag.noopx"));
        assert!(glob_matches("*.send", "mail.send"));
    }

    #[test]
    fn key_format() {
        let key = format!("{PREFIX}{}_{}", "a".repeat(16), "b".repeat(64));
        assert_eq!(
            split(&key),
            Some(("aaaaaaaaaaaaaaaa", "b".repeat(64).as_str()))
        );
        assert!(split("cvk_short_x").is_none());
        assert!(split(&key.replace("cvk_", "xyz_")).is_none());
        assert!(check_scope("enqueue:diag.*").is_ok());
        assert!(check_scope("enqueue:").is_err());
        assert!(check_scope("root").is_err());
    }
}
