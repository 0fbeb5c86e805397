//! Time limits for replays and discards, for callers that must answer in
//! time (an HTTP request, whose timeout would otherwise answer for them with
//! a bare 503 after the work was done). A [`Deadline`] ends each wait of one
//! record (a pooled connection, its row lock through `lock_timeout`) at its
//! `start_by`, so a record with no time left is left as it was, and bounds a
//! publish under way by its `finish_by`.

use std::time::{Duration, Instant};

use conveyor_schema::pool::{CHECKOUT_TIMEOUT, DbError, PgPool, PgPooled};
use diesel::prelude::*;

/// The time a publish may take to be confirmed: the default
/// `amqp.publish_timeout_ms`. Nothing starts in the last this-long of a
/// [`Deadline`] (or its last quarter, when that is shorter).
pub const PUBLISH_RESERVE: Duration = Duration::from_secs(5);

/// When a replay or discard must be over, for a caller that cannot wait for
/// ever (an HTTP request, whose timeout would otherwise answer for it).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// Change nothing after this: waiting for a connection or for the record's
    /// row lock ends here, and a replay that is not publishing yet gives up,
    /// having done nothing.
    pub start_by: Instant,
    /// A publish under way waits for the broker's confirm until this at most;
    /// unconfirmed then, the replay is in doubt (doing it again makes the same job).
    pub finish_by: Instant,
}

impl Deadline {
    /// Over `budget` after `began`; nothing starts in its last
    /// [`PUBLISH_RESERVE`] (or last quarter), the time left for a confirm.
    pub fn within(began: Instant, budget: Duration) -> Self {
        let finish_by = began + budget;
        Self {
            start_by: finish_by - PUBLISH_RESERVE.min(budget / 4),
            finish_by,
        }
    }

    /// The time left to start in; `None` once `start_by` has passed.
    pub fn left(&self) -> Option<Duration> {
        self.start_by
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
    }
}

/// Whether `deadline` (if any) leaves no time to start anything.
pub(super) fn out_of_time(deadline: Option<Deadline>) -> bool {
    deadline.is_some_and(|d| d.left().is_none())
}

/// A pooled connection, waited for no longer than `deadline` leaves;
/// `Ok(None)` when that time ran out first.
pub(super) fn checkout(
    db: &PgPool,
    deadline: Option<Deadline>,
) -> Result<Option<PgPooled>, DbError> {
    let Some(deadline) = deadline else {
        return Ok(Some(db.get()?));
    };
    let Some(left) = deadline.left() else {
        return Ok(None);
    };
    match db.get_timeout(left.min(CHECKOUT_TIMEOUT)) {
        Ok(conn) => Ok(Some(conn)),
        Err(_) if deadline.left().is_none() => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Ends every lock wait of the current transaction by `deadline`'s
/// `start_by` (`lock_timeout`); false when no time is left.
pub(super) fn bound_lock_waits(
    conn: &mut PgConnection,
    deadline: Option<Deadline>,
) -> QueryResult<bool> {
    use diesel::connection::SimpleConnection;
    let Some(deadline) = deadline else {
        return Ok(true);
    };
    let Some(left) = deadline.left() else {
        return Ok(false);
    };
    // Rounded up: a wait that times out ends at or after `start_by`, so it is
    // told from other failures by the time.
    let ms = left.as_micros().div_ceil(1_000).max(1);
    conn.batch_execute(&format!("SET LOCAL lock_timeout = {ms}"))?;
    Ok(true)
}
