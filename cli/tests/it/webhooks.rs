//! Signed profile webhooks: verification and rejections, rotation, duplicates,
//! ordered application, and the CLI that signs them.

mod delivery_limits;
mod headshot_fences;
mod headshot_race;
mod headshot_replaced;
mod headshot_sweep;
mod headshots;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use conveyor_platform::config::WebhookSource;
use conveyor_platform::webhook_signature::{self, SigningKey};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{TestApp, problem};

const WAIT: Duration = Duration::from_secs(30);
pub const TOLERANCE: u64 = 60;

/// Keys of the test source `members`: two HMAC secrets (old and new) and an Ed25519 pair.
pub struct Keys {
    pub hmac_old: String,
    pub hmac_new: String,
    pub ed25519_secret: String,
    pub ed25519_public: String,
}

impl Keys {
    pub fn new() -> Self {
        let (ed25519_secret, ed25519_public) = webhook_signature::generate_ed25519_pair();
        Self {
            hmac_old: webhook_signature::generate_hmac_secret(),
            hmac_new: webhook_signature::generate_hmac_secret(),
            ed25519_secret,
            ed25519_public,
        }
    }
}

/// The app with source `members` (all three keys, tolerance 60 s) and `workers` workers.
pub async fn spawn(
    workers: usize,
    keys: &Keys,
    tweak: impl FnOnce(&mut conveyor_platform::Config),
) -> TestApp {
    let source = WebhookSource {
        keys: [&keys.hmac_old, &keys.hmac_new, &keys.ed25519_public]
            .map(|k| k.as_str().into())
            .to_vec(),
        tolerance_secs: TOLERANCE,
    };
    TestApp::spawn_with(workers, |config| {
        config.webhooks.sources.insert("members".into(), source);
        config.webhooks.body_limit_bytes = 4096;
        tweak(config);
    })
    .await
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// POSTs `body` with the given headers to source `source`.
pub async fn post_raw(
    app: &TestApp,
    source: &str,
    headers: &[(&str, String)],
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url(&format!("/v1/webhooks/{source}/profiles")))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.body(body).send().await.unwrap()
}

/// Signs `body` with `key` as webhook `id` at `timestamp` and POSTs it to `members`.
pub async fn post_signed(
    app: &TestApp,
    key: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> reqwest::Response {
    let signature = SigningKey::parse(key).unwrap().sign(id, timestamp, body);
    let headers = [
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ];
    post_raw(app, "members", &headers, body.to_vec()).await
}

/// Sends `event` signed with `key` under a fresh id, expecting 202; returns the job id.
pub async fn send(app: &TestApp, key: &str, event: &Value) -> Uuid {
    let id = format!("msg_{}", Uuid::new_v4().simple());
    let response = post_signed(app, key, &id, now(), event.to_string().as_bytes()).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    body["job_id"].as_str().unwrap().parse().unwrap()
}

pub fn update(profile: &str, at: &str, email: &str) -> Value {
    json!({"action": "UPDATE", "profile_id": profile, "occurred_at": at,
           "data": {"email": email, "display_name": format!("Name {email}"), "locale": "en-GB"}})
}

fn delete(profile: &str, at: &str) -> Value {
    json!({"action": "DELETE", "profile_id": profile, "occurred_at": at})
}

async fn counts(app: &TestApp) -> (u32, i64, i64, i64) {
    let queue = app.topology().work_queue("webhooks");
    (
        app.queue_len(&queue).await,
        app.count("SELECT count(*) AS n FROM jobs").await,
        app.count("SELECT count(*) AS n FROM webhook_deliveries")
            .await,
        app.count("SELECT count(*) AS n FROM webhook_events").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_v1_and_v1a_signatures_are_accepted_and_published() {
    let keys = Keys::new();
    let app = spawn(0, &keys, |_| {}).await;
    send(
        &app,
        &keys.hmac_old,
        &update("p1", "2026-01-01T00:00:00Z", "a@x.io"),
    )
    .await;
    send(
        &app,
        &keys.ed25519_secret,
        &update("p1", "2026-01-01T00:00:01Z", "b@x.io"),
    )
    .await;
    // Rotation: the other HMAC key is accepted too.
    send(
        &app,
        &keys.hmac_new,
        &update("p1", "2026-01-01T00:00:02Z", "c@x.io"),
    )
    .await;
    assert_eq!(counts(&app).await, (3, 3, 3, 3));
    let tasks = app
        .count("SELECT count(*) AS n FROM jobs WHERE task = 'webhook.profile_sync'")
        .await;
    assert_eq!(tasks, 3);
}

/// Waits until the start of a second, so that a request sent now is judged in the same second.
async fn align_to_second() {
    let into = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_millis();
    tokio::time::sleep(Duration::from_millis(u64::from(1000 - into) + 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_a_problem_and_enqueues_nothing() {
    let keys = Keys::new();
    let app = spawn(0, &keys, |_| {}).await;
    let event = update("p1", "2026-01-01T00:00:00Z", "a@x.io");
    let compact = event.to_string();
    let pretty = serde_json::to_string_pretty(&event).unwrap();
    let key = SigningKey::parse(&keys.hmac_old).unwrap();
    let tol = TOLERANCE as i64;

    let expect = |status: u16, kind: &'static str| (status, kind);
    let mut cases: Vec<(&str, reqwest::Response, (u16, &str))> = Vec::new();

    // A signature over the compact body, sent with the same JSON re-serialized.
    let ts = now();
    let sig = key.sign("m1", ts, compact.as_bytes());
    let headers = [
        ("webhook-id", "m1".to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sig.clone()),
    ];
    cases.push((
        "re-serialized body",
        post_raw(&app, "members", &headers, pretty.clone()).await,
        expect(401, "invalid-signature"),
    ));
    // A key the source does not have.
    let stranger = webhook_signature::generate_hmac_secret();
    cases.push((
        "wrong key",
        post_signed(&app, &stranger, "m2", now(), compact.as_bytes()).await,
        expect(401, "invalid-signature"),
    ));
    let (other_sk, _) = webhook_signature::generate_ed25519_pair();
    cases.push((
        "wrong ed25519 key",
        post_signed(&app, &other_sk, "m3", now(), compact.as_bytes()).await,
        expect(401, "invalid-signature"),
    ));
    // Timestamps at tolerance + 1 s, past and future (judged within the same second).
    align_to_second().await;
    cases.push((
        "too old",
        post_signed(
            &app,
            &keys.hmac_old,
            "m4",
            now() - tol - 1,
            compact.as_bytes(),
        )
        .await,
        expect(401, "stale-timestamp"),
    ));
    align_to_second().await;
    cases.push((
        "too new",
        post_signed(
            &app,
            &keys.hmac_old,
            "m5",
            now() + tol + 1,
            compact.as_bytes(),
        )
        .await,
        expect(401, "stale-timestamp"),
    ));
    // A truncated signature header.
    let truncated = sig[..sig.len() / 2].to_owned();
    let headers = [
        ("webhook-id", "m6".to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", truncated),
    ];
    cases.push((
        "truncated signature",
        post_raw(&app, "members", &headers, compact.clone()).await,
        expect(401, "invalid-signature"),
    ));
    let headers = [
        ("webhook-id", "m7".to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", "v1".to_owned()),
    ];
    cases.push((
        "signature without a comma",
        post_raw(&app, "members", &headers, compact.clone()).await,
        expect(400, "invalid-webhook-headers"),
    ));
    let headers = [
        ("webhook-id", "m8".to_owned()),
        ("webhook-signature", sig.clone()),
    ];
    cases.push((
        "missing timestamp",
        post_raw(&app, "members", &headers, compact.clone()).await,
        expect(400, "invalid-webhook-headers"),
    ));
    let headers = [
        ("webhook-id", "m9".to_owned()),
        ("webhook-timestamp", "yesterday".to_owned()),
        ("webhook-signature", sig.clone()),
    ];
    cases.push((
        "malformed timestamp",
        post_raw(&app, "members", &headers, compact.clone()).await,
        expect(400, "invalid-webhook-headers"),
    ));
    // Unknown source, oversized body, unknown action, bad JSON, bad field.
    cases.push((
        "unknown source",
        post_raw(&app, "strangers", &[], compact.clone()).await,
        expect(404, "not-found"),
    ));
    let big = json!({"action": "UPDATE", "profile_id": "p", "occurred_at": "2026-01-01T00:00:00Z", "data": {"email": "a@b", "display_name": "x".repeat(5000)}}).to_string();
    cases.push((
        "oversized body",
        post_signed(&app, &keys.hmac_old, "m10", now(), big.as_bytes()).await,
        expect(413, "body-too-large"),
    ));
    let unknown =
        json!({"action": "MERGE", "profile_id": "p", "occurred_at": "2026-01-01T00:00:00Z"})
            .to_string();
    cases.push((
        "unknown action",
        post_signed(&app, &keys.hmac_old, "m11", now(), unknown.as_bytes()).await,
        expect(422, "invalid-request"),
    ));
    cases.push((
        "not JSON",
        post_signed(&app, &keys.hmac_old, "m12", now(), b"{nope").await,
        expect(400, "malformed-body"),
    ));
    let no_email = json!({"action": "UPDATE", "profile_id": "p", "occurred_at": "2026-01-01T00:00:00Z", "data": {"display_name": "x"}}).to_string();
    cases.push((
        "missing field",
        post_signed(&app, &keys.hmac_old, "m13", now(), no_email.as_bytes()).await,
        expect(422, "invalid-request"),
    ));

    for (name, response, (status, kind)) in cases {
        assert_eq!(response.status().as_u16(), status, "{name}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["status"], status, "{name}: {problem}");
        assert!(
            problem["type"].as_str().unwrap().ends_with(kind),
            "{name}: {problem}"
        );
    }
    // Nothing published, recorded, claimed or counted in the database.
    assert_eq!(counts(&app).await, (0, 0, 0, 0));
    // At exactly the tolerance, either way, it is accepted.
    align_to_second().await;
    let at_edge = post_signed(
        &app,
        &keys.hmac_old,
        "edge1",
        now() - tol,
        compact.as_bytes(),
    )
    .await;
    assert_eq!(at_edge.status(), 202);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"conveyor_webhooks_received_total{outcome="bad_signature",source="members"} 4"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"conveyor_webhooks_received_total{outcome="unknown_source",source="unknown"} 1"#
        ),
        "{metrics}"
    );
}

/// An `occurred_at` PostgreSQL cannot store (before 4714-11-24 BC, which
/// chrono reads as a signed year), or more than a day ahead of the server's
/// clock, is a 422 naming `/occurred_at` and the accepted range, with nothing
/// claimed or enqueued; the edges of that range are accepted and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_occurred_at_out_of_range_is_a_422_naming_it() {
    let keys = Keys::new();
    let app = spawn(1, &keys, |_| {}).await;
    let ahead = |secs: i64| {
        (chrono::Utc::now() + chrono::Duration::seconds(secs))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let day = 24 * 3600;
    let refused = [
        (
            "-100000-01-01T00:00:00Z",
            "4714-11-24 00:00:00 UTC BC to 294276",
        ),
        (
            "-4713-11-23T23:59:59Z",
            "4714-11-24 00:00:00 UTC BC to 294276",
        ),
        (&ahead(day + 3600), "24 h past the server's clock"),
        ("2099-01-01T00:00:00Z", "24 h past the server's clock"),
    ];
    for (i, (at, range)) in refused.iter().enumerate() {
        for event in [delete("p-range", at), update("p-range", at, "a@x.io")] {
            let id = format!("range-{i}-{}", event["action"]);
            let response = post_signed(
                &app,
                &keys.hmac_old,
                &id,
                now(),
                event.to_string().as_bytes(),
            )
            .await;
            let problem = problem(response, 422).await;
            assert!(
                problem["type"]
                    .as_str()
                    .unwrap()
                    .ends_with("/invalid-request"),
                "{problem}"
            );
            assert_eq!(problem["pointer"], "/occurred_at", "{event}: {problem}");
            let detail = problem["detail"].as_str().unwrap();
            assert!(
                detail.contains("`occurred_at`") && detail.contains(range),
                "{event}: {problem}"
            );
        }
    }
    assert_eq!(counts(&app).await, (0, 0, 0, 0));
    // PostgreSQL's earliest time, and a producer clock 23 h fast: stored.
    for (profile, at) in [
        ("p-earliest", "-4713-11-24T00:00:00Z".to_owned()),
        ("p-ahead", ahead(day - 3600)),
    ] {
        let job = send(&app, &keys.hmac_old, &delete(profile, &at)).await;
        app.wait_for_state(job, "succeeded", WAIT).await;
        assert!(!row(&app, profile).await["deleted_at"].is_null(), "{at}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_webhook_is_processed_once() {
    let keys = Keys::new();
    let app = spawn(1, &keys, |_| {}).await;
    let body = update("p1", "2026-01-01T00:00:00Z", "a@x.io").to_string();
    let ts = now();
    let first = post_signed(&app, &keys.hmac_old, "dup-1", ts, body.as_bytes()).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    // A retry by the producer, even signed with the other key and later.
    let again = post_signed(&app, &keys.ed25519_secret, "dup-1", ts + 5, body.as_bytes()).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["job_id"], first["job_id"]);
    assert_eq!(again["duplicate"], true);
    // Several at once: one job in all.
    let concurrent = futures::future::join_all(
        (0..6).map(|_| post_signed(&app, &keys.hmac_new, "dup-2", ts, body.as_bytes())),
    )
    .await;
    let statuses: Vec<u16> = concurrent.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| [200, 202, 409].contains(s)),
        "{statuses:?}"
    );
    let job: Uuid = first["job_id"].as_str().unwrap().parse().unwrap();
    app.wait_for_state(job, "succeeded", WAIT).await;
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 2);
    crate::harness::wait_until(WAIT, || async {
        app.count("SELECT count(*) AS n FROM jobs WHERE state = 'succeeded'")
            .await
            == 2
    })
    .await;
    // The same UPDATE arriving under a new id is applied once: the second changes nothing.
    let app = &app;
    let outcomes = |outcome: &str| {
        let sql = format!("SELECT count(*) AS n FROM webhook_events WHERE outcome = '{outcome}'");
        async move { app.count(&sql).await }
    };
    assert_eq!(outcomes("accepted").await, 2);
    assert_eq!(outcomes("applied").await, 1);
    assert_eq!(outcomes("unchanged").await, 1);
    assert!(outcomes("duplicate").await >= 1);
}

/// A webhook whose job the broker may have taken all the same (its publish was
/// nacked) is answered in doubt, naming the job. Its claim stays: a repeat
/// makes no second job, and once the claim counts as abandoned, a repeat
/// submits that same job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answered_in_doubt_keeps_its_claim_and_its_job_id() {
    use crate::publish_failures::{nacking_every_publish, replace_queue};
    let keys = Keys::new();
    let app = spawn(0, &keys, |_| {}).await;
    let queue = app.topology().work_queue("webhooks");
    replace_queue(&queue, Some(nacking_every_publish())).await;
    let body = update("p1", "2026-01-01T00:00:00Z", "a@x.io").to_string();
    let ts = now();
    let post = || post_signed(&app, &keys.hmac_old, "doubt-1", ts, body.as_bytes());

    let first = post().await;
    assert_eq!(first.status(), 503);
    let problem: Value = first.json().await.unwrap();
    assert!(
        problem["type"].as_str().unwrap().ends_with("/in-doubt"),
        "{problem}"
    );
    let job: Uuid = problem["job_ids"][0].as_str().unwrap().parse().unwrap();
    let claims_for_job =
        format!("SELECT count(*) AS n FROM webhook_deliveries WHERE job_id = '{job}'");
    assert_eq!(app.count(&claims_for_job).await, 1);

    let again = post().await;
    assert_eq!(again.status(), 409);
    assert_eq!(app.count(&claims_for_job).await, 1);
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 0);

    // The broker takes messages again, and the claim has aged past the point
    // where it counts as abandoned: a repeat submits the job it names.
    replace_queue(&queue, Some(lapin::types::FieldTable::default())).await;
    let mut conn = app.db.conn();
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        "UPDATE webhook_deliveries SET received_at = now() - interval '1 hour'",
    )
    .unwrap();
    let taken_over = post().await;
    assert_eq!(taken_over.status(), 202);
    let accepted: Value = taken_over.json().await.unwrap();
    assert_eq!(accepted["job_id"], job.to_string(), "{accepted}");
    assert!(app.job(job).await.is_some());
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 1);
}

/// Every column that the events decide, as one comparable row.
async fn row(app: &TestApp, id: &str) -> Value {
    let url = app.db.url.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || {
        use diesel::prelude::*;
        #[derive(QueryableByName)]
        struct J {
            #[diesel(sql_type = diesel::sql_types::Jsonb)]
            j: Value,
        }
        let mut conn = PgConnection::establish(&url).unwrap();
        diesel::sql_query(
            "SELECT to_jsonb(p) - 'id' - 'created_at' - 'updated_at' AS j FROM profiles p WHERE id = $1",
        )
        .bind::<diesel::sql_types::Text, _>(id)
        .get_result::<J>(&mut conn)
        .unwrap()
        .j
    })
    .await
    .unwrap()
}

/// Sends the events one by one, each applied before the next is sent.
async fn apply_in_sequence(app: &TestApp, key: &str, events: &[Value]) {
    for event in events {
        let job = send(app, key, event).await;
        app.wait_for_state(job, "succeeded", WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_events_end_as_ordered_application_does() {
    let keys = Keys::new();
    let app = spawn(1, &keys, |_| {}).await;
    let (t1, t2, t2b, t3) = (
        "2026-01-01T00:00:01Z",
        "2026-01-01T00:00:02Z",
        "2026-01-01T00:00:02.500Z",
        "2026-01-01T00:00:03Z",
    );
    let key = &keys.hmac_old;
    // UPDATE t2, UPDATE t1, DELETE t3, then an UPDATE older than the delete.
    apply_in_sequence(
        &app,
        key,
        &[
            update("late", t2, "two@x.io"),
            update("late", t1, "one@x.io"),
            delete("late", t3),
            update("late", t2b, "twohalf@x.io"),
        ],
    )
    .await;
    apply_in_sequence(
        &app,
        key,
        &[
            update("sorted", t1, "one@x.io"),
            update("sorted", t2, "two@x.io"),
            update("sorted", t2b, "twohalf@x.io"),
            delete("sorted", t3),
        ],
    )
    .await;
    let (late, sorted) = (row(&app, "late").await, row(&app, "sorted").await);
    assert_eq!(late, sorted);
    assert!(late["deleted_at"].is_string(), "{late}");
    assert_eq!(late["email"], Value::Null);
    // The tombstone: GET says 404, and a later UPDATE does not bring it back.
    apply_in_sequence(
        &app,
        key,
        &[update("late", "2026-02-01T00:00:00Z", "back@x.io")],
    )
    .await;
    assert_eq!(row(&app, "late").await, sorted);
    let gone = app
        .client
        .get(app.url("/v1/profiles/late"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);

    // Without a delete: the newest UPDATE wins whatever the arrival order.
    apply_in_sequence(
        &app,
        key,
        &[
            update("live", t2, "two@x.io"),
            update("live", t1, "one@x.io"),
        ],
    )
    .await;
    let live: Value = app.get_json("/v1/profiles/live").await;
    assert_eq!(live["email"], "two@x.io", "{live}");
    assert_eq!(live["source_updated_at"], "2026-01-01T00:00:02Z", "{live}");
    let stale = app
        .count("SELECT count(*) AS n FROM webhook_events WHERE outcome = 'skipped_stale'")
        .await;
    assert_eq!(stale, 2, "t1 after t2 for `late` and for `live`");
    let deleted = app
        .count("SELECT count(*) AS n FROM webhook_events WHERE outcome = 'skipped_deleted'")
        .await;
    assert_eq!(deleted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_signs_what_the_ingress_accepts() {
    let bin = env!("CARGO_BIN_EXE_conveyor");
    let run = |args: &[&str], stdin: &[u8]| {
        use std::io::Write;
        let mut child = std::process::Command::new(bin)
            .args(args)
            .env("CONVEYOR_LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let pair = run(&["webhook", "keygen", "--ed25519"], b"");
    let public = pair
        .lines()
        .find_map(|l| l.strip_prefix("verifying-key: "))
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("producer.key");
    std::fs::write(&key_file, &pair).unwrap();
    let hmac = run(&["webhook", "keygen", "--hmac"], b"").trim().to_owned();
    assert!(hmac.starts_with("whsec_"));

    let keys = Keys {
        ed25519_public: public,
        ..Keys::new()
    };
    let app = spawn(0, &keys, |_| {}).await;
    let body = serde_json::to_vec_pretty(&update("p1", "2026-01-01T00:00:00Z", "a@x.io")).unwrap();
    let printed = run(
        &[
            "webhook",
            "sign",
            "--source",
            "members",
            "--key-file",
            key_file.to_str().unwrap(),
        ],
        &body,
    );
    let headers: Vec<(&str, String)> = printed
        .lines()
        .map(|line| {
            let (name, value) = line.split_once(": ").unwrap();
            (name, value.to_owned())
        })
        .collect();
    assert_eq!(
        headers.iter().map(|h| h.0).collect::<Vec<_>>(),
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
    );
    assert!(headers[2].1.starts_with("v1a,"));
    let response = post_raw(&app, "members", &headers, body).await;
    assert_eq!(response.status(), 202);

    // A bad key file is one line naming the problem.
    std::fs::write(&key_file, "whpk_AAAA").unwrap();
    let out = std::process::Command::new(bin)
        .args([
            "webhook",
            "sign",
            "--source",
            "members",
            "--key-file",
            key_file.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--key-file"), "{stderr}");
}
