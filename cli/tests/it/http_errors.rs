//! Every bad input gets its status code and a problem+json body, and nothing is published.

use std::time::Duration;

use serde_json::json;

use crate::harness::{TestApp, problem};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_with_problems_and_publish_nothing() {
    // No worker: anything published would stay in the queue.
    let app = TestApp::spawn_with(0, |c| c.ingress.body_limit_bytes = 2048).await;
    let post = || app.client.post(app.url("/v1/jobs"));

    let body = problem(
        post()
            .header("content-type", "application/json")
            .body("{\"task\": ")
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("not valid JSON"));

    problem(
        post()
            .header("content-type", "text/plain")
            .body("{}")
            .send()
            .await
            .unwrap(),
        415,
    )
    .await;
    problem(post().body("{}").send().await.unwrap(), 415).await;

    let big = json!({"task": "diag.noop", "args": {}, "pad": "x".repeat(4096)}).to_string();
    problem(
        post()
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap(),
        413,
    )
    .await;
    // Chunked (no Content-Length): rejected while reading.
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(big.into_bytes())]);
    problem(
        post()
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .unwrap(),
        413,
    )
    .await;

    let cases = [
        (json!({"task": "no.such"}), "/task"),
        (
            json!({"task": "diag.sleep", "args": {"ms": "long"}}),
            "/args/ms",
        ),
        (
            json!({"task": "diag.sleep", "args": {"ms": 1, "extra": true}}),
            "/args/extra",
        ),
        (json!({"task": "diag.noop", "colour": "red"}), "/colour"),
        (json!({"task": 7}), "/task"),
        (json!({"task": "diag.noop", "delay_ms": -1}), "/delay_ms"),
    ];
    for (request, pointer) in cases {
        let body = problem(app.post_job(request.clone()).await, 422).await;
        assert_eq!(body["pointer"], pointer, "{request} → {body}");
        assert_eq!(body["status"], 422);
    }

    let missing = app
        .client
        .get(app.url(&format!("/v1/jobs/{}", uuid::Uuid::now_v7())))
        .send()
        .await
        .unwrap();
    problem(missing, 404).await;
    problem(
        app.client
            .get(app.url("/v1/jobs/not-a-uuid"))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    // A route asked with a method it does not take.
    for (method, path, allow) in [
        (reqwest::Method::GET, "/v1/jobs/batch", "POST"),
        (reqwest::Method::DELETE, "/v1/jobs", "POST"),
    ] {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        let body = problem(response, 405).await;
        assert!(
            body["detail"].as_str().unwrap().contains(path),
            "{method} {path} → {body}"
        );
    }

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        app.queue_len(&app.topology().work_queue("default")).await,
        0
    );
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Sends `head` (request line and headers, no body) on a raw connection and
/// returns the status line, failing if none arrives within 3 s: a server that
/// waited for the declared body would never answer.
async fn status_line_without_sending_a_body(app: &TestApp, head: String) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(3), reader.read_line(&mut line))
        .await
        .expect("no answer within 3 s: the server waited for the body")
        .unwrap();
    line
}

/// A declared `Content-Length` over the limit is refused from the headers
/// alone, with or without an `Idempotency-Key`: the body is never awaited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_content_length_is_413_before_the_body_is_sent() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    for extra in ["", "Idempotency-Key: big-1\r\n"] {
        let head = format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 10000000\r\n{extra}\r\n",
            app.admin_key
        );
        let line = status_line_without_sending_a_body(&app, head).await;
        assert!(line.starts_with("HTTP/1.1 413"), "{extra:?}: {line}");
    }
    assert_eq!(
        app.count("SELECT count(*) AS n FROM idempotency_keys")
            .await,
        0
    );
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 0);
}

/// With an `Idempotency-Key`, the content type and the declared length are
/// checked before the key is looked up: a request that fails them is refused
/// even when the key has a stored response it would otherwise replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_checked_before_the_key_is_claimed() {
    let app = TestApp::spawn_with(0, |c| c.ingress.body_limit_bytes = 2048).await;
    let body = r#"{"task":"diag.noop","args":{}}"#;
    let post = |content_type: &'static str| {
        app.client
            .post(app.url("/v1/jobs"))
            .header("idempotency-key", "order-7")
            .header("content-type", content_type)
            .body(body)
    };
    let first = post("application/json").send().await.unwrap();
    assert_eq!(first.status(), 202);
    assert_eq!(
        post("application/json").send().await.unwrap().headers()["idempotent-replayed"],
        "true"
    );
    // Same key, method, path and body: only the content type differs.
    let refused = problem(post("text/plain").send().await.unwrap(), 415).await;
    assert_eq!(refused["status"], 415);
    // Same key, a declared length over the limit.
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 4096\r\nIdempotency-Key: order-7\r\n\r\n",
        app.admin_key
    );
    let line = status_line_without_sending_a_body(&app, head).await;
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    // The stored response is untouched and still replayed.
    assert_eq!(
        post("application/json").send().await.unwrap().headers()["idempotent-replayed"],
        "true"
    );
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 1);
}
