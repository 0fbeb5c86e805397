//! `POST /v1/admin/dead-jobs/replay-matching` and `…/discard-matching`: a dry
//! run changes nothing, a replay takes exactly the matching records and its jobs
//! succeed, a second one finds nothing to do without `force`, discards are
//! audited, and bad input is a problem+json naming the field.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::TestApp;

const WAIT: Duration = Duration::from_secs(30);

async fn post(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("x-conveyor-actor", "bob")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn ok(app: &TestApp, path: &str, body: Value) -> Value {
    let response = post(app, path, body).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Enqueues one job per `(task, args)` and waits until all are dead.
async fn dead_jobs(app: &TestApp, jobs: &[(&str, Value)]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for (task, args) in jobs {
        ids.push(app.enqueue(task, args.clone()).await);
    }
    for id in &ids {
        app.wait_for_state(*id, "dead", WAIT).await;
    }
    ids
}

fn ids_with(result: &Value, outcome: &str) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = result["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] == outcome)
        .map(|r| r["id"].as_str().unwrap().parse().unwrap())
        .collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    ids.sort();
    ids
}

/// Rows of `jobs`, of `dead_job_actions`, and dead records marked replayed or discarded.
async fn footprint(app: &TestApp) -> [i64; 3] {
    [
        app.count("SELECT count(*) AS n FROM jobs").await,
        app.count("SELECT count(*) AS n FROM dead_job_actions").await,
        app.count(
            "SELECT count(*) AS n FROM dead_jobs WHERE replayed_at IS NOT NULL OR discarded_at IS NOT NULL",
        )
        .await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_replay_takes_exactly_the_matching_records_once() {
    let app = TestApp::spawn().await;
    let ids = dead_jobs(
        &app,
        &[
            ("diag.fail", json!({})),
            ("diag.fail", json!({})),
            ("diag.panic", json!({})),
        ],
    )
    .await;
    let (failing, panicking) = (sorted(ids[..2].to_vec()), ids[2]);
    let path = "/v1/admin/dead-jobs/replay-matching";
    let fixed = json!({"until_attempt": 1});
    let before = footprint(&app).await;

    // Too slow to finish within one request: refused before anything happens.
    let slow = post(
        &app,
        path,
        json!({"filter": {"task": "diag.fail"}, "rate": 0.01}),
    )
    .await;
    assert_eq!(slow.status(), 422);
    let problem: Value = slow.json().await.unwrap();
    assert_eq!(problem["pointer"], "/rate", "{problem}");

    let dry = ok(
        &app,
        path,
        json!({"filter": {"task": "diag.fail", "since": "10m"}, "args": fixed, "dry_run": true}),
    )
    .await;
    assert_eq!(
        (dry["matched"].as_u64(), dry["complete"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(ids_with(&dry, "would_replay"), failing, "{dry}");
    assert_eq!(footprint(&app).await, before, "a dry run changes nothing");

    let done = ok(
        &app,
        path,
        json!({"filter": {"task": "diag.fail"}, "args": fixed, "rate": 20}),
    )
    .await;
    assert_eq!(ids_with(&done, "replayed"), failing, "{done}");
    assert_eq!(done["counts"]["replayed"], 2);
    for item in done["results"].as_array().unwrap() {
        let job: Uuid = item["job_id"].as_str().unwrap().parse().unwrap();
        let job = app.wait_for_state(job, "succeeded", WAIT).await;
        assert_eq!(
            job.replay_of.map(|d| d.to_string()),
            item["id"].as_str().map(String::from)
        );
        assert_eq!(job.attempts, 1);
    }
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM jobs WHERE replay_of = '{panicking}'"
        ))
        .await,
        0,
        "the non-matching record is left alone"
    );
    assert_eq!(
        app.count(
            "SELECT count(*) AS n FROM dead_job_actions WHERE action = 'replay' AND actor = 'http:bob'
             AND detail->'bulk'->>'task' = 'diag.fail' AND detail->'args'->>'until_attempt' = '1'"
        )
        .await,
        2,
        "each replay audited with who, what and the filter"
    );

    // Done once: a second bulk replay finds nothing without force.
    let again = ok(&app, path, json!({"filter": {"task": "diag.fail"}})).await;
    assert_eq!(
        (again["matched"].as_u64(), again["processed"].as_u64()),
        (Some(0), Some(0))
    );
    let forced = ok(
        &app,
        path,
        json!({"filter": {"task": "diag.fail"}, "force": true, "dry_run": true}),
    )
    .await;
    assert_eq!(ids_with(&forced, "would_replay"), failing, "{forced}");
    assert_eq!(
        app.count("SELECT count(*) AS n FROM jobs WHERE replay_of IS NOT NULL")
            .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_discard_marks_and_audits_only_the_matching_records() {
    let app = TestApp::spawn().await;
    let ids = dead_jobs(&app, &[("diag.fail", json!({})), ("diag.panic", json!({}))]).await;
    let (failing, panicking) = (ids[0], ids[1]);
    let path = "/v1/admin/dead-jobs/discard-matching";
    let before = footprint(&app).await;

    let dry = ok(
        &app,
        path,
        json!({"filter": {"error_contains": "PANICKED"}, "dry_run": true}),
    )
    .await;
    assert_eq!(ids_with(&dry, "would_discard"), vec![panicking], "{dry}");
    assert_eq!(footprint(&app).await, before, "a dry run changes nothing");

    let done = ok(
        &app,
        path,
        json!({"filter": {"error_contains": "PANICKED"}}),
    )
    .await;
    assert_eq!(ids_with(&done, "discarded"), vec![panicking], "{done}");
    let listed: Value = app.get_json("/v1/admin/dead-jobs").await;
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![failing.to_string()]);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM dead_job_actions WHERE dead_job_id = '{panicking}'
             AND action = 'discard' AND actor = 'http:bob' AND detail->'bulk'->>'error_contains' = 'PANICKED'"
        ))
        .await,
        1
    );
    let again = ok(
        &app,
        path,
        json!({"filter": {"error_contains": "PANICKED"}}),
    )
    .await;
    assert_eq!(again["matched"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_input_errors_are_problems_naming_the_field() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let replay = "/v1/admin/dead-jobs/replay-matching";
    let discard = "/v1/admin/dead-jobs/discard-matching";
    for (path, body, pointer) in [
        (replay, json!({"filter": {}, "rate": 0}), "/rate"),
        (replay, json!({"filter": {}, "rate": -2.5}), "/rate"),
        (
            replay,
            json!({"filter": {"since": "yesterday"}}),
            "/filter/since",
        ),
        (replay, json!({"filter": {}, "args": {}}), "/args"),
        (
            replay,
            json!({"filter": {"task": "no.such"}, "args": {}}),
            "/filter/task",
        ),
        (
            replay,
            json!({"filter": {"task": "diag.fail"}, "args": {"until_attempt": "soon"}}),
            "/args/until_attempt",
        ),
        (replay, json!({"filter": {}, "limit": 0}), "/limit"),
        (discard, json!({"filter": {}, "limit": 10_001}), "/limit"),
        (discard, json!({"filter": {"since": "5x"}}), "/filter/since"),
        // PostgreSQL cannot store U+0000 (found by the fuzzer as a 503).
        (
            discard,
            json!({"filter": {"error_contains": "b\u{0}d"}}),
            "/filter/error_contains",
        ),
    ] {
        let response = post(&app, path, body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["pointer"], pointer, "{body}: {problem}");
    }
    // Unknown fields, a missing filter, wrong types: 422 too; broken JSON: 400.
    for body in [
        json!({"filter": {}, "rate": 1, "speed": 2}),
        json!({"filter": {"tsak": "diag.fail"}}),
        json!({"dry_run": true}),
        json!({"filter": {}, "rate": "fast"}),
    ] {
        assert_eq!(
            post(&app, replay, body.clone()).await.status(),
            422,
            "{body}"
        );
    }
    let broken = app
        .client
        .post(app.url(discard))
        .header("content-type", "application/json")
        .body("{\"filter\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(broken.status(), 400);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM dead_job_actions")
            .await,
        0
    );
}
