//! A stored headshot is shared by every profile with its checksum. An import
//! that reuses it races a DELETE of the last other profile using it; whichever
//! wins, no profile may end up pointing at an image that is no longer stored,
//! neither its `headshots` row nor, with directory storage, its file.
//!
//! The races are forced, not hoped for. For the row, the test holds the
//! importing profile's row lock, so the import has looked the image up and
//! then waits; the DELETE runs to the end meanwhile; only then is the lock let
//! go. For the file, a trigger holds the import's insert into `headshots` at a
//! gate after it has found the file already there, while the DELETE runs as
//! far as it can.

use std::sync::mpsc;
use std::time::Duration;

use conveyor_platform::config::HeadshotStorage;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::headshots::{app_with, hits_of, image_server, import, png};
use super::{Keys, send, update};
use crate::gate::{Gate, advisory_waits};
use crate::harness::wait_until;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_reusing_an_image_that_a_delete_removes_stores_it_again() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    let app = app_with(&keys, |h| h.allow_internal_addresses = true).await;
    let key = &keys.hmac_old;
    let url = format!("http://{addr}/img/ok.png");
    let sha = hex::encode(Sha256::digest(png()));

    // p1 holds the image; p2 exists without one.
    let job = send(
        &app,
        key,
        &import("p1", "2026-01-01T00:00:01Z", url.clone(), None),
    )
    .await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    let job = send(&app, key, &update("p2", "2026-01-01T00:00:01Z", "b@x.io")).await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    assert_eq!(hits_of(&hits, "ok.png"), 1);

    // Hold p2's row lock.
    let (release, released) = mpsc::channel::<()>();
    let (locked, is_locked) = mpsc::channel::<()>();
    let url_db = app.db.url.clone();
    let holder = std::thread::spawn(move || {
        let mut conn = PgConnection::establish(&url_db).unwrap();
        conn.batch_execute("BEGIN; SELECT id FROM profiles WHERE id = 'p2' FOR UPDATE;")
            .unwrap();
        locked.send(()).unwrap();
        released.recv().unwrap();
        conn.batch_execute("ROLLBACK").unwrap();
    });
    is_locked.recv().unwrap();

    // p2 imports the same image, announcing its checksum: it finds it stored, then waits.
    let reuse = send(
        &app,
        key,
        &import("p2", "2026-01-01T00:00:02Z", url, Some(&sha)),
    )
    .await;
    wait_until(WAIT, || async {
        app.count(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            >= 1
    })
    .await;
    // Meanwhile p1 is deleted: the image loses its only committed reference and goes.
    let delete =
        json!({"action": "DELETE", "profile_id": "p1", "occurred_at": "2026-01-01T00:00:03Z"});
    let job = send(&app, key, &delete).await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    assert_eq!(app.count("SELECT count(*) AS n FROM headshots").await, 0);

    release.send(()).unwrap();
    holder.join().unwrap();
    app.wait_for_state(reuse, "succeeded", WAIT).await;
    // p2 points at the image, and the image is stored: it was downloaded again.
    let dangling = app
        .count(
            "SELECT count(*) AS n FROM profiles p WHERE headshot_sha256 IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM headshots h WHERE h.sha256 = p.headshot_sha256)",
        )
        .await;
    assert_eq!(dangling, 0, "a profile points at a deleted image");
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM profiles WHERE id = 'p2' AND headshot_sha256 = '{sha}'"
        ))
        .await,
        1
    );
    assert_eq!(hits_of(&hits, "ok.png"), 2);
}

/// The DELETE of the image's last reference removes its file; an import of the
/// same image that found the file still there must not record it as stored
/// only for the removal to follow. The import waits at the gate, holding
/// whatever it holds, between seeing the file and inserting the row; the
/// DELETE commits and removes the file (or waits for the import) meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_removing_the_file_of_an_image_being_imported_again_leaves_it_in_place() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let app = app_with(&keys, |h| {
        h.allow_internal_addresses = true;
        h.storage = HeadshotStorage::Directory;
        h.dir = Some(dir.path().to_owned());
    })
    .await;
    let key = &keys.hmac_old;
    let url = format!("http://{addr}/img/ok.png");
    let sha = hex::encode(Sha256::digest(png()));
    let file = dir.path().join(&sha);

    let job = send(
        &app,
        key,
        &import("p1", "2026-01-01T00:00:01Z", url.clone(), None),
    )
    .await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    assert!(file.exists());

    // Close the gate: every insert into `headshots` waits for it.
    let gate = Gate::close(&app, "headshots", "INSERT", "true");

    // p2 imports the same image without announcing its checksum: it downloads
    // it, finds the file in place, and waits at the gate to record it.
    let reuse = send(&app, key, &import("p2", "2026-01-01T00:00:02Z", url, None)).await;
    wait_until(WAIT, || async { advisory_waits(&app).await == 1 }).await;
    assert_eq!(hits_of(&hits, "ok.png"), 2);

    // p1 is deleted: the image loses its only reference and its row goes.
    // Then the DELETE either removes the file and finishes, or waits for the import.
    let delete =
        json!({"action": "DELETE", "profile_id": "p1", "occurred_at": "2026-01-01T00:00:03Z"});
    let delete = send(&app, key, &delete).await;
    wait_until(WAIT, || async {
        app.count("SELECT count(*) AS n FROM headshots").await == 0
            && (app
                .job(delete)
                .await
                .is_some_and(|j| j.state == "succeeded")
                || advisory_waits(&app).await == 2)
    })
    .await;

    gate.open();
    app.wait_for_state(reuse, "succeeded", WAIT).await;
    app.wait_for_state(delete, "succeeded", WAIT).await;
    // p2 points at the image; its row and its file are both there.
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM profiles p JOIN headshots h ON h.sha256 = p.headshot_sha256 \
             WHERE p.id = 'p2' AND h.sha256 = '{sha}'"
        ))
        .await,
        1
    );
    assert!(
        std::fs::read(&file).is_ok_and(|bytes| bytes == png()),
        "p2 points at a removed file"
    );
}
