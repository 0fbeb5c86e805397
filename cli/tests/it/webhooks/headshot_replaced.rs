//! A stored headshot goes once no profile names it, not only when a DELETE
//! clears it: the image an IMPORT_HEADSHOT replaces, and an image an import
//! downloaded for a decision that then did not use it (a DELETE or a newer
//! import committed during the download). With either storage neither its
//! `headshots` row nor its file outlives the last profile using it, and an
//! image another profile still uses stays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor_platform::config::HeadshotStorage;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::headshots::{
    app_with, hits_of, holding_image_server, image_server, import, other_png, png,
};
use super::{Keys, delete, send};
use crate::harness::{TestApp, wait_until};

const WAIT: Duration = Duration::from_secs(30);

fn sha_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Which storage a test runs against.
#[derive(Debug, Clone, Copy)]
enum Storage {
    Database,
    Directory,
}

/// The app storing headshots as `storage` says (files in the returned directory).
/// The download timeout is long: a held answer must not time out.
async fn app_storing(keys: &Keys, storage: Storage) -> (TestApp, Option<TempDir>) {
    let dir = matches!(storage, Storage::Directory).then(|| tempfile::tempdir().unwrap());
    let path: Option<PathBuf> = dir.as_ref().map(|d| d.path().to_owned());
    let app = app_with(keys, move |h| {
        h.allow_internal_addresses = true;
        h.timeout_ms = 30_000;
        if let Some(path) = path {
            h.storage = HeadshotStorage::Directory;
            h.dir = Some(path);
        }
    })
    .await;
    (app, dir)
}

async fn rows_of(app: &TestApp, sha: &str) -> i64 {
    app.count(&format!(
        "SELECT count(*) AS n FROM headshots WHERE sha256 = '{sha}'"
    ))
    .await
}

/// The names in the headshot directory, if any.
fn files(dir: Option<&TempDir>) -> Vec<String> {
    let Some(dir) = dir else {
        return Vec::new();
    };
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn has_file(dir: &Path, sha: &str) -> bool {
    dir.join(sha).exists()
}

async fn replaced_then_deleted(storage: Storage) {
    let (addr, _hits) = image_server().await;
    let keys = Keys::new();
    let (app, dir) = app_storing(&keys, storage).await;
    let key = &keys.hmac_old;
    let (a, b) = (sha_of(&png()), sha_of(&other_png()));

    for (at, image) in [
        ("2026-01-01T00:00:01Z", "ok.png"),
        ("2026-01-01T00:00:02Z", "other.png"),
    ] {
        let url = format!("http://{addr}/img/{image}");
        let job = send(&app, key, &import("p1", at, url, None)).await;
        app.wait_for_state(job, "succeeded", WAIT).await;
    }
    let job = send(&app, key, &delete("p1", "2026-01-01T00:00:03Z")).await;
    app.wait_for_state(job, "succeeded", WAIT).await;

    let (rows_a, rows_b) = (rows_of(&app, &a).await, rows_of(&app, &b).await);
    assert_eq!(
        (rows_a, rows_b),
        (0, 0),
        "{storage:?}: headshots rows left after the DELETE (replaced image A, last image B)"
    );
    assert_eq!(
        files(dir.as_ref()),
        Vec::<String>::new(),
        "{storage:?}: files left after the DELETE (A is {a})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_headshot_goes_with_its_last_profile_in_the_database() {
    replaced_then_deleted(Storage::Database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_headshot_goes_with_its_last_profile_in_the_directory() {
    replaced_then_deleted(Storage::Directory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_headshot_stays_while_another_profile_uses_it() {
    let (addr, _hits) = image_server().await;
    let keys = Keys::new();
    let (app, dir) = app_storing(&keys, Storage::Directory).await;
    let path = dir.as_ref().unwrap().path();
    let key = &keys.hmac_old;
    let (a, b) = (sha_of(&png()), sha_of(&other_png()));
    let ok = format!("http://{addr}/img/ok.png");
    let other = format!("http://{addr}/img/other.png");

    for (profile, at, url) in [
        ("p1", "2026-01-01T00:00:01Z", ok.clone()),
        ("p2", "2026-01-01T00:00:01Z", ok),
        ("p1", "2026-01-01T00:00:02Z", other.clone()),
    ] {
        let job = send(&app, key, &import(profile, at, url, None)).await;
        app.wait_for_state(job, "succeeded", WAIT).await;
    }
    // p1 moved to B; p2 still uses A: both stay, row and file.
    assert_eq!((rows_of(&app, &a).await, rows_of(&app, &b).await), (1, 1));
    assert!(has_file(path, &a), "p2's image lost its file");
    assert!(has_file(path, &b), "p1's image has no file");

    // p2 moves to B too: A is used by no one and goes; B stays.
    let job = send(
        &app,
        key,
        &import("p2", "2026-01-01T00:00:02Z", other, None),
    )
    .await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    assert_eq!(
        (rows_of(&app, &a).await, rows_of(&app, &b).await),
        (0, 1),
        "rows of A and B once p1 and p2 both use B"
    );
    assert_eq!(files(dir.as_ref()), [b], "files once p1 and p2 both use B");
}

/// p1 has image A; an import of image B for p1 is downloading when p1's DELETE
/// commits. The download was let through only after the DELETE succeeded, so
/// the import stores B and then finds the profile deleted.
async fn deleted_during_the_download(storage: Storage) {
    let (addr, hits, hold) = holding_image_server().await;
    let keys = Keys::new();
    let (app, dir) = app_storing(&keys, storage).await;
    let key = &keys.hmac_old;

    let url = format!("http://{addr}/img/ok.png");
    let job = send(&app, key, &import("p1", "2026-01-01T00:00:01Z", url, None)).await;
    app.wait_for_state(job, "succeeded", WAIT).await;

    let url = format!("http://{addr}/img/held.png");
    let late = send(&app, key, &import("p1", "2026-01-01T00:00:02Z", url, None)).await;
    wait_until(WAIT, || async { hits_of(&hits, "held.png") == 1 }).await;
    let job = send(&app, key, &delete("p1", "2026-01-01T00:00:03Z")).await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    hold.release();
    app.wait_for_state(late, "succeeded", WAIT).await;

    assert_eq!(
        app.count(
            "SELECT count(*) AS n FROM webhook_events \
             WHERE action = 'IMPORT_HEADSHOT' AND outcome = 'skipped_deleted'"
        )
        .await,
        1,
        "the late import was decided after the DELETE"
    );
    assert_eq!(
        rows_of(&app, &sha_of(&other_png())).await,
        0,
        "{storage:?}: the deleted profile's late image was kept"
    );
    assert_eq!(app.count("SELECT count(*) AS n FROM headshots").await, 0);
    assert_eq!(
        files(dir.as_ref()),
        Vec::<String>::new(),
        "{storage:?}: files left after the DELETE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_downloaded_while_its_profile_was_deleted_is_not_kept_in_the_database() {
    deleted_during_the_download(Storage::Database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_downloaded_while_its_profile_was_deleted_is_not_kept_in_the_directory() {
    deleted_during_the_download(Storage::Directory).await;
}

/// An import of B for p1 is downloading when a newer import of A for p1
/// commits: B ends `skipped_stale` and goes; A stays with p1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_downloaded_for_an_overtaken_import_is_not_kept() {
    let (addr, hits, hold) = holding_image_server().await;
    let keys = Keys::new();
    let (app, dir) = app_storing(&keys, Storage::Directory).await;
    let key = &keys.hmac_old;
    let (a, b) = (sha_of(&png()), sha_of(&other_png()));

    let url = format!("http://{addr}/img/held.png");
    let late = send(&app, key, &import("p1", "2026-01-01T00:00:01Z", url, None)).await;
    wait_until(WAIT, || async { hits_of(&hits, "held.png") == 1 }).await;
    let url = format!("http://{addr}/img/ok.png");
    let job = send(&app, key, &import("p1", "2026-01-01T00:00:02Z", url, None)).await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    hold.release();
    app.wait_for_state(late, "succeeded", WAIT).await;

    assert_eq!(
        app.count("SELECT count(*) AS n FROM webhook_events WHERE outcome = 'skipped_stale'")
            .await,
        1
    );
    assert_eq!(
        (rows_of(&app, &a).await, rows_of(&app, &b).await),
        (1, 0),
        "rows of p1's image A and the overtaken import's B"
    );
    assert_eq!(files(dir.as_ref()), [a], "files");
}
