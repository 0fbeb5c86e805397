//! `webhook.headshot_sweep`. With directory storage: a headshot file no row
//! names and older than the sweep's age goes (and so does an old temporary
//! file); a file a row names, a fresh orphan (a store may be about to commit
//! its row), a fresh temporary file and a file of another name stay. And an
//! old orphan that a store is recording right now (holding the lock on its
//! checksum, its row not yet committed) stays too: the sweep waits for the
//! lock and finds the row. In both storages: a `headshots` row no profile
//! names and older than the sweep's age goes (with its file), one a profile
//! names or a fresh one (its import may be about to use it) stays.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use conveyor_platform::config::HeadshotStorage;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::Keys;
use super::headshots::app_with;
use crate::gate::advisory_waits;
use crate::harness::{TestApp, wait_until};

const WAIT: Duration = Duration::from_secs(30);
/// Older than the sweep's age (one hour).
const OLD: Duration = Duration::from_secs(2 * 3600);

fn sha_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `<dir>/<name>` last modified `age` ago.
fn write_aged(dir: &Path, name: &str, age: Duration) {
    let path = dir.join(name);
    std::fs::write(&path, name.as_bytes()).unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

async fn directory_app(keys: &Keys, dir: &Path) -> TestApp {
    let dir = dir.to_owned();
    app_with(keys, move |h| {
        h.storage = HeadshotStorage::Directory;
        h.dir = Some(dir);
    })
    .await
}

/// Inserts the `headshots` row naming `sha` (the bytes are in its file).
const INSERT_ROW: &str = "INSERT INTO headshots (sha256, content_type, size_bytes) \
                          VALUES ('{sha}', 'image/png', 64)";

/// Inserts a `headshots` row for `sha` created `age` ago, holding its bytes
/// unless the image is a file.
fn insert_aged_row(app: &TestApp, sha: &str, age: Duration, in_database: bool) {
    let data = if in_database {
        "'\\x00ff'::bytea"
    } else {
        "NULL"
    };
    app.db
        .conn()
        .batch_execute(&format!(
            "INSERT INTO headshots (sha256, content_type, size_bytes, data, created_at) \
             VALUES ('{sha}', 'image/png', 2, {data}, now() - interval '{} seconds')",
            age.as_secs()
        ))
        .unwrap();
}

/// Inserts profile `id` naming headshot `sha`.
fn insert_profile_naming(app: &TestApp, id: &str, sha: &str) {
    app.db
        .conn()
        .batch_execute(&format!(
            "INSERT INTO profiles (id, source, headshot_sha256, headshot_content_type, headshot_size_bytes) \
             VALUES ('{id}', 'members', '{sha}', 'image/png', 2)"
        ))
        .unwrap();
}

/// The checksums of the `headshots` rows, sorted.
fn stored_rows(app: &TestApp) -> Vec<String> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        sha256: String,
    }
    diesel::sql_query("SELECT sha256 FROM headshots ORDER BY sha256")
        .load::<Row>(&mut app.db.conn())
        .unwrap()
        .into_iter()
        .map(|r| r.sha256)
        .collect()
}

async fn sweep(app: &TestApp) {
    let job = app.enqueue("webhook.headshot_sweep", json!({})).await;
    app.wait_for_state(job, "succeeded", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_removes_old_unnamed_files_and_keeps_the_rest() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let app = directory_app(&keys, dir.path()).await;

    let named = sha_of(b"named");
    let old_orphan = sha_of(b"old orphan");
    let fresh_orphan = sha_of(b"fresh orphan");
    let old_temporary = format!(".{old_orphan}.{}", uuid::Uuid::new_v4().simple());
    let fresh_temporary = format!(".{fresh_orphan}.{}", uuid::Uuid::new_v4().simple());
    write_aged(dir.path(), &named, OLD);
    write_aged(dir.path(), &old_orphan, OLD);
    write_aged(dir.path(), &fresh_orphan, Duration::ZERO);
    write_aged(dir.path(), &old_temporary, OLD);
    write_aged(dir.path(), &fresh_temporary, Duration::ZERO);
    write_aged(dir.path(), "notes.txt", OLD);
    app.db
        .conn()
        .batch_execute(&INSERT_ROW.replace("{sha}", &named))
        .unwrap();

    sweep(&app).await;

    let exists = |name: &str| dir.path().join(name).exists();
    assert!(!exists(&old_orphan), "an old file no row names was kept");
    assert!(!exists(&old_temporary), "an old temporary file was kept");
    assert!(exists(&named), "a file a row names was removed");
    assert!(exists(&fresh_orphan), "a fresh unnamed file was removed");
    assert!(
        exists(&fresh_temporary),
        "a fresh temporary file was removed"
    );
    assert!(exists("notes.txt"), "a file of another name was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_keeps_an_old_file_a_store_is_recording() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let app = directory_app(&keys, dir.path()).await;
    let sha = sha_of(b"reused");
    write_aged(dir.path(), &sha, OLD);

    // A store reusing the file, as `headshot::store` does: the lock on its
    // checksum (shared), then its row, not yet committed.
    let (commit, committed) = mpsc::channel::<()>();
    let (holding, is_holding) = mpsc::channel::<()>();
    let url = app.db.url.clone();
    let store_sha = sha.clone();
    let store = std::thread::spawn(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        conn.batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock_shared({}, hashtext('{store_sha}')); {};",
            0x4853_4854,
            INSERT_ROW.replace("{sha}", &store_sha)
        ))
        .unwrap();
        holding.send(()).unwrap();
        committed.recv().unwrap();
        conn.batch_execute("COMMIT").unwrap();
    });
    is_holding.recv().unwrap();

    let job = app.enqueue("webhook.headshot_sweep", json!({})).await;
    wait_until(WAIT, || async {
        advisory_waits(&app).await == 1
            || app.job(job).await.is_some_and(|j| j.state == "succeeded")
    })
    .await;
    commit.send(()).unwrap();
    store.join().unwrap();
    app.wait_for_state(job, "succeeded", WAIT).await;

    assert!(
        dir.path().join(&sha).exists(),
        "the sweep removed the file of a row being committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_database_the_sweep_removes_old_rows_no_profile_names() {
    let keys = Keys::new();
    let app = app_with(&keys, |_| {}).await;
    let old_orphan = sha_of(b"old orphan");
    let named = sha_of(b"named");
    let fresh_orphan = sha_of(b"fresh orphan");
    insert_aged_row(&app, &old_orphan, OLD, true);
    insert_aged_row(&app, &named, OLD, true);
    insert_aged_row(&app, &fresh_orphan, Duration::ZERO, true);
    insert_profile_naming(&app, "p-named", &named);

    sweep(&app).await;

    let mut expected = vec![named, fresh_orphan];
    expected.sort();
    assert_eq!(
        stored_rows(&app),
        expected,
        "only the old row no profile names should have gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_directory_the_sweep_removes_old_rows_no_profile_names_with_their_files() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let app = directory_app(&keys, dir.path()).await;
    let old_orphan = sha_of(b"old orphan");
    let named = sha_of(b"named");
    let fresh_orphan = sha_of(b"fresh orphan");
    for sha in [&old_orphan, &named, &fresh_orphan] {
        write_aged(dir.path(), sha, OLD);
    }
    insert_aged_row(&app, &old_orphan, OLD, false);
    insert_aged_row(&app, &named, OLD, false);
    insert_aged_row(&app, &fresh_orphan, Duration::ZERO, false);
    insert_profile_naming(&app, "p-named", &named);

    sweep(&app).await;

    let mut expected = vec![named.clone(), fresh_orphan.clone()];
    expected.sort();
    assert_eq!(
        stored_rows(&app),
        expected,
        "only the old row no profile names should have gone"
    );
    let exists = |name: &str| dir.path().join(name).exists();
    assert!(!exists(&old_orphan), "the removed row's file was kept");
    assert!(exists(&named), "a named row's file was removed");
    assert!(exists(&fresh_orphan), "a fresh row's file was removed");
}
