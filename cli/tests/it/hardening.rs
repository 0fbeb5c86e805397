//! Limits in front of the handlers: gzip bodies inflating past the limit (413),
//! problem+json for what is refused before a handler runs,
//! oversized headers (431), load shedding and request timeouts (503 with
//! `Retry-After`), and Postgres going away (503, nothing written or published).

use std::io::Write;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::Value;

use crate::harness::{PG_SERVER, TestApp};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

async fn post_gzip(app: &TestApp, body: Vec<u8>) -> reqwest::Response {
    app.client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bombs_are_413_and_big_headers_431() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let small = gzip(br#"{"task": "diag.noop", "args": {}}"#);
    assert_eq!(post_gzip(&app, small).await.status(), 202);

    // 3 MB of JSON whitespace compresses to a few KB and inflates past the 1 MB limit.
    let mut json = br#"{"task": "diag.noop", "args": {}"#.to_vec();
    json.extend(std::iter::repeat_n(b' ', 3 * 1024 * 1024));
    json.push(b'}');
    let bomb = gzip(&json);
    assert!(bomb.len() < 20_000, "{}", bomb.len());
    let response = post_gzip(&app, bomb).await;
    assert_eq!(response.status(), 413);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 413);

    // The idempotent path buffers the body itself and applies the same limit.
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("idempotency-key", "bomb")
        .body(gzip(&json))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    let response = app
        .client
        .get(app.url("/v1/jobs/x"))
        .header("x-padding", "p".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 1);
}

/// Answers written before a handler runs (a path or query string the
/// extractors reject, a `Content-Encoding` not inflated, a body that does not
/// inflate) are problem+json like every other error; deflate bodies inflate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_before_the_handlers_are_problems_too() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let post_encoded = |encoding: &'static str, body: Vec<u8>| {
        app.client
            .post(app.url("/v1/jobs"))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(body)
            .send()
    };
    let problem = |response: reqwest::Response, status: u16| async move {
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["status"], status, "{problem}");
        assert!(problem["detail"].as_str().unwrap().len() > 5, "{problem}");
        problem
    };

    let mut deflate = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    deflate
        .write_all(br#"{"task": "diag.noop", "args": {}}"#)
        .unwrap();
    let response = post_encoded("deflate", deflate.finish().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    let unknown = post_encoded("br", b"{}".to_vec()).await.unwrap();
    let unknown = problem(unknown, 415).await;
    assert!(
        unknown["detail"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding")
    );
    let corrupt = post_encoded("gzip", b"\x1f\x8bnot gzip at all".to_vec())
        .await
        .unwrap();
    let corrupt = problem(corrupt, 400).await;
    assert!(
        corrupt["detail"]
            .as_str()
            .unwrap()
            .contains("could not be read"),
        "{corrupt}"
    );

    let get = |path: &str| app.client.get(app.url(path)).send();
    problem(get("/v1/campaigns/not-a-uuid").await.unwrap(), 400).await;
    problem(get("/v1/admin/dead-jobs?limit=many").await.unwrap(), 400).await;
    problem(get("/v1/jobs/%FF").await.unwrap(), 400).await;
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_nul_in_the_url_is_400_not_a_database_error() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    for path in [
        "/v1/profiles/a%00b",
        "/v1/stats/jobs?task=diag%00noop",
        "/v1/admin/dead-jobs?task=%00",
    ] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let problem: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            problem["type"],
            "https://conveyor.dev/problems/malformed-url"
        );
    }
}

/// A request whose body never finishes: it holds a concurrency slot until dropped.
fn stalled_request(app: &TestApp) -> tokio::task::JoinHandle<u16> {
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    tx.unbounded_send(Ok(br#"{"task": "#.to_vec())).unwrap();
    let request = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(rx));
    tokio::spawn(async move {
        let _keep_open = tx;
        request.send().await.map_or(0, |r| r.status().as_u16())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_and_slow_requests_time_out() {
    let app = TestApp::spawn_with(0, |config| {
        config.ingress.max_concurrent_requests = 1;
        config.ingress.request_timeout_ms = 1_500;
    })
    .await;
    let stalled = stalled_request(&app);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shed = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    // The stalled request is abandoned at the timeout with a 503 of its own.
    assert_eq!(stalled.await.unwrap(), 503);
    let after = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(after.status(), 200);
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_gone_is_503_with_nothing_published() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let work = app.topology().work_queue("default");
    let unused_key = app.create_key(&["enqueue:*"]).await;
    assert_eq!(app.enqueue_status(&app.client).await, 202);

    let name = app.db.name.clone();
    tokio::task::spawn_blocking(move || {
        PgConnection::establish(&format!("{PG_SERVER}/postgres"))
            .unwrap()
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .unwrap();
    })
    .await
    .unwrap();
    // The admin key is still cached: the job's own write fails.
    let response = app.enqueue_response(&app.client).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    // A key not cached cannot be verified.
    let response = app.enqueue_response(&app.client_with(&unused_key)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(app.queue_len(&work).await, 1);
}

/// The recorder keeps one connection per batch in flight. One killed since its
/// last batch (a database restart, a failover, an administrator's
/// `pg_terminate_backend`) is replaced before anything is published: the next
/// job is accepted, not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_connections_killed_between_batches_are_replaced() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let work = app.topology().work_queue("default");
    for _ in 0..3 {
        assert_eq!(app.enqueue_status(&app.client).await, 202);
    }
    let lanes = format!(
        "FROM pg_stat_activity WHERE datname = current_database() AND application_name = '{}'",
        conveyor_ingress::recorder::LANE_APPLICATION_NAME
    );
    assert!(app.count(&format!("SELECT count(*) AS n {lanes}")).await >= 1);
    let killed = app
        .count(&format!(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n {lanes}"
        ))
        .await;
    assert!(killed >= 1, "no recorder connection was terminated");
    for _ in 0..3 {
        assert_eq!(app.enqueue_status(&app.client).await, 202);
    }
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 6);
    assert_eq!(app.queue_len(&work).await, 6);
}

/// A database on the same host is reached without TLS, which would encrypt
/// traffic that never leaves the machine (`config::database_url`). Debian's
/// PostgreSQL offers TLS (`ssl = on`), and libpq's default takes it: the
/// harness's own connection, made with the bare URL, shows the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_on_the_same_host_is_reached_without_tls() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    assert_eq!(app.enqueue_status(&app.client).await, 202);
    let lanes = format!(
        "FROM pg_stat_activity JOIN pg_stat_ssl USING (pid)
         WHERE datname = current_database() AND application_name = '{}'",
        conveyor_ingress::recorder::LANE_APPLICATION_NAME
    );
    assert!(app.count(&format!("SELECT count(*) AS n {lanes}")).await >= 1);
    assert_eq!(
        app.count(&format!("SELECT count(*) AS n {lanes} AND ssl"))
            .await,
        0,
        "a recorder lane's connection to 127.0.0.1 uses TLS"
    );
    let server_offers_tls = app
        .count("SELECT count(*) AS n FROM pg_settings WHERE name = 'ssl' AND setting = 'on'")
        .await
        == 1;
    if server_offers_tls {
        let own = "SELECT count(*) AS n FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl";
        assert_eq!(app.count(own).await, 1, "libpq's default should take TLS");
    }
}
