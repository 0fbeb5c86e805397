//! Finding what PostgreSQL refuses in a batch of job states.
//!
//! A batch commits as one transaction, so one row PostgreSQL refuses (a value
//! out of its type's range, an index entry too large, a constraint it breaks)
//! fails the whole batch, however often it is sent again. So when a commit
//! fails with an error that may be about the data, the batch is committed in
//! halves, each in its own transaction, and a half that fails is halved
//! again, down to single entries: about 2·log2(n) transactions for one bad
//! entry among n. Halves commit in the batch's order, so what commits is
//! applied as it would have been, less the refused entries.
//!
//! Which errors are about the data? PostgreSQL says so by SQLSTATE class (22
//! data exception, 23 integrity constraint, 54 program limit exceeded; against
//! 08 connection, 40 rollback, 53 insufficient resources, 57 operator
//! intervention), but diesel does not pass the SQLSTATE on: it names a few as a
//! [`DatabaseErrorKind`] and leaves the rest `Unknown`, data errors and
//! transient ones alike. So the kinds that name a transient failure (closed
//! connection, serialization failure, read-only transaction) are retried as
//! before, and any other database error is taken as possibly about the data.
//! An entry failing alone is then refused only if PostgreSQL takes an ordinary
//! write at that moment and the entry fails once more: a [`probe`] (the same
//! statements for a made-up job, rolled back) tells an entry PostgreSQL
//! refuses from a database that refuses everything (disk full, out of memory,
//! a table gone: all `Unknown` to diesel), and the second try tells it from a
//! failure that seldom strikes twice (a deadlock, a lock or statement timeout,
//! `Unknown` too). When the probe fails, the halving stops, and what it did not
//! reach waits for the writer's next attempt. What is left is a transient
//! failure that strikes one entry twice while the probe passes (a statement
//! timeout behind a lock held longer than two timeouts, say): that entry is
//! refused, and dead-lettered with the error, not lost.

use chrono::Utc;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error};
use uuid::Uuid;

use super::{Item, MAX_ERROR_LEN, Pending, StateChange, transaction};
use crate::dead_letters::DeadLetter;

/// What became of one entry of a batch that PostgreSQL refused as a whole.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Fate {
    /// Not reached: a failure that is not about the data stopped the search.
    Pending,
    /// Committed with other entries of the batch, or alone.
    Committed,
    /// Refused on its own, with the database's error message.
    Refused(String),
}

/// Whether `err` may be about the data written rather than about the database
/// or the connection (see the module header).
pub fn about_the_data(err: &Error) -> bool {
    match err {
        Error::DatabaseError(kind, _) => !matches!(
            kind,
            DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::SerializationFailure
                | DatabaseErrorKind::ReadOnlyTransaction
        ),
        // A value diesel could not encode fails the same way every time.
        Error::SerializationError(_) => true,
        _ => false,
    }
}

/// Finds the fate of each of `entries`, which failed together with an error
/// that may be about the data, and commits all PostgreSQL takes; `fates` is
/// in `entries`' order. `Err` with the failure that stopped the search when
/// one is not about the data (or the probe failed): entries it did not reach
/// stay [`Fate::Pending`].
pub(super) fn isolate(
    conn: &mut PgConnection,
    entries: &[Pending],
    fates: &mut [Fate],
) -> Result<(), String> {
    if let [entry] = entries {
        probe(conn, &entry.item)?;
        fates[0] = match transaction(conn, entries) {
            Ok(_) => Fate::Committed,
            Err(err) if about_the_data(&err) => Fate::Refused(message(&err)),
            Err(err) => return Err(err.to_string()),
        };
        return Ok(());
    }
    let (left, right) = entries.split_at(entries.len() / 2);
    let (left_fates, right_fates) = fates.split_at_mut(left.len());
    for (half, fates) in [(left, left_fates), (right, right_fates)] {
        match transaction(conn, half) {
            Ok(_) => fates.fill(Fate::Committed),
            Err(err) if about_the_data(&err) => isolate(conn, half, fates)?,
            Err(err) => return Err(err.to_string()),
        }
    }
    Ok(())
}

/// Whether PostgreSQL takes, now, the write `item` makes with values any job
/// has: the same statements for a made-up job of `item`'s queue and state, in
/// a transaction rolled back. `Err` with its error when it does not.
fn probe(conn: &mut PgConnection, item: &Item) -> Result<(), String> {
    let made_up = Pending {
        item: made_up_like(item),
        done: None,
    };
    let written = conn.transaction(|conn| {
        transaction(conn, std::slice::from_ref(&made_up))?;
        Err::<(), _>(Error::RollbackTransaction)
    });
    match written {
        Err(Error::RollbackTransaction) => Ok(()),
        Err(err) => Err(format!("a probe write failed too: {err}")),
        Ok(()) => Ok(()),
    }
}

/// The task name of [`probe`]'s made-up job.
const PROBE_TASK: &str = "conveyor.probe";

/// An entry of the same shape as `item` (state change and/or dead-job
/// record, same queue and state) for a fresh job with plain values.
fn made_up_like(item: &Item) -> Item {
    let id = Uuid::new_v4();
    let now = Utc::now();
    let change = item.change.as_ref().map(|change| StateChange {
        id,
        task: PROBE_TASK.into(),
        queue: change.queue.clone(),
        args: serde_json::json!({}),
        attempt: 1,
        max_attempts: 1,
        enqueued_at: now,
        state: change.state,
        started_at: change.started_at.map(|_| now),
        finished_at: change.finished_at.map(|_| now),
        error: change.error.as_ref().map(|_| "probe".into()),
        next_attempt_at: change.next_attempt_at.map(|_| now),
        at: now,
        producer: None,
        runner: None,
    });
    let dead = item.dead.as_ref().map(|dead| DeadLetter {
        id,
        task: PROBE_TASK.into(),
        queue: dead.queue.clone(),
        envelope: None,
        body: None,
        attempts: 1,
        reason: "probe".into(),
        x_death: None,
        source: dead.source,
        refused_state: dead.refused_state,
    });
    Item { change, dead }
}

/// `error`'s message, at most [`MAX_ERROR_LEN`] bytes (it may quote a value).
fn message(error: &Error) -> String {
    let mut text = error.to_string();
    let mut cut = MAX_ERROR_LEN.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::DatabaseError(kind, Box::new(message.to_owned()))
    }

    #[test]
    fn transient_kinds_are_not_about_the_data() {
        for kind in [
            DatabaseErrorKind::ClosedConnection,
            DatabaseErrorKind::UnableToSendCommand,
            DatabaseErrorKind::SerializationFailure,
            DatabaseErrorKind::ReadOnlyTransaction,
        ] {
            assert!(!about_the_data(&database(kind, "x")), "{kind:?}");
        }
        assert!(!about_the_data(&Error::BrokenTransactionManager));
        assert!(!about_the_data(&Error::NotFound));
    }

    #[test]
    fn constraint_kinds_and_unknown_errors_may_be_about_the_data() {
        for kind in [
            DatabaseErrorKind::CheckViolation,
            DatabaseErrorKind::NotNullViolation,
            DatabaseErrorKind::UniqueViolation,
            DatabaseErrorKind::ForeignKeyViolation,
            // "index row size … exceeds btree version 4 maximum", "timestamp out of range"
            DatabaseErrorKind::Unknown,
        ] {
            assert!(about_the_data(&database(kind, "x")), "{kind:?}");
        }
        assert!(about_the_data(&Error::SerializationError("x".into())));
    }

    #[test]
    fn a_long_message_is_cut_on_a_character_boundary() {
        let long = database(DatabaseErrorKind::Unknown, &"é".repeat(MAX_ERROR_LEN));
        let text = message(&long);
        assert_eq!(text.len(), MAX_ERROR_LEN);
        assert!(text.chars().all(|c| c == 'é'));
    }
}
