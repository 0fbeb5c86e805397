//! The PostgreSQL pool type and the one way to use it from async code.
//!
//! It lives in the contract crate because ingress, worker and task code all
//! share it, and tasks may not depend on the AMQP/HTTP plumbing.
//!
//! Diesel is synchronous; every call goes through [`run`], which borrows a pooled
//! connection on tokio's blocking thread pool so the async executor never waits
//! on the database. A blocking call cannot be stopped once it started, so work
//! whose caller may give up on it (a task's attempt cut off by its timeout)
//! goes through [`run_cancel_on_drop`], which has PostgreSQL cancel it instead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::{PgConnection, RunQueryDsl};

/// The shared connection pool.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;
/// A connection borrowed from [`PgPool`].
pub type PgPooled = PooledConnection<ConnectionManager<PgConnection>>;

/// Why a database call could not be made or failed.
///
/// `Unavailable` and `Join` say their cause in their own text and do not also
/// give it as their `source`, so an error chain printed whole (`{:#}`) names
/// it once.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had from the pool in time (database down or pool exhausted).
    #[error("database unavailable: {0}")]
    Unavailable(diesel::r2d2::PoolError),
    /// The query failed.
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    /// The blocking task panicked or was cancelled.
    #[error("database task failed: {0}")]
    Join(tokio::task::JoinError),
}

impl From<diesel::r2d2::PoolError> for DbError {
    fn from(err: diesel::r2d2::PoolError) -> Self {
        Self::Unavailable(err)
    }
}

impl From<tokio::task::JoinError> for DbError {
    fn from(err: tokio::task::JoinError) -> Self {
        Self::Join(err)
    }
}

/// How long a checkout waits for a connection before the caller hears the
/// database is unavailable. Other code that connects on its own (the ingress's
/// recorder lanes) waits as long, so both fail alike.
pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// `url` for a connection a process holds on its own, outside the pool,
/// unless the URL says otherwise: a connection attempt gives up after
/// [`CHECKOUT_TIMEOUT`], like a checkout, and the connection is named
/// `application_name` in `pg_stat_activity`.
pub fn dedicated_url(url: &str, application_name: &str) -> String {
    let mut url = url.to_owned();
    let timeout = CHECKOUT_TIMEOUT.as_secs().to_string();
    for (key, value) in [
        ("connect_timeout", timeout.as_str()),
        ("application_name", application_name),
    ] {
        if !url.contains(&format!("{key}=")) {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("{key}={value}"));
        }
    }
    url
}

/// Builds a pool without waiting for a first connection, so a process can start
/// while the database is still coming up; `/readyz` reports when it answers.
///
/// Each checkout pings the connection (`SELECT 1`, one round trip) and replaces
/// it when the ping fails. Without that, a database restart or failover would
/// leave every pooled connection dead: Diesel reports a `PgConnection` as broken
/// only when its transaction state is, so r2d2 would hand the dead sockets out
/// again and again until they aged out. Callers batch their writes, so the
/// ping costs little next to the work of a checkout.
pub fn pool(url: &str, size: u32) -> PgPool {
    let manager = ConnectionManager::<PgConnection>::new(url);
    Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(CHECKOUT_TIMEOUT)
        .test_on_check_out(true)
        .build_unchecked(manager)
}

/// Runs `f` with a pooled connection on the blocking thread pool.
pub async fn run<T, F>(pool: &PgPool, f: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce(&mut PgConnection) -> Result<T, diesel::result::Error> + Send + 'static,
{
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = pool.get()?;
        Ok(f(&mut conn)?)
    })
    .await?
}

/// Like [`run`], except that when the returned future is dropped before `f`
/// returns (the attempt that awaited it timed out, say), PostgreSQL cancels
/// the statement `f` is running (`pg_cancel_backend`), and any it starts
/// after, until `f` returns. Under [`run`], `f` would run on unseen on its
/// blocking thread, holding its connection, its locks and the database's time.
///
/// One round trip more than [`run`] (the backend's pid). Not for writes whose
/// caller may already have answered "in doubt": those must be left to finish.
pub async fn run_cancel_on_drop<T, F>(pool: &PgPool, f: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce(&mut PgConnection) -> Result<T, diesel::result::Error> + Send + 'static,
{
    let backend = Arc::new(Mutex::new(Backend::Starting));
    let mut guard = CancelOnDrop {
        pool: pool.clone(),
        backend: Arc::clone(&backend),
        armed: true,
    };
    let pool = pool.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut conn = pool.get()?;
        // Declared after `conn`, so dropped before it, a panic included: the
        // call is `Finished` before its connection can serve anyone else.
        let finish = Finish(&backend);
        let session = diesel::sql_query(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        )
        .get_result::<Session>(&mut conn)?;
        *lock(&backend) = Backend::Running(session);
        let result = f(&mut conn);
        // Marked finished while the connection is still this call's: a
        // canceller holding the lock has sent its cancel by then, and one
        // that takes it after sees `Finished`, so no cancel can reach the
        // connection's next user.
        drop(finish);
        Ok(result?)
    })
    .await;
    guard.armed = false;
    result?
}

/// A server session: its pid, and when it started, so that a cancel meant
/// for it cannot reach a later session that reuses the pid.
#[derive(Clone, PartialEq, diesel::QueryableByName)]
struct Session {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    backend_start: chrono::DateTime<chrono::Utc>,
}

/// What the connection of a [`run_cancel_on_drop`] call is doing.
enum Backend {
    /// `f` has not got its connection yet.
    Starting,
    /// `f` runs in this session.
    Running(Session),
    /// `f` returned.
    Finished,
}

fn lock(backend: &Mutex<Backend>) -> std::sync::MutexGuard<'_, Backend> {
    backend
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Marks the call finished when `f` returns, fails or panics.
struct Finish<'a>(&'a Mutex<Backend>);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        *lock(self.0) = Backend::Finished;
    }
}

/// Cancels the call's statements from a thread of its own when the call's
/// future is dropped before it finished.
struct CancelOnDrop {
    pool: PgPool,
    backend: Arc<Mutex<Backend>>,
    armed: bool,
}

/// How often a dropped call's backend is cancelled again until `f` returns.
const CANCEL_EVERY: Duration = Duration::from_millis(50);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let pool = self.pool.clone();
        let backend = Arc::clone(&self.backend);
        std::thread::spawn(move || cancel_until_finished(&pool, &backend));
    }
}

/// Cancels the call's statements every [`CANCEL_EVERY`] until it finished,
/// or until its closure is gone without running (the runtime shut down).
fn cancel_until_finished(pool: &PgPool, backend: &Arc<Mutex<Backend>>) {
    loop {
        let target = match &*lock(backend) {
            Backend::Finished => return,
            Backend::Starting => None,
            Backend::Running(session) => Some(session.clone()),
        };
        if Arc::strong_count(backend) == 1 {
            return;
        }
        if let Some(target) = target {
            // A connection first, outside the lock, so that the call is never
            // held from finishing while the pool has none to spare.
            match pool.get() {
                Ok(mut conn) => {
                    let state = lock(backend);
                    match &*state {
                        Backend::Running(session) if *session == target => {
                            if let Err(error) = diesel::sql_query(
                                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
                                 WHERE pid = $1 AND backend_start = $2",
                            )
                            .bind::<diesel::sql_types::Integer, _>(target.pid)
                            .bind::<diesel::sql_types::Timestamptz, _>(target.backend_start)
                            .execute(&mut conn)
                            {
                                tracing::warn!(%error, backend.pid = target.pid, "could not cancel an abandoned database call; retrying");
                            }
                        }
                        _ => return,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, backend.pid = target.pid, "no connection to cancel an abandoned database call with; retrying");
                }
            }
        }
        std::thread::sleep(CANCEL_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::dedicated_url;

    #[test]
    fn a_timeout_and_a_name_are_added_unless_the_url_has_them() {
        assert_eq!(
            dedicated_url("postgres://h/db", "me"),
            "postgres://h/db?connect_timeout=5&application_name=me"
        );
        assert_eq!(
            dedicated_url(
                "postgres://h/db?sslmode=disable&application_name=mine",
                "me"
            ),
            "postgres://h/db?sslmode=disable&application_name=mine&connect_timeout=5"
        );
        assert_eq!(
            dedicated_url("postgres://h/db?connect_timeout=1", "me"),
            "postgres://h/db?connect_timeout=1&application_name=me"
        );
    }
}
