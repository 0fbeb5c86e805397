//! Time limits for replays and discards, for callers that must answer in
//! time (an HTTP request, whose timeout would otherwise answer for them with
//! a bare 503 after the work was done). A [`Deadline`] ends each wait of one
//! record (a pooled connection, its row lock through `lock_timeout`) at its
//! `start_by`, so a record with no time left is left as it was, and bounds a
//! publish under way by its `finish_by`. Between the two lies the publisher's
//! own confirm wait (`amqp.publish_timeout_ms`, as configured), so a publish
//! that starts in time is confirmed, or given up by the publisher, before the
//! caller must answer.

use std::time::{Duration, Instant};

use conveyor_schema::pool::{CHECKOUT_TIMEOUT, DbError, PgPool, PgPooled};
use diesel::prelude::*;

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
    /// Over `budget` after `began`, for a publisher that waits up to
    /// `publish_timeout` (`amqp.publish_timeout_ms`) for a confirm: nothing
    /// starts in the last `publish_timeout` of it, so a replay that starts
    /// publishing by `start_by` hears from the publisher (confirmed, or timed
    /// out) by `finish_by` and is never cut short by it. Only the publish is
    /// reserved for: a record's other waits (a pooled connection, up to
    /// [`CHECKOUT_TIMEOUT`], its row lock) end at `start_by` themselves, and
    /// the commit after the confirm falls in the time the caller keeps to
    /// answer. A budget no longer than `publish_timeout` starts nothing (the
    /// ingress refuses to start with a request timeout that short).
    pub fn within(began: Instant, budget: Duration, publish_timeout: Duration) -> Self {
        Self {
            start_by: began + budget.saturating_sub(publish_timeout),
            finish_by: began + budget,
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

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_platform::Config;

    /// The budget of a bulk request under a default 30 s request timeout.
    const BUDGET: Duration = Duration::from_secs(28);

    #[test]
    fn the_reserve_is_the_configured_publish_timeout() {
        let began = Instant::now();
        let mut config = Config::default();
        let default = Deadline::within(began, BUDGET, config.publish_timeout());
        assert_eq!(default.finish_by - began, Duration::from_secs(28));
        assert_eq!(default.finish_by - default.start_by, Duration::from_secs(5));

        // A shorter confirm wait leaves more time to start records in.
        config.amqp.publish_timeout_ms = 1_000;
        let short = Deadline::within(began, BUDGET, config.publish_timeout());
        assert_eq!(short.start_by - began, Duration::from_secs(27));

        // A longer one is reserved in full, not a quarter of the budget: a
        // publish started at `start_by` is over by `finish_by`.
        config.amqp.publish_timeout_ms = 12_000;
        let long = Deadline::within(began, BUDGET, config.publish_timeout());
        assert_eq!(long.start_by - began, Duration::from_secs(16));
        assert_eq!(long.finish_by - long.start_by, config.publish_timeout());
    }

    #[test]
    fn a_budget_no_longer_than_the_publish_timeout_starts_nothing() {
        let began = Instant::now() - Duration::from_millis(1);
        let none = Deadline::within(began, Duration::from_secs(4), Duration::from_secs(5));
        assert_eq!(none.start_by, began);
        assert!(none.left().is_none());
        assert!(out_of_time(Some(none)));
    }
}
