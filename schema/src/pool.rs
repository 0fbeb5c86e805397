//! The PostgreSQL pool type and the one way to use it from async code.
//!
//! It lives in the contract crate because ingress, worker and task code all
//! share it, and tasks may not depend on the AMQP/HTTP plumbing.
//!
//! Diesel is synchronous; every call goes through [`run`], which borrows a pooled
//! connection on tokio's blocking thread pool so the async executor never waits
//! on the database.

use std::time::Duration;

use diesel::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};

/// The shared connection pool.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;
/// A connection borrowed from [`PgPool`].
pub type PgPooled = PooledConnection<ConnectionManager<PgConnection>>;

/// Why a database call could not be made or failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had from the pool in time (database down or pool exhausted).
    #[error("database unavailable: {0}")]
    Unavailable(#[from] diesel::r2d2::PoolError),
    /// The query failed.
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    /// The blocking task panicked or was cancelled.
    #[error("database task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// How long a checkout waits for a connection before the caller hears the
/// database is unavailable. Other code that connects on its own (the ingress's
/// recorder lanes) waits as long, so both fail alike.
pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

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
