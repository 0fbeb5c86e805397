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

/// Runs `conveyor migrate <args>` on `db`, asserting success; returns stdout.
fn conveyor_migrate(db: &TestDb, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("migrate")
        .args(args)
        .env("CONVEYOR_DATABASE_URL", &db.url)
        .env("CONVEYOR_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `conveyor migrate status` as (state, version) pairs, one per line.
fn migrate_status(db: &TestDb) -> Vec<(String, String)> {
    conveyor_migrate(db, &["status"])
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let pair = (
                words.next().unwrap_or_default().to_owned(),
                words.next().unwrap_or_default().to_owned(),
            );
            assert_eq!(
                words.next(),
                None,
                "one state and one version per line: {line}"
            );
            pair
        })
        .collect()
}

/// The folders of `migrations/`, oldest first.
fn migration_folders() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let mut folders: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    folders
}

/// True when `version` (as the CLI prints it) names migration folder `folder`
/// (`2026-12-05-000100_drop_jobs_finished_at_brin`): Diesel's version is the
/// folder's date-and-number prefix, with or without its dashes.
fn names(version: &str, folder: &str) -> bool {
    let prefix = folder.split('_').next().unwrap().replace('-', "");
    version.replace('-', "").starts_with(&prefix)
}

#[test]
fn migrate_status_lists_each_migration_and_revert_undoes_exactly_one() {
    let db = TestDb::create_empty();
    let folders = migration_folders();
    let pending = migrate_status(&db);
    assert_eq!(pending.len(), folders.len(), "{pending:?}");
    for ((state, version), folder) in pending.iter().zip(&folders) {
        assert_eq!(state, "pending");
        assert!(names(version, folder), "{version} vs {folder}");
    }

    conveyor_migrate(&db, &["run"]);
    let applied = migrate_status(&db);
    assert!(
        applied.iter().all(|(state, _)| state == "applied"),
        "{applied:?}"
    );
    let versions: Vec<&String> = applied.iter().map(|(_, v)| v).collect();
    assert_eq!(versions, pending.iter().map(|(_, v)| v).collect::<Vec<_>>());

    // The newest adds a column; the one before builds an index CONCURRENTLY
    // (outside a transaction). Each revert undoes exactly one of them, and
    // `run` applies both again.
    let (newest, before) = (&folders[folders.len() - 1], &folders[folders.len() - 2]);
    assert!(
        newest.ends_with("_jobs_runner") && before.ends_with("_profiles_headshot_index"),
        "update this test: {before}, {newest}"
    );
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let names = |sql: &str| {
        use diesel::RunQueryDsl;
        diesel::sql_query(sql)
            .load::<Name>(&mut db.conn())
            .unwrap()
            .into_iter()
            .map(|row| row.name)
            .collect::<Vec<_>>()
    };
    let indexes = || {
        names(
            "SELECT indexname AS name FROM pg_indexes \
             WHERE tablename IN ('dead_jobs', 'profiles') ORDER BY indexname",
        )
    };
    let runner = || {
        names(
            "SELECT column_name::text AS name FROM information_schema.columns \
             WHERE table_name = 'jobs' AND column_name = 'runner'",
        )
    };
    let all = indexes();
    let without = |gone: &[&str]| -> Vec<String> {
        all.iter()
            .filter(|name| !gone.contains(&name.as_str()))
            .cloned()
            .collect()
    };
    assert!(
        all.contains(&"profiles_headshot_sha256".to_owned()),
        "{all:?}"
    );
    assert_eq!(runner(), ["runner"]);
    let [.., before_last, last] = versions.as_slice() else {
        panic!("{applied:?}")
    };

    let reverted = conveyor_migrate(&db, &["revert"]);
    assert_eq!(reverted.trim(), format!("reverted {last}"));
    assert_eq!(runner(), Vec::<String>::new());
    assert_eq!(indexes(), all);
    let reverted = conveyor_migrate(&db, &["revert"]);
    assert_eq!(reverted.trim(), format!("reverted {before_last}"));
    assert_eq!(indexes(), without(&["profiles_headshot_sha256"]));
    assert_eq!(runner(), Vec::<String>::new());
    let after = migrate_status(&db);
    let (kept, undone) = after.split_at(after.len() - 2);
    assert!(
        kept.iter().all(|(state, _)| state == "applied")
            && undone.iter().all(|(state, _)| state == "pending"),
        "{after:?}"
    );
    assert_eq!(&undone[0].1, *before_last);
    assert_eq!(&undone[1].1, *last);

    // `run` applies only those two again.
    assert_eq!(
        conveyor_migrate(&db, &["run"]).trim(),
        format!("applied {before_last}\napplied {last}")
    );
    assert_eq!(indexes(), all);
    assert_eq!(runner(), ["runner"]);
}

/// The Postgres type of a Diesel type in `schema/src/db.rs`, as
/// `information_schema.columns.udt_name` spells it.
fn udt_name(diesel_type: &str) -> String {
    match diesel_type {
        "Uuid" => "uuid".into(),
        "Text" => "text".into(),
        "Jsonb" => "jsonb".into(),
        "Json" => "json".into(),
        "Int2" | "SmallInt" => "int2".into(),
        "Int4" | "Integer" => "int4".into(),
        "Int8" | "BigInt" => "int8".into(),
        "Float4" => "float4".into(),
        "Float8" | "Double" => "float8".into(),
        "Bool" => "bool".into(),
        "Bytea" | "Binary" => "bytea".into(),
        "Timestamptz" => "timestamptz".into(),
        "Timestamp" => "timestamp".into(),
        "Date" => "date".into(),
        other => match other
            .strip_prefix("Array<")
            .and_then(|t| t.strip_suffix('>'))
        {
            Some(inner) => format!("_{}", udt_name(inner)),
            None => panic!("add Diesel type {other} to udt_name"),
        },
    }
}

/// `schema/src/db.rs` as table → column → (udt_name, nullable).
fn diesel_schema()
-> std::collections::BTreeMap<String, std::collections::BTreeMap<String, (String, bool)>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/src/db.rs");
    let text = std::fs::read_to_string(path).unwrap();
    let mut tables = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with("diesel::table!") || line == "}" {
            current = None;
        } else if let Some(header) = line.strip_suffix('{')
            && current.is_none()
            && !line.starts_with("diesel::")
        {
            // `jobs (id) {`
            let name = header.split_whitespace().next().unwrap().to_owned();
            tables.insert(name.clone(), std::collections::BTreeMap::new());
            current = Some(name);
        } else if let (Some(table), Some((column, ty))) = (&current, line.split_once(" -> ")) {
            assert!(!line.starts_with('#'), "attributes are not parsed: {line}");
            let ty = ty.trim_end_matches(',');
            let (ty, nullable) = match ty
                .strip_prefix("Nullable<")
                .and_then(|t| t.strip_suffix('>'))
            {
                Some(inner) => (inner, true),
                None => (ty, false),
            };
            tables
                .get_mut(table)
                .unwrap()
                .insert(column.to_owned(), (udt_name(ty), nullable));
        }
    }
    tables
}

/// `schema/src/db.rs` is kept by hand: every table it declares has, after all
/// migrations, exactly its columns, with its nullability and types.
#[test]
fn the_diesel_schema_matches_the_migrated_database() {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Column {
        #[diesel(sql_type = diesel::sql_types::Text)]
        table_name: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        column_name: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        udt_name: String,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        nullable: bool,
    }
    let declared = diesel_schema();
    assert!(declared.len() >= 15, "the parser found only {declared:?}");
    assert!(declared["jobs"].len() >= 15, "{:?}", declared["jobs"]);
    let db = TestDb::create();
    let columns: Vec<Column> = diesel::sql_query(
        "SELECT table_name::text, column_name::text, udt_name::text, is_nullable = 'YES' AS nullable
         FROM information_schema.columns WHERE table_schema = 'public'",
    )
    .load(&mut db.conn())
    .unwrap();
    let mut problems = Vec::new();
    for (table, expected) in &declared {
        let actual: std::collections::BTreeMap<String, (String, bool)> = columns
            .iter()
            .filter(|c| &c.table_name == table)
            .map(|c| (c.column_name.clone(), (c.udt_name.clone(), c.nullable)))
            .collect();
        if actual.is_empty() {
            problems.push(format!("{table}: no such table"));
            continue;
        }
        for (column, want) in expected {
            match actual.get(column) {
                None => problems.push(format!("{table}.{column}: not in the database")),
                Some(got) if got != want => problems.push(format!(
                    "{table}.{column}: schema.rs says {want:?}, the database {got:?} (type, nullable)"
                )),
                Some(_) => {}
            }
        }
        for column in actual.keys().filter(|c| !expected.contains_key(*c)) {
            problems.push(format!("{table}.{column}: not in schema.rs"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
