//! Workers stop safely: SIGTERM drains within the grace period, `kill -9` loses nothing.
//!
//! What a drain promises about the job records (README, Architecture, `worker/`):
//! a job that finishes within the grace period ran once (`attempts = 1, runs = 1`);
//! a job still running when the grace period ends is returned to its queue and
//! started again elsewhere, and since being cut off is not a failed attempt it
//! ends with `attempts = 1, runs = 2`.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use tokio_util::sync::CancellationToken;

use crate::harness::{TestApp, free_port, wait_exit, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_jobs_and_a_second_worker_takes_the_rest() {
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    let pid = app.spawn_worker_process(10_000);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(app.enqueue("diag.sleep", json!({"ms": 1500})).await);
    }
    // Wait until the worker is running some of them.
    wait_until(Duration::from_secs(20), || async {
        app.count("SELECT count(*) AS n FROM jobs WHERE state = 'running'")
            .await
            > 0
    })
    .await;
    let signalled = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| wait_exit(&mut app, 0, Duration::from_secs(12)));
    assert!(status.success(), "worker exited with {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        signalled.elapsed()
    );

    app.start_worker().await;
    for id in &ids {
        app.wait_for_state(*id, "succeeded", Duration::from_secs(30))
            .await;
    }
    // Exactly once: one attempt, started once, for every job.
    assert_eq!(
        app.count(
            "SELECT count(*) AS n FROM jobs WHERE state = 'succeeded' AND attempts = 1 AND runs = 1"
        )
        .await,
        20
    );
}

/// A job that has finished but whose outcome is still being committed when the
/// drain starts: its handler has already ended (the ack follows the commit, on
/// the state writer), and the drain still waits for that commit and ack, so the
/// message does not go back to the queue to be delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_outcomes_still_being_committed() {
    use diesel::connection::SimpleConnection;
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    let id = app.enqueue("diag.noop", json!({})).await;
    // Hold the job's row, so the worker's commit of its outcome waits.
    let mut holder = app.db.conn();
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM jobs WHERE id = '{id}' FOR UPDATE"
        ))
        .unwrap();
    let pid = app.spawn_worker_process(10_000);
    let db_name = app.db.name.clone();
    let committing = format!(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{db_name}' \
         AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO jobs%'"
    );
    wait_until(Duration::from_secs(20), || async {
        app.count(&committing).await == 1
    })
    .await;
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    holder.batch_execute("COMMIT").unwrap();
    let status = tokio::task::block_in_place(|| wait_exit(&mut app, 0, Duration::from_secs(12)));
    assert!(status.success(), "worker exited with {status}");

    let job = app.job(id).await.unwrap();
    assert_eq!((job.state.as_str(), job.runs), ("succeeded", 1));
    let work_queue = app.topology().work_queue("default");
    assert_eq!(
        app.queue_len(&work_queue).await,
        0,
        "the finished job's message came back to the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_job_redelivers_and_completes() {
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    let pid = app.spawn_worker_process(10_000);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.enqueue("diag.sleep", json!({"ms": 3000})).await);
    }
    wait_until(Duration::from_secs(20), || async {
        app.count("SELECT count(*) AS n FROM jobs WHERE state = 'running'")
            .await
            == 5
    })
    .await;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    tokio::task::block_in_place(|| wait_exit(&mut app, 0, Duration::from_secs(5)));

    app.spawn_worker_process(10_000);
    for id in &ids {
        let job = app
            .wait_for_state(*id, "succeeded", Duration::from_secs(30))
            .await;
        assert_eq!(job.attempts, 1, "a crash is not a failed attempt");
        assert_eq!(job.runs, 2, "started once before the kill and once after");
    }
}

/// Jobs longer than the grace period: the worker finishes what it can, exits 0
/// when the grace period ends (not when the long jobs would), and the long jobs
/// go back to the queue, where a second worker completes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_over_returns_unfinished_jobs_and_a_second_worker_completes_them() {
    const GRACE_MS: u64 = 2_000;
    // Long enough that "waited for the long jobs" and "cut them off" cannot be confused.
    const LONG_MS: u64 = 12_000;
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    let pid = app.spawn_worker_process(GRACE_MS);
    let mut long = Vec::new();
    for _ in 0..4 {
        long.push(app.enqueue("diag.sleep", json!({"ms": LONG_MS})).await);
    }
    let mut short = Vec::new();
    for _ in 0..4 {
        short.push(app.enqueue("diag.sleep", json!({"ms": 1_200})).await);
    }
    wait_until(Duration::from_secs(20), || async {
        app.count("SELECT count(*) AS n FROM jobs WHERE state = 'running'")
            .await
            == 8
    })
    .await;
    let signalled = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| wait_exit(&mut app, 0, Duration::from_secs(10)));
    let took = signalled.elapsed();
    assert!(status.success(), "worker exited with {status}");
    // The long jobs had at least LONG_MS - 1 s left; exiting well before that
    // means the worker stopped waiting at the end of the grace period.
    assert!(
        took < Duration::from_millis(GRACE_MS + 5_000),
        "the worker waited {took:?} (grace {GRACE_MS} ms, long jobs {LONG_MS} ms)"
    );

    // The short jobs finished inside the grace period, once.
    for id in &short {
        let job = app.job(*id).await.unwrap();
        assert_eq!(
            (job.state.as_str(), job.attempts, job.runs),
            ("succeeded", 1, 1),
            "{job:?}"
        );
    }
    // The long ones were cut off: not failed, not finished, and back in the queue.
    for id in &long {
        let job = app.job(*id).await.unwrap();
        assert_eq!(
            (job.state.as_str(), job.attempts, job.runs),
            ("running", 1, 1),
            "{job:?}"
        );
    }
    let work_queue = app.topology().work_queue("default");
    wait_until(Duration::from_secs(5), || async {
        app.queue_len(&work_queue).await == 4
    })
    .await;

    app.start_worker().await;
    for id in &long {
        let job = app
            .wait_for_state(*id, "succeeded", Duration::from_secs(40))
            .await;
        assert_eq!(
            job.attempts, 1,
            "being cut off by a drain is not a failed attempt"
        );
        assert_eq!(
            job.runs, 2,
            "started before the drain and again on the second worker"
        );
        assert!(job.last_error.is_none(), "{job:?}");
    }
    assert_eq!(
        app.count("SELECT count(*) AS n FROM jobs WHERE state = 'succeeded'")
            .await,
        8
    );
}

/// Jobs waiting for their task's only slot when the drain starts go back to
/// their queue once each. Returned before the broker confirmed cancelling the
/// consumer, one could be delivered straight back to the stopping worker and
/// be returned a second time when its connection closes: on RabbitMQ 3.10
/// both returns count toward `amqp.delivery_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_a_slot_are_returned_once() {
    // Many, so that some of the returns would race the consumer's cancel.
    const WAITING: usize = 100;
    let mut app = TestApp::spawn_with(0, |config| {
        config.worker.prefetch = Some(WAITING as u16 + 1);
        // The drain gives up on the slow job soon; its delivery is returned once too.
        config.worker.grace_period_ms = 1_000;
    })
    .await;
    let mut registry = conveyor_tasks::registry();
    assert!(registry.tune("diag.sleep", |o| o.concurrency = 1));
    app.start_worker_with(registry).await;
    let slow = app.enqueue("diag.sleep", json!({"ms": 600_000})).await;
    app.wait_for_state(slow, "running", Duration::from_secs(20))
        .await;
    for _ in 0..WAITING {
        app.enqueue("diag.sleep", json!({"ms": 1})).await;
    }
    // Every job delivered: one running, the rest waiting for its slot.
    let work_queue = app.topology().work_queue("default");
    wait_until(Duration::from_secs(20), || async {
        app.queue_len(&work_queue).await == 0
    })
    .await;
    app.stop_workers().await;

    wait_until(Duration::from_secs(10), || async {
        app.queue_len(&work_queue).await as usize == WAITING + 1
    })
    .await;
    let returned = app.drain_queue(&work_queue).await;
    let counts: Vec<i64> = returned
        .iter()
        .map(|(headers, _)| delivery_count(headers))
        .collect();
    let twice = counts.iter().filter(|count| **count != 1).count();
    assert_eq!(
        (returned.len(), twice),
        (WAITING + 1, 0),
        "x-delivery-count of the returned jobs: {counts:?}"
    );
}

/// The broker's count of a message's returns (`x-delivery-count`; 0 without it).
fn delivery_count(headers: &lapin::types::FieldTable) -> i64 {
    use lapin::types::AMQPValue;
    match headers.inner().get("x-delivery-count") {
        None => 0,
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(other) => panic!("x-delivery-count is {other:?}"),
    }
}

/// SIGTERM starts a drain (readiness fails at once); a second SIGTERM exits
/// at once with status 130 instead of waiting out the grace period, and the
/// job it abandoned goes back to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_with_status_130() {
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    let port = free_port();
    app.process_env.push((
        "CONVEYOR_WORKER_METRICS_ADDR".into(),
        format!("127.0.0.1:{port}"),
    ));
    // A grace period far longer than the test waits for the exit.
    let pid = app.spawn_worker_process(120_000);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let ready_status = || async {
        match reqwest::get(&readyz).await {
            Ok(response) => Some(response.status().as_u16()),
            Err(_) => None,
        }
    };
    wait_until(Duration::from_secs(20), || async {
        ready_status().await == Some(200)
    })
    .await;
    let id = app.enqueue("diag.sleep", json!({"ms": 120_000})).await;
    app.wait_for_state(id, "running", Duration::from_secs(20))
        .await;

    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    // The first signal was handled: the worker is draining and says so.
    wait_until(Duration::from_secs(5), || async {
        ready_status().await == Some(503)
    })
    .await;
    assert_eq!(
        reqwest::get(&readyz).await.unwrap().text().await.unwrap(),
        "draining"
    );

    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| wait_exit(&mut app, 0, Duration::from_secs(10)));
    assert_eq!(status.code(), Some(130), "worker exited with {status}");
    // Nothing was acknowledged: the broker holds the job again.
    let work_queue = app.topology().work_queue("default");
    wait_until(Duration::from_secs(5), || async {
        app.queue_len(&work_queue).await == 1
    })
    .await;
    assert_eq!(app.job(id).await.unwrap().state, "running");
}

/// The ingress stops being ready as soon as its shutdown starts. The server
/// also stops accepting connections at that moment, so from outside "not
/// ready" is a refused connection; the handler itself is checked below on an
/// ingress state whose broker and database are both fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_readyz_fails_once_shutdown_starts() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let readyz = app.url("/readyz");
    assert_eq!(reqwest::get(&readyz).await.unwrap().status(), 200);
    app.stop_ingress();
    wait_until(Duration::from_secs(5), || async {
        !reqwest::get(&readyz)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

/// `/readyz`'s handler on a real broker and database: 200, then 503
/// "shutting down" as soon as the shutdown token is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_readyz_handler_answers_503_once_the_shutdown_token_is_cancelled() {
    use axum::extract::State;
    use axum::response::IntoResponse;
    use conveyor_ingress::routes::health::readyz;

    let app = TestApp::spawn_with(0, |_| {}).await;
    let config = &app.config;
    let db = conveyor_schema::pool::pool(&app.db.url, 2);
    let stop = CancellationToken::new();
    let topology = app.topology();
    let publisher = app.publisher(&stop).await;
    let metrics = conveyor_platform::metrics::Metrics::new();
    let shutdown = CancellationToken::new();
    let state = conveyor_ingress::state::AppState::new(conveyor_ingress::state::Handles {
        recorder: conveyor_ingress::recorder::Recorder::start(
            &conveyor_platform::config::database_url(config),
            publisher.clone(),
            metrics.clone(),
            &conveyor_platform::config::IngressConfig {
                batch_max: 1,
                batches_in_flight: 1,
                ..Default::default()
            },
        )
        .unwrap(),
        auth: conveyor_ingress::auth::Auth::new(db.clone(), &config.auth),
        webhook_ledger: conveyor_ingress::webhooks::Ledger::start(db.clone()),
        db,
        publisher,
        topology,
        metrics,
        templates: conveyor_templates::MailTemplates::new(None),
        webhooks: Default::default(),
        webhook_rejections: Default::default(),
        shutdown: shutdown.clone(),
        schedules: Default::default(),
        idempotency: conveyor_ingress::idempotency::Settings {
            retention: Duration::from_secs(60),
            in_flight_timeout: Duration::from_secs(60),
        },
        snapshot: Default::default(),
        worker_gone_after: Duration::from_secs(60),
    });
    let answer = |state| async move {
        let response = readyz(State(state)).await.into_response();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    };
    assert_eq!(answer(state.clone()).await, (200, "ready".to_owned()));
    shutdown.cancel();
    assert_eq!(answer(state).await, (503, "shutting down".to_owned()));
    stop.cancel();
}
