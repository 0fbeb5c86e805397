//! Rows of `dead_jobs` (what operators browse and replay) and `dead_job_actions` (the audit).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use crate::db::{dead_job_actions, dead_jobs};

/// A dead job as recorded when it was dead-lettered.
#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = dead_jobs, check_for_backend(diesel::pg::Pg))]
pub struct DeadJob {
    /// The job id (the AMQP message id).
    pub id: Uuid,
    /// Task name (empty when the message was unreadable).
    pub task: String,
    /// Logical queue.
    pub queue: String,
    /// The envelope as dead-lettered; `None` when unreadable.
    pub envelope: Option<Value>,
    /// Raw body (lossy UTF-8) when the envelope was unreadable.
    pub body: Option<String>,
    /// Attempts made.
    pub attempts: i32,
    /// Every failure: `[{"attempt", "at", "error"}]`.
    pub errors: Value,
    /// The final reason.
    pub reason: String,
    /// RabbitMQ's `x-death` history, when the broker dead-lettered it.
    pub x_death: Option<Value>,
    /// `worker` or `broker`.
    pub source: String,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
    /// The job the latest replay created.
    pub replayed_as: Option<Uuid>,
    /// When it was last replayed.
    pub replayed_at: Option<DateTime<Utc>>,
    /// Times it was replayed.
    pub replay_count: i32,
    /// When it was discarded (hidden from the default listing).
    pub discarded_at: Option<DateTime<Utc>>,
}

/// One audited operator action on a dead job.
#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = dead_job_actions, check_for_backend(diesel::pg::Pg))]
pub struct DeadJobAction {
    /// Sequence number.
    pub id: i64,
    /// The dead job acted on.
    pub dead_job_id: Uuid,
    /// `replay` or `discard`.
    pub action: String,
    /// Who did it (admin token holder, CLI user).
    pub actor: String,
    /// When.
    pub at: DateTime<Utc>,
    /// The job a replay created.
    pub new_job_id: Option<Uuid>,
    /// Extra facts (forced, edited args).
    pub detail: Value,
}

/// A new audit row.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = dead_job_actions)]
pub struct NewDeadJobAction {
    /// The dead job acted on.
    pub dead_job_id: Uuid,
    /// `replay` or `discard`.
    pub action: String,
    /// Who did it.
    pub actor: String,
    /// The job a replay created.
    pub new_job_id: Option<Uuid>,
    /// Extra facts.
    pub detail: Value,
}
