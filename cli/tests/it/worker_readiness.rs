//! A worker's `/readyz` says whether it consumes every queue: a consumer the
//! broker cancels fails it until the worker has reconnected and consumes again.

use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use serde_json::json;

use crate::harness::{AMQP_URL, TestApp};

#[tokio::test]
async fn readyz_fails_while_a_consumer_is_cancelled_and_recovers() {
    let app = TestApp::spawn().await;
    let readyz = format!("http://{}/readyz", app.workers[0].worker.http_addr);
    let client = reqwest::Client::new();
    let status = || async {
        client
            .get(&readyz)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(status().await, 200);

    // Deleting a work queue makes the broker cancel the worker's consumer on it
    // (its other consumers carry on).
    let conn = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_delete(
            app.topology().work_queue("default").into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;

    // Probe tightly: the worker re-declares the queue itself when it reconnects,
    // so the not-ready window is short.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen_unready = false;
    loop {
        let now = status().await;
        if now == 503 {
            seen_unready = true;
        } else if now == 200 && seen_unready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz {}: last answer {now}",
            if seen_unready {
                "never answered 200 again"
            } else {
                "never failed after the consumer was cancelled"
            }
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Ready again means consuming again: a job posted now runs.
    let id = app.enqueue("diag.noop", json!({})).await;
    app.wait_for_state(id, "succeeded", Duration::from_secs(30))
        .await;
}
