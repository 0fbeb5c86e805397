//! The dashboard in a real headless browser: sign in, load every page (the
//! queues page with its per-minute rates), replay a dead job by clicking and
//! see the replay succeed; a screenshot of each page goes to
//! `<target>/tmp/dashboard-screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::harness::{AMQP_URL, TestApp, wait_until};
use crate::webdriver::Browser;

const WAIT: Duration = Duration::from_secs(30);

fn shot(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("dashboard-screenshots")
        .join(format!("{name}.png"))
}

/// Returns one delivery of the head of `queue` to the broker (counts as a delivery).
async fn bounce(queue: &str) {
    let conn = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let message = channel
        .basic_get(queue.into(), Default::default())
        .await
        .unwrap()
        .expect("a message to bounce");
    message
        .delivery
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_load_and_a_dead_job_is_replayed_by_clicking() {
    let mut app = TestApp::spawn_with(0, |config| {
        config.amqp.delivery_limit = 1;
        crate::metrics::fast_monitor(config);
    })
    .await;
    // A job the broker dead-letters (delivered twice, never acked): replaying it succeeds.
    let dead = app.enqueue("diag.noop", json!({})).await;
    let work = app.topology().work_queue("default");
    bounce(&work).await;
    bounce(&work).await;
    app.start_worker().await;
    app.wait_for_state(dead, "dead", WAIT).await;
    // One retry, then success: every rate column has something to show.
    let retried = app.enqueue("diag.fail", json!({"until_attempt": 2})).await;
    app.wait_for_state(retried, "succeeded", WAIT).await;

    let browser = Browser::start().await;
    browser.goto(&app.url("/dashboard")).await;
    browser.wait_for_url("/dashboard/login", WAIT).await;
    browser.screenshot(&shot("login")).await;
    browser.type_into("#name", "carol").await;
    browser.type_into("#token", &app.admin_key).await;
    browser.click("#sign-in").await;
    browser.wait_for_url("/dashboard/queues", WAIT).await;

    // Queues: refreshed in place until the poller shows the worker's consumer.
    browser.wait_for_text("#refreshed", "updated", WAIT).await;
    let queues = browser.wait_for_text("#queues", "default", WAIT).await;
    assert!(queues.contains("Consumers"), "{queues}");
    for column in [
        "Published / min",
        "Started / min",
        "Succeeded / min",
        "Retried / min",
        "Dead / min",
    ] {
        assert!(queues.contains(column), "{column} missing: {queues}");
    }
    // Two jobs recorded; the failing one started (its latest attempt), retried once
    // and succeeded; the bounced one was dead-lettered by the broker, never started.
    for (rate, shown) in [
        ("published", "2"),
        ("started", "1"),
        ("succeeded", "1"),
        ("retried", "1"),
        ("dead", "1"),
    ] {
        let cell = browser
            .wait_for_text(&format!("#queue-default .{rate}"), shown, WAIT)
            .await;
        assert_eq!(cell, shown, "{rate}");
    }
    browser.screenshot(&shot("queues")).await;

    browser.goto(&app.url("/dashboard/workers")).await;
    browser.wait_for_text("#workers", "live", WAIT).await;
    browser.screenshot(&shot("workers")).await;

    browser
        .goto(&app.url(&format!("/dashboard/jobs?id={dead}")))
        .await;
    browser.wait_for_text("#jobs", "dead", WAIT).await;
    browser.screenshot(&shot("jobs")).await;

    browser
        .goto(&app.url(&format!("/dashboard/dead/{dead}")))
        .await;
    let detail = browser.text("main").await;
    assert!(detail.contains("delivery_limit"), "{detail}");
    browser.screenshot(&shot("dead-job")).await;

    browser.goto(&app.url("/dashboard/dead")).await;
    browser.screenshot(&shot("dead-jobs")).await;
    browser.click(&format!("#dead-{dead} button.replay")).await;
    let flash = browser.wait_for_text("#flash", "Replayed", WAIT).await;
    assert!(
        flash.starts_with(&format!("Replayed {dead} as job ")),
        "{flash}"
    );
    let new_id: Uuid = flash
        .trim_end_matches('.')
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    app.wait_for_state(new_id, "succeeded", WAIT).await;
    browser.screenshot(&shot("dead-jobs-after-replay")).await;

    browser
        .goto(&app.url(&format!("/dashboard/jobs?id={new_id}")))
        .await;
    let row = browser.wait_for_text("#jobs", "succeeded", WAIT).await;
    assert!(row.contains(&dead.to_string()), "replay_of shown: {row}");
    browser.screenshot(&shot("replayed-job")).await;
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM dead_job_actions WHERE dead_job_id = '{dead}' AND actor = 'dashboard:carol'"
        ))
        .await,
        1
    );

    for page in ["campaigns", "schedules"] {
        browser.goto(&app.url(&format!("/dashboard/{page}"))).await;
        let text = browser.text("#empty").await;
        assert_eq!(text, format!("No {page} yet."));
        browser.screenshot(&shot(page)).await;
    }
    wait_until(WAIT, || async { shot("schedules").exists() }).await;
}
