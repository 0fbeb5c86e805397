//! A short-lived in-process cache of `api_keys` rows, so each request does not
//! hit Postgres, while a revocation still takes effect within the TTL (≤ 3 s,
//! enforced by config validation) on every replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_schema::models::ApiKey;
use conveyor_schema::pool::{self, DbError, PgPool};

/// Entries kept at most; beyond this the cache is cleared (a flood of made-up ids cannot grow it).
const MAX_ENTRIES: usize = 10_000;

/// id → (the row, or `None` for no such key; when it was read).
type Entries = HashMap<String, (Option<Arc<ApiKey>>, Instant)>;

/// Key rows by id, each with the time it was read.
#[derive(Clone)]
pub struct KeyCache {
    /// Where rows come from.
    db: PgPool,
    /// How long a row (or its absence) is trusted.
    ttl: Duration,
    /// id → (row or none, read at).
    entries: Arc<Mutex<Entries>>,
}

impl KeyCache {
    /// An empty cache over `db`.
    pub fn new(db: PgPool, ttl: Duration) -> Self {
        Self {
            db,
            ttl,
            entries: Arc::default(),
        }
    }

    /// The row of key `id` (`None`: no such key), from the cache when fresh.
    /// Fails only when Postgres cannot be reached and nothing fresh is cached.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<ApiKey>>, DbError> {
        if let Some((row, at)) = self.lock().get(id)
            && at.elapsed() < self.ttl
        {
            return Ok(row.clone());
        }
        let owned = id.to_owned();
        let row = pool::run(&self.db, move |conn| super::keys::find(conn, &owned))
            .await?
            .map(Arc::new);
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(id.to_owned(), (row.clone(), Instant::now()));
        Ok(row)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
