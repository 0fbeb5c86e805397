//! Handling one record of `conveyor dlq replay|discard` when the database fails
//! on it: is it refusing that record, or failing for every record alike?
//!
//! PostgreSQL may refuse one record's data (a value its type cannot hold, a
//! constraint or a trigger it breaks): that fails the same way however often
//! it is tried, so an `--all-matching` run that stopped there would stop there
//! again when carried on, and never reach the records after it. Or the
//! database may be failing (down, read-only after a failover, out of disk):
//! then the next records would fail alike, and the run should stop and say
//! where to carry on. diesel does not pass PostgreSQL's SQLSTATE on, so the
//! two are told apart as the worker tells a job state PostgreSQL refuses
//! ([`conveyor_worker::about_the_data`]): an error of a kind that names a
//! transient failure is the database's; any other is tried once more (a
//! deadlock or a lock timeout seldom strikes twice), and when it fails again
//! while the database answers a probe query ([`probe`]), it is the
//! record's: reported, counted as failed, and passed over.

use conveyor_schema::pool::{self, DbError, PgPool};
use conveyor_worker::about_the_data;

/// What came of trying one record.
pub(super) enum Tried<T, E> {
    /// The operation's outcome, database failures not about the record included.
    Done(Result<T, E>),
    /// Failed twice with an error that may be about the record's data, while
    /// the database answered a probe: that record's failure.
    Refused(E),
    /// Failed twice so, and the probe failed too: the database is failing.
    Outage {
        /// The record's second failure.
        error: E,
        /// The probe's.
        probe: DbError,
    },
}

/// Runs `attempt` on one record, and once more when it fails with a database
/// error that may be about the record (`db_error` picks out a database error);
/// see the module header.
pub(super) async fn twice<T, E>(
    db: &PgPool,
    mut attempt: impl AsyncFnMut() -> Result<T, E>,
    db_error: fn(&E) -> Option<&DbError>,
) -> Tried<T, E> {
    match attempt().await {
        Err(err) if db_error(&err).is_some_and(about_the_record) => {}
        first => return Tried::Done(first),
    }
    let error = match attempt().await {
        Err(err) if db_error(&err).is_some_and(about_the_record) => err,
        second => return Tried::Done(second),
    };
    match probe(db).await {
        Ok(()) => Tried::Refused(error),
        Err(probe) => Tried::Outage { error, probe },
    }
}

/// Whether the database answers a plain query now: a pooled checkout, which
/// pings its connection (`SELECT 1`, see [`pool::pool`]). After a record
/// failed twice with an error that may be about its data, `Ok` says the
/// failure is that record's, `Err` (with the probe's failure) that the
/// database is failing for every record alike.
async fn probe(db: &PgPool) -> Result<(), DbError> {
    pool::run(db, |_| Ok(())).await
}

/// Whether `err` may be PostgreSQL refusing the record's data rather than the
/// database or the connection failing.
fn about_the_record(err: &DbError) -> bool {
    matches!(err, DbError::Query(err) if about_the_data(err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind, Error};

    #[test]
    fn only_query_errors_that_may_be_about_the_data_are_the_records() {
        let query = |kind| DbError::Query(Error::DatabaseError(kind, Box::new("x".to_owned())));
        assert!(about_the_record(&query(DatabaseErrorKind::Unknown)));
        assert!(about_the_record(&query(DatabaseErrorKind::CheckViolation)));
        assert!(!about_the_record(&query(
            DatabaseErrorKind::ReadOnlyTransaction
        )));
        assert!(!about_the_record(&query(
            DatabaseErrorKind::ClosedConnection
        )));
    }
}
