//! Every bad input gets its status code and a problem+json body, and nothing is published.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::TestApp;

async fn problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    response.json().await.unwrap()
}

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
