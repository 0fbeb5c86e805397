//! The ingress's queue monitor when a poll fails, and what it reads: a half of
//! the poll that fails (the broker or the database) leaves its gauges out of
//! `/metrics` until it answers again, rather than repeating its last numbers or
//! reading an error as 0, and the snapshot says so; the alert rules fire on
//! that (`promtool test rules`); the count of unhandled dead jobs reads its own
//! index; and heartbeats carry the database's time, not the worker's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::harness::{AMQP_URL, PlanJson, TestApp, TestDb, assert_reads_only, wait_until};
use crate::metrics::{fast_monitor, sample, scrape};

const WAIT: Duration = Duration::from_secs(20);

/// The broker-fed gauges of queue `default`: (name, labels).
const BROKER_GAUGES: [(&str, &[(&str, &str)]); 3] = [
    (
        "conveyor_queue_messages_ready",
        &[("queue", "default"), ("kind", "work")],
    ),
    (
        "conveyor_queue_messages_ready",
        &[("queue", "default"), ("kind", "dead_letter")],
    ),
    ("conveyor_queue_consumers", &[("queue", "default")]),
];

/// The database-fed gauges: (name, labels).
const DATABASE_GAUGES: [(&str, &[(&str, &str)]); 4] = [
    (
        "conveyor_queue_oldest_job_age_seconds",
        &[("queue", "default")],
    ),
    ("conveyor_dead_jobs", &[("queue", "default")]),
    ("conveyor_workers", &[("state", "live")]),
    ("conveyor_workers", &[("state", "gone")]),
];

/// Fed by both.
const BACKLOG: (&str, &[(&str, &str)]) =
    ("conveyor_queue_backlog_per_worker", &[("queue", "default")]);

/// Which of `gauges` the ingress exports now.
fn present(text: &str, gauges: &[(&str, &[(&str, &str)])]) -> Vec<String> {
    gauges
        .iter()
        .filter(|(name, labels)| sample(text, name, labels).is_some())
        .map(|(name, labels)| format!("{name}{labels:?}"))
        .collect()
}

/// The time at `key` of a snapshot.
fn read_at(snapshot: &Value, key: &str) -> DateTime<Utc> {
    let at = snapshot[key].as_str();
    at.and_then(|at| at.parse().ok())
        .unwrap_or_else(|| panic!("no {key}: {snapshot}"))
}

/// A TCP relay to the shared broker that a test can cut (every relayed
/// connection closed, new ones closed at once) and restore.
struct Relay {
    port: u16,
    /// The token of the relayed connections while open; `None` while cut.
    open: Arc<Mutex<Option<CancellationToken>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let accepting = tokio::spawn({
            let open = open.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    // While cut, `inbound` is dropped here: closed at once.
                    let Some(token) = open.lock().unwrap().clone() else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect("127.0.0.1:5672").await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = token.cancelled() => {}
                        }
                    });
                }
            }
        });
        Self {
            port,
            open,
            accepting,
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn cut(&self) {
        if let Some(token) = self.open.lock().unwrap().take() {
            token.cancel();
        }
    }

    fn restore(&self) {
        *self.open.lock().unwrap() = Some(CancellationToken::new());
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

/// The broker goes away: the queue gauges leave `/metrics` (they froze at
/// their last values before), the database's stay, the snapshot names the
/// error and keeps when the broker last answered; all come back with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_takes_the_queue_gauges_out_until_it_is_back() {
    let relay = Relay::start().await;
    let url = relay.url();
    let app = TestApp::spawn_with(0, |config| {
        fast_monitor(config);
        config.amqp.url = url.into();
    })
    .await;
    for _ in 0..2 {
        app.enqueue("diag.noop", json!({})).await;
    }
    let metrics = app.url("/metrics");
    let work = [("queue", "default"), ("kind", "work")];
    wait_until(WAIT, || async {
        let text = scrape(&metrics).await;
        sample(&text, "conveyor_queue_messages_ready", &work) == Some(2.0)
            && sample(&text, BACKLOG.0, BACKLOG.1) == Some(2.0)
            && present(&text, &DATABASE_GAUGES).len() == DATABASE_GAUGES.len()
    })
    .await;
    let before: Value = app.get_json("/v1/admin/queues").await;
    assert!(before["broker_error"].is_null(), "{before}");
    assert!(before["broker_read_at"].is_string(), "{before}");

    relay.cut();
    wait_until(WAIT, || async {
        let text = scrape(&metrics).await;
        present(&text, &BROKER_GAUGES).is_empty()
            && present(&text, &[BACKLOG]).is_empty()
            && !text.contains("kind=\"delay\"")
    })
    .await;
    let text = scrape(&metrics).await;
    assert_eq!(
        present(&text, &DATABASE_GAUGES).len(),
        DATABASE_GAUGES.len(),
        "the database still answers:\n{text}"
    );
    let cut: Value = app.get_json("/v1/admin/queues").await;
    assert!(cut["broker_error"].is_string(), "{cut}");
    assert!(cut["database_error"].is_null(), "{cut}");
    assert!(
        read_at(&cut, "broker_read_at") < read_at(&cut, "polled_at"),
        "{cut}"
    );
    assert_eq!(
        read_at(&cut, "database_read_at"),
        read_at(&cut, "polled_at"),
        "{cut}"
    );
    // The dashboard still shows the last numbers read, beside the error.
    assert_eq!(cut["queues"][0]["ready"], 2, "{cut}");

    relay.restore();
    wait_until(Duration::from_secs(30), || async {
        let text = scrape(&metrics).await;
        sample(&text, "conveyor_queue_messages_ready", &work) == Some(2.0)
            && sample(&text, BACKLOG.0, BACKLOG.1) == Some(2.0)
            && present(&text, &BROKER_GAUGES).len() == BROKER_GAUGES.len()
    })
    .await;
    let back: Value = app.get_json("/v1/admin/queues").await;
    assert!(back["broker_error"].is_null(), "{back}");
}

/// A queue the broker says is missing (404) holds nothing and has no
/// consumers, so it reads 0. Any other refusal leaves the count unknown: here
/// the work queue is another connection's exclusive queue (405
/// RESOURCE_LOCKED), and the queue gauges leave `/metrics` instead of reading
/// 0 ready and 0 consumers, as they did before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_missing_queue_reads_as_empty() {
    let app = TestApp::spawn_with(0, fast_monitor).await;
    for _ in 0..2 {
        app.enqueue("diag.noop", json!({})).await;
    }
    let metrics = app.url("/metrics");
    let work = [("queue", "default"), ("kind", "work")];
    let consumers = [("queue", "default")];
    wait_until(WAIT, || async {
        sample(
            &scrape(&metrics).await,
            "conveyor_queue_messages_ready",
            &work,
        ) == Some(2.0)
    })
    .await;

    let conn = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = app.topology().work_queue("default");
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    wait_until(WAIT, || async {
        let text = scrape(&metrics).await;
        sample(&text, "conveyor_queue_messages_ready", &work) == Some(0.0)
            && sample(&text, "conveyor_queue_consumers", &consumers) == Some(0.0)
    })
    .await;
    let missing: Value = app.get_json("/v1/admin/queues").await;
    assert!(missing["broker_error"].is_null(), "{missing}");

    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    wait_until(WAIT, || async {
        present(&scrape(&metrics).await, &BROKER_GAUGES).is_empty()
    })
    .await;
    let locked: Value = app.get_json("/v1/admin/queues").await;
    let error = locked["broker_error"].as_str().unwrap_or_default();
    assert!(error.contains(&queue), "{locked}");

    // Closing the connection deletes its exclusive queue: missing again, 0 again.
    conn.close(200, "done".into()).await.unwrap();
    wait_until(WAIT, || async {
        let text = scrape(&metrics).await;
        sample(&text, "conveyor_queue_messages_ready", &work) == Some(0.0)
            && sample(&text, "conveyor_queue_consumers", &consumers) == Some(0.0)
    })
    .await;
}

/// The database poll fails (a table it reads is gone): its gauges and the
/// backlog leave `/metrics`, the broker's stay, and the snapshot names the
/// error (before, every gauge stayed and the snapshot looked fresh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_database_poll_takes_its_gauges_out_and_says_so() {
    let app = TestApp::spawn_with(1, fast_monitor).await;
    let metrics = app.url("/metrics");
    wait_until(WAIT, || async {
        let text = scrape(&metrics).await;
        sample(&text, "conveyor_workers", &[("state", "live")]) == Some(1.0)
            && sample(&text, "conveyor_queue_consumers", &[("queue", "default")]) == Some(1.0)
            && present(&text, &DATABASE_GAUGES).len() == DATABASE_GAUGES.len()
    })
    .await;
    let sql = |sql: &'static str| {
        let url = app.db.url.clone();
        tokio::task::spawn_blocking(move || {
            PgConnection::establish(&url)
                .unwrap()
                .batch_execute(sql)
                .unwrap()
        })
    };

    sql("ALTER TABLE dead_jobs RENAME TO dead_jobs_away")
        .await
        .unwrap();
    wait_until(WAIT, || async {
        let text = scrape(&metrics).await;
        present(&text, &DATABASE_GAUGES).is_empty() && present(&text, &[BACKLOG]).is_empty()
    })
    .await;
    let text = scrape(&metrics).await;
    assert_eq!(
        present(&text, &BROKER_GAUGES).len(),
        BROKER_GAUGES.len(),
        "the broker still answers:\n{text}"
    );
    let failed: Value = app.get_json("/v1/admin/queues").await;
    let error = failed["database_error"].as_str().unwrap_or_default();
    assert!(error.contains("dead_jobs"), "{failed}");
    assert!(failed["broker_error"].is_null(), "{failed}");
    assert!(
        read_at(&failed, "database_read_at") < read_at(&failed, "polled_at"),
        "{failed}"
    );
    // The dashboard says which numbers are old, and from when.
    let html = crate::dashboard::page(&app, "/dashboard/queues").await;
    assert!(
        html.contains("Database unreachable on the last poll")
            && html.contains("dead_jobs")
            && html.contains("as read at"),
        "{html}"
    );

    sql("ALTER TABLE dead_jobs_away RENAME TO dead_jobs")
        .await
        .unwrap();
    wait_until(WAIT, || async {
        let text = scrape(&metrics).await;
        present(&text, &DATABASE_GAUGES).len() == DATABASE_GAUGES.len()
            && present(&text, &[BACKLOG]).len() == 1
    })
    .await;
    let back: Value = app.get_json("/v1/admin/queues").await;
    assert!(back["database_error"].is_null(), "{back}");
}

/// The rules' own unit tests (`deploy/prometheus/rules.test.yml`): with the
/// gauges of a failing poll left out, `ConveyorNoConsumers` and
/// `ConveyorWorkerGone` stop and the `absent()` rules fire.
#[test]
fn promtool_passes_the_alert_rule_tests() {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus/rules.test.yml");
    let Ok(output) = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&tests)
        .output()
    else {
        eprintln!(
            "\n\n!!!!! SKIPPED: promtool is not installed, so deploy/prometheus/rules.test.yml was NOT run.\n\
             !!!!! Install it with `bash deploy/local/test-prereqs.sh` (Debian package `prometheus`).\n\n"
        );
        return;
    };
    assert!(
        output.status.success(),
        "promtool's rule tests failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// KEDA must not read the absent gauge as 0 (and scale in).
#[test]
fn keda_holds_when_the_gauge_is_absent() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/autoscaling/keda-scaledobject.yaml");
    let yaml: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for trigger in yaml["spec"]["triggers"].as_array().unwrap() {
        assert_eq!(
            trigger["metadata"]["ignoreNullValues"], "false",
            "{trigger}"
        );
    }
}

/// Every ingress exports the same service-wide numbers, so the dashboard
/// takes their `max`: a `sum` counted each queue once per ingress.
#[test]
fn the_dashboard_does_not_add_up_service_wide_gauges() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/conveyor.json");
    let text = std::fs::read_to_string(path).unwrap();
    let service_wide = ["conveyor_queue_", "conveyor_workers", "conveyor_dead_jobs"];
    let exprs: Vec<&str> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("\"expr\": "))
        .filter(|expr| service_wide.iter().any(|name| expr.contains(name)))
        .collect();
    assert!(exprs.len() >= 5, "{exprs:?}");
    for expr in exprs {
        assert!(expr.contains("max"), "{expr}");
        assert!(!expr.contains("sum ") && !expr.contains("sum("), "{expr}");
    }
}

/// The count of unhandled dead jobs reads the partial index
/// `dead_jobs_unhandled`, and only its entries, however many handled records
/// the never-pruned table keeps (it read the whole table before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhandled_dead_jobs_are_counted_from_their_own_index() {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::Text)]
        queue: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }

    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut conn = db.conn();
        // 20 000 replayed or discarded records on two queues, then 7 + 3 unhandled.
        conn.batch_execute(
            "INSERT INTO dead_jobs (id, task, queue, reason, source, dead_at, errors,
                                    replayed_at, discarded_at)
             SELECT gen_random_uuid(), 'diag.fail', CASE WHEN g % 4 = 0 THEN 'mail' ELSE 'default' END,
                    'gave up', 'worker', now() - interval '1 s' * g,
                    jsonb_build_array(jsonb_build_object('attempt', 1, 'error', repeat('x', 200))),
                    CASE WHEN g % 2 = 0 THEN now() END, CASE WHEN g % 2 = 1 THEN now() END
             FROM generate_series(1, 20000) g;
             INSERT INTO dead_jobs (id, task, queue, reason, source)
             SELECT gen_random_uuid(), 'diag.fail', CASE WHEN g <= 7 THEN 'default' ELSE 'mail' END,
                    'gave up', 'worker'
             FROM generate_series(1, 10) g;",
        )
        .unwrap();
        // On its own: a multi-statement batch runs in one transaction.
        conn.batch_execute("VACUUM ANALYZE dead_jobs").unwrap();
        let mut counts: Vec<(String, i64)> =
            diesel::sql_query(conveyor_ingress::monitor::UNHANDLED_DEAD_JOBS)
                .load::<Count>(&mut conn)
                .unwrap()
                .into_iter()
                .map(|c| (c.queue, c.n))
                .collect();
        counts.sort();
        assert_eq!(counts, [("default".to_owned(), 7), ("mail".to_owned(), 3)]);

        // Sequential scans priced out: the plan must still find an index that
        // holds only the unhandled records (no other index does).
        conn.batch_execute("SET enable_seqscan = off").unwrap();
        let plan: PlanJson = diesel::sql_query(format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) {}",
            conveyor_ingress::monitor::UNHANDLED_DEAD_JOBS
        ))
        .get_result(&mut conn)
        .unwrap();
        assert_reads_only(&plan, "dead_jobs", "dead_jobs_unhandled", 10.0);
    })
    .await
    .unwrap();
}

/// A heartbeat's `last_seen_at` (and a stop's `stopped_at`) is the database's
/// `now()`, never the worker's clock. Inside a transaction the database's
/// `now()` stays at the transaction's start while the writer's clock moves on,
/// so a beat written 1.1 s in comes from a writer whose clock is 1.1 s off the
/// database's; it must still be recorded at the database's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_is_recorded_at_the_database_time() {
    use conveyor_schema::db::workers;
    use conveyor_worker::heartbeat::{Identity, record};

    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = diesel::sql_types::Timestamptz)]
        now: DateTime<Utc>,
    }

    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut conn = db.conn();
        let me = Identity {
            id: "host:1:abc".into(),
            host: "host".into(),
            queues: vec!["default".into()],
            started_at: Utc::now(),
        };
        conn.transaction::<_, diesel::result::Error, _>(|conn| {
            let db_now = diesel::sql_query("SELECT now() AS now")
                .get_result::<Now>(conn)?
                .now;
            std::thread::sleep(Duration::from_millis(1_100));
            let seen = |conn: &mut PgConnection| {
                workers::table
                    .select((
                        workers::last_seen_at,
                        workers::stopped_at,
                        workers::in_flight,
                    ))
                    .first::<(DateTime<Utc>, Option<DateTime<Utc>>, i32)>(conn)
            };
            record(conn, &me, 3, false)?;
            assert_eq!(seen(conn)?, (db_now, None, 3));
            record(conn, &me, 0, true)?;
            assert_eq!(seen(conn)?, (db_now, Some(db_now), 0));
            Ok(())
        })
        .unwrap();
    })
    .await
    .unwrap();
}
