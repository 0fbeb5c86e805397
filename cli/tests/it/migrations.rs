//! Migrations run up, down and up again; concurrent runs agree; stale databases are refused.

use std::process::Command;

use conveyor_platform::Config;
use conveyor_platform::migrations::{self, MigrationError};
use diesel::connection::SimpleConnection;

use crate::harness::{AMQP_URL, TestDb};

fn config_for(db: &TestDb) -> Config {
    let mut config = Config::default();
    config.database.url = db.url.clone().into();
    config
}

#[test]
fn all_up_all_down_all_up() {
    let db = TestDb::create_empty();
    let config = config_for(&db);
    let applied = migrations::run_pending(&config.database).unwrap();
    assert!(!applied.is_empty());
    migrations::ensure_current(&config.database).unwrap();
    let reverted = migrations::revert_all(&config.database).unwrap();
    assert_eq!(reverted.len(), applied.len());
    assert!(matches!(
        migrations::ensure_current(&config.database),
        Err(MigrationError::Pending(..))
    ));
    assert_eq!(migrations::run_pending(&config.database).unwrap(), applied);
    // Every table of schema.rs exists.
    db.conn()
        .batch_execute("SELECT id, runs, errors FROM jobs LIMIT 0")
        .unwrap();
}

#[test]
fn creates_a_missing_database() {
    let db = TestDb::create_empty();
    let mut config = config_for(&db);
    let missing = format!("{}_new", db.name);
    config.database.url = db.url.replace(&db.name, &missing).into();
    migrations::run_pending(&config.database).unwrap();
    migrations::ensure_current(&config.database).unwrap();
    let _cleanup = TestDb {
        name: missing,
        url: String::new(),
    };
}

#[test]
fn two_concurrent_runs_both_succeed() {
    let db = TestDb::create_empty();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .args(["migrate", "run"])
            .env("CONVEYOR_DATABASE_URL", &db.url)
            .env("CONVEYOR_LOG_LEVEL", "warn")
            .output()
            .unwrap()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(run);
        let b = s.spawn(run);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let outputs = format!(
        "{}{}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout)
    );
    assert!(
        outputs.contains("nothing to migrate"),
        "exactly one run applies: {outputs}"
    );
    migrations::ensure_current(&config_for(&db).database).unwrap();
}

#[test]
fn worker_and_ingress_refuse_a_database_with_pending_migrations() {
    let db = TestDb::create_empty();
    for role in ["worker", "ingress"] {
        let out = Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .arg(role)
            .env("CONVEYOR_DATABASE_URL", &db.url)
            .env("CONVEYOR_AMQP_URL", AMQP_URL)
            .env("CONVEYOR_INGRESS_ADDR", "127.0.0.1:0")
            .env("CONVEYOR_WORKER_METRICS_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("pending migration"), "{role}: {stderr}");
        assert!(stderr.contains("conveyor migrate run"), "{role}: {stderr}");
    }
}

#[test]
fn a_migration_blocked_by_traffic_fails_fast() {
    let db = TestDb::create_empty();
    let mut config = config_for(&db);
    config.database.lock_timeout_ms = 300;
    // Apply every migration, then hold a lock on `jobs` while reverting them all:
    // later migrations revert, the one that drops `jobs` must fail fast.
    migrations::run_pending(&config.database).unwrap();
    let mut holder = db.conn();
    holder
        .batch_execute("BEGIN; LOCK TABLE jobs IN ACCESS SHARE MODE;")
        .unwrap();
    let started = std::time::Instant::now();
    let err = migrations::revert_all(&config.database)
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(
        err.contains("lock timeout") || err.contains("locked"),
        "{err}"
    );
    holder.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn bad_configuration_is_one_line_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["migrate", "status"])
        .env("CONVEYOR_WORKER_PREFETCH", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("worker.prefetch"), "{stderr}");
}
