//! What the endpoint bounds: a chunked body past the limit, a header carrying
//! more signatures than the cap, and how long accepted ids are remembered
//! before the sweeper forgets them.

use conveyor_platform::webhook_signature::{MAX_SIGNATURES, SigningKey};
use serde_json::{Value, json};

use super::{Keys, TOLERANCE, counts, now, post_raw, spawn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_is_413_with_nothing_enqueued() {
    let keys = Keys::new();
    let app = spawn(0, &keys, |_| {}).await;
    // A valid, correctly signed event, only too large (the test source's limit is 4096).
    let body = json!({"action": "UPDATE", "profile_id": "p", "occurred_at": "2026-01-01T00:00:00Z",
                      "data": {"email": "a@b", "display_name": "x".repeat(6000)}})
    .to_string()
    .into_bytes();
    let ts = now();
    let signature = SigningKey::parse(&keys.hmac_old)
        .unwrap()
        .sign("big-1", ts, &body);
    let headers = [
        ("webhook-id", "big-1".to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signature),
    ];
    // Sent in 512-byte chunks without a Content-Length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(512).map(|c| Ok(c.to_vec())).collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let response = post_raw(&app, "members", &headers, streamed).await;
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("body-too-large"),
        "{problem}"
    );
    assert_eq!(counts(&app).await, (0, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_signatures_than_the_cap_is_400_even_with_a_valid_one() {
    let keys = Keys::new();
    let app = spawn(0, &keys, |_| {}).await;
    let body = super::update("p1", "2026-01-01T00:00:00Z", "a@x.io").to_string();
    let ts = now();
    let sign = |id: &str| {
        SigningKey::parse(&keys.hmac_old)
            .unwrap()
            .sign(id, ts, body.as_bytes())
    };
    let header = |id: &str, entries: usize| {
        let mut all = vec!["v1,bm90IHRoaXMgb25l".to_owned(); entries - 1];
        all.push(sign(id));
        [
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", all.join(" ")),
        ]
    };
    let over = post_raw(
        &app,
        "members",
        &header("many-1", MAX_SIGNATURES + 1),
        body.clone(),
    )
    .await;
    assert_eq!(over.status(), 400);
    let problem: Value = over.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("too-many-signatures"),
        "{problem}"
    );
    assert_eq!(counts(&app).await, (0, 0, 0, 0));
    // At the cap, the one valid signature among them is enough.
    let at_cap = post_raw(&app, "members", &header("many-2", MAX_SIGNATURES), body).await;
    assert_eq!(at_cap.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_ids_are_remembered_past_the_window_and_then_swept() {
    let keys = Keys::new();
    let app = spawn(0, &keys, |_| {}).await;
    let margin = app.config.webhooks.dedup_margin_secs;
    let body = super::update("p1", "2026-01-01T00:00:00Z", "a@x.io").to_string();
    let ts = now();
    let response = super::post_signed(&app, &keys.hmac_old, "kept-1", ts, body.as_bytes()).await;
    assert_eq!(response.status(), 202);
    // Remembered at least as long as a replay could still pass the timestamp check.
    let long_enough = app
        .count(&format!(
            "SELECT count(*) AS n FROM webhook_deliveries WHERE webhook_id = 'kept-1' \
             AND expires_at >= to_timestamp({})",
            ts + (TOLERANCE + margin) as i64
        ))
        .await;
    assert_eq!(long_enough, 1);

    // An expired claim beside it: the sweep removes that one only.
    app.count(
        "WITH i AS (INSERT INTO webhook_deliveries (source, webhook_id, job_id, expires_at) \
         VALUES ('members', 'old-1', gen_random_uuid(), now() - interval '1 second') RETURNING 1) \
         SELECT count(*) AS n FROM i",
    )
    .await;
    let db = conveyor_schema::pool::pool(&app.db.url, 1);
    let swept = conveyor_ingress::webhooks::sweep_expired(&db)
        .await
        .unwrap();
    assert_eq!(swept, 1);
    let left = app
        .count(
            "SELECT count(*) AS n FROM webhook_deliveries WHERE webhook_id IN ('kept-1', 'old-1')",
        )
        .await;
    assert_eq!(left, 1);
    let kept = app
        .count("SELECT count(*) AS n FROM webhook_deliveries WHERE webhook_id = 'kept-1'")
        .await;
    assert_eq!(kept, 1);
}
