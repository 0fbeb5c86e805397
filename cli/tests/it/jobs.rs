//! A job's whole path: HTTP → RabbitMQ → worker → Postgres, with retries and dead letters.

use std::time::Duration;

use conveyor_platform::amqp::{ERROR_HEADER, Outgoing};
use conveyor_schema::Envelope;
use lapin::types::AMQPValue;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::TestApp;

pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) fn header(headers: &lapin::types::FieldTable, name: &str) -> Option<String> {
    headers
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| match v {
            AMQPValue::LongString(s) => s.to_string(),
            other => format!("{other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueued_job_runs_and_succeeds() {
    let app = TestApp::spawn().await;
    let id = app.enqueue("diag.noop", json!({})).await;
    // Visible as soon as the 202 was sent.
    let status: Value = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert!(
        ["queued", "running", "succeeded"].contains(&status["state"].as_str().unwrap()),
        "{status}"
    );
    let job = app.wait_for_state(id, "succeeded", WAIT).await;
    assert_eq!((job.attempts, job.runs), (1, 1));
    let status: Value = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status["state"], "succeeded");
    assert!(status["finished_at"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_succeeds_on_third_attempt_after_backoff() {
    let app = TestApp::spawn().await;
    let id = app.enqueue("diag.fail", json!({"until_attempt": 3})).await;
    let job = app.wait_for_state(id, "succeeded", WAIT).await;
    assert_eq!(job.attempts, 3);
    let errors = job.errors.as_array().unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    let at =
        |i: usize| chrono::DateTime::parse_from_rfc3339(errors[i]["at"].as_str().unwrap()).unwrap();
    // Equal jitter: attempt 2 waits 50–100 ms, attempt 3 waits 100–200 ms (timestamps are the
    // worker's own, taken when each attempt failed or started).
    let gap = at(1) - at(0);
    assert!(
        gap >= chrono::Duration::milliseconds(50),
        "second failure only {gap} after the first"
    );
    let started = job.started_at.unwrap();
    let wait = started - at(1).with_timezone(&chrono::Utc);
    assert!(
        wait >= chrono::Duration::milliseconds(100),
        "attempt 3 started {wait} after the second failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_job_is_dead_lettered_with_its_error() {
    let app = TestApp::spawn().await;
    let id = app.enqueue("diag.fail", json!({})).await;
    let job = app.wait_for_state(id, "dead", WAIT).await;
    assert_eq!(job.attempts, 5);
    assert!(
        job.last_error
            .as_deref()
            .unwrap()
            .contains("failing attempt 5"),
        "{job:?}"
    );
    let dlq = app.topology().dead_letter_queue("default");
    let messages = app.drain_queue(&dlq).await;
    assert_eq!(messages.len(), 1);
    let (headers, body) = &messages[0];
    assert_eq!(Envelope::decode(body).unwrap().id, id);
    assert!(
        header(headers, ERROR_HEADER)
            .unwrap()
            .contains("gave up after 5 attempts")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_job_is_dead_lettered_while_others_flow() {
    let app = TestApp::spawn().await;
    let panicking = app.enqueue("diag.panic", json!({})).await;
    let mut others = Vec::new();
    for _ in 0..20 {
        others.push(app.enqueue("diag.noop", json!({})).await);
    }
    for id in others {
        app.wait_for_state(id, "succeeded", WAIT).await;
    }
    let job = app.wait_for_state(panicking, "dead", WAIT).await;
    // Every panic was a failed attempt, up to diag's maximum of 5.
    assert_eq!((job.attempts, job.max_attempts), (5, 5), "{job:?}");
    assert_eq!(job.errors.as_array().unwrap().len(), 5, "{job:?}");
    assert!(job.last_error.unwrap().contains("task panicked"));
    assert_eq!(
        app.drain_queue(&app.topology().dead_letter_queue("default"))
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_job_waits_in_the_broker() {
    let app = TestApp::spawn().await;
    let response = app
        .post_job(json!({"task": "diag.noop", "delay_ms": 700}))
        .await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let job = app.wait_for_state(id, "succeeded", WAIT).await;
    let waited = job.started_at.unwrap() - job.enqueued_at;
    assert!(
        waited >= chrono::Duration::milliseconds(700),
        "started after only {waited}"
    );
}

/// `body` as a message to the `default` work queue, as a producer other than
/// Conveyor may publish it (with a fresh `message_id`, no task header).
pub(crate) fn raw_message(app: &TestApp, body: Vec<u8>) -> Outgoing {
    Outgoing {
        exchange: String::new(),
        routing_key: app.topology().work_queue("default"),
        body,
        message_id: uuid::Uuid::now_v7(),
        task: String::new(),
        headers: vec![],
    }
}

/// Publishes `messages` in order, each confirmed.
pub(crate) async fn publish_raw(app: &TestApp, messages: &[Outgoing]) {
    let stop = CancellationToken::new();
    let publisher = app.publisher(&stop).await;
    for message in messages {
        publisher.publish(message).await.unwrap();
    }
    stop.cancel();
}

/// Waits for `count` messages in the `default` dead-letter queue, takes them
/// and returns their reasons ([`ERROR_HEADER`]).
pub(crate) async fn dead_letter_reasons(app: &TestApp, count: u32) -> Vec<String> {
    let dlq = app.topology().dead_letter_queue("default");
    crate::harness::wait_until(WAIT, || async { app.queue_len(&dlq).await == count }).await;
    app.drain_queue(&dlq)
        .await
        .iter()
        .map(|(headers, _)| header(headers, ERROR_HEADER).unwrap())
        .collect()
}

/// Messages that are not valid jobs go to the dead-letter queue with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_messages_are_dead_lettered_not_dropped() {
    let app = TestApp::spawn().await;
    let unknown_task = Envelope::new("no.such.task", json!({}));
    let mut future_version = serde_json::to_value(Envelope::new("diag.noop", json!({}))).unwrap();
    future_version["version"] = json!(99);
    let not_json = raw_message(&app, b"this is not json".to_vec());
    let not_json_id = not_json.message_id;
    publish_raw(
        &app,
        &[
            not_json,
            raw_message(&app, unknown_task.encode()),
            raw_message(&app, serde_json::to_vec(&future_version).unwrap()),
        ],
    )
    .await;
    let mut reasons = dead_letter_reasons(&app, 3).await;
    reasons.sort();
    assert!(reasons[0].contains("undecodable envelope"), "{reasons:?}");
    assert!(
        reasons[1].contains("unknown task `no.such.task`"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("unsupported envelope version 99"),
        "{reasons:?}"
    );
    assert_eq!(app.job(unknown_task.id).await.unwrap().state, "dead");
    // An unreadable body has no job id of its own: its dead-job record is named
    // after the message's `message_id`.
    let named = format!("SELECT count(*) AS n FROM dead_jobs WHERE id = '{not_json_id}'");
    crate::harness::wait_until(WAIT, || async { app.count(&named).await == 1 }).await;
}

/// An unreadable message without a `message_id` is named after its body, so
/// handling it twice (as after a redelivery) records it once; both copies stay
/// in the dead-letter queue, the raw archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_without_an_id_is_recorded_once_however_often_it_comes() {
    let mut app = TestApp::spawn().await;
    let message = Outgoing {
        message_id: uuid::Uuid::nil(),
        ..raw_message(&app, b"not an envelope, no id".to_vec())
    };
    publish_raw(&app, &[message.clone(), message]).await;
    let dlq = app.topology().dead_letter_queue("default");
    crate::harness::wait_until(WAIT, || async { app.queue_len(&dlq).await == 2 }).await;
    // A drained worker has committed what it handled.
    app.stop_workers().await;
    assert_eq!(app.count("SELECT count(*) AS n FROM dead_jobs").await, 1);
}

/// Text PostgreSQL cannot store (U+0000) in a message from some other producer
/// sends that message to the dead-letter queue; it does not stop the worker's
/// state commits, so the jobs after it still run and are recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_holding_nul_are_dead_lettered_and_the_worker_goes_on() {
    let app = TestApp::spawn().await;
    let nul_in_args = raw_message(
        &app,
        Envelope::new("diag.noop", json!({"note": "a\u{0}b"})).encode(),
    );
    let nul_bytes = raw_message(&app, b"not json\0either".to_vec());
    // Neither is a readable envelope: their dead-job records are named after their `message_id`s.
    let named = [nul_in_args.message_id, nul_bytes.message_id];
    publish_raw(&app, &[nul_in_args, nul_bytes]).await;
    let after = app.enqueue("diag.noop", json!({})).await;
    crate::harness::wait_until(WAIT, || async {
        app.job(after)
            .await
            .is_some_and(|job| job.state == "succeeded")
    })
    .await;
    let reasons = dead_letter_reasons(&app, 2).await;
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("/args/note holds the NUL character")),
        "{reasons:?}"
    );
    for id in named {
        let named = format!("SELECT count(*) AS n FROM dead_jobs WHERE id = '{id}'");
        crate::harness::wait_until(WAIT, || async { app.count(&named).await == 1 }).await;
    }
}

/// `Idempotency-Key` and a valid W3C `traceparent` (with its `tracestate`)
/// reach the job's envelope; an invalid `traceparent` is ignored, not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_and_trace_context_reach_the_envelope() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let post = |headers: Vec<(&'static str, &'static str)>| {
        let mut request = app
            .client
            .post(app.url("/v1/jobs"))
            .json(&json!({"task": "diag.noop", "args": {}}));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 202);
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .parse::<uuid::Uuid>()
                .unwrap()
        }
    };
    let traced = post(vec![
        ("idempotency-key", "order-42"),
        ("traceparent", traceparent),
        ("tracestate", "congo=t61rcWkgMzE"),
    ])
    .await;
    let invalid = post(vec![("traceparent", "00-not-a-trace-01")]).await;
    let plain = post(vec![]).await;

    let messages = app.drain_queue(&app.topology().work_queue("default")).await;
    let envelopes: Vec<Envelope> = messages
        .iter()
        .map(|(_, body)| Envelope::decode(body).unwrap())
        .collect();
    let find = |id| envelopes.iter().find(|e| e.id == id).unwrap();
    assert_eq!(envelopes.len(), 3);
    let envelope = find(traced);
    assert_eq!(envelope.idempotency_key.as_deref(), Some("order-42"));
    let trace = envelope.trace.as_ref().unwrap();
    assert_eq!(trace.traceparent, traceparent);
    assert_eq!(trace.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    assert_eq!(find(invalid).trace, None);
    assert_eq!(
        (&find(plain).idempotency_key, &find(plain).trace),
        (&None, &None)
    );
}
