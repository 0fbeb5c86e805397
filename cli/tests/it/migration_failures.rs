//! The runbook's "A migration failed" procedures (deploy/RUNBOOK.md), run
//! against the real runner with a failing migration planted first and last:
//! `status` shows what the runbook says, nothing of the failing migration is
//! left behind, and a rerun after the fix continues at the failed migration.

use std::path::Path;

use conveyor_platform::Config;
use conveyor_platform::migrations::{self, MigrationStatus};
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
