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
//! A redelivered copy whose attempt is `running` waits, checking again every
//! [`RECHECK`] without holding a concurrency slot, while its runner
//! * holds its lock,
//! * has beaten within `monitor.worker_gone_after_ms` and not stopped (a host
//!   that vanished without closing its sockets keeps its session until TCP
//!   gives up, but its heartbeat stops), and
//! * started the attempt less than the task's timeout plus [`OUTCOME_MARGIN`]
//!   ago (an attempt cannot run longer; a runner alive past that lost its
//!   outcome).
//!
//! Once the record moves on (final, `retrying`, a later attempt) the copy is
//! acknowledged without running; once the runner is gone it runs. A worker
//! that gives back a delivery after starting its attempt (stopped for
//! shutdown, or its outcome could not be published) clears its name first
//! ([`release`]), so the copy runs at once.

use std::time::Duration;

use conveyor_schema::pool;
use conveyor_schema::{Envelope, JobState};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Text, Uuid as SqlUuid};
use uuid::Uuid;

use crate::execute::is_stale;
use crate::runtime::Runtime;

/// How often a held copy checks its job's record and runner again.
pub const RECHECK: Duration = Duration::from_millis(500);

/// Beyond its timeout, how long an attempt's outcome may take to be published
/// (the publisher may wait up to 10 s for a reconnection) and committed.
pub const OUTCOME_MARGIN: Duration = Duration::from_secs(60);

/// What to do with a copy of a job, given its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Run it: no record says otherwise.
    Run,
    /// Acknowledge it without running (see `execute::is_stale`).
    Stale,
    /// Hold it: its attempt is running under a worker still alive.
    Wait,
}

const CHECK: &str = "
SELECT state, attempts,
       CASE WHEN state = 'running' AND attempts = $2 AND runner IS NOT NULL
                 AND started_at > now() - $4 * interval '1 millisecond'
                 AND EXISTS (SELECT 1 FROM workers w
                             WHERE w.id = jobs.runner AND w.stopped_at IS NULL
                               AND w.last_seen_at > now() - $3 * interval '1 millisecond')
            THEN NOT pg_try_advisory_xact_lock(hashtextextended(runner, 0))
            ELSE false END AS runner_at_work
FROM jobs WHERE id = $1";

#[derive(QueryableByName)]
struct Recorded {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Bool)]
    runner_at_work: bool,
}

/// The verdict on a copy of `envelope`'s job whose task times out after
/// `timeout`; `keyed` as for [`is_stale`]. `Run` without a record, or when the
/// record cannot be read: running is then the safe side.
pub async fn check(rt: &Runtime, envelope: &Envelope, keyed: bool, timeout: Duration) -> Verdict {
    let id = envelope.id;
    let attempt = i32::try_from(envelope.attempt).unwrap_or(i32::MAX);
    let gone_after = millis(rt.runner_gone_after);
    let attempt_bound = millis(timeout + OUTCOME_MARGIN);
    let found = pool::run(&rt.db, move |conn| {
        diesel::sql_query(CHECK)
            .bind::<SqlUuid, _>(id)
            .bind::<Integer, _>(attempt)
            .bind::<BigInt, _>(gone_after)
            .bind::<BigInt, _>(attempt_bound)
            .get_result::<Recorded>(conn)
            .optional()
    })
    .await;
    match found {
        Ok(Some(recorded)) => {
            let state = JobState::parse(&recorded.state);
            if is_stale(state, recorded.attempts, envelope.attempt, keyed) {
                Verdict::Stale
            } else if recorded.runner_at_work {
                Verdict::Wait
            } else {
                Verdict::Run
            }
        }
        _ => Verdict::Run,
    }
}

/// Takes this worker's lock on `conn` (held until the session ends).
pub fn hold_lock(conn: &mut PgConnection, worker_id: &str) -> QueryResult<()> {
    diesel::sql_query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind::<Text, _>(worker_id)
        .execute(conn)?;
    Ok(())
}

/// Clears this worker's name from job `id`'s running `attempt`, so that the
/// delivery it gives back runs at once elsewhere. Best effort: should it fail,
/// the copy waits until this worker has stopped.
pub async fn release(rt: &Runtime, id: Uuid, attempt: u32) {
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
