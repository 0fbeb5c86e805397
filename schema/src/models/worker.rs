//! A row of `workers`: one worker process as its latest heartbeat described it.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::db::workers;

/// A worker's latest heartbeat.
#[derive(Debug, Clone, Queryable, Selectable, Identifiable, Insertable, AsChangeset)]
#[diesel(table_name = workers, check_for_backend(diesel::pg::Pg))]
pub struct WorkerRow {
    /// `host:pid:random`, unique per process start.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: i32,
    /// Conveyor version it runs.
    pub version: String,
    /// When the process started.
    pub started_at: DateTime<Utc>,
    /// Logical queues it consumes.
    pub queues: Vec<String>,
    /// Attempts running at the last heartbeat.
    pub in_flight: i32,
    /// Last heartbeat.
    pub last_seen_at: DateTime<Utc>,
    /// Set when it drained and stopped cleanly.
    pub stopped_at: Option<DateTime<Utc>>,
}
