//! Workers stop safely: SIGTERM drains within the grace period, `kill -9` loses nothing.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use crate::harness::{TestApp, wait_until};

fn wait_exit(app: &mut TestApp, index: usize, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = app.processes[index].try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "worker did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
