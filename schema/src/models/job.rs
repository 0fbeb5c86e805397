//! A row of `jobs`: what the status API shows and the worker updates.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use crate::db::jobs;
use crate::{Envelope, JobState, TaskOptions};

/// A job record as stored.
#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = jobs, check_for_backend(diesel::pg::Pg))]
pub struct Job {
    /// Same as the envelope id.
    pub id: Uuid,
    /// Task name.
    pub task: String,
    /// Logical queue.
    pub queue: String,
    /// One of [`JobState`]'s stored names.
    pub state: String,
    /// Arguments as enqueued.
    pub args: Value,
    /// Attempts started so far.
    pub attempts: i32,
    /// Times an attempt was started (counts redeliveries after crashes).
    pub runs: i32,
    /// Attempts allowed in all.
    pub max_attempts: i32,
    /// The most recent failure, if any.
    pub last_error: Option<String>,
    /// Every failure: `[{"attempt", "at", "error"}]`.
    pub errors: Value,
    /// The producer's Idempotency-Key, if any.
    pub idempotency_key: Option<String>,
    /// The dead job this one replays, if any.
    pub replay_of: Option<Uuid>,
    /// When the producer accepted it.
    pub enqueued_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the next attempt is due: while `retrying`, or while `queued` with a
    /// delay (the envelope's `not_before`).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The worker that ran, or runs, the latest attempt (its id in `workers`).
    pub runner: Option<String>,
}

impl Job {
    /// The parsed state (`Queued` for anything unknown, which the CHECK constraint forbids).
    pub fn job_state(&self) -> JobState {
        JobState::parse(&self.state).unwrap_or(JobState::Queued)
    }
}

/// A job record about to be inserted in state `queued`.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = jobs)]
pub struct NewJob {
    /// Envelope id.
    pub id: Uuid,
    /// Task name.
    pub task: String,
    /// Logical queue.
    pub queue: String,
    /// Always `queued` on insert.
    pub state: String,
    /// Arguments.
    pub args: Value,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Idempotency-Key, if any.
    pub idempotency_key: Option<String>,
    /// Replayed dead job, if any.
    pub replay_of: Option<Uuid>,
    /// Acceptance time.
    pub enqueued_at: DateTime<Utc>,
    /// The envelope's `not_before` when it was enqueued with a delay: the job is
    /// not waiting (and does not age its queue) before then.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The API key's producer, for jobs enqueued through `POST /v1/jobs` (see [`Self::by`]).
    pub producer: Option<String>,
}

impl NewJob {
    /// The queued record for `envelope` of a task with `options`.
    pub fn queued(envelope: &Envelope, options: &TaskOptions) -> Self {
        Self {
            id: envelope.id,
            task: envelope.task.clone(),
            queue: options.queue.to_owned(),
            state: JobState::Queued.as_str().to_owned(),
            args: envelope.args.clone(),
            max_attempts: i32::try_from(options.max_attempts).unwrap_or(i32::MAX),
            idempotency_key: envelope.idempotency_key.clone(),
            replay_of: envelope.replay_of,
            enqueued_at: envelope.enqueued_at,
            next_attempt_at: envelope.not_before,
            producer: None,
        }
    }

    /// The same record, owned by `producer` (only it and `admin` keys may read it back).
    pub fn by(self, producer: Option<String>) -> Self {
        Self { producer, ..self }
    }
}
