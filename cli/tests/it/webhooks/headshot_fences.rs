//! The fences around a headshot download, each against the test image server:
//! a name that resolves to an internal address, a redirect, a chunked answer
//! without end, and a server slower than the download timeout.

use std::time::Duration;

use super::headshots::{CAP, SLOW, app_with, hits_of, image_server, import};
use super::{Keys, send};

const WAIT: Duration = Duration::from_secs(30);
const AT: &str = "2026-01-01T00:00:01Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_name_that_resolves_to_an_internal_address_is_refused() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    let app = app_with(&keys, |h| {
        h.allowed_hosts = vec!["localhost".into()];
        h.allow_internal_addresses = false;
    })
    .await;
    let url = format!("http://localhost:{}/img/ok.png", addr.port());
    let job = send(&app, &keys.hmac_old, &import("p1", AT, url, None)).await;
    let dead = app.wait_for_state(job, "dead", WAIT).await;
    assert_eq!(dead.attempts, 1, "refused at once, not retried");
    let error = dead.last_error.unwrap_or_default();
    assert!(
        error.contains("`localhost` resolves to the internal address"),
        "{error}"
    );
    assert_eq!(hits_of(&hits, "ok.png"), 0, "never contacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_an_internal_address_is_not_followed() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    // 127.0.0.1 is allowed (the test server), the redirect points at `localhost`.
    let app = app_with(&keys, |h| h.allow_internal_addresses = true).await;
    let url = format!("http://{addr}/img/redirect.png");
    let job = send(&app, &keys.hmac_old, &import("p1", AT, url, None)).await;
    let dead = app.wait_for_state(job, "dead", WAIT).await;
    assert_eq!(dead.attempts, 1, "a redirect is a permanent failure");
    let error = dead.last_error.unwrap_or_default();
    assert!(
        error.contains("302") && error.contains("redirects are not followed"),
        "{error}"
    );
    assert_eq!(hits_of(&hits, "redirect.png"), 1);
    assert_eq!(hits_of(&hits, "ok.png"), 0, "the target was never fetched");
    assert_eq!(app.count("SELECT count(*) AS n FROM headshots").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_without_length_is_cut_off_at_the_cap() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    let app = app_with(&keys, |h| h.allow_internal_addresses = true).await;
    // The server never stops sending: only the cap ends the download.
    let url = format!("http://{addr}/img/endless.png");
    let job = send(&app, &keys.hmac_old, &import("p1", AT, url, None)).await;
    let dead = app.wait_for_state(job, "dead", WAIT).await;
    assert_eq!(dead.attempts, 1, "refused at once, not retried");
    let error = dead.last_error.unwrap_or_default();
    assert!(error.contains(&format!("exceeds {CAP} bytes")), "{error}");
    assert_eq!(hits_of(&hits, "endless.png"), 1);
    assert_eq!(app.count("SELECT count(*) AS n FROM headshots").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_slower_than_the_timeout_is_retried_as_a_timeout() {
    let (addr, hits) = image_server().await;
    let keys = Keys::new();
    let app = app_with(&keys, |h| {
        h.allow_internal_addresses = true;
        h.timeout_ms = 300;
    })
    .await;
    let url = format!("http://{addr}/img/slow.png");
    let started = std::time::Instant::now();
    let job = send(&app, &keys.hmac_old, &import("p1", AT, url, None)).await;
    // The first attempt fails on the timeout and the job is retried, not dead-lettered.
    let retried = loop {
        let record = app.job(job).await.unwrap();
        if record.attempts >= 2 || record.state == "dead" {
            break record;
        }
        assert!(started.elapsed() < WAIT, "not retried: {record:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_ne!(retried.state, "dead", "{retried:?}");
    assert!(retried.attempts >= 2, "{retried:?}");
    let error = retried.last_error.unwrap_or_default();
    assert!(error.contains("timed out after 300ms"), "{error}");
    assert!(
        started.elapsed() < SLOW * 2,
        "two attempts gave up long before the server answered"
    );
    crate::harness::wait_until(WAIT, || async { hits_of(&hits, "slow.png") >= 2 }).await;
    assert_eq!(app.count("SELECT count(*) AS n FROM headshots").await, 0);
}
