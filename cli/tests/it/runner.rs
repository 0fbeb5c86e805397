//! A redelivered copy of a job does not run beside the attempt it copies while
//! that attempt's worker is alive: it waits, and is acknowledged unrun once
//! the attempt has ended (see `worker/src/runner.rs`). A killed worker's jobs
//! still run again at once (`drain::kill_9_mid_job_redelivers_and_completes`).

use std::time::Duration;

use conveyor_schema::Envelope;
use serde_json::json;

use crate::dead_letters::bounce_once;
use crate::harness::{TestApp, wait_until};

const WAIT: Duration = Duration::from_secs(30);

async fn worker_counter(app: &TestApp, name: &str) -> Option<f64> {
    task_counter(app, name, "diag.sleep").await
}

async fn task_counter(app: &TestApp, name: &str, task: &str) -> Option<f64> {
    let text = app.worker_metrics().await;
    let labels = [("task", task), ("queue", "default")];
    crate::metrics::sample(&text, name, &labels)
}

/// Waits until the copy was acknowledged unrun (or ran), then checks that the
/// attempt ran once and that the last started worker held the copy meanwhile.
async fn held_once_then_skipped(app: &TestApp, id: uuid::Uuid) {
    let runs = || async { app.wait_for_state(id, "succeeded", WAIT).await.runs };
    wait_until(WAIT, || async {
        worker_counter(app, "conveyor_jobs_skipped_total").await == Some(1.0) || runs().await > 1
    })
    .await;
    assert_eq!(runs().await, 1, "the attempt ran twice");
    let held = worker_counter(app, "conveyor_jobs_held_for_runner_total").await;
    assert_eq!(held, Some(1.0));
    let work = app.topology().work_queue("default");
    assert_eq!(app.queue_len(&work).await, 0);
}

/// A keyed job's second message, returned by a worker that held it (as a
/// draining one does) while the first runs on another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_second_message_waits_for_the_attempt_running_elsewhere() {
    // A window of one: the first worker holds the first message only, so the
    // second stays in the queue for this test to take and return.
    let mut app = TestApp::spawn_with(0, |config| config.worker.prefetch = Some(1)).await;
    let work = app.topology().work_queue("default");
    let mut envelope = Envelope::new("diag.sleep", json!({"ms": 6000}));
    envelope.idempotency_key = Some("twin".into());
    app.publish_envelope(&envelope).await;
    app.start_worker().await;
    app.wait_for_state(envelope.id, "running", WAIT).await;

    app.publish_envelope(&envelope).await;
    assert!(
        bounce_once(&work).await,
        "the second message was not in the queue"
    );
    app.start_worker().await;
    held_once_then_skipped(&app, envelope.id).await;
}

/// A worker whose broker connection is closed mid-attempt goes on with the
/// attempt; the copy the broker redelivers (to the same worker, reconnected)
/// waits for it instead of running it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_whose_worker_lost_its_broker_connection_runs_once() {
    let mut app = TestApp::spawn_with(0, |config| config.worker.prefetch = Some(1)).await;
    app.start_worker().await;
    let id = app.enqueue("diag.sleep", json!({"ms": 5000})).await;
    app.wait_for_state(id, "running", WAIT).await;

    let worker = tokio::task::block_in_place(|| {
        let worker = worker_id(&app);
        close_broker_connection(&format!("conveyor-worker {worker}"));
        worker
    });
    held_once_then_skipped(&app, id).await;
    let status: serde_json::Value = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status["worker"], worker.as_str(), "{status}");
}

/// The one worker's id, from its heartbeat.
fn worker_id(app: &TestApp) -> String {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
    }
    let rows: Vec<Row> = diesel::sql_query("SELECT id FROM workers")
        .load(&mut app.db.conn())
        .unwrap();
    assert_eq!(rows.len(), 1, "one worker");
    rows.into_iter().next().unwrap().id
}

/// Has the broker close the connection named `name`, as a network fault would
/// (`rabbitmqctl close_connection`).
fn close_broker_connection(name: &str) {
    let rabbitmqctl = |args: &[&str]| {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // The name a client gives its connection is among its client properties.
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    let quoted = format!("\"{name}\"");
    let pid = listing
        .lines()
        .find(|line| line.contains(&quoted))
        .and_then(|line| line.split('\t').next())
        .map(|pid| pid.trim().to_owned())
        .unwrap_or_else(|| panic!("no connection named {name:?} in {listing}"));
    rabbitmqctl(&["close_connection", &pid, "test: a network fault"]);
}

/// Two messages of a keyed job delivered together (a retried request, a
/// re-published tick) used to both start within the few milliseconds before
/// either's `running` state was committed: the start is now claimed in one
/// statement, and the second copy finds the first's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_a_keyed_job_delivered_together_start_it_once() {
    const JOBS: usize = 5;
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    let mut ids = Vec::new();
    for n in 0..JOBS {
        let mut envelope = Envelope::new("diag.sleep", json!({"ms": 1000}));
        envelope.idempotency_key = Some(format!("twin-{n}"));
        app.publish_envelope(&envelope).await;
        app.publish_envelope(&envelope).await;
        ids.push(envelope.id);
    }
    app.start_worker().await;
    for id in &ids {
        let job = app.wait_for_state(*id, "succeeded", WAIT).await;
        assert_eq!(job.runs, 1, "a keyed job's two messages both started it");
    }
    wait_until(WAIT, || async {
        worker_counter(&app, "conveyor_jobs_skipped_total").await == Some(JOBS as f64)
    })
    .await;
}

/// A worker that gives back a job it started (here: its retry cannot be
/// published) clears its name from the record first, so the job runs again at
/// once rather than wait for the worker to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_given_back_after_its_attempt_runs_again_at_once() {
    use crate::publish_failures::{nacking_every_publish, replace_queue};
    let mut app = TestApp::spawn_with(0, |_| {}).await;
    app.start_worker().await;
    // After the worker declared them: its publisher would refuse their arguments.
    let topology = app.topology();
    for level in conveyor_platform::amqp::DELAY_LEVELS_MS {
        replace_queue(&topology.delay_queue(level), Some(nacking_every_publish())).await;
    }
    let id = app.enqueue("diag.fail", json!({})).await;
    wait_until(WAIT, || async {
        app.count(&format!(
            "SELECT runs::bigint AS n FROM jobs WHERE id = '{id}'"
        ))
        .await
            >= 3
    })
    .await;
    let held = task_counter(&app, "conveyor_jobs_held_for_runner_total", "diag.fail").await;
    assert_eq!(
        held.unwrap_or(0.0),
        0.0,
        "a copy was held for its own worker"
    );
}

/// A worker's heartbeat connection breaks, and its lock is still held by
/// another session when the heartbeat reconnects (as a backend PostgreSQL has
/// not yet seen end would hold it): the heartbeat beats on rather than wait
/// for the lock, and takes it at a later beat once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_finding_its_lock_held_beats_on_and_takes_it_once_free() {
    use diesel::RunQueryDsl;
    let mut app = TestApp::spawn_with(0, |config| config.monitor.heartbeat_ms = 200).await;
    app.start_worker().await;
    let worker = tokio::task::block_in_place(|| worker_id(&app));
    let session = format!("conveyor-worker {worker}");
    wait_until(WAIT, || holds_lock(&app, &session)).await;

    let mut other = app.db.conn();
    tokio::task::block_in_place(|| {
        diesel::sql_query(format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = '{session}'"
        ))
        .execute(&mut other)
        .unwrap();
        // Granted once the terminated backend has gone.
        diesel::sql_query(format!(
            "SELECT pg_advisory_lock(hashtextextended('{worker}', 0))"
        ))
        .execute(&mut other)
        .unwrap();
    });
    // Two beats after the reconnection, with the lock held elsewhere.
    let seen = last_seen_ms(&app, &worker).await;
    wait_until(WAIT, || async {
        last_seen_ms(&app, &worker).await > seen + 400
    })
    .await;
    assert!(
        !holds_lock(&app, &session).await,
        "the worker holds a lock another session has"
    );

    drop(other);
    wait_until(WAIT, || holds_lock(&app, &session)).await;
}

/// Whether the session named `session` holds an advisory lock.
async fn holds_lock(app: &TestApp, session: &str) -> bool {
    let sql = format!(
        "SELECT count(*) AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = '{session}'"
    );
    app.count(&sql).await == 1
}

/// `worker`'s last heartbeat, in milliseconds since the epoch.
async fn last_seen_ms(app: &TestApp, worker: &str) -> i64 {
    app.count(&format!(
        "SELECT (extract(epoch FROM last_seen_at) * 1000)::bigint AS n \
         FROM workers WHERE id = '{worker}'"
    ))
    .await
}
