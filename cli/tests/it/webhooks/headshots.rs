//! IMPORT_HEADSHOT against a real HTTP server started by the test: stored
//! once, skipped when unchanged, refused when too large, of the wrong type,
//! missing, or on a host or address that is not allowed; retried when flaky.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use conveyor_platform::config::{HeadshotConfig, HeadshotStorage};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Keys, send, spawn};
use crate::harness::TestApp;

const WAIT: Duration = Duration::from_secs(30);
pub const CAP: u64 = 4096;
/// How long `slow.png` takes to answer: far past the download timeout of [`app_with`] tests.
pub const SLOW: Duration = Duration::from_secs(3);

/// Requests served, by path.
pub type Hits = Arc<Mutex<HashMap<String, u32>>>;

/// Holds every answer of `held.png` ([`other_png`]) back until [`Hold::release`].
#[derive(Clone)]
pub struct Hold(Arc<tokio::sync::Semaphore>);

impl Hold {
    /// Lets one held (or the next) answer of `held.png` go.
    pub fn release(&self) {
        self.0.add_permits(1);
    }
}

#[derive(Clone)]
struct Served {
    hits: Hits,
    hold: Hold,
}

pub fn png() -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend((0..1000u32).map(|i| (i % 251) as u8));
    bytes
}

/// A second image, served as `other.png` and `held.png`.
pub fn other_png() -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend((0..1000u32).map(|i| (i % 241) as u8));
    bytes
}

async fn serve_image(
    State(Served { hits, hold }): State<Served>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let seen = {
        let mut hits = hits.lock().unwrap();
        let n = hits.entry(name.clone()).or_default();
        *n += 1;
        *n
    };
    let port = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.rsplit_once(':'))
        .map(|(_, port)| port.to_owned())
        .unwrap_or_default();
    match name.as_str() {
        // To the same image by a name that is neither allowed nor public.
        "redirect.png" => (
            StatusCode::FOUND,
            [(
                header::LOCATION,
                format!("http://localhost:{port}/img/ok.png"),
            )],
        )
            .into_response(),
        // Chunked, no Content-Length, and never ending: only a cut-off stops it.
        "endless.png" => {
            let chunks = futures::stream::repeat_with(|| {
                Ok::<_, std::convert::Infallible>(Bytes::from(vec![7u8; 1024]))
            });
            (
                [(header::CONTENT_TYPE, "image/png")],
                Body::from_stream(chunks),
            )
                .into_response()
        }
        "slow.png" => {
            tokio::time::sleep(SLOW).await;
            ([(header::CONTENT_TYPE, "image/png")], png()).into_response()
        }
        "held.png" => {
            hold.0.acquire().await.unwrap().forget();
            ([(header::CONTENT_TYPE, "image/png")], other_png()).into_response()
        }
        _ => fixed(&name, seen),
    }
}

fn fixed(name: &str, seen: u32) -> Response {
    let (status, content_type, body) = match name {
        "ok.png" => (StatusCode::OK, [(header::CONTENT_TYPE, "image/png")], png()),
        "other.png" => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "image/png")],
            other_png(),
        ),
        "big.png" => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "image/png")],
            vec![7; CAP as usize + 1],
        ),
        "page.png" => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            b"<html></html>".to_vec(),
        ),
        "flaky.png" if seen == 1 => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            Vec::new(),
        ),
        "flaky.png" => (StatusCode::OK, [(header::CONTENT_TYPE, "image/png")], png()),
        "down.png" => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            Vec::new(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain")],
            Vec::new(),
        ),
    };
    (status, content_type, body).into_response()
}

/// An image server on 127.0.0.1:0.
pub async fn image_server() -> (SocketAddr, Hits) {
    let (addr, hits, _hold) = holding_image_server().await;
    (addr, hits)
}

/// An image server on 127.0.0.1:0 whose `held.png` answers when the [`Hold`] lets them.
pub async fn holding_image_server() -> (SocketAddr, Hits, Hold) {
    let hits = Hits::default();
    let hold = Hold(Arc::new(tokio::sync::Semaphore::new(0)));
    let app = axum::Router::new()
        .route("/img/{name}", axum::routing::get(serve_image))
        .with_state(Served {
            hits: hits.clone(),
            hold: hold.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits, hold)
}

pub fn hits_of(hits: &Hits, name: &str) -> u32 {
    hits.lock().unwrap().get(name).copied().unwrap_or(0)
}

pub fn import(profile: &str, at: &str, url: String, sha256: Option<&str>) -> Value {
    let mut data = json!({"url": url});
    if let Some(sha) = sha256 {
        data["sha256"] = json!(sha);
    }
    json!({"action": "IMPORT_HEADSHOT", "profile_id": profile, "occurred_at": at, "data": data})
}

async fn app_for(keys: &Keys, allow_internal: bool, dir: Option<std::path::PathBuf>) -> TestApp {
    app_with(keys, |h| {
        h.allow_internal_addresses = allow_internal;
        if let Some(dir) = dir {
            h.storage = HeadshotStorage::Directory;
            h.dir = Some(dir);
        }
    })
    .await
}

/// One worker; images from 127.0.0.1 only, at most [`CAP`] bytes within 5 s, then `tweak`.
pub async fn app_with(keys: &Keys, tweak: impl FnOnce(&mut HeadshotConfig)) -> TestApp {
    spawn(1, keys, move |config| {
        let h = &mut config.webhooks.headshots;
        h.allowed_hosts = vec!["127.0.0.1".into()];
        h.max_bytes = CAP;
        h.timeout_ms = 5_000;
        tweak(h);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headshot_is_stored_once_and_an_unchanged_checksum_skips_the_download() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    let app = app_for(&keys, true, None).await;
    let key = &keys.hmac_old;
    let url = format!("http://{addr}/img/ok.png");
    let sha = hex::encode(Sha256::digest(png()));

    let job = send(
        &app,
        key,
        &import("p1", "2026-01-01T00:00:01Z", url.clone(), None),
    )
    .await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    assert_eq!(hits_of(&hits, "ok.png"), 1);
    let profile: Value = app.get_json("/v1/profiles/p1").await;
    assert_eq!(profile["headshot"]["sha256"], sha.as_str(), "{profile}");
    assert_eq!(profile["headshot"]["content_type"], "image/png");
    let stored = app
        .count(&format!(
            "SELECT count(*) AS n FROM headshots WHERE sha256 = '{sha}' AND length(data) = {}",
            png().len()
        ))
        .await;
    assert_eq!(stored, 1);

    // Same checksum announced again: no download.
    let job = send(
        &app,
        key,
        &import("p1", "2026-01-01T00:00:02Z", url.clone(), Some(&sha)),
    )
    .await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    // Another profile with an image already stored: no download either.
    let job = send(
        &app,
        key,
        &import("p2", "2026-01-01T00:00:02Z", url.clone(), Some(&sha)),
    )
    .await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    assert_eq!(hits_of(&hits, "ok.png"), 1);
    // Without a checksum it is fetched, but still stored once.
    let job = send(&app, key, &import("p3", "2026-01-01T00:00:02Z", url, None)).await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    assert_eq!(hits_of(&hits, "ok.png"), 2);
    assert_eq!(app.count("SELECT count(*) AS n FROM headshots").await, 1);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM profiles WHERE headshot_sha256 = '{sha}'"
        ))
        .await,
        3
    );
    let unchanged = app
        .count("SELECT count(*) AS n FROM webhook_events WHERE outcome = 'unchanged' AND detail LIKE 'checksum unchanged%'")
        .await;
    assert_eq!(unchanged, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headshots_are_refused_and_flaky_ones_retried() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    let app = app_for(&keys, true, None).await;
    let key = &keys.hmac_old;
    let at = "2026-01-01T00:00:01Z";
    let cases = [
        (
            "big",
            format!("http://{addr}/img/big.png"),
            "exceeds 4096 bytes",
        ),
        (
            "page",
            format!("http://{addr}/img/page.png"),
            "content type `text/html`",
        ),
        ("missing", format!("http://{addr}/img/missing.png"), "404"),
        (
            "elsewhere",
            format!("http://localhost:{}/img/ok.png", addr.port()),
            "not in webhooks.headshots.allowed_hosts",
        ),
    ];
    for (profile, url, why) in cases {
        let job = send(&app, key, &import(profile, at, url, None)).await;
        let dead = app.wait_for_state(job, "dead", WAIT).await;
        assert_eq!(dead.attempts, 1, "{profile}: refused at once, not retried");
        // Also not run again: the first job's dead letter once raced the
        // worker's publisher connecting, and the job ran up to a dozen times.
        assert_eq!(dead.runs, 1, "{profile}: ran once");
        let error = dead.last_error.unwrap_or_default();
        assert!(error.contains(why), "{profile}: {error}");
        let profile_row = app.count(&format!("SELECT count(*) AS n FROM profiles WHERE id = '{profile}' AND headshot_sha256 IS NOT NULL")).await;
        assert_eq!(profile_row, 0, "{profile}");
    }
    assert_eq!(
        hits_of(&hits, "ok.png"),
        0,
        "the disallowed host was never contacted"
    );
    assert_eq!(hits_of(&hits, "missing.png"), 1, "a 404 is not retried");
    assert_eq!(app.count("SELECT count(*) AS n FROM headshots").await, 0);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM webhook_events WHERE outcome = 'failed'")
            .await,
        4
    );

    let job = send(
        &app,
        key,
        &import("flaky", at, format!("http://{addr}/img/flaky.png"), None),
    )
    .await;
    let done = app.wait_for_state(job, "succeeded", WAIT).await;
    assert_eq!(done.attempts, 2);
    assert_eq!(hits_of(&hits, "flaky.png"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_refused_unless_allowed_and_files_can_hold_images() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    // Allowed host, but it is loopback and internal addresses are not allowed.
    let strict = app_for(&keys, false, Some(dir.path().to_owned())).await;
    let url = format!("http://{addr}/img/ok.png");
    let job = send(
        &strict,
        &keys.hmac_old,
        &import("p1", "2026-01-01T00:00:01Z", url.clone(), None),
    )
    .await;
    let dead = strict.wait_for_state(job, "dead", WAIT).await;
    assert!(
        dead.last_error
            .unwrap_or_default()
            .contains("internal address 127.0.0.1")
    );
    assert_eq!(hits_of(&hits, "ok.png"), 0);
    drop(strict);

    let open = app_for(&keys, true, Some(dir.path().to_owned())).await;
    let job = send(
        &open,
        &keys.hmac_old,
        &import("p1", "2026-01-01T00:00:01Z", url, None),
    )
    .await;
    open.wait_for_state(job, "succeeded", WAIT).await;
    let sha = hex::encode(Sha256::digest(png()));
    assert_eq!(std::fs::read(dir.path().join(&sha)).unwrap(), png());
    assert_eq!(
        open.count(&format!(
            "SELECT count(*) AS n FROM headshots WHERE sha256 = '{sha}' AND data IS NULL"
        ))
        .await,
        1
    );
    // A DELETE drops the last reference: the file goes too.
    let job = send(
        &open,
        &keys.hmac_old,
        &json!({"action": "DELETE", "profile_id": "p1", "occurred_at": "2026-01-01T00:00:05Z"}),
    )
    .await;
    open.wait_for_state(job, "succeeded", WAIT).await;
    assert!(!dir.path().join(&sha).exists());
    assert_eq!(open.count("SELECT count(*) AS n FROM headshots").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_short_file_under_the_images_name_is_written_again_not_reused() {
    let (addr, _hits) = image_server().await;
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let sha = hex::encode(Sha256::digest(png()));
    // What a release that renamed before syncing could leave after a power loss.
    let whole = png();
    std::fs::write(dir.path().join(&sha), &whole[..whole.len() / 2]).unwrap();
    let app = app_for(&keys, true, Some(dir.path().to_owned())).await;
    let job = send(
        &app,
        &keys.hmac_old,
        &import(
            "p1",
            "2026-01-01T00:00:01Z",
            format!("http://{addr}/img/ok.png"),
            None,
        ),
    )
    .await;
    app.wait_for_state(job, "succeeded", WAIT).await;
    let stored = std::fs::read(dir.path().join(&sha)).unwrap();
    assert!(
        stored == whole,
        "the cut-short file was reused: {} bytes of {}",
        stored.len(),
        whole.len()
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from(&sha)],
        "no temporary file left"
    );
}

/// An event whose retries never succeed (its headshot host answers 503 every
/// time) is recorded `failed` on its last attempt, with the reason, so the
/// webhook statistics count it; before, only an `accepted` row showed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_out_of_attempts_is_recorded_failed() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    let app = app_for(&keys, true, None).await;
    // Its last attempt, as the earlier ones would have left it.
    let args = json!({
        "source": "members",
        "webhook_id": "msg_out_of_attempts",
        "event": import("p1", "2026-01-01T00:00:01Z", format!("http://{addr}/img/down.png"), None),
    });
    let mut envelope = conveyor_schema::Envelope::new("webhook.profile_sync", args);
    envelope.attempt = 8;
    app.publish_envelope_to("webhooks", &envelope).await;
    let dead = app.wait_for_state(envelope.id, "dead", WAIT).await;
    assert_eq!(hits_of(&hits, "down.png"), 1);
    let failed = app
        .count(
            "SELECT count(*) AS n FROM webhook_events
              WHERE webhook_id = 'msg_out_of_attempts' AND outcome = 'failed'
                AND detail LIKE 'gave up after 8 attempts: %503%'",
        )
        .await;
    assert_eq!(
        failed, 1,
        "no failed event recorded; the job ended: {dead:?}"
    );
}
