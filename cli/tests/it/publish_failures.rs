//! A publish the broker does not accept answers 503 with `Retry-After` and
//! leaves no job record: a 202 always means a record and a confirmed message.
//! A return (unroutable) is certain; a nack is in doubt (a quorum queue that
//! loses its leader may nack a message its new leader holds), and says so.
//!
//! Both failures are provoked on the test's own queue only (its namespace is
//! private), so the shared broker's settings and other tests are untouched:
//! - returned: the work queue is deleted after the ingress declared it, so the
//!   mandatory publish is unroutable and comes back;
//! - nacked: the work queue is replaced by one of the same name with
//!   `x-max-length = 0` and `x-overflow = reject-publish`, so the broker
//!   routes the message, refuses it, and nacks the publish.

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;

use crate::harness::{AMQP_URL, TestApp};

/// Deletes the test's work queue; with `replacement`, declares a queue of the
/// same name with those arguments.
pub(crate) async fn replace_work_queue(app: &TestApp, replacement: Option<FieldTable>) {
    replace_queue(&app.topology().work_queue("default"), replacement).await;
}

/// Deletes queue `name`; with `replacement`, declares a queue of the same name
/// with those arguments.
pub(crate) async fn replace_queue(name: &str, replacement: Option<FieldTable>) {
    let conn = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    if let Some(args) = replacement {
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
}

/// POSTs a job and checks the refusal: 503, `Retry-After`, problem+json of
/// type `in-doubt` naming the job or not, and still `records` job records.
async fn assert_refused_without_a_record(app: &TestApp, records: i64, in_doubt: bool) {
    let response = app.post_job(json!({"task": "diag.noop", "args": {}})).await;
    assert_eq!(response.status(), 503);
    let retry_after = response
        .headers()
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = response.text().await.unwrap();
    assert_eq!(
        app.count("SELECT count(*) AS n FROM jobs").await,
        records,
        "a refused publish left a job record: {body}"
    );
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        problem["type"] == "https://conveyor.dev/problems/in-doubt",
        in_doubt,
        "{body}"
    );
    assert_eq!(problem["job_ids"][0].is_string(), in_doubt, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_publish_answers_503_and_leaves_no_record() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    // The queue was declared by the ingress and takes jobs.
    app.enqueue("diag.noop", json!({})).await;
    let work = app.topology().work_queue("default");
    assert_eq!(app.drain_queue(&work).await.len(), 1);

    replace_work_queue(&app, None).await;
    assert_refused_without_a_record(&app, 1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_publish_answers_503_and_leaves_no_record() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    replace_work_queue(&app, Some(nacking_every_publish())).await;
    assert_refused_without_a_record(&app, 0, true).await;
}

/// Arguments of a queue that routes every message and nacks its publish.
pub(crate) fn nacking_every_publish() -> FieldTable {
    let mut full = FieldTable::default();
    full.insert("x-max-length".into(), AMQPValue::LongInt(0));
    full.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    full
}
