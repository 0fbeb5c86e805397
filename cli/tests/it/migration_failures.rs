//! The runbook's "A migration failed" procedures (deploy/RUNBOOK.md), run
//! against the real runner with a failing migration planted first and last:
//! `status` shows what the runbook says, nothing of the failing migration is
//! left behind, and a rerun after the fix continues at the failed migration.
//! A `CONCURRENTLY` build waits out a long transaction instead of failing at
//! the lock timeout, and a rerun after a failed build drops the INVALID index
//! it left and builds it.

use std::path::Path;

use conveyor_platform::Config;
use conveyor_platform::migrations::{self, MigrationStatus};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Bool;
use diesel_migrations::FileBasedMigrations;

use crate::harness::TestDb;

/// Creates a table and fills it, then fails: a migration that would be half
/// applied if it did not run in a transaction of its own.
const FAILING: &str = "CREATE TABLE {t} (id int);\nINSERT INTO {t} VALUES (1);\nSELECT 1 / 0;\n";
const GOOD: &str = "CREATE TABLE {t} (id int);\nINSERT INTO {t} VALUES (1);\n";

/// Writes migration `version` creating table `table`, failing or not.
fn plant(dir: &Path, version: &str, table: &str, fails: bool) {
    let folder = dir.join(format!("{version}_create_{table}"));
    std::fs::create_dir_all(&folder).unwrap();
    let up = if fails { FAILING } else { GOOD };
    std::fs::write(folder.join("up.sql"), up.replace("{t}", table)).unwrap();
    std::fs::write(folder.join("down.sql"), format!("DROP TABLE {table};\n")).unwrap();
}

fn source(dir: &Path) -> FileBasedMigrations {
    FileBasedMigrations::from_path(dir).expect("a valid migrations folder")
}

fn table_exists(db: &TestDb, table: &str) -> bool {
    #[derive(QueryableByName)]
    struct Exists {
        #[diesel(sql_type = Bool)]
        exists: bool,
    }
    diesel::sql_query(format!(
        "SELECT to_regclass('{table}') IS NOT NULL AS exists"
    ))
    .get_result::<Exists>(&mut db.conn())
    .unwrap()
    .exists
}

/// `(version, applied)` for every migration of `dir`, oldest first.
fn status(config: &Config, dir: &Path) -> Vec<(String, bool)> {
    migrations::status_from(&config.database, &source(dir))
        .unwrap()
        .into_iter()
        .map(|MigrationStatus { version, applied }| (version, applied))
        .collect()
}

const V1: &str = "20000101000001";
const V2: &str = "20000101000002";
const V3: &str = "20000101000003";

fn setup() -> (TestDb, Config, tempfile::TempDir) {
    let db = TestDb::create_empty();
    let mut config = Config::default();
    config.database.url = db.url.clone().into();
    (db, config, tempfile::tempdir().unwrap())
}

#[test]
fn a_migration_failing_at_the_first_step_applies_nothing_and_a_rerun_applies_all() {
    let (db, config, dir) = setup();
    plant(dir.path(), V1, "planted_one", true);
    plant(dir.path(), V2, "planted_two", false);
    plant(dir.path(), V3, "planted_three", false);

    let err = migrations::run_pending_from(&config.database, source(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(V1),
        "the error names the failing migration: {err}"
    );
    assert!(err.contains("division by zero"), "{err}");
    assert_eq!(
        status(&config, dir.path()),
        [(V1.into(), false), (V2.into(), false), (V3.into(), false)],
        "every migration of the release still pending"
    );
    assert!(
        !table_exists(&db, "planted_one"),
        "the failing migration's transaction was rolled back"
    );
    assert!(!table_exists(&db, "planted_two"));

    // Fix the cause, rerun: everything applies, in order.
    plant(dir.path(), V1, "planted_one", false);
    assert_eq!(
        migrations::run_pending_from(&config.database, source(dir.path())).unwrap(),
        [V1, V2, V3]
    );
    assert!(
        status(&config, dir.path())
            .iter()
            .all(|(_, applied)| *applied)
    );
    for table in ["planted_one", "planted_two", "planted_three"] {
        assert!(table_exists(&db, table), "{table}");
    }
}

#[test]
fn a_migration_failing_after_partly_applying_keeps_the_earlier_ones_and_a_rerun_continues() {
    let (db, config, dir) = setup();
    plant(dir.path(), V1, "planted_one", false);
    plant(dir.path(), V2, "planted_two", false);
    plant(dir.path(), V3, "planted_three", true);

    let err = migrations::run_pending_from(&config.database, source(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(V3),
        "the error names the failing migration: {err}"
    );
    assert_eq!(
        status(&config, dir.path()),
        [(V1.into(), true), (V2.into(), true), (V3.into(), false)],
        "the first two applied, the failed one pending"
    );
    assert!(table_exists(&db, "planted_one"));
    assert!(table_exists(&db, "planted_two"));
    assert!(
        !table_exists(&db, "planted_three"),
        "nothing of the failing migration is left behind"
    );

    // Rerunning unfixed fails at the same migration and changes nothing.
    let again = migrations::run_pending_from(&config.database, source(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(again.contains(V3), "{again}");
    assert_eq!(status(&config, dir.path())[2], (V3.into(), false));

    // Fix it, rerun: it continues at the failed migration and applies only that one.
    plant(dir.path(), V3, "planted_three", false);
    assert_eq!(
        migrations::run_pending_from(&config.database, source(dir.path())).unwrap(),
        [V3]
    );
    assert!(
        status(&config, dir.path())
            .iter()
            .all(|(_, applied)| *applied)
    );
    assert!(table_exists(&db, "planted_three"));
}

/// Writes migration `version` running `up`, outside a transaction when
/// `concurrently` (as the `CREATE INDEX CONCURRENTLY` migrations do).
fn plant_sql(dir: &Path, version: &str, name: &str, up: &str, concurrently: bool) {
    let folder = dir.join(format!("{version}_{name}"));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("up.sql"), up).unwrap();
    std::fs::write(folder.join("down.sql"), "SELECT 1;\n").unwrap();
    if concurrently {
        std::fs::write(folder.join("metadata.toml"), "run_in_transaction = false\n").unwrap();
    }
}

/// `Some(valid)` for the index `name`, `None` when there is none.
fn index_valid(db: &TestDb, name: &str) -> Option<bool> {
    #[derive(QueryableByName)]
    struct Valid {
        #[diesel(sql_type = Bool)]
        valid: bool,
    }
    diesel::sql_query(format!(
        "SELECT indisvalid AS valid FROM pg_index WHERE indexrelid = to_regclass('{name}')"
    ))
    .get_result::<Valid>(&mut db.conn())
    .optional()
    .unwrap()
    .map(|row| row.valid)
}

#[test]
fn a_concurrently_build_waits_for_a_transaction_open_longer_than_the_lock_timeout() {
    let (db, mut config, dir) = setup();
    config.database.lock_timeout_ms = 300;
    plant(dir.path(), V1, "planted_one", false);
    migrations::run_pending_from(&config.database, source(dir.path())).unwrap();
    plant_sql(
        dir.path(),
        V2,
        "planted_index",
        "CREATE INDEX CONCURRENTLY planted_one_id ON planted_one (id);\n",
        true,
    );

    // A long report: its snapshot is older than the build, which must wait
    // for it to end (here 2 s, well past the 300 ms lock timeout).
    let mut report = db.conn();
    let hold = std::time::Duration::from_secs(2);
    let report = std::thread::spawn(move || {
        diesel::sql_query(format!("SELECT pg_sleep({})", hold.as_secs_f64()))
            .execute(&mut report)
            .unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let applied = migrations::run_pending_from(&config.database, source(dir.path()));
    report.join().unwrap();
    assert_eq!(applied.unwrap(), [V2], "the build waited for the report");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1_000),
        "it did wait: {:?}",
        started.elapsed()
    );
    assert_eq!(index_valid(&db, "planted_one_id"), Some(true));
    // Migrations run in a transaction still fail fast on a lock.
    plant_sql(
        dir.path(),
        V3,
        "planted_column",
        "ALTER TABLE planted_one ADD COLUMN extra int;\n",
        false,
    );
    let mut holder = db.conn();
    holder
        .batch_execute("BEGIN; LOCK TABLE planted_one IN ACCESS SHARE MODE;")
        .unwrap();
    let err = migrations::run_pending_from(&config.database, source(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("lock timeout"), "{err}");
}

#[test]
fn a_rerun_drops_the_invalid_index_a_failed_concurrently_build_left_and_builds_it() {
    let (db, config, dir) = setup();
    // Duplicates make the unique build fail after it created its index.
    plant(dir.path(), V1, "planted_one", false);
    migrations::run_pending_from(&config.database, source(dir.path())).unwrap();
    db.conn()
        .batch_execute("INSERT INTO planted_one VALUES (1)")
        .unwrap();
    plant_sql(
        dir.path(),
        V2,
        "planted_unique",
        "CREATE UNIQUE INDEX CONCURRENTLY planted_one_unique ON planted_one (id);\n",
        true,
    );
    let err = migrations::run_pending_from(&config.database, source(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains(V2), "{err}");
    assert!(
        err.contains("the next `conveyor migrate run` drops it and builds it again"),
        "the advice says what a rerun does: {err}"
    );
    assert_eq!(
        index_valid(&db, "planted_one_unique"),
        Some(false),
        "the failed build left an INVALID index"
    );

    // Fix the data, rerun the same migration: it just works.
    db.conn()
        .batch_execute("DELETE FROM planted_one; INSERT INTO planted_one VALUES (1)")
        .unwrap();
    assert_eq!(
        migrations::run_pending_from(&config.database, source(dir.path())).unwrap(),
        [V2]
    );
    assert_eq!(index_valid(&db, "planted_one_unique"), Some(true));
    assert!(
        status(&config, dir.path())
            .iter()
            .all(|(_, applied)| *applied)
    );
}
