//! The database side of a group commit: one thread per batch in flight, each
//! owning one long-lived connection.
//!
//! A batch needs a transaction held open while its messages are confirmed, so
//! it occupies a connection and a blocking thread for its whole life. Keeping
//! both for good (rather than a `spawn_blocking` and a pool checkout per batch)
//! saves a thread hand-off and the pool's `SELECT 1` ping per batch: the
//! transaction's own `BEGIN` is the proof that the database is there before
//! anything is published. A kept connection that died since its last batch (a
//! database restart) fails that `BEGIN`; the lane then connects afresh,
//! trying for as long as a pool checkout would, which is safe because
//! nothing has been published yet.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_schema::db::jobs;
use conveyor_schema::models::NewJob;
use conveyor_schema::pool::{CHECKOUT_TIMEOUT, dedicated_url};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::insert::insert_records;

/// What the async side tells the open transaction: commit without these ids
/// (those of them that the batch created), or roll back.
pub(super) enum Decision {
    CommitWithout(Vec<Uuid>),
    RollBack,
}

/// One batch's database work and the signals it exchanges with the async side.
pub(super) struct Work {
    pub records: Arc<Vec<NewJob>>,
    /// `Ok` once `BEGIN` succeeded: publishing may start.
    pub began: oneshot::Sender<Result<(), String>>,
    /// The insert's outcome (rows in, not yet committed).
    pub inserted: oneshot::Sender<Result<(), String>>,
    /// Read after the insert; the transaction stays open until it arrives.
    pub decision: Receiver<Decision>,
    /// `Ok` once committed (or rolled back as decided).
    pub finished: oneshot::Sender<Result<(), String>>,
}

/// Hands batches to idle lane threads. The threads end when this is dropped.
pub(super) struct Lanes {
    work: Sender<Work>,
}

impl Lanes {
    /// Starts `count` threads that connect to `database_url` on their first batch.
    pub fn start(database_url: &str, count: usize) -> std::io::Result<Self> {
        let (work, queue) = channel::<Work>();
        let queue = Arc::new(Mutex::new(queue));
        let url = lane_url(database_url);
        for index in 0..count.max(1) {
            let (queue, url) = (queue.clone(), url.clone());
            std::thread::Builder::new()
                .name(format!("recorder-lane-{index}"))
                .spawn(move || serve(&queue, &url))?;
        }
        Ok(Self { work })
    }

    /// Queues `work` for the next idle lane. Should every lane have ended, the
    /// work is dropped, and its `began` says so by closing.
    pub fn submit(&self, work: Work) {
        let _ = self.work.send(work);
    }
}

/// The name lanes show in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "conveyor-recorder";

/// `url` for a lane's connection (see [`dedicated_url`]).
pub(super) fn lane_url(url: &str) -> String {
    dedicated_url(url, APPLICATION_NAME)
}

fn serve(queue: &Mutex<Receiver<Work>>, url: &str) {
    let mut connection: Option<PgConnection> = None;
    loop {
        let next = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(work) = next else { return };
        // A panic fails this batch only (its signals close, so its submitters
        // get 503); the lane lives on for the next one.
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| run(&mut connection, url, work)))
                .unwrap_or_else(|_| Err("the batch's database work panicked".into()));
        if let Err(failed) = outcome {
            // Whatever went wrong, the next batch starts on a fresh connection
            // (the server rolls back what this one left open).
            tracing::debug!(error = %failed, "recorder lane drops its connection");
            connection = None;
        }
    }
}

/// Runs one batch's transaction; `Err` when its connection should not be reused.
fn run(slot: &mut Option<PgConnection>, url: &str, work: Work) -> Result<(), String> {
    let Work {
        records,
        began,
        inserted,
        decision,
        finished,
    } = work;
    let conn = match begin(slot, url) {
        Ok(conn) => conn,
        Err(err) => {
            let _ = began.send(Err(err.clone()));
            return Err(err);
        }
    };
    let _ = began.send(Ok(()));
    let existing = match insert_records(conn, &records) {
        Ok(existing) => existing,
        Err(err) => {
            let err = err.to_string();
            let _ = inserted.send(Err(err.clone()));
            return Err(err);
        }
    };
    let _ = inserted.send(Ok(()));
    let outcome = match decision.recv() {
        Ok(Decision::CommitWithout(failed)) => {
            // A row that was there before (an earlier, accepted submission of
            // the same job, or the worker's) is not this batch's to remove.
            let created: Vec<Uuid> = failed
                .into_iter()
                .filter(|id| !existing.contains(id))
                .collect();
            if created.is_empty() {
                Ok(())
            } else {
                diesel::delete(jobs::table.filter(jobs::id.eq_any(created)))
                    .execute(conn)
                    .map(|_| ())
            }
        }
        .and_then(|()| conn.batch_execute("COMMIT")),
        Ok(Decision::RollBack) | Err(_) => conn.batch_execute("ROLLBACK"),
    }
    .map_err(|err| err.to_string());
    let _ = finished.send(outcome.clone());
    outcome
}

/// `BEGIN` on the kept connection, or on a new one when there is none or it died.
fn begin<'c>(
    slot: &'c mut Option<PgConnection>,
    url: &str,
) -> Result<&'c mut PgConnection, String> {
    if let Some(conn) = slot.as_mut()
        && conn.batch_execute("BEGIN").is_ok()
    {
        return Ok(slot.as_mut().expect("checked above"));
    }
    *slot = None;
    // Like a pool checkout, keep trying for a while: a database that is
    // restarting is usually back within seconds, and a request that waits
    // that long is better served than one refused at once.
    let deadline = Instant::now() + CHECKOUT_TIMEOUT;
    let mut pause = Duration::from_millis(50);
    loop {
        let opened = PgConnection::establish(url)
            .map_err(|err| err.to_string())
            .and_then(|mut conn| match conn.batch_execute("BEGIN") {
                Ok(()) => Ok(conn),
                Err(err) => Err(err.to_string()),
            });
        match opened {
            Ok(conn) => return Ok(slot.insert(conn)),
            Err(err) if Instant::now() + pause >= deadline => return Err(err),
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lane_url;

    #[test]
    fn a_lane_names_its_connection() {
        assert_eq!(
            lane_url("postgres://h/db"),
            "postgres://h/db?connect_timeout=5&application_name=conveyor-recorder"
        );
    }
}
