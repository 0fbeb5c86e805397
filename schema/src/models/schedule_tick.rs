//! A row of `schedule_ticks`: one fired tick of a schedule and the job it enqueued.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::db::schedule_ticks;

/// A claimed tick as stored.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = schedule_ticks, check_for_backend(diesel::pg::Pg))]
pub struct ScheduleTick {
    /// Schedule name.
    pub schedule: String,
    /// The tick's time (UTC).
    pub tick_at: DateTime<Utc>,
    /// The one job this tick enqueued.
    pub job_id: Uuid,
    /// Fired late by `catch_up = "once"` after downtime.
    pub catch_up: bool,
    /// The worker that claimed it (or last took over its publication).
    pub claimed_by: String,
    /// When it was claimed (or taken over).
    pub claimed_at: DateTime<Utc>,
    /// When the broker confirmed the job's message; `None` until then.
    pub published_at: Option<DateTime<Utc>>,
}
