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
///
/// `task` comes from the request, so the time is linear in both lengths
/// whatever the pattern: the text before the first `*` must start `task`, the
/// text after the last `*` must end the rest, and each piece between two `*`s
/// is found leftmost in what remains (the leftmost place leaves the most room
/// for the pieces after it, so no other place needs trying).
pub fn glob_matches(pattern: &str, task: &str) -> bool {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(rest) = task.strip_prefix(first) else {
        return false;
    };
    let Some(last) = pieces.next_back() else {
        return rest.is_empty();
    };
    let Some(mut rest) = rest.strip_suffix(last) else {
        return false;
    };
    for piece in pieces {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
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

    /// What [`glob_matches`] must answer, by dynamic programming over
    /// characters: `done[j]` says whether the pattern so far matches the first
    /// `j` characters of the task.
    fn reference(pattern: &str, task: &str) -> bool {
        let task: Vec<char> = task.chars().collect();
        let mut done = vec![false; task.len() + 1];
        done[0] = true;
        for p in pattern.chars() {
            let mut next = vec![false; task.len() + 1];
            for j in 0..=task.len() {
                next[j] = if p == '*' {
                    done[j] || (j > 0 && next[j - 1])
                } else {
                    j > 0 && done[j - 1] && task[j - 1] == p
                };
            }
            done = next;
        }
        done[task.len()]
    }

    /// Every string of up to `max` characters from `alphabet`.
    fn strings(alphabet: &[char], max: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn globs_agree_with_the_reference_on_every_short_pattern_and_task() {
        // `é` is two bytes: a match must still fall on characters.
        let patterns = strings(&['a', '.', 'é', '*'], 5);
        let tasks = strings(&['a', '.', 'é'], 5);
        for pattern in &patterns {
            for task in &tasks {
                assert_eq!(
                    glob_matches(pattern, task),
                    reference(pattern, task),
                    "pattern {pattern:?}, task {task:?}"
                );
            }
        }
    }

    /// Patterns with several `*` against a 100 KB name: the old backtracking
    /// matcher tried every split of the name per `*` (n^3 and more) and did
    /// not finish these; each must be answered correctly in one pass.
    #[test]
    fn several_stars_against_a_long_name() {
        let dots = ".".repeat(100_000);
        assert!(glob_matches("*.*.*.*", &dots));
        assert!(!glob_matches("*.*.*.*x", &dots));
        assert!(!glob_matches("*.*.*x*", &dots));
        assert!(!glob_matches("x*.*.*.*", &dots));
        let name = format!("{dots}x{dots}");
        assert!(glob_matches("*.*x*.*", &name));
        assert!(!glob_matches("*.*x*x*", &name));
        assert!(!glob_matches("*..*x*..", &format!("{dots}x.")));
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
