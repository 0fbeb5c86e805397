//! A job whose message the broker confirmed but whose record the database did
//! not commit: the ingress writes the record again, and answers 202 once it
//! has; if it cannot, the 503 says the job may run, names it, and the job's
//! producer can read it once a worker has run it. A request that times out
//! after handing its job over is a 503 in doubt too. A keyed request in doubt,
//! retried with its key, enqueues the same job, and a worker runs it once.
//!
//! The failure is a deferred constraint trigger on the test's own `jobs` table:
//! it raises at `COMMIT`, after the batch's insert and its confirms, which is
//! where a database that dies mid-batch fails. A sequence (not rolled back with
//! the transaction) counts the commits it has failed.

use std::time::Duration;

use conveyor_schema::Envelope;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{TestApp, run_sql, wait_until};

/// Makes the first `failures` commits that insert a job fail.
async fn fail_commits(app: &TestApp, failures: i64) {
    run_sql(
        app,
        format!(
            "CREATE SEQUENCE commit_faults;
             CREATE FUNCTION fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF nextval('commit_faults') <= {failures} THEN
                     RAISE EXCEPTION 'injected commit failure';
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER fail_commit AFTER INSERT ON jobs
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_commit();"
        ),
    )
    .await;
}

/// The ingress's sample of `metric` (a line of its `/metrics` without the value).
async fn ingress_counter(app: &TestApp, metric: &str) -> f64 {
    let text = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(metric)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {metric} in:\n{text}"))
}

/// The ids of the messages in the test's work queue (taking them).
async fn queued_ids(app: &TestApp) -> Vec<Uuid> {
    let work = app.topology().work_queue("default");
    let mut ids: Vec<Uuid> = app
        .drain_queue(&work)
        .await
        .iter()
        .map(|(_, body)| Envelope::decode(body).unwrap().id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_after_the_confirm_is_written_again_and_answered_202() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    fail_commits(&app, 1).await;
    let id = app.enqueue("diag.noop", json!({})).await;
    assert_eq!(
        app.count("SELECT last_value AS n FROM commit_faults").await,
        2,
        "the batch's commit failed once and the record was written on the second try"
    );
    let job = app.job(id).await.expect("a record for the 202");
    assert_eq!(job.state, "queued");
    assert_eq!(queued_ids(&app).await, vec![id], "one message for the job");
    assert_eq!(
        ingress_counter(&app, "conveyor_jobs_recorded_again_total").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_be_recorded_is_a_503_in_doubt_that_its_producer_can_resolve() {
    let mut app =
        TestApp::spawn_with(0, |config| config.ingress.rerecord_within_ms = Some(300)).await;
    fail_commits(&app, i64::MAX).await;
    let key = app.create_key_with("shop", &["enqueue:*"], None).await;
    let shop = app.client_with(&key);

    let response = app.enqueue_response(&shop).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "https://conveyor.dev/problems/in-doubt");
    assert_eq!(problem["job_ids"].as_array().unwrap().len(), 1, "{problem}");
    let id: Uuid = problem["job_ids"][0].as_str().unwrap().parse().unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains(&id.to_string()), "{detail}");
    assert!(detail.contains("injected commit failure"), "{detail}");
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 0);
    let work = app.topology().work_queue("default");
    assert_eq!(app.queue_len(&work).await, 1, "the confirmed message stays");
    let unrecorded = "conveyor_jobs_in_doubt_total{reason=\"unrecorded\"}";
    assert_eq!(ingress_counter(&app, unrecorded).await, 1.0);

    // The database heals; a worker runs the job and records it for its producer.
    run_sql(&app, "DROP TRIGGER fail_commit ON jobs".into()).await;
    app.start_worker().await;
    let status_url = app.url(&format!("/v1/jobs/{id}"));
    wait_until(Duration::from_secs(20), || async {
        let response = shop.get(&status_url).send().await.unwrap();
        response.status() == 200 && response.json::<Value>().await.unwrap()["state"] == "succeeded"
    })
    .await;
    let recorded_for_shop = format!(
        "SELECT count(*) AS n FROM jobs WHERE id = '{id}' AND producer = 'shop' AND runs = 1"
    );
    assert_eq!(app.count(&recorded_for_shop).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_none_of_whose_jobs_can_be_recorded_names_them_all_in_doubt() {
    let app = TestApp::spawn_with(0, |config| config.ingress.rerecord_within_ms = Some(0)).await;
    fail_commits(&app, i64::MAX).await;
    let job = json!({"task": "diag.noop", "args": {}});
    let response = app
        .client
        .post(app.url("/v1/jobs/batch"))
        .json(&json!({"jobs": [job, job]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "https://conveyor.dev/problems/in-doubt");
    let mut named: Vec<Uuid> = problem["job_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().parse().unwrap())
        .collect();
    named.sort();
    assert_eq!(named, queued_ids(&app).await, "{problem}");
    assert_eq!(named.len(), 2);
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 0);
    let unrecorded = "conveyor_jobs_in_doubt_total{reason=\"unrecorded\"}";
    assert_eq!(ingress_counter(&app, unrecorded).await, 2.0);
    let recorded_again = ingress_counter(&app, "conveyor_jobs_recorded_again_total").await;
    assert_eq!(recorded_again, 0.0);
}

/// The one job an in-doubt 503 names.
async fn named_in_doubt(response: reqwest::Response) -> Uuid {
    assert_eq!(response.status(), 503);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem["type"], "https://conveyor.dev/problems/in-doubt",
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("took too long"),
        "{problem}"
    );
    let ids = problem["job_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "{problem}");
    ids[0].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_times_out_after_handing_over_its_job_is_a_503_in_doubt_naming_it() {
    let app = TestApp::spawn_with(0, |config| {
        config.ingress.request_timeout_ms = 1_500;
        config.ingress.batches_in_flight = 1;
    })
    .await;
    let release = app.block_inserts("jobs").await;
    // The first job's batch publishes and waits on its insert; the second job
    // waits for the only batch slot. Both requests time out.
    let first = app.enqueue_response(&app.client);
    let second = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.enqueue_response(&app.client).await
    };
    let (first, second) = tokio::join!(first, second);
    let (published, waiting) = (named_in_doubt(first).await, named_in_doubt(second).await);

    // Once the table is free, the first job's batch commits: recorded and
    // queued, it will run. The second job's submitter had stopped waiting when
    // a batch could take it, so it was left out: no record and no message.
    release.send(()).unwrap();
    wait_until(Duration::from_secs(10), || async {
        app.job(published).await.is_some()
    })
    .await;
    let abandoned = "conveyor_jobs_in_doubt_total{reason=\"abandoned\"}";
    wait_until(Duration::from_secs(10), || async {
        ingress_counter(&app, abandoned).await == 1.0
    })
    .await;
    assert_eq!(queued_ids(&app).await, vec![published]);
    assert!(
        app.job(waiting).await.is_none(),
        "a record for the left-out job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_request_that_times_out_names_its_job_and_a_retry_gets_its_202() {
    let app = TestApp::spawn_with(0, |config| config.ingress.request_timeout_ms = 1_500).await;
    let release = app.block_inserts("jobs").await;
    let post = || post_keyed_noop(&app, "order-42");
    let id = named_in_doubt(post().await).await;
    assert_eq!(
        post().await.status(),
        409,
        "the first request is still running"
    );

    // The first request goes on in its own task: once the table is free, its
    // job is recorded and its 202 stored for the key, which a retry gets.
    release.send(()).unwrap();
    let mut retried = post().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while retried.status() == 409 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        retried = post().await;
    }
    assert_eq!(retried.status(), 202);
    assert_eq!(retried.headers()["idempotent-replayed"], "true");
    let accepted: Value = retried.json().await.unwrap();
    assert_eq!(accepted["id"], id.to_string());
    assert_eq!(queued_ids(&app).await, vec![id]);
    let abandoned = "conveyor_jobs_in_doubt_total{reason=\"abandoned\"}";
    assert_eq!(ingress_counter(&app, abandoned).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_request_in_doubt_retried_with_its_key_enqueues_the_same_job_which_runs_once() {
    let mut app =
        TestApp::spawn_with(0, |config| config.ingress.rerecord_within_ms = Some(0)).await;
    fail_commits(&app, i64::MAX).await;
    let first = post_keyed_noop(&app, "order-7").await;
    assert_eq!(first.status(), 503);
    let problem: Value = first.json().await.unwrap();
    assert_eq!(problem["type"], "https://conveyor.dev/problems/in-doubt");
    let id: Uuid = problem["job_ids"][0].as_str().unwrap().parse().unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("enqueues this job again"), "{detail}");
    let failed =
        "SELECT count(*) AS n FROM idempotency_keys WHERE key = 'order-7' AND state = 'failed'";
    assert_eq!(app.count(failed).await, 1, "a 5xx keeps the key's seed");

    // The database heals, and the confirmed message runs the job.
    run_sql(&app, "DROP TRIGGER fail_commit ON jobs".into()).await;
    app.start_worker().await;
    app.wait_for_state(id, "succeeded", Duration::from_secs(20))
        .await;

    // The retry makes the same job, not a second one: a 202 naming it (not a
    // replay: the first answer was a 503), and a second message for it, which
    // the worker takes without running the job again.
    let retried = post_keyed_noop(&app, "order-7").await;
    assert_eq!(retried.status(), 202);
    assert!(retried.headers().get("idempotent-replayed").is_none());
    let accepted: Value = retried.json().await.unwrap();
    assert_eq!(accepted["id"], id.to_string());
    wait_until(Duration::from_secs(20), || async {
        worker_counter(&app, "conveyor_jobs_skipped_total", "diag.noop").await == Some(1.0)
    })
    .await;
    assert_eq!(
        worker_counter(&app, "conveyor_jobs_started_total", "diag.noop").await,
        Some(1.0),
        "the job ran once"
    );
    let work = app.topology().work_queue("default");
    assert_eq!(app.queue_len(&work).await, 0);
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 1);
    let job = app.job(id).await.unwrap();
    assert_eq!((job.state.as_str(), job.runs), ("succeeded", 1));
    let done =
        "SELECT count(*) AS n FROM idempotency_keys WHERE key = 'order-7' AND state = 'done'";
    assert_eq!(app.count(done).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_jobs_second_message_is_not_run_while_the_job_runs() {
    let app = TestApp::spawn_with(1, |_| {}).await;
    let args = json!({"ms": 1_500});
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .header("idempotency-key", "slow-1")
        .json(&json!({"task": "diag.sleep", "args": args}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id: Uuid = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    app.wait_for_state(id, "running", Duration::from_secs(10))
        .await;

    // What a retry of an in-doubt request publishes: the same job again.
    app.publish_keyed_again(id, "diag.sleep", args, "slow-1")
        .await;

    wait_until(Duration::from_secs(10), || async {
        worker_counter(&app, "conveyor_jobs_skipped_total", "diag.sleep").await == Some(1.0)
    })
    .await;
    app.wait_for_state(id, "succeeded", Duration::from_secs(10))
        .await;
    let started = worker_counter(&app, "conveyor_jobs_started_total", "diag.sleep").await;
    assert_eq!(started, Some(1.0), "the job ran once");
}

/// A retry's message whose attempt's predecessor ran again and succeeded (its
/// worker died after publishing the retry, before committing `retrying`, and
/// the redelivery ran it once more) is taken without running the job again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrys_message_for_a_job_that_succeeded_meanwhile_is_not_run() {
    let app = TestApp::spawn_with(1, |_| {}).await;
    let id = app.enqueue("diag.noop", json!({})).await;
    app.wait_for_state(id, "succeeded", Duration::from_secs(10))
        .await;

    let mut retry = conveyor_schema::Envelope::new("diag.noop", json!({}));
    retry.id = id;
    retry.attempt = 2;
    app.publish_envelope(&retry).await;

    wait_until(Duration::from_secs(10), || async {
        worker_counter(&app, "conveyor_jobs_skipped_total", "diag.noop").await == Some(1.0)
    })
    .await;
    let started = worker_counter(&app, "conveyor_jobs_started_total", "diag.noop").await;
    assert_eq!(started, Some(1.0), "the job ran once");
}

/// The worker's sample of counter `name` for `task`.
async fn worker_counter(app: &TestApp, name: &str, task: &str) -> Option<f64> {
    let text = app.worker_metrics().await;
    let labels = [("task", task), ("queue", "default")];
    crate::metrics::sample(&text, name, &labels)
}

/// `POST /v1/jobs` of a `diag.noop` with Idempotency-Key `key`.
async fn post_keyed_noop(app: &TestApp, key: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/jobs"))
        .header("idempotency-key", key)
        .json(&json!({"task": "diag.noop", "args": {}}))
        .send()
        .await
        .unwrap()
}
