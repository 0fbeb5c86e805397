//! Recording again the jobs whose messages the broker confirmed but whose
//! batch's transaction then failed.
//!
//! Such a job will run: its message is in the queue. Answering 503 would leave
//! its submitter in doubt, and a retry would make a second job. A database
//! that failed mid-batch (a restart, a failover) is usually back within
//! seconds, so these records are written again, each attempt on a fresh
//! connection and in one statement, for up to `ingress.rerecord_within_ms`.
//! Their submitters wait for the outcome: a 202 once written (the record and
//! the confirmed message then both exist), else the in-doubt 503. The statement
//! is the group commit's own insert, which keeps whatever a worker wrote
//! first, and which is a no-op if the failed `COMMIT` had in fact reached the
//! server.

use std::time::{Duration, Instant};

use conveyor_schema::models::NewJob;
use diesel::{Connection, PgConnection};

use super::insert::insert_records;

/// Writes `records` on a fresh connection to `url`, trying again with backoff
/// for up to `within`; the last error if none succeeded.
pub(super) async fn rerecord(
    url: String,
    records: Vec<NewJob>,
    within: Duration,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + within;
        let mut pause = Duration::from_millis(50);
        loop {
            let written = PgConnection::establish(&url)
                .map_err(|err| err.to_string())
                .and_then(|mut conn| {
                    insert_records(&mut conn, &records).map_err(|err| err.to_string())
                });
            match written {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() + pause >= deadline => return Err(err),
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    })
    .await
    .unwrap_or_else(|err| Err(err.to_string()))
}
