//! Embedded schema migrations and the checks around them.
//!
//! `conveyor migrate run` creates the database when missing, then takes a
//! session advisory lock so that many instances starting at once run the
//! migrations exactly once (the others wait, then find nothing pending). After
//! the lock is held, `lock_timeout` makes a migration that is blocked by live
//! traffic fail fast with a clear message instead of hanging a deploy.
//! `ingress` and `worker` call [`ensure_current`] and refuse to start on a
//! database that is behind or ahead of this binary.
//!
//! A migration that runs outside a transaction (`run_in_transaction = false`,
//! used only for `CREATE`/`DROP INDEX CONCURRENTLY`) runs without that
//! timeout: such a build takes no lock that queues traffic, but waits for
//! every transaction older than it to end, and a rollup or report open for
//! longer than `lock_timeout` would make it fail for nothing. A failed build
//! leaves an INVALID index of its name behind; when the rerun then stops at
//! "already exists" on an INVALID index nobody is building, the runner drops
//! that index and runs the migration again, so a plain rerun just works.

use std::collections::BTreeSet;

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::migration::{Migration, MigrationVersion};
use diesel::pg::Pg;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use secrecy::ExposeSecret;

use crate::config::DatabaseConfig;

/// Every migration this binary carries.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// Arbitrary but fixed: the advisory-lock key that serialises migration runs.
const MIGRATION_LOCK_KEY: i64 = 0x636f_6e76_6579;

/// A migration command that failed, said in one line.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to the database: {0}")]
    Connect(#[from] diesel::ConnectionError),
    /// A statement failed; the message says which migration when known.
    #[error("{0}")]
    Failed(String),
    /// The database is ahead of this binary and `database.allow_newer_schema` is off.
    #[error(
        "the database has migration(s) this binary does not know ({0}): a newer release migrated it; \
         run that release, or set database.allow_newer_schema = true (CONVEYOR_DATABASE_ALLOW_NEWER_SCHEMA) \
         to run this one on the expanded schema"
    )]
    Unknown(String),
    /// The database is behind this binary.
    #[error("the database has {0} pending migration(s) ({1}); run `conveyor migrate run` first")]
    Pending(usize, String),
}

/// One migration and whether it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// The migration's version (the folder name's date-and-number prefix plus name).
    pub version: String,
    /// Applied in the database.
    pub applied: bool,
}

fn failed(context: &str, err: impl std::fmt::Display) -> MigrationError {
    let text = err.to_string();
    let hint = if text.contains("lock timeout") {
        " (a table is locked by running traffic; stop workers or retry when quieter, \
         or raise database.lock_timeout_ms for this run)"
    } else {
        ""
    };
    MigrationError::Failed(format!("{context}: {text}{hint}"))
}

/// Creates the configured database if it does not exist (tolerating a
/// concurrent creator).
pub fn create_database_if_missing(config: &DatabaseConfig) -> Result<(), MigrationError> {
    let url = url::Url::parse(config.url.expose_secret())
        .map_err(|e| MigrationError::Failed(format!("database.url: {e}")))?;
    let name = url.path().trim_start_matches('/').to_owned();
    if PgConnection::establish(url.as_str()).is_ok() {
        return Ok(());
    }
    let mut admin_url = url.clone();
    admin_url.set_path("/postgres");
    let mut admin = PgConnection::establish(admin_url.as_str())?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match admin.batch_execute(&format!("CREATE DATABASE {quoted}")) {
        Ok(()) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        Err(err) if err.to_string().contains("already exists") => Ok(()),
        Err(err) => Err(failed("create database", err)),
    }
}

fn connect(config: &DatabaseConfig) -> Result<PgConnection, MigrationError> {
    Ok(PgConnection::establish(config.url.expose_secret())?)
}

/// Runs every pending migration under the advisory lock; returns the versions applied.
pub fn run_pending(config: &DatabaseConfig) -> Result<Vec<String>, MigrationError> {
    run_pending_from(config, MIGRATIONS)
}

/// [`run_pending`] with the migrations of `source` instead of the embedded
/// ones (tests plant failing migrations this way).
///
/// Each migration runs in its own transaction (unless its metadata says
/// `run_in_transaction = false`), one after the other, so a failure leaves
/// the ones before it applied, the failing one and those after it pending, and
/// nothing of the failing one behind (but for an INVALID index of a failed
/// `CONCURRENTLY` build, which the next run drops and builds again). The
/// error names the failing migration.
pub fn run_pending_from<S: MigrationSource<Pg>>(
    config: &DatabaseConfig,
    source: S,
) -> Result<Vec<String>, MigrationError> {
    create_database_if_missing(config)?;
    let mut conn = connect(config)?;
    with_lock(&mut conn, config, |conn| {
        let pending = conn
            .pending_migrations(source)
            .map_err(|e| failed("reading pending migrations", e))?;
        let mut applied = Vec::with_capacity(pending.len());
        for migration in &pending {
            let version = if migration.metadata().run_in_transaction() {
                conn.run_migration(migration.as_ref())
                    .map_err(|e| failed("migration failed", e))?
            } else {
                run_outside_transaction(conn, config, migration.as_ref())?
            };
            applied.push(version.to_string());
        }
        Ok(applied)
    })
}

/// Runs a `run_in_transaction = false` migration with no `lock_timeout`, and
/// once more after dropping the INVALID index of a failed earlier build that
/// stopped it with "already exists".
fn run_outside_transaction(
    conn: &mut PgConnection,
    config: &DatabaseConfig,
    migration: &dyn Migration<Pg>,
) -> Result<MigrationVersion<'static>, MigrationError> {
    conn.batch_execute("SET lock_timeout = 0")
        .map_err(|e| failed("clearing lock_timeout", e))?;
    let mut result = conn.run_migration(migration);
    if let Err(err) = &result
        && let Some(index) = invalid_leftover(conn, &err.to_string())?
    {
        tracing::warn!(
            migration = %migration.name(),
            %index,
            "dropping the INVALID index a failed CONCURRENTLY build left behind, then running the migration again"
        );
        conn.batch_execute(&format!("DROP INDEX CONCURRENTLY {index}"))
            .map_err(|e| failed(&format!("dropping the INVALID index {index}"), e))?;
        result = conn.run_migration(migration);
    }
    conn.batch_execute(&format!(
        "SET lock_timeout = '{}ms'",
        config.lock_timeout_ms
    ))
    .map_err(|e| failed("setting lock_timeout", e))?;
    result.map_err(|e| {
        let err = failed("migration failed", e);
        MigrationError::Failed(format!(
            "{err} (it runs outside a transaction: statements before the failing one stay applied; \
             an index it failed to build is left INVALID, and the next `conveyor migrate run` \
             drops it and builds it again)"
        ))
    })
}

/// The quoted, schema-qualified name of the index an "already exists" error
/// names when that index is INVALID and no build of it is in progress (the
/// leftover of a failed `CREATE INDEX CONCURRENTLY`); `None` otherwise.
fn invalid_leftover(
    conn: &mut PgConnection,
    error: &str,
) -> Result<Option<String>, MigrationError> {
    #[derive(QueryableByName)]
    struct Leftover {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let Some(name) = error
        .split_once("relation \"")
        .and_then(|(_, rest)| rest.split_once("\" already exists"))
        .map(|(name, _)| name)
    else {
        return Ok(None);
    };
    let row: Option<Leftover> = diesel::sql_query(
        "SELECT i.indexrelid::regclass::text AS name FROM pg_index i \
         WHERE i.indexrelid = to_regclass(quote_ident($1)) AND NOT i.indisvalid \
           AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p \
                           WHERE p.index_relid = i.indexrelid)",
    )
    .bind::<diesel::sql_types::Text, _>(name)
    .get_result(conn)
    .optional()
    .map_err(|e| failed("looking for an INVALID index", e))?;
    Ok(row.map(|row| row.name))
}

/// Reverts the most recent migration; returns its version, or `None` when none is applied.
pub fn revert_last(config: &DatabaseConfig) -> Result<Option<String>, MigrationError> {
    let mut conn = connect(config)?;
    with_lock(&mut conn, config, |conn| {
        let applied = conn
            .applied_migrations()
            .map_err(|e| failed("reading applied migrations", e))?;
        if applied.is_empty() {
            return Ok(None);
        }
        let version = conn
            .revert_last_migration(MIGRATIONS)
            .map_err(|e| failed("revert failed", e))?;
        Ok(Some(version.to_string()))
    })
}

/// Reverts every applied migration (used by tests and `migrate revert --all`).
pub fn revert_all(config: &DatabaseConfig) -> Result<Vec<String>, MigrationError> {
    let mut conn = connect(config)?;
    with_lock(&mut conn, config, |conn| {
        let reverted = conn
            .revert_all_migrations(MIGRATIONS)
            .map_err(|e| failed("revert failed", e))?;
        Ok(reverted.into_iter().map(|v| v.to_string()).collect())
    })
}

/// Applied and pending migrations, oldest first, plus applied ones this binary does not know.
pub fn status(config: &DatabaseConfig) -> Result<Vec<MigrationStatus>, MigrationError> {
    status_from(config, &MIGRATIONS)
}

/// [`status`] against the migrations of `source` instead of the embedded ones.
pub fn status_from<S: MigrationSource<Pg>>(
    config: &DatabaseConfig,
    source: &S,
) -> Result<Vec<MigrationStatus>, MigrationError> {
    let mut conn = connect(config)?;
    status_on(&mut conn, source)
}

fn status_on<S: MigrationSource<Pg>>(
    conn: &mut PgConnection,
    source: &S,
) -> Result<Vec<MigrationStatus>, MigrationError> {
    let applied: BTreeSet<String> = if table_exists(conn)? {
        conn.applied_migrations()
            .map_err(|e| failed("reading applied migrations", e))?
            .into_iter()
            .map(|v| v.to_string())
            .collect()
    } else {
        BTreeSet::new()
    };
    let known: BTreeSet<String> = source
        .migrations()
        .map_err(|e| failed("reading migrations", e))?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect();
    let mut all: Vec<MigrationStatus> = known
        .iter()
        .map(|version| MigrationStatus {
            version: version.clone(),
            applied: applied.contains(version),
        })
        .collect();
    all.extend(applied.difference(&known).map(|version| MigrationStatus {
        version: format!("{version} (unknown to this binary)"),
        applied: true,
    }));
    Ok(all)
}

fn table_exists(conn: &mut PgConnection) -> Result<bool, MigrationError> {
    #[derive(QueryableByName)]
    struct Exists {
        #[diesel(sql_type = Bool)]
        exists: bool,
    }
    let row: Exists =
        diesel::sql_query("SELECT to_regclass('__diesel_schema_migrations') IS NOT NULL AS exists")
            .get_result(conn)
            .map_err(|e| failed("checking migrations table", e))?;
    Ok(row.exists)
}

/// Fails when the database lacks a migration this binary carries.
///
/// Migrations the binary does not know (a newer release applied them) are
/// refused unless `database.allow_newer_schema` is set; then they are logged
/// and accepted: migrations are written expand-then-contract, so the previous
/// release keeps working on the expanded schema. That is what lets an old pod
/// restart in the middle of a rolling deploy, and a rollback to the previous
/// image run without reverting anything (see deploy/RUNBOOK.md).
pub fn ensure_current(config: &DatabaseConfig) -> Result<(), MigrationError> {
    let mut conn = connect(config)?;
    let all = status_on(&mut conn, &MIGRATIONS)?;
    let unknown: Vec<_> = all
        .iter()
        .filter(|m| m.version.ends_with("(unknown to this binary)"))
        .map(|m| {
            m.version
                .trim_end_matches(" (unknown to this binary)")
                .to_owned()
        })
        .collect();
    if !unknown.is_empty() && !config.allow_newer_schema {
        return Err(MigrationError::Unknown(unknown.join(", ")));
    }
    if !unknown.is_empty() {
        tracing::warn!(
            migrations = %unknown.join(", "),
            "the database is ahead of this binary (a newer release migrated it); running on the expanded schema"
        );
    }
    let pending: Vec<_> = all
        .iter()
        .filter(|m| !m.applied)
        .map(|m| m.version.clone())
        .collect();
    if !pending.is_empty() {
        return Err(MigrationError::Pending(pending.len(), pending.join(", ")));
    }
    Ok(())
}

/// How often a run waiting for another instance's asks for the lock again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(100);

fn try_lock(conn: &mut PgConnection) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Taken {
        #[diesel(sql_type = Bool)]
        taken: bool,
    }
    let row: Taken = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS taken")
        .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
        .get_result(conn)?;
    Ok(row.taken)
}

fn with_lock<T>(
    conn: &mut PgConnection,
    config: &DatabaseConfig,
    body: impl FnOnce(&mut PgConnection) -> Result<T, MigrationError>,
) -> Result<T, MigrationError> {
    // Wait as long as it takes for another instance's run; then fail fast on
    // table locks. The wait polls rather than blocking in `pg_advisory_lock`:
    // a session blocked in a statement holds a snapshot, and a migration that
    // builds an index CONCURRENTLY waits for every such snapshot to end, so the
    // two would deadlock.
    while !try_lock(conn).map_err(|e| failed("taking the migration lock", e))? {
        std::thread::sleep(LOCK_POLL);
    }
    conn.batch_execute(&format!(
        "SET lock_timeout = '{}ms'",
        config.lock_timeout_ms
    ))
    .map_err(|e| failed("setting lock_timeout", e))?;
    let result = body(conn);
    let _ = diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
        .execute(conn);
    result
}
