//! Operations on dead jobs, shared by the admin HTTP API, the dashboard and
//! `conveyor dlq`: list, show, replay and discard.
//!
//! A replay publishes a fresh job (new id, attempt 1, `replay_of` = the dead
//! job) and, in one transaction, records the new job, marks the dead record
//! replayed and writes the audit row; the transaction commits only after the
//! broker confirmed the message. The n-th replay of a record is always the
//! same job (its id and idempotency key derive from the record and n), so a
//! replay that fails after its message may have been taken (a lost confirm, a
//! failed commit) is answered in doubt, and doing it again makes that job, not
//! a second one. The dead row is locked while that happens, so
//! two operators replaying the same record at once replay it once. Replaying a
//! record that was already replayed (or discarded) does nothing unless forced.
//! The `.dlq` queues are not touched: they stay the raw archive for
//! RabbitMQ-native tooling. A record holds its envelope as JSON, or, when
//! PostgreSQL refused its full form to the worker, as text in `body`: either
//! replays; a record with neither (an unreadable message, a cut copy) is
//! refused, naming the `.dlq` queue that holds its message. Finding records
//! (filters, keyset pages) is in `listing`; acting on every record a filter
//! matches, at a rate, in [`bulk`].
//!
//! A caller that must answer in time (an HTTP request) gives a [`Deadline`]:
//! the waits of one replay or discard (a pooled connection, the record's row
//! lock) end at its `start_by`, and a record that could not be started by then
//! is left exactly as it was ([`ReplayError::OutOfTime`]); a publish already
//! under way waits for its confirm until `finish_by`, and is in doubt after.

pub mod bulk;
mod deadline;
mod listing;

use chrono::{DateTime, Utc};
use conveyor_platform::amqp::{Outgoing, PublishError, Publisher, Topology};
use conveyor_schema::db::{dead_job_actions, dead_jobs, jobs};
use conveyor_schema::models::{DeadJob, DeadJobAction, NewDeadJobAction, NewJob};
use conveyor_schema::pool::{self, DbError, PgPool};
use conveyor_schema::{Envelope, find_task};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

pub use deadline::Deadline;
use deadline::{bound_lock_waits, checkout, out_of_time};
pub use listing::{BadCursor, Filter, MAX_LIMIT, Position, Summary, Target, list, page, summaries};

/// One dead job and its audit trail (oldest action first); `None` when unknown.
pub async fn show(db: &PgPool, id: Uuid) -> Result<Option<(DeadJob, Vec<DeadJobAction>)>, DbError> {
    pool::run(db, move |conn| {
        let Some(dead) = dead_jobs::table
            .find(id)
            .select(DeadJob::as_select())
            .first(conn)
            .optional()?
        else {
            return Ok(None);
        };
        let actions = dead_job_actions::table
            .filter(dead_job_actions::dead_job_id.eq(id))
            .order(dead_job_actions::id.asc())
            .select(DeadJobAction::as_select())
            .load(conn)?;
        Ok(Some((dead, actions)))
    })
    .await
}

/// How to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Replay even if already replayed or discarded.
    pub force: bool,
    /// Check everything, change nothing.
    pub dry_run: bool,
    /// Replace the arguments (validated like a new job's).
    pub args: Option<Value>,
    /// Who asks (recorded in the audit).
    pub actor: String,
    /// The filter of the bulk operation this replay is part of (recorded in the audit).
    pub bulk: Option<Value>,
    /// When it must be over; none: it waits as long as it takes.
    pub deadline: Option<Deadline>,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplayOutcome {
    /// A new job was published.
    Replayed {
        /// The new job's id.
        new_job_id: Uuid,
    },
    /// Dry run: this would have been published.
    WouldReplay {
        /// Task name.
        task: String,
        /// Arguments it would carry.
        args: Value,
    },
    /// Nothing done: already replayed (use force to replay again).
    AlreadyReplayed {
        /// The job the earlier replay created.
        replayed_as: Option<Uuid>,
    },
    /// Nothing done: the record was discarded (use force to replay anyway).
    Discarded,
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No such dead job.
    #[error("no dead job {0}")]
    NotFound(Uuid),
    /// The record holds no envelope to replay: the dead message was not a
    /// readable envelope, or the record kept it only as text that is not a
    /// whole one (cut, in a fallback record). The message is in the
    /// dead-letter queue all the same.
    #[error(
        "dead job {id} holds no replayable envelope (the message was not a readable envelope, or its record kept only a cut copy of it); the message itself is in `{dead_letter_queue}`"
    )]
    Unreadable {
        /// The dead job.
        id: Uuid,
        /// The queue that holds its message.
        dead_letter_queue: String,
    },
    /// Its task is not in this build's catalogue.
    #[error("task `{0}` is not in the catalogue")]
    UnknownTask(String),
    /// The (edited) arguments are invalid.
    #[error("invalid args at {pointer}: {message}")]
    InvalidArgs {
        /// JSON pointer into the job request (`/args/...`).
        pointer: String,
        /// What is wrong.
        message: String,
    },
    /// The broker did not take the new job; nothing was recorded.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The new job's message may have reached its queue (its confirm was lost,
    /// or the transaction failed after it), but nothing was recorded: the job
    /// may run. Replaying again makes that same job (see [`replay`]).
    #[error("{reason}; job {job} may run all the same, and replaying again makes that same job")]
    InDoubt {
        /// The job that may run.
        job: Uuid,
        /// What failed.
        reason: String,
    },
    /// Its [`Deadline`] came before a connection or the record's row lock
    /// (held by another replay or discard) could be had; nothing was done.
    #[error(
        "no time was left to replay dead job {0} (waiting for a database connection or for its row, which another replay or discard held); nothing was done"
    )]
    OutOfTime(Uuid),
    /// The database failed; nothing was recorded.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for ReplayError {
    fn from(err: diesel::result::Error) -> Self {
        Self::Db(DbError::Query(err))
    }
}

/// Replays dead job `id` through `publisher`.
pub async fn replay(
    db: &PgPool,
    publisher: &Publisher,
    topology: &Topology,
    id: Uuid,
    options: ReplayOptions,
) -> Result<ReplayOutcome, ReplayError> {
    let handle = tokio::runtime::Handle::current();
    let (pool, publisher, topology) = (db.clone(), publisher.clone(), topology.clone());
    tokio::task::spawn_blocking(move || {
        let deadline = options.deadline;
        let Some(mut conn) = checkout(&pool, deadline)? else {
            return Err(ReplayError::OutOfTime(id));
        };
        let mut published = None;
        let mut publishing = false;
        let replayed = conn.transaction(|conn| {
            if !bound_lock_waits(conn, deadline)? {
                return Err(ReplayError::OutOfTime(id));
            }
            let dead: DeadJob = dead_jobs::table
                .find(id)
                .select(DeadJob::as_select())
                .for_update()
                .first(conn)
                .optional()?
                .ok_or(ReplayError::NotFound(id))?;
            if dead.replayed_at.is_some() && !options.force {
                return Ok(ReplayOutcome::AlreadyReplayed {
                    replayed_as: dead.replayed_as,
                });
            }
            if dead.discarded_at.is_some() && !options.force {
                return Ok(ReplayOutcome::Discarded);
            }
            let old = replayable_envelope(&dead).ok_or_else(|| ReplayError::Unreadable {
                id,
                dead_letter_queue: topology.dead_letter_queue(&dead.queue),
            })?;
            let task =
                find_task(&old.task).ok_or_else(|| ReplayError::UnknownTask(old.task.clone()))?;
            let edited = options.args.is_some();
            let args = options.args.clone().unwrap_or(old.args.clone());
            task.validate(&args)
                .map_err(|err| ReplayError::InvalidArgs {
                    pointer: err.pointer,
                    message: err.message,
                })?;
            if options.dry_run {
                return Ok(ReplayOutcome::WouldReplay {
                    task: task.name.to_owned(),
                    args,
                });
            }
            let mut fresh = Envelope::new(task.name, args.clone());
            fresh.replay_of = Some(id);
            // The n-th replay of a dead job is always the same job: should a
            // replay whose message was published fail to commit (or its
            // confirm be lost), doing it again makes that job, not a second
            // one, and the key lets a worker take the second message without
            // running the job again.
            let ordinal = dead.replay_count + 1;
            fresh.id = Uuid::new_v5(&id, format!("replay/{ordinal}").as_bytes());
            fresh.idempotency_key = Some(format!("replay:{id}/{ordinal}"));
            diesel::insert_into(jobs::table)
                .values(NewJob::queued(&fresh, &task.options))
                .on_conflict_do_nothing()
                .execute(conn)?;
            diesel::update(dead_jobs::table.find(id))
                .set((
                    dead_jobs::replayed_as.eq(fresh.id),
                    dead_jobs::replayed_at.eq(Utc::now()),
                    dead_jobs::replay_count.eq(dead_jobs::replay_count + 1),
                ))
                .execute(conn)?;
            let mut detail = json!({
                "forced": options.force && dead.replayed_at.is_some(),
                "args": if edited { args } else { Value::Null },
            });
            if let Some(bulk) = &options.bulk {
                detail["bulk"] = bulk.clone();
            }
            diesel::insert_into(dead_job_actions::table)
                .values(NewDeadJobAction {
                    dead_job_id: id,
                    action: "replay".into(),
                    actor: options.actor.clone(),
                    new_job_id: Some(fresh.id),
                    detail,
                })
                .execute(conn)?;
            let message = Outgoing::job(&topology, task.options.queue, &fresh);
            if out_of_time(deadline) {
                return Err(ReplayError::OutOfTime(id));
            }
            publishing = true;
            // Blocking threads may wait on async work; the row lock is held until the confirm.
            let confirmed = handle.block_on(async {
                let publish = publisher.publish(&message);
                match deadline {
                    Some(d) => tokio::time::timeout_at(d.finish_by.into(), publish).await,
                    None => Ok(publish.await),
                }
            });
            let Ok(confirmed) = confirmed else {
                return Err(ReplayError::InDoubt {
                    job: fresh.id,
                    reason: "the broker had not confirmed the new job by the deadline".into(),
                });
            };
            match confirmed {
                Ok(()) => published = Some(fresh.id),
                Err(err) if err.may_have_been_enqueued() => {
                    return Err(ReplayError::InDoubt {
                        job: fresh.id,
                        reason: err.to_string(),
                    });
                }
                Err(err) => return Err(err.into()),
            }
            Ok(ReplayOutcome::Replayed {
                new_job_id: fresh.id,
            })
        });
        match (replayed, published) {
            (Err(ReplayError::Db(err)), Some(job)) => Err(ReplayError::InDoubt {
                job,
                reason: format!("the replay could not be recorded: {err}"),
            }),
            // Rolled back before publishing, its time up: a lock wait ended by
            // `lock_timeout` (PostgreSQL's error does not say so otherwise).
            (Err(ReplayError::Db(_)), None) if !publishing && out_of_time(deadline) => {
                Err(ReplayError::OutOfTime(id))
            }
            (replayed, _) => replayed,
        }
    })
    .await
    .map_err(|err| ReplayError::Db(DbError::Join(err)))?
}

/// The envelope `dead` holds, if any: its `envelope`, or the envelope the
/// worker kept as text in `body` when PostgreSQL refused the record's full
/// form (a fallback record), if that text is a whole, valid envelope. The body
/// of an unreadable message is not one (it failed the same check in the worker).
fn replayable_envelope(dead: &DeadJob) -> Option<Envelope> {
    let from_json = dead
        .envelope
        .clone()
        .and_then(|value| serde_json::from_value(value).ok());
    from_json.or_else(|| {
        let body = dead.body.as_deref()?;
        Envelope::decode(body.as_bytes()).ok()
    })
}

/// What a discard did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardOutcome {
    /// Marked discarded now.
    Discarded,
    /// Dry run: it would have been marked discarded.
    WouldDiscard,
    /// It already was; nothing changed.
    AlreadyDiscarded,
    /// No such dead job.
    NotFound,
}

/// How to discard.
#[derive(Debug, Clone, Default)]
pub struct DiscardOptions {
    /// Who asks (recorded in the audit).
    pub actor: String,
    /// Check, change nothing.
    pub dry_run: bool,
    /// The filter of the bulk operation this discard is part of (recorded in the audit).
    pub bulk: Option<Value>,
    /// When it must be over (only `start_by` counts: nothing is published);
    /// none: it waits as long as it takes.
    pub deadline: Option<Deadline>,
}

/// Why a discard failed; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// Its [`Deadline`] came before a connection or the record's row lock
    /// (held by another replay or discard) could be had.
    #[error(
        "no time was left to discard dead job {0} (waiting for a database connection or for its row, which another replay or discard held); nothing was done"
    )]
    OutOfTime(Uuid),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for DiscardError {
    fn from(err: diesel::result::Error) -> Self {
        Self::Db(DbError::Query(err))
    }
}

/// Marks dead job `id` discarded (hidden from the default listing; never replayed
/// without force) and audits it.
pub async fn discard(db: &PgPool, id: Uuid, actor: String) -> Result<DiscardOutcome, DiscardError> {
    let options = DiscardOptions {
        actor,
        ..Default::default()
    };
    discard_with(db, id, options).await
}

/// [`discard`] with a dry run and the bulk operation recorded in the audit.
pub async fn discard_with(
    db: &PgPool,
    id: Uuid,
    options: DiscardOptions,
) -> Result<DiscardOutcome, DiscardError> {
    let pool = db.clone();
    let deadline = options.deadline;
    let discarded = tokio::task::spawn_blocking(move || {
        let Some(mut conn) = checkout(&pool, deadline)? else {
            return Err(DiscardError::OutOfTime(id));
        };
        conn.transaction(|conn| {
            if !bound_lock_waits(conn, deadline)? {
                return Err(DiscardError::OutOfTime(id));
            }
            let found: Option<Option<DateTime<Utc>>> = dead_jobs::table
                .find(id)
                .select(dead_jobs::discarded_at)
                .for_update()
                .first(conn)
                .optional()?;
            match found {
                None => Ok(DiscardOutcome::NotFound),
                Some(Some(_)) => Ok(DiscardOutcome::AlreadyDiscarded),
                Some(None) if options.dry_run => Ok(DiscardOutcome::WouldDiscard),
                Some(None) => {
                    diesel::update(dead_jobs::table.find(id))
                        .set(dead_jobs::discarded_at.eq(Utc::now()))
                        .execute(conn)?;
                    let detail = match options.bulk {
                        Some(bulk) => json!({ "bulk": bulk }),
                        None => json!({}),
                    };
                    diesel::insert_into(dead_job_actions::table)
                        .values(NewDeadJobAction {
                            dead_job_id: id,
                            action: "discard".into(),
                            actor: options.actor,
                            new_job_id: None,
                            detail,
                        })
                        .execute(conn)?;
                    Ok(DiscardOutcome::Discarded)
                }
            }
        })
    })
    .await
    .map_err(|err| DiscardError::Db(DbError::Join(err)))?;
    match discarded {
        // Rolled back with its time up: a lock wait ended by `lock_timeout`.
        Err(DiscardError::Db(_)) if out_of_time(deadline) => Err(DiscardError::OutOfTime(id)),
        discarded => discarded,
    }
}
