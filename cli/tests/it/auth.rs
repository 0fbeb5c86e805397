//! API keys, scopes and rate limits against the real ingress: the status table
//! (401/403/429, each with nothing published), revocation within 5 s, and the
//! `conveyor keys` commands.

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{AMQP_URL, TestApp, problem};

fn keys_cli(app: &TestApp, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("keys")
        .args(args)
        .env_clear()
        .env("CONVEYOR_DATABASE_URL", &app.db.url)
        .env("CONVEYOR_AMQP_URL", AMQP_URL)
        .env("CONVEYOR_LOG_LEVEL", "warn")
        .output()
        .expect("run conveyor keys");
    assert!(
        output.status.success(),
        "conveyor keys {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn post_job(client: &reqwest::Client, app: &TestApp, task: &str) -> reqwest::Response {
    client
        .post(app.url("/v1/jobs"))
        .json(&json!({"task": task, "args": {}}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_table_with_nothing_published_for_any_rejection() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let work = app.topology().work_queue("default");
    let anonymous = reqwest::Client::new();

    // 401: missing, malformed, unknown (well-formed), expired.
    let missing = post_job(&anonymous, &app, "diag.noop").await;
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    problem(missing, 401).await;
    problem(
        post_job(&app.client_with("not-a-key"), &app, "diag.noop").await,
        401,
    )
    .await;
    let unknown = format!("cvk_{}_{}", "a".repeat(16), "b".repeat(64));
    problem(
        post_job(&app.client_with(&unknown), &app, "diag.noop").await,
        401,
    )
    .await;
    let diag = app.create_key(&["enqueue:diag.*"]).await;
    // The right id with a wrong secret is as unknown as any other.
    let (id_part, _) = diag.rsplit_once('_').unwrap();
    let forged = format!("{id_part}_{}", "c".repeat(64));
    problem(
        post_job(&app.client_with(&forged), &app, "diag.noop").await,
        401,
    )
    .await;
    let expired = app.create_key(&["enqueue:*"]).await;
    let expired_id = expired.split('_').nth(1).unwrap().to_owned();
    app.count(&format!(
        "WITH e AS (UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE id = '{expired_id}' RETURNING 1) SELECT count(*) AS n FROM e"
    ))
    .await;
    let body = problem(
        post_job(&app.client_with(&expired), &app, "diag.noop").await,
        401,
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    // 403: a task outside the key's globs; routes outside its scopes.
    let diag_client = app.client_with(&diag);
    let body = problem(
        post_job(&diag_client, &app, "mail.plan_campaign").await,
        403,
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("mail.plan_campaign"),
        "{body}"
    );
    for path in [
        "/v1/campaigns/x",
        "/v1/stats/jobs",
        "/v1/admin/queues",
        "/v1/profiles/p",
        "/v1/schedules",
    ] {
        let response = diag_client.get(app.url(path)).send().await.unwrap();
        problem(response, 403).await;
    }
    let campaigns = app.create_key(&["campaigns"]).await;
    problem(
        post_job(&app.client_with(&campaigns), &app, "diag.noop").await,
        403,
    )
    .await;

    // Allowed: a matching glob, and admin covers everything.
    assert_eq!(
        post_job(&diag_client, &app, "diag.noop").await.status(),
        202
    );
    assert_eq!(post_job(&app.client, &app, "diag.noop").await.status(), 202);
    let webhooks_admin = app.create_key(&["webhooks:admin"]).await;
    let profile = app
        .client_with(&webhooks_admin)
        .get(app.url("/v1/profiles/nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(profile.status(), 404);

    // 429: a key with a bucket of 2 refilling once a minute.
    let slow = app
        .create_key_with("slow", &["enqueue:diag.noop"], Some((1.0 / 60.0, 2)))
        .await;
    let slow_client = app.client_with(&slow);
    assert_eq!(
        post_job(&slow_client, &app, "diag.noop").await.status(),
        202
    );
    assert_eq!(
        post_job(&slow_client, &app, "diag.noop").await.status(),
        202
    );
    let limited = post_job(&slow_client, &app, "diag.noop").await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    problem(limited, 429).await;
    // Another producer's bucket is untouched.
    assert_eq!(
        post_job(&diag_client, &app, "diag.noop").await.status(),
        202
    );

    // Open routes need no key.
    for path in ["/healthz", "/openapi.json", "/metrics"] {
        let response = anonymous.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    // Unknown /v1 paths authenticate before they 404.
    problem(
        anonymous.get(app.url("/v1/nothing")).send().await.unwrap(),
        401,
    )
    .await;

    // Exactly the five accepted jobs exist and were published.
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 5);
    assert_eq!(app.queue_len(&work).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_lists_and_revokes_and_revocation_bites_within_five_seconds() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let created = keys_cli(
        &app,
        &[
            "create",
            "--producer",
            "billing",
            "--scope",
            "enqueue:diag.*",
            "--expires",
            "30d",
            "--rate",
            "50",
            "--burst",
            "10",
        ],
    );
    let key = created.lines().last().unwrap().trim().to_owned();
    assert!(key.starts_with("cvk_"), "{created}");
    let id = key.split('_').nth(1).unwrap().to_owned();
    // Only the hash is stored.
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM api_keys WHERE id = '{id}' AND producer = 'billing' AND rate_per_sec = 50 AND burst = 10 AND expires_at > now() + interval '29 days'"
        ))
        .await,
        1
    );
    let client = app.client_with(&key);
    assert_eq!(post_job(&client, &app, "diag.noop").await.status(), 202);

    let listed = keys_cli(&app, &["list"]);
    assert!(
        listed.contains(&id) && listed.contains("billing") && listed.contains("active"),
        "{listed}"
    );
    assert!(
        !listed.contains(&key),
        "the list must not show the key: {listed}"
    );

    keys_cli(&app, &["revoke", &id]);
    let revoked_at = Instant::now();
    loop {
        let status = post_job(&client, &app, "diag.noop").await.status();
        if status == 401 {
            break;
        }
        assert_eq!(status, 202);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "the revoked key still worked after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(keys_cli(&app, &["list"]).contains("revoked"));

    // Bad input is a one-line error naming the problem.
    let output = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["keys", "create", "--producer", "x", "--scope", "root"])
        .env_clear()
        .env("CONVEYOR_DATABASE_URL", &app.db.url)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown scope `root`"));
}

/// A bad `--expires` is refused before anything runs, with an error naming the
/// problem and a non-zero exit, never a panic (a multi-byte character, a count
/// of days past what a duration holds, an expiry past the largest timestamp).
#[test]
fn a_bad_expiry_is_an_error_not_a_panic() {
    for (expires, problem) in [
        ("5é", "the unit must be d, h, m or s"),
        ("999999999999d", "too far ahead"),
        ("100000000d", "too far ahead"),
        ("0d", "must be positive"),
        ("soon", "neither a duration"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .args(["keys", "create", "--producer", "x", "--scope", "admin"])
            .args(["--expires", expires])
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{expires}: {stderr}");
        assert!(!stderr.contains("panicked"), "{expires}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains("--expires") && first.contains(problem),
            "{expires}: {stderr}"
        );
    }
}

/// `GET /v1/jobs/{id}` of a job another producer enqueued is a 404 exactly
/// like an unknown id (a 403 would confirm that the id exists); `admin` reads all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_read_only_their_own_jobs() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let billing = app.create_key_with("billing", &["enqueue:*"], None).await;
    // A second key of the same producer, with a narrower scope.
    let billing_too = app
        .create_key_with("billing", &["enqueue:diag.noop"], None)
        .await;
    let shipping = app.create_key_with("shipping", &["enqueue:*"], None).await;
    let (billing, billing_too, shipping) = (
        app.client_with(&billing),
        app.client_with(&billing_too),
        app.client_with(&shipping),
    );
    let accepted = |response: reqwest::Response| async move {
        assert_eq!(response.status(), 202);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let plain = accepted(post_job(&billing, &app, "diag.noop").await).await;
    let idempotent = accepted(
        billing
            .post(app.url("/v1/jobs"))
            .header("idempotency-key", "order-1")
            .json(&json!({"task": "diag.noop", "args": {}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let by_admin = accepted(post_job(&app.client, &app, "diag.noop").await).await;
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM jobs WHERE producer = 'billing' AND id IN ('{plain}', '{idempotent}')"
        ))
        .await,
        2
    );

    let get =
        |client: &reqwest::Client, id: &str| client.get(app.url(&format!("/v1/jobs/{id}"))).send();
    for id in [&plain, &idempotent] {
        for client in [&billing, &billing_too, &app.client] {
            let response = get(client, id).await.unwrap();
            assert_eq!(response.status(), 200, "{id}");
            assert_eq!(response.json::<Value>().await.unwrap()["id"], id.as_str());
        }
    }
    // Another producer's job and an unknown job look the same.
    let unknown = uuid::Uuid::new_v4().to_string();
    for (client, id) in [
        (&shipping, &plain),
        (&shipping, &idempotent),
        (&billing, &by_admin),
        (&shipping, &unknown),
    ] {
        let body = problem(get(client, id).await.unwrap(), 404).await;
        assert_eq!(body["detail"], format!("no job {id}"), "{body}");
    }
    assert_eq!(get(&app.client, &by_admin).await.unwrap().status(), 200);

    // Jobs Conveyor made itself (schedules, campaigns, replays) have no producer: admin only.
    let own = uuid::Uuid::new_v4();
    app.count(&format!(
        "WITH j AS (INSERT INTO jobs (id, task, queue, state, args, max_attempts, enqueued_at) \
         VALUES ('{own}', 'diag.noop', 'default', 'queued', '{{}}', 5, now()) RETURNING 1) \
         SELECT count(*) AS n FROM j"
    ))
    .await;
    let own = own.to_string();
    problem(get(&billing, &own).await.unwrap(), 404).await;
    assert_eq!(get(&app.client, &own).await.unwrap().status(), 200);
}
