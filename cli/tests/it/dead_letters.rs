//! Dead letters are recorded in PostgreSQL whichever road they took (the worker
//! giving up, or the broker's delivery limit), and the table and the `.dlq`
//! queue agree about what is dead.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{AMQP_URL, TestApp, wait_until};

const WAIT: Duration = Duration::from_secs(40);

/// Takes one message from `queue` and returns it unstarted (a requeueing nack,
/// as a worker stopped holding it does), which counts as a delivery toward
/// its limit. False when the queue had none ready.
pub(crate) async fn bounce_once(queue: &str) -> bool {
    let conn = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let got = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap();
    let found = got.is_some();
    if let Some(message) = got {
        message
            .delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_and_queue_agree_after_many_failures() {
    // The jobs are returned unstarted: no resets, so that the broker's limit dead-letters them.
    let mut app = TestApp::spawn_with(0, |config| {
        config.amqp.delivery_limit = 1;
        config.amqp.delivery_limit_resets = 0;
    })
    .await;
    let topology = app.topology();
    let work = topology.work_queue("default");
    // Three jobs the broker dead-letters: each delivered twice, never acked.
    let mut broker_dead = Vec::new();
    for _ in 0..3 {
        broker_dead.push(app.enqueue("diag.noop", json!({})).await);
    }
    for _ in 0..6 {
        assert!(bounce_once(&work).await);
    }
    let inbox = topology.dead_letter_inbox("default");
    wait_until(WAIT, || async { app.queue_len(&inbox).await == 3 }).await;

    // Now the worker: it records those and gives up on the failing jobs.
    app.start_worker().await;
    let mut worker_dead = Vec::new();
    for i in 0..12 {
        let task = if i % 3 == 0 {
            "diag.panic"
        } else {
            "diag.fail"
        };
        worker_dead.push(app.enqueue(task, json!({})).await);
    }
    for id in worker_dead.iter().chain(&broker_dead) {
        app.wait_for_state(*id, "dead", WAIT).await;
    }
    let dlq = topology.dead_letter_queue("default");
    wait_until(WAIT, || async { app.queue_len(&dlq).await == 15 }).await;
    assert_eq!(app.queue_len(&inbox).await, 0);

    let in_queue: BTreeSet<Uuid> = app
        .drain_queue(&dlq)
        .await
        .iter()
        .map(|(_, body)| conveyor_schema::Envelope::decode(body).unwrap().id)
        .collect();
    let expected: BTreeSet<Uuid> = worker_dead.iter().chain(&broker_dead).copied().collect();
    assert_eq!(in_queue, expected);
    assert_eq!(app.count("SELECT count(*) AS n FROM dead_jobs").await, 15);
    assert_eq!(
        app.count(
            "SELECT count(*) AS n FROM dead_jobs d JOIN jobs j ON j.id = d.id AND j.state = 'dead'"
        )
        .await,
        15
    );
    // Worker-side records carry every error with its time.
    let id = worker_dead[1];
    let described = app
        .count(&format!(
            "SELECT (CASE source WHEN 'worker' THEN 1000 ELSE 2000 END + attempts * 10
                     + jsonb_array_length(errors))::int8 AS n FROM dead_jobs WHERE id = '{id}'"
        ))
        .await;
    assert_eq!(described, 1055, "source 1=worker, attempts, errors");
    // Broker-side records carry the x-death history.
    let id = broker_dead[0];
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM dead_jobs WHERE id = '{id}' AND source = 'broker'
               AND x_death -> 0 ->> 'reason' = 'delivery_limit' AND reason LIKE '%delivery_limit%'"
        ))
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_dead_letter_keeps_x_death_in_the_dlq() {
    // The jobs are returned unstarted: no resets, so that the broker's limit dead-letters them.
    let mut app = TestApp::spawn_with(0, |config| {
        config.amqp.delivery_limit = 1;
        config.amqp.delivery_limit_resets = 0;
    })
    .await;
    let topology = app.topology();
    let id = app.enqueue("diag.noop", json!({})).await;
    let work = topology.work_queue("default");
    assert!(bounce_once(&work).await);
    assert!(bounce_once(&work).await);
    app.start_worker().await;
    app.wait_for_state(id, "dead", WAIT).await;
    let dlq = topology.dead_letter_queue("default");
    wait_until(WAIT, || async { app.queue_len(&dlq).await == 1 }).await;
    let messages = app.drain_queue(&dlq).await;
    let (headers, _) = &messages[0];
    let x_death = headers
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == "x-death")
        .map(|(_, v)| v.clone());
    assert!(
        matches!(x_death, Some(AMQPValue::FieldArray(ref a)) if !a.as_slice().is_empty()),
        "{headers:?}"
    );
}

/// A message no worker manages to move out of the dead-letter inbox (here:
/// returned every time, as by a worker that cannot commit its record) neither
/// loops there forever nor disappears: after the delivery limit the broker
/// dead-letters it straight to the `.dlq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_in_the_inbox_goes_to_the_dlq_after_the_delivery_limit() {
    let app = TestApp::spawn_with(0, |config| config.amqp.delivery_limit = 1).await;
    let topology = app.topology();
    let id = app.enqueue("diag.noop", json!({})).await;
    let (work, inbox, dlq) = (
        topology.work_queue("default"),
        topology.dead_letter_inbox("default"),
        topology.dead_letter_queue("default"),
    );
    // Into the inbox by the work queue's own delivery limit.
    assert!(bounce_once(&work).await);
    assert!(bounce_once(&work).await);
    wait_until(WAIT, || async { app.queue_len(&inbox).await == 1 }).await;
    // Out of it by the inbox's: delivered twice, returned both times.
    assert!(bounce_once(&inbox).await);
    assert!(bounce_once(&inbox).await);
    wait_until(WAIT, || async { app.queue_len(&dlq).await == 1 }).await;
    assert!(
        !bounce_once(&inbox).await,
        "the message is still in the inbox"
    );
    let moved = app.drain_queue(&dlq).await;
    let (headers, body) = &moved[0];
    assert_eq!(conveyor_schema::Envelope::decode(body).unwrap().id, id);
    // Both hops are in its history.
    let Some(AMQPValue::FieldArray(deaths)) = headers
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == "x-death")
        .map(|(_, v)| v.clone())
    else {
        panic!("no x-death in {headers:?}");
    };
    let queues: BTreeSet<String> = deaths
        .as_slice()
        .iter()
        .filter_map(|death| match death {
            AMQPValue::FieldTable(t) => {
                t.inner()
                    .iter()
                    .find(|(k, _)| k.as_str() == "queue")
                    .map(|(_, v)| match v {
                        AMQPValue::LongString(s) => s.to_string(),
                        other => format!("{other:?}"),
                    })
            }
            _ => None,
        })
        .collect();
    assert_eq!(queues, BTreeSet::from([work, inbox]));
}

/// An inbox declared by a release before the inbox had a delivery limit (a
/// plain quorum queue) cannot be redeclared with one; ingress and worker start
/// anyway, keep it as it is, and dead letters still flow through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_from_an_older_release_is_kept_and_still_works() {
    let namespace = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
    let old = conveyor_platform::amqp::Topology::for_config(&conveyor_platform::Config {
        namespace: namespace.clone(),
        ..Default::default()
    });
    let conn = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut quorum = lapin::types::FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            old.dead_letter_inbox("default").as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum,
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;

    // Starting the ingress (and below the worker) would fail on PRECONDITION_FAILED.
    let mut app = TestApp::spawn_with(0, |config| {
        config.namespace = namespace.clone();
        config.amqp.delivery_limit = 1;
        config.amqp.delivery_limit_resets = 0;
    })
    .await;
    let topology = app.topology();
    let id = app.enqueue("diag.noop", json!({})).await;
    let work = topology.work_queue("default");
    assert!(bounce_once(&work).await);
    assert!(bounce_once(&work).await);
    let inbox = topology.dead_letter_inbox("default");
    wait_until(WAIT, || async { app.queue_len(&inbox).await == 1 }).await;
    app.start_worker().await;
    let job = app.wait_for_state(id, "dead", WAIT).await;
    assert!(job.last_error.unwrap().contains("delivery_limit"));
    let dlq = topology.dead_letter_queue("default");
    wait_until(WAIT, || async { app.queue_len(&dlq).await == 1 }).await;
    assert_eq!(app.queue_len(&inbox).await, 0);
}
