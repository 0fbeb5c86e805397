//! Who runs a job's attempt, and whether that worker still lives: what keeps a
//! redelivered copy of a job from running beside the attempt it copies.
//!
//! The broker redelivers a message whenever the channel that held it is gone,
//! and that is not proof the attempt stopped. A worker whose broker connection
//! dropped mid-attempt still runs it, and a draining worker returns a keyed
//! job's second message while the first runs elsewhere. So a job's `running`
//! record names its runner (`jobs.runner`, the worker id), and every worker
//! holds a PostgreSQL advisory lock keyed on its id
//! (`hashtextextended(id, 0)`, session level) on its heartbeat's own
//! connection, from its first heartbeat until it exits (see `heartbeat`). The
//! lock goes with the session: a killed worker's backend sees its socket close
//! and ends, and the lock with it, within milliseconds.
//!
//! A copy that may not be the only one (a redelivery; a keyed job's, a
//! retry's, a delayed job's message, or one returned after the delivery
//! limit: see `execute`) claims its start in one statement ([`claim`]): its
//! record is written `running` under this worker unless the copy is stale or
//! its attempt is running under a worker still at work. Two copies claiming at
//! once are ordered by the row's lock, so only one starts. A redelivered copy
//! whose attempt is running waits, claiming again every [`RECHECK`] without
//! holding a concurrency slot, while its runner
//! * holds its lock,
//! * has beaten within `monitor.worker_gone_after_ms` and not stopped (a host
//!   that vanished without closing its sockets keeps its session until TCP
//!   gives up, but its heartbeat stops), and
//! * started the attempt less than the task's timeout plus [`OUTCOME_MARGIN`]
//!   ago (an attempt cannot run longer; a runner alive past that lost its
//!   outcome).
//!
//! The SQL function `runner_at_work` (created with `jobs.runner`) decides
//! this. Once the record moves on (final, `retrying`, a later attempt) the copy
//! is acknowledged without running; once the runner is gone it runs. A worker that gives back a delivery after
//! starting its attempt (stopped for shutdown, or its outcome could not be
//! published) clears its name first ([`release`]), so the copy runs at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_schema::pool;
use conveyor_schema::{Envelope, JobState};
use diesel::prelude::*;
use diesel::sql_types::{
    BigInt, Bool, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use uuid::Uuid;

use crate::execute::recorded_attempt;
use crate::runtime::Runtime;

/// How often a held copy checks its job's record and runner again.
pub const RECHECK: Duration = Duration::from_millis(500);

/// Beyond its timeout, how long an attempt's outcome may take to be published
/// (the publisher may wait up to 10 s for a reconnection) and committed.
pub const OUTCOME_MARGIN: Duration = Duration::from_secs(60);

/// What to do with a copy of a job, given its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Run it: its attempt is claimed (recorded `running` under this worker).
    Claimed,
    /// Run it unclaimed: the record could not be read or written, and running
    /// is then the safe side (its `running` state goes through the state writer).
    Unclaimed,
    /// Acknowledge it without running (see [`is_stale`]).
    Stale,
    /// Hold it: its attempt is running under a worker still alive.
    Wait,
}

/// A copy's start, claimed in one statement: the row is written `running`
/// under this worker only if the copy is not stale ([`is_stale`]; `$11`
/// is `keyed`) and no live worker runs its attempt. Two copies claiming at
/// once are ordered by the row's lock, so the second sees the first's claim.
const CLAIM: &str = "
INSERT INTO jobs AS j (id, task, queue, state, args, attempts, runs, max_attempts, enqueued_at,
                       started_at, updated_at, producer, runner)
VALUES ($1, $2, $3, 'running', $4, $5, 1, $6, $7, $8, now(), $9, $10)
ON CONFLICT (id) DO UPDATE SET
    state = 'running',
    attempts = EXCLUDED.attempts,
    runs = j.runs + 1,
    started_at = EXCLUDED.started_at,
    finished_at = NULL,
    next_attempt_at = NULL,
    runner = EXCLUDED.runner,
    updated_at = now()
WHERE j.state NOT IN ('succeeded', 'dead')
  AND j.attempts <= EXCLUDED.attempts
  AND NOT (j.attempts = EXCLUDED.attempts
           AND (j.state = 'retrying'
                OR (j.state = 'running'
                    AND ($11 OR runner_at_work(j.runner, j.started_at, $12, $13)))))";

/// What claiming a copy needs besides its envelope.
pub struct Start<'a> {
    /// Logical queue.
    pub queue: &'a str,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The task's timeout per attempt.
    pub timeout: Duration,
    /// A keyed job's first delivery, as for [`is_stale`].
    pub keyed: bool,
    /// When the attempt starts.
    pub started_at: DateTime<Utc>,
    /// The producer that enqueued the job, if the message says.
    pub producer: Option<&'a str>,
}

/// Claims the start of a copy of `envelope`'s job that may not be the only
/// one (see the module header), or says why it may not start.
pub async fn claim(rt: &Runtime, envelope: &Envelope, start: Start<'_>) -> Verdict {
    let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let (id, this, keyed) = (envelope.id, envelope.attempt, start.keyed);
    let gone_after = millis(rt.runner_gone_after);
    let attempt_bound = millis(start.timeout + OUTCOME_MARGIN);
    let claim = diesel::sql_query(CLAIM)
        .bind::<SqlUuid, _>(id)
        .bind::<Text, _>(envelope.task.clone())
        .bind::<Text, _>(start.queue.to_owned())
        .bind::<Jsonb, _>(envelope.args.clone())
        .bind::<Integer, _>(int(this))
        .bind::<Integer, _>(int(start.max_attempts))
        .bind::<Timestamptz, _>(envelope.enqueued_at)
        .bind::<Timestamptz, _>(start.started_at)
        .bind::<Nullable<Text>, _>(start.producer.map(str::to_owned))
        .bind::<Text, _>(rt.runner.to_string())
        .bind::<Bool, _>(keyed)
        .bind::<BigInt, _>(gone_after)
        .bind::<BigInt, _>(attempt_bound);
    let claimed = pool::run(&rt.db, move |conn| claim.execute(conn)).await;
    // Refused: why, from the record as it is now.
    let refused = match claimed {
        Ok(1) => return Verdict::Claimed,
        Ok(_) => recorded_attempt(rt, id).await,
        Err(err) => Err(err),
    };
    match refused {
        Ok(Some((state, attempts))) if is_stale(state, attempts, this, keyed) => Verdict::Stale,
        // Not stale: running elsewhere, or no longer (its worker went between
        // the two statements); held for one recheck, whose claim decides.
        Ok(_) => Verdict::Wait,
        Err(err) => {
            tracing::warn!(error = %err, "could not claim the attempt's start; running it unclaimed");
            Verdict::Unclaimed
        }
    }
}

/// Tries to take this worker's lock on `conn` (held until the session ends);
/// `false` when another session holds it. That can only be an earlier session
/// of this worker's heartbeat that PostgreSQL has not yet seen end (a broken
/// network path): it still says this worker lives, and waiting for it would
/// stop the heartbeat, so the caller tries again at its next beat.
pub fn try_lock(conn: &mut PgConnection, worker_id: &str) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = Bool)]
        locked: bool,
    }
    let row: Locked =
        diesel::sql_query("SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS locked")
            .bind::<Text, _>(worker_id)
            .get_result(conn)?;
    Ok(row.locked)
}

/// Clears this worker's name from job `id`'s running `attempt`, so that the
/// delivery it gives back runs at once elsewhere. The attempt's `running`
/// state may still wait in the state writer (a quick attempt's outcome is
/// known before its start is committed): that goes first. Best effort: should
/// it fail, the copy waits until this worker has stopped.
pub async fn release(rt: &Runtime, id: Uuid, attempt: u32) {
    if !rt.states.flushed().await {
        return;
    }
    let runner = rt.runner.clone();
    let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
    let released = pool::run(&rt.db, move |conn| {
        diesel::sql_query(
            "UPDATE jobs SET runner = NULL
             WHERE id = $1 AND runner = $2 AND state = 'running' AND attempts = $3",
        )
        .bind::<SqlUuid, _>(id)
        .bind::<Text, _>(&*runner)
        .bind::<Integer, _>(attempt)
        .execute(conn)
    })
    .await;
    if let Err(err) = released {
        tracing::warn!(error = %err, "could not clear this worker's name from the attempt it gives back");
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Whether a message of `attempt` is stale, given its job's recorded `state`
/// and `attempts`: the job is final, or a later attempt has started, or this
/// attempt already failed and its retry is on its way (`retrying` is committed
/// only after the next attempt's message is confirmed). With `keyed` (a keyed
/// job's first delivery, which may be a second message of the same attempt),
/// also when this attempt is running. A redelivery must not count `running`:
/// the record may say so because the worker that ran it died, and the
/// redelivery is what finishes it (whether it died is `runner::claim`'s to say). Nor does `running` at an earlier attempt
/// count: a retry's message can arrive before the failed attempt's `retrying`
/// is committed.
fn is_stale(state: Option<JobState>, attempts: i32, attempt: u32, keyed: bool) -> bool {
    let (recorded, this) = (i64::from(attempts), i64::from(attempt));
    let this_attempt_is = |s: JobState| recorded == this && state == Some(s);
    state.is_some_and(JobState::is_final)
        || recorded > this
        || this_attempt_is(JobState::Retrying)
        || (keyed && this_attempt_is(JobState::Running))
}

#[cfg(test)]
mod tests {
    use super::is_stale;
    use conveyor_schema::JobState::{self, *};

    fn stale(state: JobState, attempts: i32, attempt: u32) -> (bool, bool) {
        let redelivered = is_stale(Some(state), attempts, attempt, false);
        let keyed = is_stale(Some(state), attempts, attempt, true);
        (redelivered, keyed)
    }

    #[test]
    fn a_waiting_job_runs() {
        assert_eq!(stale(Queued, 0, 1), (false, false));
        assert!(!is_stale(None, 0, 1, true));
    }

    #[test]
    fn a_finished_job_or_a_later_attempt_makes_any_message_stale() {
        assert_eq!(stale(Succeeded, 1, 1), (true, true));
        assert_eq!(stale(Dead, 3, 1), (true, true));
        assert_eq!(stale(Running, 2, 1), (true, true));
    }

    #[test]
    fn an_attempt_whose_retry_is_committed_does_not_run_again() {
        assert_eq!(stale(Retrying, 1, 1), (true, true));
        // The retry itself runs.
        assert_eq!(stale(Retrying, 1, 2), (false, false));
    }

    #[test]
    fn only_a_keyed_second_message_skips_a_running_attempt() {
        // A redelivery finishes what a dead worker started; a keyed job's
        // second message would run it twice.
        assert_eq!(stale(Running, 1, 1), (false, true));
    }

    #[test]
    fn a_retry_that_overtakes_its_failed_attempts_commit_runs() {
        // The next attempt's message was confirmed before `retrying` was
        // committed: the record still says attempt 1 is running.
        assert_eq!(stale(Running, 1, 2), (false, false));
    }
}
