//! A stored headshot is shared by every profile with its checksum. An import
//! that reuses it races a DELETE of the last other profile using it; whichever
//! wins, no profile may end up pointing at an image that is no longer stored.
//!
//! The race is forced, not hoped for: the test holds the importing profile's
//! row lock, so the import has looked the image up and then waits; the DELETE
//! runs to the end meanwhile; only then is the lock let go.

use std::sync::mpsc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::headshots::{app_with, hits_of, image_server, import, png};
use super::{Keys, send, update};
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
