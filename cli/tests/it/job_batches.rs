//! `POST /v1/jobs/batch` against the real ingress, broker and database: a whole
//! batch runs; one bad job refuses it with nothing enqueued; its tokens are one
//! per job; a broker that refuses some jobs gets a 207 naming them, and one
//! that refuses all a 503; an `Idempotency-Key` replays the batch's 202, and
//! after a 207 enqueues the whole batch again under the same ids, without
//! removing the record of a job the first request enqueued should the broker
//! refuse that job the second time.

use std::time::Duration;

use lapin::types::FieldTable;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::TestApp;
use conveyor_platform::amqp::delay_level_for;

use crate::publish_failures::{replace_queue, replace_work_queue};

const WAIT: Duration = Duration::from_secs(20);
/// The delay of [`half_routable`]'s first job.
const HOUR: Duration = Duration::from_secs(3600);

fn noops(count: usize) -> Value {
    json!({ "jobs": vec![json!({"task": "diag.noop"}); count] })
}

async fn post_batch(client: &reqwest::Client, app: &TestApp, body: &Value) -> (u16, Value) {
    let response = client
        .post(app.url("/v1/jobs/batch"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn ids(outcome: &Value) -> Vec<Uuid> {
    outcome["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// Deletes the work queue the ingress declared and returns a batch whose
/// second job comes back unroutable, while its first, delayed, goes to a delay
/// queue, which still takes it.
async fn half_routable(app: &TestApp) -> Value {
    replace_work_queue(app, None).await;
    json!({"jobs": [
        {"task": "diag.noop", "delay_ms": HOUR.as_millis() as u64},
        {"task": "diag.noop"},
    ]})
}

async fn records(app: &TestApp) -> i64 {
    app.count("SELECT count(*) AS n FROM jobs").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_of_a_batch_runs_once_and_a_replay_enqueues_nothing() {
    let app = TestApp::spawn().await;
    let mut body = noops(40);
    body["jobs"][7] = json!({"task": "diag.sleep", "args": {"ms": 10}});
    let send = || app.post_keyed(&app.client, "/v1/jobs/batch", "nightly-1", &body);
    let first = send().await;
    assert_eq!(first.status(), 202);
    let outcome: Value = first.json().await.unwrap();
    assert_eq!(
        (outcome["accepted"].as_u64(), outcome["refused"].as_u64()),
        (Some(40), Some(0))
    );
    let ids = ids(&outcome);
    assert_eq!(ids.len(), 40);
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        40
    );
    for (job, id) in outcome["jobs"].as_array().unwrap().iter().zip(&ids) {
        assert_eq!(job["accepted"], true);
        assert_eq!(job["status_url"], format!("/v1/jobs/{id}"));
    }
    for id in &ids {
        let job = app.wait_for_state(*id, "succeeded", WAIT).await;
        assert_eq!(job.runs, 1);
        assert_eq!(job.idempotency_key.as_deref(), Some("nightly-1"));
    }
    // The order of the request is the order of the answer.
    assert_eq!(app.job(ids[7]).await.unwrap().task, "diag.sleep");

    let again = send().await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let replayed: Value = again.json().await.unwrap();
    assert_eq!(replayed, outcome);
    assert_eq!(records(&app).await, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_job_refuses_the_whole_batch_and_enqueues_nothing() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let work = app.topology().work_queue("default");
    let cases = [
        (
            json!({"jobs": [{"task": "diag.noop"}, {"task": "diag.sleep", "args": {"ms": "soon"}}]}),
            422,
            "/jobs/1/args/ms",
        ),
        (
            json!({"jobs": [{"task": "no.such"}, {"task": "diag.noop"}]}),
            422,
            "/jobs/0/task",
        ),
        (
            json!({"jobs": [{"task": "diag.noop", "delay_ms": 1u64 << 40}]}),
            422,
            "/jobs/0/delay_ms",
        ),
        (json!({"jobs": []}), 422, "/jobs"),
        (noops(1_001), 422, "/jobs"),
        (
            json!({"jobs": [{"task": "diag.noop", "priority": 1}]}),
            422,
            "/jobs/0/priority",
        ),
    ];
    for (body, status, pointer) in cases {
        let (got, problem) = post_batch(&app.client, &app, &body).await;
        assert_eq!(got, status, "{problem}");
        assert_eq!(problem["pointer"], pointer, "{problem}");
    }
    // A key that may enqueue `diag.sleep` only.
    let key = app.create_key(&["enqueue:diag.sleep"]).await;
    let body = json!({"jobs": [{"task": "diag.sleep", "args": {"ms": 1}}, {"task": "diag.noop"}]});
    let (status, problem) = post_batch(&app.client_with(&key), &app, &body).await;
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["pointer"], "/jobs/1/task");
    assert!(
        problem["detail"].as_str().unwrap().starts_with("job 1: "),
        "{problem}"
    );

    assert_eq!(records(&app).await, 0);
    assert_eq!(app.queue_len(&work).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spends_one_token_per_job() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    // A bucket of 5 that refills once every 100 s.
    let key = app
        .create_key_with("batcher", &["enqueue:*"], Some((0.01, 5)))
        .await;
    let client = app.client_with(&key);
    let (status, problem) = post_batch(&client, &app, &noops(6)).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["pointer"], "/jobs");
    assert!(
        problem["detail"].as_str().unwrap().contains("holds (5)"),
        "{problem}"
    );
    // That refusal cost the request's one token: 4 are left.
    let (status, problem) = post_batch(&client, &app, &noops(5)).await;
    assert_eq!(status, 429, "{problem}");
    let (status, outcome) = post_batch(&client, &app, &noops(3)).await;
    assert_eq!(status, 202, "{outcome}");
    assert_eq!(records(&app).await, 3);
    let (status, _) = post_batch(&client, &app, &noops(1)).await;
    assert_eq!(status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_the_broker_refuses_are_named_and_leave_no_record() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let body = half_routable(&app).await;
    let (status, outcome) = post_batch(&app.client, &app, &body).await;
    assert_eq!(status, 207, "{outcome}");
    assert_eq!(
        (outcome["accepted"].as_u64(), outcome["refused"].as_u64()),
        (Some(1), Some(1))
    );
    let jobs = outcome["jobs"].as_array().unwrap();
    assert_eq!(jobs[0]["accepted"], true);
    assert_eq!(jobs[1]["accepted"], false);
    assert!(jobs[1].get("status_url").is_none(), "{outcome}");
    assert!(jobs[1]["error"].as_str().unwrap().len() > 3, "{outcome}");
    let ids = ids(&outcome);
    assert_eq!(records(&app).await, 1);
    assert!(app.job(ids[0]).await.is_some());

    let (status, problem) = post_batch(&app.client, &app, &noops(3)).await;
    assert_eq!(status, 503, "{problem}");
    assert!(problem["retry_after"].as_u64().unwrap() >= 1);
    assert_eq!(records(&app).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_207_is_not_replayed_and_its_retry_enqueues_the_refused_jobs_under_their_ids() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let body = half_routable(&app).await;
    let send = || app.post_keyed(&app.client, "/v1/jobs/batch", "partly-1", &body);
    let first = send().await;
    assert_eq!(first.status(), 207);
    let named = ids(&first.json().await.unwrap());
    assert_eq!(records(&app).await, 1);

    // The work queue is back: the same request with the same key now
    // enqueues the refused job under the id the 207 gave it.
    let work = app.topology().work_queue("default");
    replace_work_queue(&app, Some(FieldTable::default())).await;
    let retry = send().await;
    assert_eq!(retry.status(), 202);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    let outcome: Value = retry.json().await.unwrap();
    assert_eq!(ids(&outcome), named, "{outcome}");
    assert_eq!(records(&app).await, 2);
    let messages = app.drain_queue(&work).await;
    assert_eq!(messages.len(), 1);
    let envelope: Value = serde_json::from_slice(&messages[0].1).unwrap();
    assert_eq!(envelope["id"], named[1].to_string(), "{envelope}");

    // That 202 is stored: a third request replays it and enqueues nothing.
    let again = send().await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(app.queue_len(&work).await, 0);
    assert_eq!(records(&app).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_retry_the_broker_refuses_keeps_the_record_of_a_job_the_first_request_enqueued() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let body = half_routable(&app).await;
    let send = || app.post_keyed(&app.client, "/v1/jobs/batch", "partly-2", &body);
    let first = send().await;
    assert_eq!(first.status(), 207);
    let named = ids(&first.json().await.unwrap());
    assert!(app.job(named[0]).await.is_some());

    // Now the work queue is back and the delayed job's delay queue is gone:
    // the retry's copy of the job the first request enqueued comes back
    // unroutable, while the other job is enqueued.
    replace_work_queue(&app, Some(FieldTable::default())).await;
    replace_queue(&app.topology().delay_queue(delay_level_for(HOUR)), None).await;
    let retry = send().await;
    assert_eq!(retry.status(), 207);
    let outcome: Value = retry.json().await.unwrap();
    assert_eq!(ids(&outcome), named, "{outcome}");
    assert_eq!(outcome["jobs"][0]["accepted"], false, "{outcome}");
    assert_eq!(outcome["jobs"][1]["accepted"], true, "{outcome}");
    let first_job = app.job(named[0]).await;
    assert!(
        first_job.is_some(),
        "the first request's job lost its record"
    );
    assert_eq!(records(&app).await, 2);
}
