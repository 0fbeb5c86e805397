//! The harness's own promise: a dropped `TestApp` leaves nothing on the shared
//! broker, even when it is dropped in the middle of work.

use std::time::Duration;

use conveyor_platform::amqp::Topology;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;

use crate::harness::{AMQP_URL, TestApp};

/// The names of `topology`'s queues and exchanges that exist on the broker.
async fn left_on_broker(topology: &Topology) -> Vec<String> {
    let conn = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let mut found = Vec::new();
    // A failed passive declare closes its channel, so each check has its own.
    for queue in topology.queue_names() {
        let channel = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .is_ok()
        {
            found.push(queue);
        }
    }
    for exchange in topology.exchange_names() {
        let channel = conn.create_channel().await.unwrap();
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok()
        {
            found.push(exchange);
        }
    }
    let _ = conn.close(200, "done".into()).await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_app_dropped_mid_work_leaves_no_queue_or_exchange_behind() {
    for round in 0..3 {
        let app = TestApp::spawn().await;
        let topology = app.topology();
        // At drop time jobs are failing and going round the delay queues, and one is running.
        for _ in 0..20 {
            app.enqueue("diag.fail", json!({})).await;
        }
        app.enqueue("diag.sleep", json!({"ms": 10_000})).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(app);
        // Long enough for anything still running to declare its topology again.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let left = left_on_broker(&topology).await;
        assert!(
            left.is_empty(),
            "round {round}: left on the broker: {left:?}"
        );
    }
}
