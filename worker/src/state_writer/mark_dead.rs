//! Bringing to `dead` the row of a job whose own state PostgreSQL refused.
//!
//! When PostgreSQL refuses a job's state change for what it holds, the job is
//! dead-lettered and its `dead_jobs` record is written without that change
//! (see `dead_letters::commit`). Its `jobs` row would otherwise keep its last
//! committed state, `running` or `queued`, for ever: the status API, the
//! dashboard and the monitor would show a job that is not running. So with a
//! record that stands in for a refused state ([`DeadLetter::refused_state`]),
//! the writer also brings the row to `dead` in a form that holds none of the
//! refused data: state `dead`, finished and updated now, no next attempt, and
//! a fixed text naming the refusal as its last error (the database's own
//! message, which may quote the refused value, stays in the record). A row
//! already final (`succeeded`, `dead`) or at a later attempt is left alone.
//!
//! It runs in the record's transaction, right after the record, under a
//! savepoint, and is tried twice (a deadlock or a lock timeout passes): should
//! PostgreSQL refuse it both times, the refusal is logged and the record
//! commits without it.

use conveyor_schema::JobState;
use diesel::prelude::*;
use diesel::sql_types::{Int4, Text, Uuid as SqlUuid};

use super::isolate::about_the_data;
use crate::dead_letters::DeadLetter;

const MARK_DEAD: &str = "
UPDATE jobs
SET state = 'dead', finished_at = now(), updated_at = now(), next_attempt_at = NULL, last_error = $2
WHERE id = $1 AND state NOT IN ('succeeded', 'dead') AND attempts <= $3";

/// The last error of a job marked `dead` because its `refused` state was
/// refused: fixed text, so that it holds nothing PostgreSQL could refuse. A
/// `dead` state is refused together with its record, so the refusal may have
/// been the record's alone; the text does not claim which.
fn last_error(refused: JobState) -> String {
    match refused {
        JobState::Dead => "the database refused this job's `dead` state with its dead-job record; \
             that record holds the reason"
            .to_owned(),
        other => format!(
            "the database refused this job's `{}` state; its dead-job record holds the reason",
            other.as_str()
        ),
    }
}

/// Marks the job of `record` `dead` when the record stands in for a refused
/// state (see the module header). `Err` only for a failure that is not about
/// the data (the transaction is then retried as a whole); a refusal is logged.
pub(super) fn mark_dead(conn: &mut PgConnection, record: &DeadLetter) -> QueryResult<()> {
    let Some(refused) = record.refused_state else {
        return Ok(());
    };
    let mark = |conn: &mut PgConnection| {
        conn.transaction(|conn| {
            diesel::sql_query(MARK_DEAD)
                .bind::<SqlUuid, _>(record.id)
                .bind::<Text, _>(last_error(refused))
                .bind::<Int4, _>(i32::try_from(record.attempts).unwrap_or(i32::MAX))
                .execute(conn)
        })
    };
    // A second try before a failure counts as a refusal: a deadlock or a lock
    // timeout passes, a refusal of the data does not.
    let marked = mark(conn).or_else(|err| {
        if about_the_data(&err) {
            mark(conn)
        } else {
            Err(err)
        }
    });
    match marked {
        Ok(_) => Ok(()),
        Err(err) if about_the_data(&err) => {
            tracing::error!(job.id = %record.id, error = %err, "PostgreSQL refused to mark as dead a job whose state it refused; its row keeps its last committed state");
            Ok(())
        }
        Err(err) => Err(err),
    }
}
