//! Both `/metrics` endpoints: names follow Prometheus conventions, the per-job
//! counters move after a job, and the ingress serves the service-wide queue and
//! worker gauges from the broker poller and heartbeats.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::harness::{PlanJson, TestApp, scans_of, wait_until};

const WAIT: Duration = Duration::from_secs(20);

/// `# TYPE` lines: metric family name → type.
pub fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect()
}

/// The value of the sample whose name and labels start with `prefix`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn fast_monitor(config: &mut conveyor_platform::Config) {
    config.monitor.queue_poll_ms = 100;
    config.monitor.heartbeat_ms = 100;
    config.monitor.worker_gone_after_ms = 2_000;
}

pub(crate) async fn scrape(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

fn assert_conventions(text: &str) {
    let families = families(text);
    assert!(!families.is_empty());
    for (name, kind) in &families {
        assert!(name.starts_with("conveyor_"), "{name} lacks the prefix");
        match kind.as_str() {
            "counter" => assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            ),
            "histogram" => assert!(
                name.ends_with("_seconds"),
                "histogram {name} not in seconds"
            ),
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name} ends in _total"),
            other => panic!("unexpected type {other} for {name}"),
        }
        assert!(
            !name.contains("_ms") && !name.contains("millis"),
            "{name}: use base units"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_endpoints_follow_conventions_and_counters_move() {
    let app = TestApp::spawn_with(1, fast_monitor).await;
    let ingress_metrics = app.url("/metrics");
    let labels = [("task", "diag.noop"), ("queue", "default")];
    let before = scrape(&app.metrics_url).await;
    assert_eq!(
        sample(&before, "conveyor_jobs_started_total", &labels),
        None
    );

    let id = app.enqueue("diag.noop", json!({})).await;
    app.wait_for_state(id, "succeeded", WAIT).await;
    let failing = app.enqueue("diag.fail", json!({"until_attempt": 2})).await;
    app.wait_for_state(failing, "succeeded", WAIT).await;

    let worker = scrape(&app.metrics_url).await;
    assert_conventions(&worker);
    assert_eq!(
        sample(&worker, "conveyor_jobs_started_total", &labels),
        Some(1.0)
    );
    assert_eq!(
        sample(&worker, "conveyor_jobs_succeeded_total", &labels),
        Some(1.0)
    );
    let fail = [("task", "diag.fail"), ("queue", "default")];
    assert_eq!(
        sample(&worker, "conveyor_jobs_retried_total", &fail),
        Some(1.0)
    );
    assert_eq!(
        sample(&worker, "conveyor_job_duration_seconds_count", &labels),
        Some(1.0)
    );
    assert_eq!(
        sample(&worker, "conveyor_job_queue_wait_seconds_count", &labels),
        Some(1.0)
    );
    assert_eq!(
        sample(&worker, "conveyor_jobs_in_flight", &labels),
        Some(0.0)
    );
    // Service-wide gauges belong to the ingress only.
    assert!(!worker.contains("scope=\"service\""));

    // The poller sees the worker's consumer and heartbeat.
    wait_until(WAIT, || async {
        let text = scrape(&ingress_metrics).await;
        sample(
            &text,
            "conveyor_queue_consumers",
            &[("queue", "default"), ("scope", "service")],
        ) == Some(1.0)
            && sample(&text, "conveyor_workers", &[("state", "live")]) == Some(1.0)
    })
    .await;
    let ingress = scrape(&ingress_metrics).await;
    assert_conventions(&ingress);
    assert_eq!(
        sample(&ingress, "conveyor_jobs_published_total", &labels),
        Some(1.0)
    );
    assert!(
        sample(
            &ingress,
            "conveyor_http_requests_total",
            &[("route", "/v1/jobs"), ("status", "202")]
        )
        .is_some_and(|n| n >= 2.0)
    );
    for (name, labels) in [
        (
            "conveyor_queue_messages_ready",
            vec![("queue", "default"), ("kind", "work")],
        ),
        (
            "conveyor_queue_messages_ready",
            vec![("queue", "default"), ("kind", "dead_letter")],
        ),
        (
            "conveyor_queue_messages_ready",
            vec![("queue", "delay.100"), ("kind", "delay")],
        ),
        (
            "conveyor_queue_oldest_job_age_seconds",
            vec![("queue", "default")],
        ),
        (
            "conveyor_queue_backlog_per_worker",
            vec![("queue", "default")],
        ),
        ("conveyor_build_info", vec![]),
    ] {
        assert!(
            sample(&ingress, name, &labels).is_some(),
            "{name} {labels:?} missing:\n{ingress}"
        );
    }
}

/// Waiting jobs without a consumer: the oldest age and backlog per worker grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_and_oldest_age_reflect_waiting_jobs() {
    let app = TestApp::spawn_with(0, fast_monitor).await;
    for _ in 0..3 {
        app.enqueue("diag.noop", json!({})).await;
    }
    let url = app.url("/metrics");
    wait_until(WAIT, || async {
        let text = scrape(&url).await;
        let q = [("queue", "default")];
        sample(&text, "conveyor_queue_backlog_per_worker", &q) == Some(3.0)
            && sample(&text, "conveyor_queue_oldest_job_age_seconds", &q)
                .is_some_and(|age| age > 0.0)
            && sample(&text, "conveyor_queue_consumers", &q) == Some(0.0)
    })
    .await;
}

/// The ingress's latest poll (`GET /v1/admin/queues`).
async fn snapshot(app: &TestApp) -> serde_json::Value {
    app.get_json("/v1/admin/queues").await
}

/// Waits for a poll that began after this call.
async fn next_poll(app: &TestApp) -> serde_json::Value {
    let seen = snapshot(app).await["polled_at"].clone();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut fresh = snapshot(app).await;
    while fresh["polled_at"] == seen {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fresh = snapshot(app).await;
    }
    // The poll that was running may have begun before; one more makes sure.
    let seen = fresh["polled_at"].clone();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let next = snapshot(app).await;
        if next["polled_at"] != seen {
            return next;
        }
    }
}

/// A job delayed 10 minutes, whether enqueued with a delay or waiting out a
/// retry's backoff, is not waiting: the oldest age ignores it until it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_jobs_do_not_raise_the_oldest_age() {
    let app = TestApp::spawn_with(0, fast_monitor).await;
    let delayed = app
        .post_job(json!({"task": "diag.noop", "delay_ms": 600_000}))
        .await;
    assert_eq!(delayed.status(), 202);
    // As the worker records a failed attempt: enqueued an hour ago, next try in 10 minutes.
    app.count(
        "WITH r AS (INSERT INTO jobs (id, task, queue, state, args, attempts, max_attempts,
                                      enqueued_at, next_attempt_at)
                    VALUES (gen_random_uuid(), 'diag.noop', 'default', 'retrying', '{}', 1, 5,
                            now() - interval '1 hour', now() + interval '10 minutes')
                    RETURNING 1)
         SELECT count(*) AS n FROM r",
    )
    .await;
    // Long enough for an over-count to show.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let polled = next_poll(&app).await;
    let default = &polled["queues"][0];
    assert_eq!(default["queue"], "default");
    assert_eq!(default["oldest_waiting_seconds"], 0.0, "{polled}");
    let text = scrape(&app.url("/metrics")).await;
    let q = [("queue", "default")];
    assert_eq!(
        sample(&text, "conveyor_queue_oldest_job_age_seconds", &q),
        Some(0.0)
    );

    // A runnable job does age the queue, from its own enqueue (not the hour-old retry's).
    app.enqueue("diag.noop", json!({})).await;
    let url = app.url("/metrics");
    wait_until(WAIT, || async {
        let text = scrape(&url).await;
        sample(&text, "conveyor_queue_oldest_job_age_seconds", &q).is_some_and(|age| age > 0.5)
    })
    .await;
    let age = snapshot(&app).await["queues"][0]["oldest_waiting_seconds"]
        .as_f64()
        .unwrap();
    assert!(age < 60.0, "{age}");
}

/// The last minute's rates count each event once, although every poll
/// (100 ms apart here) sees the rows again: a poll counts only the seconds
/// since the previous one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_minute_counts_each_event_once() {
    // A 1 s publish timeout: a second is counted once it is 9 s old.
    let mut app = TestApp::spawn_with(0, |config| {
        fast_monitor(config);
        config.amqp.publish_timeout_ms = 1_000;
    })
    .await;
    let mut registry = conveyor_tasks::registry();
    // The retry waits 12–24 s, so its first start has been counted (9 s after
    // it) before the second start replaces it in the row.
    assert!(registry.tune("diag.fail", |o| {
        o.backoff_base = Duration::from_secs(24);
        o.backoff_cap = Duration::from_secs(24);
    }));
    app.start_worker_with(registry).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push((app.enqueue("diag.noop", json!({})).await, "succeeded"));
    }
    let retried = app.enqueue("diag.fail", json!({"until_attempt": 2})).await;
    ids.push((retried, "succeeded"));
    let dead = app.enqueue("diag.fail", json!({"permanent": true})).await;
    ids.push((dead, "dead"));
    for (id, state) in ids {
        app.wait_for_state(id, state, Duration::from_secs(40)).await;
    }
    let rates = |polled: &serde_json::Value| {
        let default = &polled["queues"][0];
        assert_eq!(default["queue"], "default");
        let kinds = ["published", "started", "succeeded", "retried", "dead"];
        kinds.map(|kind| default[format!("{kind}_last_minute")].as_i64().unwrap())
    };
    // Published, started (the retried job twice), succeeded, retried, dead.
    let expected = [5, 6, 4, 1, 1];
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = rates(&snapshot(&app).await);
    while seen != expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = rates(&snapshot(&app).await);
    }
    assert_eq!(
        seen, expected,
        "published, started, succeeded, retried, dead"
    );
    // Thirty more polls later, nothing was counted again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let polled = next_poll(&app).await;
    assert_eq!(rates(&polled), expected, "{polled}");
}

/// An event is counted although its commit lands seconds after the time
/// stamped on it: a retry, a dead job or a published job is committed only
/// after its publish is confirmed (up to `amqp.publish_timeout_ms`), and the
/// writer's clock may run behind the database's. Rows that appear stamped
/// 2.5 s and 10 s in the past were never counted before, as their seconds had
/// been counted (2 s after them) before the rows existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_after_its_time_is_counted() {
    let app = TestApp::spawn_with(0, fast_monitor).await;
    // Polls have counted the seconds up to now.
    next_poll(&app).await;
    app.count(
        "WITH r AS (INSERT INTO jobs (id, task, queue, state, args, max_attempts, enqueued_at)
                    SELECT gen_random_uuid(), 'diag.noop', 'default', 'queued', '{}', 5,
                           now() - interval '1 ms' * ago
                    FROM unnest(ARRAY[2500, 10000]) AS ago
                    RETURNING 1)
         SELECT count(*) AS n FROM r",
    )
    .await;
    // Counted once their seconds are 13 s old (the default 5 s publish timeout + 8 s).
    let deadline = std::time::Instant::now() + WAIT;
    let published = || async {
        snapshot(&app).await["queues"][0]["published_last_minute"]
            .as_i64()
            .unwrap()
    };
    while published().await < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(published().await, 2, "{}", snapshot(&app).await);
}

/// The oldest waiting job of each queue is read from the first entry of
/// `jobs_waiting_since`, not found among every waiting job: a backlog of
/// 20 000 jobs (and older jobs that are delayed, not waiting) costs the poll
/// one index entry per queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_waiting_job_is_one_index_entry_per_queue() {
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::sql_types::{Array, Double, Text};

    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        queue: String,
        #[diesel(sql_type = Double)]
        value: f64,
    }

    let db = tokio::task::spawn_blocking(crate::harness::TestDb::create)
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let mut conn = db.conn();
        // Waiting for 10 000 s down to 8 000 s, on two queues; and, older still,
        // a delayed job and a retry not due for an hour.
        conn.batch_execute(
            "INSERT INTO jobs (id, task, queue, state, args, max_attempts, enqueued_at)
             SELECT gen_random_uuid(), 'diag.noop', CASE WHEN g % 4 = 0 THEN 'mail' ELSE 'default' END,
                    'queued', '{}', 5, now() - interval '1 s' * (8000 + g / 10.0)
             FROM generate_series(1, 20000) g;
             INSERT INTO jobs (id, task, queue, state, args, attempts, max_attempts, enqueued_at, next_attempt_at)
             VALUES (gen_random_uuid(), 'diag.noop', 'default', 'queued', '{}', 0, 5,
                     now() - interval '1 day', now() + interval '1 hour'),
                    (gen_random_uuid(), 'diag.noop', 'default', 'retrying', '{}', 1, 5,
                     now() - interval '1 day', now() + interval '1 hour');
             ANALYZE jobs;",
        )
        .unwrap();
        let queues = vec!["default".to_owned(), "mail".to_owned(), "none".to_owned()];
        let mut rows: Vec<Row> = diesel::sql_query(conveyor_ingress::monitor::OLDEST_WAITING)
            .bind::<Array<Text>, _>(&queues)
            .load(&mut conn)
            .unwrap();
        rows.sort_by(|a, b| a.queue.cmp(&b.queue));
        let queues_found: Vec<&str> = rows.iter().map(|r| r.queue.as_str()).collect();
        assert_eq!(queues_found, ["default", "mail"]);
        // 8 000 + 19 999 / 10 s and 8 000 + 20 000 / 10 s ago, plus the
        // moments since the insert; not the day-old delayed jobs.
        let (default, mail) = (rows[0].value, rows[1].value);
        assert!((9_999.9..10_060.0).contains(&default), "{default}");
        assert!(((mail - default) - 0.1).abs() < 0.01, "{default} {mail}");

        let plan: PlanJson = diesel::sql_query(format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) {}",
            conveyor_ingress::monitor::OLDEST_WAITING
        ))
        .bind::<Array<Text>, _>(&queues)
        .get_result(&mut conn)
        .unwrap();
        let plan: serde_json::Value = serde_json::from_str(&plan.json).unwrap();
        let scans = scans_of(&plan, "jobs");
        assert!(!scans.is_empty(), "{plan}");
        for (kind, index, rows) in &scans {
            assert_eq!(
                (kind.as_str(), index.as_str()),
                ("Index Scan", "jobs_waiting_since"),
                "{plan}"
            );
            assert!(*rows <= 3.0, "read {rows} rows of jobs: {plan}");
        }
    })
    .await
    .unwrap();
}
