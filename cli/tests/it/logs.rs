//! What a normal start and stop leave in a process's log: no error or warning
//! an operator would have to look into, and, in a file, no terminal colour codes.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use crate::harness::{TestApp, free_port, wait_exit, wait_until};

/// Sends SIGTERM to process `index` of `app` (pid `pid`) and waits for a clean exit.
fn stop(app: &mut TestApp, index: usize, pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| wait_exit(app, index, Duration::from_secs(12)));
    assert!(status.success(), "process {pid} exited with {status}");
}

/// The log's error and warning lines, after checking it holds no colour codes.
fn complaints(log: &str) -> Vec<&str> {
    assert!(
        !log.contains('\u{1b}'),
        "a log written to a file carries terminal colour codes: {log}"
    );
    log.lines()
        .filter(|line| line.contains("ERROR") || line.contains("WARN"))
        .collect()
}

/// lapin logged "Connection error: invalid channel state: Closing" at every
/// SIGTERM when the dead-letter inboxes' channels, dropped as consuming
/// stopped, closed while the connection did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_ran_a_job_stops_without_complaint() {
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker.log");
    let pid = app.spawn_worker_process_logging_to(10_000, &path);
    let id = app.enqueue("diag.noop", json!({})).await;
    app.wait_for_state(id, "succeeded", Duration::from_secs(20))
        .await;
    stop(&mut app, 0, pid);
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("worker stopped"), "{log}");
    assert!(complaints(&log).is_empty(), "{:#?}", complaints(&log));
}

/// An ingress started before anything declared its namespace's queues: its
/// queue monitor polled them before the publisher had declared them, and the
/// broker's refusal of each passive declare was logged as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_in_a_new_namespace_starts_and_stops_without_complaint() {
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    let mut fresh = app.config.clone();
    fresh.namespace = format!("{}-fresh", app.config.namespace);
    // The new namespace's queues go with the test, whatever its outcome.
    struct Cleanup(conveyor_platform::amqp::Topology);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            crate::harness::delete_topology(self.0.clone());
        }
    }
    let _cleanup = Cleanup(conveyor_platform::amqp::Topology::for_config(&fresh));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingress.log");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let pid = app.spawn_ingress_process_logging_to(&fresh.namespace, addr, &path);
    let ready = format!("http://{addr}/readyz");
    wait_until(Duration::from_secs(20), || async {
        reqwest::get(&ready)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    // The monitor polls as soon as it starts; give that poll time to finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(&mut app, 0, pid);
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("ingress stopped"), "{log}");
    assert!(complaints(&log).is_empty(), "{:#?}", complaints(&log));
}
