//! `Idempotency-Key` on the creating POSTs: replay, mismatch (422), in flight
//! (409), failures not stored, a retry of a failed or abandoned first request
//! making the same job (and another body refused meanwhile), a late first
//! request leaving its key's takeover alone, 50 concurrent retries making one
//! job, and the batched purge of expired keys.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::harness::TestApp;

async fn post(
    client: &reqwest::Client,
    app: &TestApp,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    app.post_keyed(client, "/v1/jobs", key, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_replays_other_body_is_422_failures_are_not_stored() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let work = app.topology().work_queue("default");
    let body = json!({"task": "diag.noop", "args": {}});

    let first = post(&app.client, &app, "order-1", &body).await;
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let again = post(&app.client, &app, "order-1", &body).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], "application/json");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first);

    let other = json!({"task": "diag.noop", "args": {}, "delay_ms": 5});
    let mismatch = post(&app.client, &app, "order-1", &other).await;
    assert_eq!(mismatch.status(), 422);
    assert_eq!(
        mismatch.headers()["content-type"],
        "application/problem+json"
    );

    // A request that fails validation does not store the key: the corrected retry runs.
    let invalid = json!({"task": "diag.noop", "args": {"nope": 1}});
    assert_eq!(
        post(&app.client, &app, "order-2", &invalid).await.status(),
        422
    );
    let corrected = post(&app.client, &app, "order-2", &body).await;
    assert_eq!(corrected.status(), 202);
    assert!(corrected.headers().get("idempotent-replayed").is_none());

    // Keys belong to a producer: another producer's "order-1" is its own.
    let other_producer = app.create_key_with("shop", &["enqueue:*"], None).await;
    let theirs = post(&app.client_with(&other_producer), &app, "order-1", &body).await;
    assert_eq!(theirs.status(), 202);
    assert!(theirs.headers().get("idempotent-replayed").is_none());

    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 3);
    assert_eq!(app.queue_len(&work).await, 3);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM idempotency_keys WHERE state = 'done' AND expires_at > now() + interval '23 hours'")
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_flight_is_409() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let body = json!({"task": "diag.noop", "args": {}});
    let raw = serde_json::to_vec(&body).unwrap();
    // A claim as the first request leaves it while it runs.
    leave_claim(&app, "busy", &raw, "in_flight", "0 seconds", Uuid::now_v7()).await;
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "busy")
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 0);
}

/// Leaves the claim a first request with body `raw` on `POST /v1/jobs` would:
/// for the harness's admin key, in `state`, made `age` ago, with job seed `seed`.
async fn leave_claim(app: &TestApp, key: &str, raw: &[u8], state: &str, age: &str, seed: Uuid) {
    let mut hasher = Sha256::new();
    hasher.update(b"POST\n/v1/jobs\n");
    hasher.update(raw);
    let hash = hex::encode(hasher.finalize());
    app.count(&format!(
        "WITH c AS (INSERT INTO idempotency_keys \
           (producer, key, request_hash, state, created_at, expires_at, id_seed) \
         VALUES ('test-admin', '{key}', '\\x{hash}', '{state}', now() - interval '{age}', \
           now() + interval '1 hour', '{seed}') RETURNING 1) \
         SELECT count(*) AS n FROM c"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_failed_or_abandoned_first_request_makes_the_same_job() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let body = json!({"task": "diag.noop", "args": {}});
    let raw = serde_json::to_vec(&body).unwrap();
    let accepted_id = |response: reqwest::Response| async move {
        assert_eq!(response.status(), 202);
        assert!(response.headers().get("idempotent-replayed").is_none());
        let id = response.json::<Value>().await.unwrap()["id"].clone();
        id.as_str().unwrap().parse::<Uuid>().unwrap()
    };

    // Its ingress died an hour ago, mid-request: the retry takes the claim
    // over and makes the job the first request may have enqueued.
    let abandoned = Uuid::now_v7();
    leave_claim(&app, "crashed", &raw, "in_flight", "1 hour", abandoned).await;
    let retried = post(&app.client, &app, "crashed", &body).await;
    assert_eq!(accepted_id(retried).await, abandoned);

    // It answered 5xx (perhaps in doubt): the same request makes the same job.
    let failed = Uuid::now_v7();
    leave_claim(&app, "failed", &raw, "failed", "1 second", failed).await;
    let retried = post(&app.client, &app, "failed", &body).await;
    assert_eq!(accepted_id(retried).await, failed);

    // Another request with the key of a failed or abandoned first request is
    // refused as on any key, and takes nothing over: the first request's retry
    // still makes the job the first may have made.
    let other = json!({"task": "diag.noop", "args": {}, "delay_ms": 5});
    for (key, state, age) in [
        ("failed-then-other", "failed", "1 second"),
        ("crashed-then-other", "in_flight", "1 hour"),
    ] {
        let seed = Uuid::now_v7();
        leave_claim(&app, key, &raw, state, age, seed).await;
        let refused = post(&app.client, &app, key, &other).await;
        assert_eq!(refused.status(), 422, "{key}");
        let problem: Value = refused.json().await.unwrap();
        assert_eq!(
            problem["type"], "https://conveyor.dev/problems/idempotency-key-reused",
            "{problem}"
        );
        let retried = post(&app.client, &app, key, &body).await;
        assert_eq!(accepted_id(retried).await, seed, "{key}");
    }

    // A keyed batch's jobs each get an id of their own from the one seed.
    let batch = app
        .post_keyed(
            &app.client,
            "/v1/jobs/batch",
            "batch-1",
            &json!({"jobs": [body, body]}),
        )
        .await;
    assert_eq!(batch.status(), 202);
    let batch: Value = batch.json().await.unwrap();
    let ids: Vec<Uuid> = batch["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{batch}");
    assert_ne!(ids[0], ids[1]);
    assert!(ids.iter().all(|id| id.get_version_num() == 7), "{ids:?}");

    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 6);
    let done = "SELECT count(*) AS n FROM idempotency_keys WHERE state = 'done'";
    assert_eq!(app.count(done).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_answering_after_its_key_was_taken_over_stores_nothing() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let campaign = json!({
        "name": "Late",
        "template": "event_announcement",
        "from": "Events <events@example.com>",
        "vars": {"event": {"title": "Late", "date": "1 April", "venue": "Hall 1"}},
        "recipients": [{"email": "ada@example.com", "vars": {"name": "Ada"}}],
    });
    // The first request waits to insert its campaign.
    let release = app.block_inserts("campaigns").await;
    let first = app.post_keyed(&app.client, "/v1/campaigns", "late", &campaign);
    let take_over = async {
        app.wait_for_a_lock_wait().await;
        // Meanwhile it was presumed dead, and a retry took the key over: the
        // claim is the retry's (same seed, a later `created_at`), still running.
        let taken = "WITH u AS (UPDATE idempotency_keys SET created_at = created_at + interval '1 minute' \
                     WHERE key = 'late' AND state = 'in_flight' RETURNING 1) SELECT count(*) AS n FROM u";
        assert_eq!(app.count(taken).await, 1);
        release.send(()).unwrap();
    };
    let (first, ()) = tokio::join!(first, take_over);
    assert_eq!(first.status(), 201);

    // Its answer is not stored over the retry's claim: a third request finds
    // the retry still running, not the first request's answer to replay.
    let claim = "SELECT count(*) AS n FROM idempotency_keys \
                 WHERE key = 'late' AND state = 'in_flight' AND response_status IS NULL";
    assert_eq!(app.count(claim).await, 1);
    let third = app
        .post_keyed(&app.client, "/v1/campaigns", "late", &campaign)
        .await;
    assert_eq!(third.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_identical_requests_make_one_job() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let work = app.topology().work_queue("default");
    let body = json!({"task": "diag.noop", "args": {}});
    let requests = (0..50).map(|_| {
        let client = app.client.clone();
        let url = app.url("/v1/jobs");
        let body = body.clone();
        tokio::spawn(async move {
            let response = client
                .post(url)
                .header("Idempotency-Key", "same-for-all")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let body: Value = response.json().await.unwrap();
            (status, replayed, body)
        })
    });
    let answers: Vec<_> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let accepted: Vec<_> = answers.iter().filter(|a| a.0 == 202).collect();
    let fresh = accepted.iter().filter(|a| !a.1).count();
    assert_eq!(fresh, 1, "exactly one request ran: {answers:?}");
    assert!(
        answers.iter().all(|a| a.0 == 202 || a.0 == 409),
        "{answers:?}"
    );
    let id = &accepted[0].2["id"];
    assert!(accepted.iter().all(|a| &a.2["id"] == id), "{answers:?}");
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 1);
    assert_eq!(app.queue_len(&work).await, 1);
    // After the first finished, a retry replays it.
    let retry = post(&app.client, &app, "same-for-all", &body).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(&retry.json::<Value>().await.unwrap()["id"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_purged_in_batches_and_can_be_reused() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    app.count(
        "WITH c AS (INSERT INTO idempotency_keys (producer, key, request_hash, state, expires_at) \
         SELECT 'p', 'k' || g, '\\x00', 'done', now() - interval '1 second' FROM generate_series(1, 2500) g \
         RETURNING 1) SELECT count(*) AS n FROM c",
    )
    .await;
    let body = json!({"task": "diag.noop", "args": {}});
    assert_eq!(post(&app.client, &app, "old", &body).await.status(), 202);
    app.count("WITH u AS (UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = 'old' RETURNING 1) SELECT count(*) AS n FROM u").await;
    // An expired key is taken over by a new request, even with another body.
    let other = json!({"task": "diag.noop", "args": {}, "delay_ms": 1});
    let reused = post(&app.client, &app, "old", &other).await;
    assert_eq!(reused.status(), 202);
    assert!(reused.headers().get("idempotent-replayed").is_none());

    let pool = conveyor_schema::pool::pool(&app.db.url, 2);
    let purged = conveyor_ingress::idempotency::purge_expired(&pool)
        .await
        .unwrap();
    assert_eq!(purged, 2500);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM idempotency_keys")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_create_and_send_replay_with_a_campaigns_key_and_a_lost_answer_makes_no_second_campaign()
 {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let client = app.client_with(&app.create_key(&["campaigns"]).await);
    let campaign = json!({
        "name": "Spring meetup",
        "template": "event_announcement",
        "from": "Events <events@example.com>",
        "vars": {"event": {"title": "Spring meetup", "date": "1 April", "venue": "Hall 1"}},
        "recipients": [{"email": "ada@example.com", "vars": {"name": "Ada"}}],
    });
    let create = |key: &'static str| {
        client
            .post(app.url("/v1/campaigns"))
            .header("Idempotency-Key", key)
            .json(&campaign)
            .send()
    };
    let first = create("spring").await.unwrap();
    let status = first.status();
    let first: Value = first.json().await.unwrap();
    assert!(status.is_success(), "{status} {first}");
    let again = create("spring").await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.count("SELECT count(*) AS n FROM campaigns").await, 1);

    // Had the first request's ingress died after its commit, before storing the
    // answer, the key would be left in flight: a retry, once it takes the key
    // over, finds that campaign instead of making a second one.
    let abandon = "WITH u AS (UPDATE idempotency_keys SET state = 'in_flight', \
                     created_at = now() - interval '1 hour', response_status = NULL, \
                     response_type = NULL, response_body = NULL \
                   WHERE key = 'spring' RETURNING 1) SELECT count(*) AS n FROM u";
    assert_eq!(app.count(abandon).await, 1);
    let retried = create("spring").await.unwrap();
    assert_eq!(retried.status(), 201);
    assert!(retried.headers().get("idempotent-replayed").is_none());
    assert_eq!(retried.json::<Value>().await.unwrap()["id"], first["id"]);
    assert_eq!(app.count("SELECT count(*) AS n FROM campaigns").await, 1);
    let recipients = "SELECT count(*) AS n FROM campaign_recipients";
    assert_eq!(app.count(recipients).await, 1);

    let id = first["id"].as_str().unwrap();
    let send = || {
        client
            .post(app.url(&format!("/v1/campaigns/{id}/send")))
            .header("Idempotency-Key", "send-spring")
            .json(&json!({}))
            .send()
    };
    let sent = send().await.unwrap();
    assert!(sent.status().is_success(), "{}", sent.status());
    let resent = send().await.unwrap();
    assert_eq!(resent.headers()["idempotent-replayed"], "true");
    assert_eq!(
        app.count("SELECT count(*) AS n FROM jobs WHERE task = 'mail.plan_campaign'")
            .await,
        1
    );
}
