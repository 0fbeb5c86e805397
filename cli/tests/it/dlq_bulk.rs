//! `POST /v1/admin/dead-jobs/replay-matching` and `…/discard-matching`: a dry
//! run changes nothing, a replay takes exactly the matching records and its jobs
//! succeed, a second one finds nothing to do without `force`, discards are
//! audited, and bad input is a problem+json naming the field; a call cut
//! short carries on from its `next`. The CLI side, `conveyor dlq
//! replay|discard --all-matching`, is in `dlq_carry_on`.

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
pub(crate) async fn footprint(app: &TestApp) -> [i64; 3] {
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
        // About 8 200 years back: before PostgreSQL's earliest time.
        (
            discard,
            json!({"filter": {"since": "3000000d"}}),
            "/filter/since",
        ),
        (
            replay,
            json!({"filter": {"task": "webhook.profile_sync"}, "args": {
                "source": "s", "webhook_id": "w", "event": {"action": "DELETE",
                "profile_id": "p", "occurred_at": "-100000-01-01T00:00:00Z"}}}),
            "/args/event/occurred_at",
        ),
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

/// One dead `diag.fail` job per call, each dead before the next is enqueued
/// (so they died in this order); failing permanently, each dies at its first
/// attempt, and so does its replay.
async fn dead_in_order(app: &TestApp, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = app.enqueue("diag.fail", json!({"permanent": true})).await;
        app.wait_for_state(id, "dead", WAIT).await;
        ids.push(id);
    }
    ids
}

/// Holds `SELECT … FROM dead_jobs WHERE id = <id> FOR UPDATE` in a
/// connection of its own until the returned sender sends or is dropped.
async fn hold_row(app: &TestApp, id: Uuid) -> std::sync::mpsc::Sender<()> {
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    let url = app.db.url.clone();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        conn.batch_execute(&format!(
            "BEGIN; SELECT id FROM dead_jobs WHERE id = '{id}' FOR UPDATE"
        ))
        .unwrap();
        locked.send(()).unwrap();
        let _ = released.recv();
        conn.batch_execute("COMMIT").unwrap();
    });
    is_locked.await.unwrap();
    release
}

async fn replay_count(app: &TestApp, id: Uuid) -> i64 {
    app.count(&format!(
        "SELECT replay_count::bigint AS n FROM dead_jobs WHERE id = '{id}'"
    ))
    .await
}

/// A forced bulk replay that runs out of time (here: another transaction
/// holds the second record's row past the request's budget) stops before that
/// record and answers 200, `complete: false`, with a `next` cursor, well
/// before the ingress's request timeout; carrying on from `next`, still
/// forced, replays the rest and not the first record again, nor the record
/// its replay left when it died (dead after the run began).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_bulk_replay_cut_short_carries_on_without_replaying_twice() {
    // 3.6 s to work in, records started in the first 2.6 s (the last 1 s is
    // kept for a publish's confirm).
    let app = TestApp::spawn_with(1, |config| {
        config.ingress.request_timeout_ms = 4_000;
        config.amqp.publish_timeout_ms = 1_000;
    })
    .await;
    let ids = dead_in_order(&app, 3).await;
    let (r1, r2, r3) = (ids[0], ids[1], ids[2]);
    let path = "/v1/admin/dead-jobs/replay-matching";
    let forced = json!({"filter": {"task": "diag.fail"}, "force": true});

    let held = hold_row(&app, r2).await;
    let began = std::time::Instant::now();
    let first = post(&app, path, forced.clone()).await;
    let took = began.elapsed();
    let status = first.status();
    let first: Value = first.json().await.unwrap();
    assert_eq!(status, 200, "{first}");
    assert!(took < Duration::from_millis(3_900), "{took:?}");
    assert_eq!(
        (first["complete"].as_bool(), first["processed"].as_u64()),
        (Some(false), Some(1)),
        "{first}"
    );
    assert_eq!(ids_with(&first, "replayed"), vec![r1], "{first}");
    let next = first["next"].as_str().expect("a cursor").to_owned();

    // A bulk discard is bounded alike: it stops at the held row, discarding nothing.
    let discard = ok(
        &app,
        "/v1/admin/dead-jobs/discard-matching",
        json!({"filter": {"task": "diag.fail"}}),
    )
    .await;
    assert_eq!(
        (discard["complete"].as_bool(), discard["processed"].as_u64()),
        (Some(false), Some(0)),
        "{discard}"
    );
    assert!(discard["next"].is_string(), "{discard}");
    drop(held);

    // r1's replay fails permanently too: a new dead record, newer than the run.
    let replayed: Uuid = first["results"][0]["job_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    app.wait_for_state(replayed, "dead", WAIT).await;

    let mut resumed = forced.clone();
    resumed["after"] = json!(next);
    let rest = ok(&app, path, resumed).await;
    assert_eq!(ids_with(&rest, "replayed"), sorted(vec![r2, r3]), "{rest}");
    assert_eq!(
        (rest["complete"].as_bool(), rest["next"].as_str()),
        (Some(true), None),
        "{rest}"
    );
    for id in [r1, r2, r3] {
        assert_eq!(replay_count(&app, id).await, 1, "{id}");
    }
    assert_eq!(replay_count(&app, replayed).await, 0);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM dead_job_actions WHERE action = 'discard'")
            .await,
        0
    );
}

/// A bulk replay keeps the last `amqp.publish_timeout_ms` of its request for
/// a confirm, as configured: with a 500 ms publish timeout, a 6 s request
/// (5.4 s to work in) may start records until 4.9 s, so five records at
/// 0.9/s (the last at 4.4 s) are all replayed. Reserving the default 5 s (or
/// a quarter of the budget, 1.35 s) left 4.05 s, too little for that rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_replay_reserves_the_configured_publish_timeout() {
    let app = TestApp::spawn_with(1, |config| {
        config.ingress.request_timeout_ms = 6_000;
        config.amqp.publish_timeout_ms = 500;
    })
    .await;
    let ids = dead_in_order(&app, 5).await;
    let began = std::time::Instant::now();
    let response = post(
        &app,
        "/v1/admin/dead-jobs/replay-matching",
        json!({"filter": {"task": "diag.fail"}, "rate": 0.9}),
    )
    .await;
    let took = began.elapsed();
    let status = response.status();
    let result: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{result}");
    assert_eq!(
        (result["complete"].as_bool(), result["processed"].as_u64()),
        (Some(true), Some(5)),
        "{result}"
    );
    assert_eq!(ids_with(&result, "replayed"), sorted(ids), "{result}");
    assert!(took >= Duration::from_millis(4_400), "paced: {took:?}");
}

/// A forced bulk replay with a `limit` answers `next` while records remain,
/// and carrying on from it takes the next records in death order, each once;
/// a `next` that is not one is refused naming `/after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_bulk_replay_pages_through_with_its_cursor() {
    let app = TestApp::spawn().await;
    let ids = dead_in_order(&app, 3).await;
    let path = "/v1/admin/dead-jobs/replay-matching";
    let mut body = json!({
        "filter": {"task": "diag.fail"}, "force": true, "limit": 2,
        "args": {"until_attempt": 1},
    });
    let first = ok(&app, path, body.clone()).await;
    assert_eq!(
        ids_with(&first, "replayed"),
        sorted(ids[..2].to_vec()),
        "{first}"
    );
    assert_eq!(first["complete"], true, "{first}");
    body["after"] = first["next"].clone();
    assert!(body["after"].is_string(), "{first}");
    let second = ok(&app, path, body.clone()).await;
    assert_eq!(ids_with(&second, "replayed"), vec![ids[2]], "{second}");
    assert!(second["next"].is_null(), "{second}");
    for id in &ids {
        assert_eq!(replay_count(&app, *id).await, 1, "{id}");
    }

    body["after"] = json!("1.2.3");
    let refused = post(&app, path, body).await;
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["pointer"], "/after", "{problem}");
}

/// Carrying on with `next` takes the rest of the first call's matches even
/// when its `since` is an age that, read again later, has passed some of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carrying_on_keeps_the_first_calls_since() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let ago = |ms: i64| (chrono::Utc::now() - chrono::Duration::milliseconds(ms)).to_rfc3339();
    let (older, newer) = (ago(2_000), ago(1_500));
    let ids = crate::dlq::insert_dead(
        &app,
        &[("diag.fail", "boom", &older), ("diag.fail", "boom", &newer)],
    )
    .await;
    let path = "/v1/admin/dead-jobs/discard-matching";
    let mut body = json!({"filter": {"since": "3s"}, "dry_run": true, "limit": 1});
    let first = ok(&app, path, body.clone()).await;
    assert_eq!(ids_with(&first, "would_discard"), vec![ids[0]], "{first}");
    // Both records are now more than 3 s old.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    body["after"] = first["next"].clone();
    let rest = ok(&app, path, body).await;
    assert_eq!(ids_with(&rest, "would_discard"), vec![ids[1]], "{rest}");
}
