//! A job the broker dead-letters for its delivery limit without its attempt
//! ever having started (every delivery returned by a worker stopped before
//! starting it) goes back to its work queue and runs; one returned
//! `amqp.delivery_limit_resets` times already, or whose attempt did start, is
//! dead-lettered as a crash loop.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use uuid::Uuid;

use crate::dead_letters::bounce_once;
use crate::harness::{AMQP_URL, TestApp, wait_until};

const WAIT: Duration = Duration::from_secs(40);

/// Returns the job's message to the work queue until the broker dead-letters
/// it into the inbox (`delivery_limit` + 1 returns).
async fn return_until_dead_lettered(app: &TestApp, delivery_limit: u32) {
    let topology = app.topology();
    let (work, inbox) = (
        topology.work_queue("default"),
        topology.dead_letter_inbox("default"),
    );
    for _ in 0..=delivery_limit {
        assert!(bounce_once(&work).await, "no message in {work}");
    }
    wait_until(WAIT, || async { app.queue_len(&inbox).await == 1 }).await;
}

/// The last started worker's count of returns of `diag.noop` jobs.
async fn resets_counted(app: &TestApp) -> u64 {
    noop_counter(app, "conveyor_jobs_delivery_limit_resets_total").await
}

async fn dead_records(app: &TestApp, id: Uuid) -> i64 {
    app.count(&format!(
        "SELECT count(*) AS n FROM dead_jobs WHERE id = '{id}'"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_hit_the_delivery_limit_unstarted_runs_once() {
    let mut app = TestApp::spawn_with(0, |config| config.amqp.delivery_limit = 2).await;
    let id = app.enqueue("diag.noop", json!({})).await;
    return_until_dead_lettered(&app, 2).await;

    app.start_worker().await;
    let job = app.wait_for_state(id, "succeeded", WAIT).await;
    assert_eq!(job.runs, 1, "{job:?}");
    assert_eq!(job.attempts, 1, "{job:?}");
    assert_eq!(
        dead_records(&app, id).await,
        0,
        "a dead-job record was written"
    );
    let inbox = app.topology().dead_letter_inbox("default");
    assert_eq!(app.queue_len(&inbox).await, 0);
    assert_eq!(resets_counted(&app).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_returned_delivery_limit_resets_times_is_dead() {
    let mut app = TestApp::spawn_with(0, |config| {
        config.amqp.delivery_limit = 1;
        config.amqp.delivery_limit_resets = 1;
    })
    .await;
    let id = app.enqueue("diag.noop", json!({})).await;
    return_until_dead_lettered(&app, 1).await;

    // A worker that never gets to start it (no slot for the task): it returns
    // the job to the work queue, holds it, and returns it when stopped.
    let mut stuck = conveyor_tasks::registry();
    assert!(stuck.tune("diag.noop", |o| o.concurrency = 0));
    app.start_worker_with(stuck).await;
    wait_until(WAIT, || async { resets_counted(&app).await == 1 }).await;
    app.stop_workers().await;
    // Its returns count again: the stop's (one requeue, made once the broker
    // confirmed cancelling the consumer), then ours, until the broker gives
    // up on it again.
    let topology = app.topology();
    let (work, inbox) = (
        topology.work_queue("default"),
        topology.dead_letter_inbox("default"),
    );
    wait_until(WAIT, || async {
        app.queue_len(&inbox).await == 1 || {
            bounce_once(&work).await;
            false
        }
    })
    .await;

    app.start_worker().await;
    let job = app.wait_for_state(id, "dead", WAIT).await;
    assert_eq!(job.runs, 0, "{job:?}");
    assert!(
        job.last_error
            .as_deref()
            .unwrap_or("")
            .contains("delivery_limit"),
        "{job:?}"
    );
    assert_eq!(dead_records(&app, id).await, 1);
    assert_eq!(resets_counted(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_attempt_started_is_dead_at_the_delivery_limit() {
    let mut app = TestApp::spawn_with(0, |config| {
        config.amqp.delivery_limit = 1;
        // The stopped worker gives up on its running attempt quickly.
        config.worker.grace_period_ms = 200;
    })
    .await;
    app.start_worker().await;
    let id = app.enqueue("diag.sleep", json!({"ms": 600_000})).await;
    app.wait_for_state(id, "running", WAIT).await;
    // Stopped mid-run: the delivery returns to its queue (one return).
    app.stop_workers().await;
    let work = app.topology().work_queue("default");
    wait_until(WAIT, || async { app.queue_len(&work).await == 1 }).await;
    assert!(bounce_once(&work).await, "no message in {work}");
    let inbox = app.topology().dead_letter_inbox("default");
    wait_until(WAIT, || async { app.queue_len(&inbox).await == 1 }).await;

    app.start_worker().await;
    let job = app.wait_for_state(id, "dead", WAIT).await;
    assert_eq!(job.runs, 1, "{job:?}");
    assert_eq!(dead_records(&app, id).await, 1);
    assert_eq!(resets_counted(&app).await, 0);
}

/// The worker's `name` counter for `diag.noop` (0 before its first).
async fn noop_counter(app: &TestApp, name: &str) -> u64 {
    let metrics = app.worker_metrics().await;
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(prefix.as_str()))
        .filter(|labels| labels.contains("task=\"diag.noop\""))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// The header of a returned message, as the README documents it.
const LIMIT_RESETS_HEADER: &str = "conveyor-limit-resets";

/// Publishes `body` to `queue` as a returned message is (with
/// [`LIMIT_RESETS_HEADER`]), confirmed.
async fn publish_returned(queue: &str, body: &[u8]) {
    let conn = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert(LIMIT_RESETS_HEADER.into(), AMQPValue::LongLongInt(1));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let _ = conn.close(200, "done".into()).await;
}

/// A redelivered inbox copy can return its job twice: the second copy of a
/// returned message is checked against the job's record and not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_returned_copy_of_a_finished_job_does_not_run() {
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    let id = app.enqueue("diag.noop", json!({})).await;
    let work = app.topology().work_queue("default");
    let taken = app.drain_queue(&work).await;
    assert_eq!(taken.len(), 1);
    let body = &taken[0].1;

    publish_returned(&work, body).await;
    app.start_worker().await;
    app.wait_for_state(id, "succeeded", WAIT).await;
    publish_returned(&work, body).await;
    wait_until(WAIT, || async {
        noop_counter(&app, "conveyor_jobs_skipped_total").await == 1
    })
    .await;
    assert_eq!(noop_counter(&app, "conveyor_jobs_started_total").await, 1);
}

/// The last started worker's count of inbox copies of `diag.noop` jobs that
/// had already succeeded.
async fn already_succeeded_counted(app: &TestApp) -> u64 {
    noop_counter(app, "conveyor_jobs_delivery_limit_already_succeeded_total").await
}

/// A job that ran and succeeded, whose stale copy (its ack lost each time)
/// the broker then dead-letters for its delivery limit: the inbox copy is
/// acknowledged and counted, never recorded nor moved to the `.dlq`, where a
/// replay would run the succeeded job again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_of_a_succeeded_job_at_the_delivery_limit_is_not_dead() {
    let mut app = TestApp::spawn_with(0, |config| config.amqp.delivery_limit = 1).await;
    let id = app.enqueue("diag.noop", json!({})).await;
    let topology = app.topology();
    let (work, inbox, dlq) = (
        topology.work_queue("default"),
        topology.dead_letter_inbox("default"),
        topology.dead_letter_queue("default"),
    );
    let taken = app.drain_queue(&work).await;
    assert_eq!(taken.len(), 1);
    let envelope = conveyor_schema::Envelope::decode(&taken[0].1).unwrap();

    app.publish_envelope(&envelope).await;
    app.start_worker().await;
    app.wait_for_state(id, "succeeded", WAIT).await;
    app.stop_workers().await;
    // The stale copy, returned until the broker dead-letters it.
    app.publish_envelope(&envelope).await;
    return_until_dead_lettered(&app, 1).await;

    app.start_worker().await;
    // Either road ends here: the copy acknowledged as a succeeded job's, or
    // (the defect) recorded and moved to the `.dlq`.
    wait_until(WAIT, || async {
        already_succeeded_counted(&app).await == 1
            || dead_records(&app, id).await == 1
            || app.queue_len(&dlq).await == 1
    })
    .await;
    assert_eq!(
        dead_records(&app, id).await,
        0,
        "a dead-job record was written for a succeeded job"
    );
    assert_eq!(already_succeeded_counted(&app).await, 1);
    assert_eq!(resets_counted(&app).await, 0);
    // Stopped, the worker would return a copy it had not acked.
    app.stop_workers().await;
    assert_eq!(app.queue_len(&inbox).await, 0);
    assert_eq!(app.queue_len(&dlq).await, 0);
    let job = app.job(id).await.unwrap();
    assert_eq!(job.state, "succeeded", "{job:?}");
    assert_eq!(job.runs, 1, "{job:?}");
}
