//! Rollups: idempotent, equal to an independent recomputation, late rows
//! counted, groups whose rows left a window deleted, a gap between runs
//! caught up; mail and webhook parts skipped when their tables are absent; the
//! stats API's CSV matches its JSON; retention deletes only rolled-up rows.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::gate::{Gate, advisory_waits};
use crate::harness::{PlanJson, TestApp, TestDb, assert_reads_only, problem, wait_until};

async fn app() -> TestApp {
    TestApp::spawn_with(1, |_| {}).await
}

pub(crate) async fn execute(app: &TestApp, sql: &str) {
    let url = app.db.url.clone();
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || {
        PgConnection::establish(&url)
            .unwrap()
            .batch_execute(&sql)
            .unwrap()
    })
    .await
    .unwrap();
}

async fn load<T: QueryableByName<diesel::pg::Pg> + Send + 'static>(
    app: &TestApp,
    sql: &str,
) -> Vec<T> {
    let url = app.db.url.clone();
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || {
        diesel::sql_query(sql)
            .load(&mut PgConnection::establish(&url).unwrap())
            .unwrap()
    })
    .await
    .unwrap()
}

/// Runs `task` through the real path (HTTP, broker, worker) and waits for it.
pub(crate) async fn run(app: &TestApp, task: &str, args: Value) {
    let id = app.enqueue(task, args).await;
    app.wait_for_state(id, "succeeded", Duration::from_secs(30))
        .await;
}

/// Inserts `n` jobs finishing spread over `span_secs` from `base` (an SQL
/// expression): a mix of tasks, states, attempts and durations, some unfinished.
pub(crate) async fn insert_jobs(app: &TestApp, n: u32, base: &str, span_secs: u32, salt: u32) {
    execute(
        app,
        &format!(
            "INSERT INTO jobs (id, task, queue, state, args, attempts, max_attempts, enqueued_at, started_at, finished_at) \
             SELECT gen_random_uuid(), (ARRAY['diag.noop','diag.fail','diag.sleep'])[1 + (i + {salt}) % 3], 'default', \
                    CASE WHEN i % 7 = 0 THEN 'dead' WHEN i % 11 = 0 THEN 'running' ELSE 'succeeded' END, \
                    '{{}}', 1 + (i * {salt}) % 3, 5, f - interval '1 minute', \
                    f - ((i * 37 + {salt}) % 5000) * interval '1.001 millisecond', \
                    CASE WHEN i % 11 = 0 THEN NULL ELSE f END \
             FROM (SELECT i, {base} + ((i * 7919 + {salt}) % {span_secs}) * interval '1 second' AS f \
                   FROM generate_series(1, {n}) i) s"
        ),
    )
    .await;
}

#[derive(Debug, Clone, PartialEq, QueryableByName)]
struct JobStat {
    #[diesel(sql_type = Timestamptz)]
    bucket: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    task: String,
    #[diesel(sql_type = BigInt)]
    succeeded: i64,
    #[diesel(sql_type = BigInt)]
    retried: i64,
    #[diesel(sql_type = BigInt)]
    dead: i64,
    #[diesel(sql_type = Nullable<Double>)]
    p50_ms: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    p95_ms: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    max_ms: Option<f64>,
    #[diesel(sql_type = Timestamptz)]
    computed_at: DateTime<Utc>,
}

#[derive(Debug, QueryableByName)]
struct RawJob {
    #[diesel(sql_type = Text)]
    task: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    started_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    finished_at: Option<DateTime<Utc>>,
}

/// (bucket, task) -> (succeeded, retried, dead, p50, p95, max).
type Expected =
    BTreeMap<(DateTime<Utc>, String), (i64, i64, i64, Option<f64>, Option<f64>, Option<f64>)>;

/// Linear-interpolation percentile, as SQL's `percentile_cont` defines it.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let pos = p * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64))
}

/// Job statistics computed in Rust from the raw rows: (bucket, task) -> row.
async fn expected_job_stats(app: &TestApp, width: chrono::Duration) -> Expected {
    let raw: Vec<RawJob> = load(
        app,
        "SELECT task, state, attempts, started_at, finished_at FROM jobs WHERE task NOT LIKE 'stats.%'",
    )
    .await;
    let mut groups: BTreeMap<(DateTime<Utc>, String), Vec<&RawJob>> = BTreeMap::new();
    for job in &raw {
        let Some(finished) = job.finished_at else {
            continue;
        };
        if job.state != "succeeded" && job.state != "dead" {
            continue;
        }
        let bucket = finished.duration_trunc(width).unwrap();
        groups
            .entry((bucket, job.task.clone()))
            .or_default()
            .push(job);
    }
    groups
        .into_iter()
        .map(|(key, jobs)| {
            let mut ms: Vec<f64> = jobs
                .iter()
                .filter_map(|j| {
                    let us = (j.finished_at? - j.started_at?).num_microseconds()?;
                    Some(us as f64 / 1000.0)
                })
                .collect();
            ms.sort_by(f64::total_cmp);
            let count = |f: &dyn Fn(&RawJob) -> bool| jobs.iter().filter(|j| f(j)).count() as i64;
            let value = (
                count(&|j| j.state == "succeeded"),
                count(&|j| j.attempts > 1),
                count(&|j| j.state == "dead"),
                percentile(&ms, 0.5),
                percentile(&ms, 0.95),
                ms.last().copied(),
            );
            (key, value)
        })
        .collect()
}

async fn table(app: &TestApp, name: &str) -> Vec<JobStat> {
    load(
        app,
        &format!("SELECT * FROM {name} WHERE task NOT LIKE 'stats.%' ORDER BY bucket, task"),
    )
    .await
}

/// Asserts the rollup `rows` equal the independent computation over the
/// buckets in `[from, to)`.
fn assert_matches(rows: &[JobStat], expected: &Expected, from: DateTime<Utc>, to: DateTime<Utc>) {
    let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-6,
        (a, b) => a == b,
    };
    let wanted: Vec<_> = expected
        .iter()
        .filter(|((bucket, _), _)| *bucket >= from && *bucket < to)
        .collect();
    let got: Vec<_> = rows
        .iter()
        .filter(|r| r.bucket >= from && r.bucket < to)
        .collect();
    assert!(!wanted.is_empty());
    assert_eq!(got.len(), wanted.len(), "{got:#?}\n{wanted:#?}");
    for (row, ((bucket, task), e)) in got.iter().zip(&wanted) {
        assert_eq!((&row.bucket, &row.task), (bucket, task));
        assert_eq!(
            (row.succeeded, row.retried, row.dead),
            (e.0, e.1, e.2),
            "{row:?}"
        );
        assert!(
            close(row.p50_ms, e.3) && close(row.p95_ms, e.4) && close(row.max_ms, e.5),
            "{row:?} vs {e:?}"
        );
    }
}

#[derive(QueryableByName)]
struct Windows {
    #[diesel(sql_type = Timestamptz)]
    hour: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    day: DateTime<Utc>,
}

async fn current_windows(app: &TestApp) -> (DateTime<Utc>, DateTime<Utc>) {
    let w: Vec<Windows> = load(
        app,
        "SELECT date_trunc('hour', now(), 'UTC') AS hour, date_trunc('day', now(), 'UTC') AS day",
    )
    .await;
    (w[0].hour, w[0].day)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_are_idempotent_match_a_recomputation_and_count_late_rows() {
    let app = app().await;
    let (hour, day) = current_windows(&app).await;
    let hours = chrono::Duration::hours(1);
    let days = chrono::Duration::days(1);
    insert_jobs(
        &app,
        400,
        "date_trunc('hour', now(), 'UTC') - interval '2 hours'",
        7200,
        3,
    )
    .await;
    insert_jobs(
        &app,
        300,
        "date_trunc('day', now(), 'UTC') - interval '1 day'",
        86_400,
        5,
    )
    .await;
    run(&app, "stats.rollup_hourly", json!({"lookback": 3})).await;
    run(&app, "stats.rollup_daily", json!({"lookback": 2})).await;
    let hourly = table(&app, "job_stats_hourly").await;
    let daily = table(&app, "job_stats_daily").await;

    // Twice gives identical tables (untouched rows keep their computed_at too).
    run(&app, "stats.rollup_hourly", json!({"lookback": 3})).await;
    run(&app, "stats.rollup_daily", json!({"lookback": 2})).await;
    assert_eq!(table(&app, "job_stats_hourly").await, hourly);
    assert_eq!(table(&app, "job_stats_daily").await, daily);

    // ...equal to a recomputation from the raw rows written here.
    assert_matches(
        &hourly,
        &expected_job_stats(&app, hours).await,
        hour - hours * 2,
        hour,
    );
    assert_matches(
        &daily,
        &expected_job_stats(&app, days).await,
        day - days,
        day,
    );

    // Rows arriving late in an old (but still recomputed) window are counted.
    insert_jobs(
        &app,
        50,
        "date_trunc('hour', now(), 'UTC') - interval '2 hours'",
        3600,
        11,
    )
    .await;
    run(&app, "stats.rollup_hourly", json!({"lookback": 3})).await;
    run(&app, "stats.rollup_daily", json!({"lookback": 2})).await;
    let late_hourly = table(&app, "job_stats_hourly").await;
    assert_ne!(late_hourly, hourly);
    assert_matches(
        &late_hourly,
        &expected_job_stats(&app, hours).await,
        hour - hours * 2,
        hour,
    );
    assert_matches(
        &table(&app, "job_stats_daily").await,
        &expected_job_stats(&app, days).await,
        day - days,
        day,
    );
}

#[derive(Debug, PartialEq, Deserialize)]
struct MailRow {
    bucket: DateTime<Utc>,
    campaign_id: Uuid,
    sent: i64,
    failed: i64,
    unknown: i64,
}

#[derive(Debug, PartialEq, Deserialize)]
struct WebhookRow {
    bucket: DateTime<Utc>,
    source: String,
    outcome: String,
    reason: String,
    events: i64,
}

#[derive(Debug, Deserialize)]
struct JobRow {
    bucket: DateTime<Utc>,
    task: String,
    succeeded: i64,
    retried: i64,
    dead: i64,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    max_ms: Option<f64>,
}

/// Equal, floats to within rounding: serde_json's default float parser is not
/// correctly rounded, the csv crate's (std's) is.
impl PartialEq for JobRow {
    fn eq(&self, other: &Self) -> bool {
        let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() <= a.abs() * 1e-12,
            (a, b) => a == b,
        };
        (
            &self.bucket,
            &self.task,
            self.succeeded,
            self.retried,
            self.dead,
        ) == (
            &other.bucket,
            &other.task,
            other.succeeded,
            other.retried,
            other.dead,
        ) && close(self.p50_ms, other.p50_ms)
            && close(self.p95_ms, other.p95_ms)
            && close(self.max_ms, other.max_ms)
    }
}

/// `GET /v1/stats/{family}` as JSON rows and as parsed CSV records.
async fn json_and_csv<T: for<'de> Deserialize<'de>>(app: &TestApp, path: &str) -> (Vec<T>, Vec<T>) {
    let json: Value = app.get_json(path).await;
    let rows = serde_json::from_value(json["rows"].clone()).unwrap();
    let response = app
        .client
        .get(app.url(path))
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = response.text().await.unwrap();
    let csv = csv::Reader::from_reader(text.as_bytes())
        .deserialize()
        .collect::<Result<Vec<T>, _>>()
        .unwrap();
    (rows, csv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_and_webhook_rollups_skip_absent_tables_and_csv_matches_json() {
    let app = app().await;
    // Whatever the mail and webhook features create, start without their tables.
    execute(
        &app,
        "DROP TABLE IF EXISTS campaign_recipients, webhook_events CASCADE",
    )
    .await;
    insert_jobs(
        &app,
        60,
        "date_trunc('hour', now(), 'UTC') - interval '1 hour'",
        3600,
        7,
    )
    .await;
    run(&app, "stats.rollup_hourly", json!({})).await;
    assert!(
        app.count("SELECT count(*) AS n FROM job_stats_hourly")
            .await
            > 0
    );
    assert_eq!(
        app.count("SELECT count(*) AS n FROM mail_stats_hourly")
            .await,
        0
    );

    // The shapes this rollup expects of the other features' tables, written as
    // their owners write them: the mail ledger sets `sent_at` only on a 250 and
    // `updated_at` on every change of state, so failed and unknown recipients
    // have no `sent_at`; pending and sending ones are not counted.
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    execute(
        &app,
        &format!(
            "CREATE TABLE campaign_recipients (campaign_id uuid NOT NULL, email text NOT NULL, \
                 state text NOT NULL, sent_at timestamptz, updated_at timestamptz NOT NULL); \
             INSERT INTO campaign_recipients \
             SELECT campaign_id, email, state, CASE WHEN state = 'sent' THEN at END, at \
             FROM (SELECT CASE WHEN i % 3 = 0 THEN '{a}'::uuid ELSE '{b}'::uuid END AS campaign_id, \
                          'r' || i || '@example.com' AS email, \
                          (ARRAY['sent','sent','failed','unknown','pending','sending'])[1 + i % 6] AS state, \
                          date_trunc('hour', now(), 'UTC') - interval '1 hour' + i * interval '10 seconds' AS at \
                   FROM generate_series(1, 300) i) r; \
             CREATE TABLE webhook_events (source text NOT NULL, outcome text NOT NULL, reason text, \
                 recorded_at timestamptz NOT NULL); \
             INSERT INTO webhook_events \
             SELECT (ARRAY['stripe','github'])[1 + i % 2], \
                    (ARRAY['accepted','rejected','applied','stale'])[1 + i % 4], \
                    CASE WHEN i % 4 = 1 THEN (ARRAY['signature','too_old'])[1 + i % 3 % 2] END, \
                    date_trunc('hour', now(), 'UTC') - interval '1 hour' + i * interval '9 seconds' \
             FROM generate_series(1, 200) i;"
        ),
    )
    .await;
    run(&app, "stats.rollup_hourly", json!({})).await;
    run(&app, "stats.rollup_daily", json!({})).await;

    // Independent counts from the raw tables, in Rust.
    #[derive(QueryableByName)]
    struct Recipient {
        #[diesel(sql_type = SqlUuid)]
        campaign_id: Uuid,
        #[diesel(sql_type = Text)]
        state: String,
    }
    let recipients: Vec<Recipient> =
        load(&app, "SELECT campaign_id, state FROM campaign_recipients").await;
    let (hour, _) = current_windows(&app).await;
    let from =
        (hour - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = hour.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (json_rows, csv_rows) = json_and_csv::<MailRow>(
        &app,
        &format!("/v1/stats/mail?from={from}&to={to}&granularity=hour"),
    )
    .await;
    assert_eq!(json_rows, csv_rows);
    assert_eq!(json_rows.len(), 2);
    let total = |count: fn(&MailRow) -> i64| json_rows.iter().map(count).sum::<i64>();
    assert_eq!(
        (total(|r| r.sent), total(|r| r.failed), total(|r| r.unknown)),
        (100, 50, 50),
        "every final recipient counted once, in its hour"
    );
    for row in &json_rows {
        let of = |state: &str| {
            recipients
                .iter()
                .filter(|r| r.campaign_id == row.campaign_id && r.state == state)
                .count() as i64
        };
        assert_eq!(
            (row.sent, row.failed, row.unknown),
            (of("sent"), of("failed"), of("unknown"))
        );
    }

    let (json_rows, csv_rows) =
        json_and_csv::<WebhookRow>(&app, &format!("/v1/stats/webhooks?from={from}&to={to}")).await;
    assert_eq!(json_rows, csv_rows);
    assert_eq!(json_rows.iter().map(|r| r.events).sum::<i64>(), 200);
    assert!(
        json_rows
            .iter()
            .any(|r| r.outcome == "rejected" && r.reason == "signature")
    );
    let (stripe, _) = json_and_csv::<WebhookRow>(
        &app,
        &format!("/v1/stats/webhooks?from={from}&to={to}&source=stripe&outcome=applied"),
    )
    .await;
    assert!(
        !stripe.is_empty()
            && stripe
                .iter()
                .all(|r| r.source == "stripe" && r.outcome == "applied")
    );

    let (json_rows, csv_rows) = json_and_csv::<JobRow>(
        &app,
        &format!("/v1/stats/jobs?from={from}&to={to}&task=diag.noop"),
    )
    .await;
    assert_eq!(json_rows, csv_rows);
    assert!(!json_rows.is_empty() && json_rows.iter().all(|r| r.task == "diag.noop"));
    let (daily, _) = json_and_csv::<JobRow>(&app, "/v1/stats/jobs?granularity=day").await;
    assert!(!daily.is_empty());

    for (path, status) in [
        ("/v1/stats/jobs?granularity=week", 400),
        (
            "/v1/stats/jobs?campaign=00000000-0000-0000-0000-000000000000",
            400,
        ),
        (&format!("/v1/stats/jobs?from={to}&to={from}"), 400),
        ("/v1/stats/jobs?colour=red", 400),
        ("/v1/stats/queues", 404),
    ] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
}

/// A `from` or `to` PostgreSQL cannot store (before 4714-11-24 BC) is a 400
/// naming it and the accepted range, not a database error (503); the earliest
/// storable times are answered, and a default `from` stops there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_out_of_range_is_a_400_naming_it() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    for (query, named) in [
        (
            "from=-100000-01-01T00:00:00Z&to=-100000-01-02T00:00:00Z",
            "`from`",
        ),
        ("to=-100000-01-02T00:00:00Z", "`to`"),
        (
            "from=-4713-11-23T23:59:59Z&to=-4713-11-24T01:00:00Z",
            "`from`",
        ),
        (
            "from=-4713-11-24T00:00:00Z&to=-4713-11-23T23:59:59Z",
            "`to`",
        ),
    ] {
        let response = app
            .client
            .get(app.url(&format!("/v1/stats/jobs?{query}")))
            .send()
            .await
            .unwrap();
        let problem = problem(response, 400).await;
        assert!(
            problem["type"]
                .as_str()
                .unwrap()
                .ends_with("/invalid-query"),
            "{query}: {problem}"
        );
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(named) && detail.contains("from 4714-11-24 00:00:00 UTC BC to"),
            "{query}: {problem}"
        );
    }
    for query in [
        "from=-4713-11-24T00:00:00Z&to=-4713-11-25T00:00:00Z",
        "to=-4713-11-24T12:00:00Z",
        "granularity=day&to=-4713-11-25T00:00:00Z",
    ] {
        let response = app
            .client
            .get(app.url(&format!("/v1/stats/jobs?{query}")))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(body["rows"], json!([]), "{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_seals_old_days_then_deletes_their_finished_jobs_in_batches() {
    let app = TestApp::spawn_with(1, |config| {
        config.stats.default_schedules = true;
        config.webhooks.headshot_sweep = true;
    })
    .await;
    // The built-in schedules are listed when enabled (the default outside
    // tests).
    let list: Vec<Value> = app.get_json("/v1/schedules").await;
    let names: Vec<_> = list.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "stats.rollup_hourly",
            "stats.rollup_daily",
            "stats.retention",
            "webhook.headshot_sweep"
        ]
    );

    insert_jobs(
        &app,
        120,
        "date_trunc('day', now(), 'UTC') - interval '40 days'",
        86_400,
        13,
    )
    .await;
    insert_jobs(
        &app,
        30,
        "date_trunc('day', now(), 'UTC') - interval '2 days'",
        86_400,
        17,
    )
    .await;
    // Webhook rejection counts: two minutes of the old day, one recent.
    execute(
        &app,
        "INSERT INTO webhook_rejections (minute, source, reason, requests) VALUES \
         (date_trunc('day', now(), 'UTC') - interval '40 days' + interval '3 hours', 'members', 'bad_signature', 7), \
         (date_trunc('day', now(), 'UTC') - interval '40 days' + interval '181 minutes', 'members', 'bad_signature', 5), \
         (date_trunc('day', now(), 'UTC') - interval '40 days' + interval '5 hours', '(unknown)', 'unknown_source', 2), \
         (date_trunc('day', now(), 'UTC') - interval '2 days', 'members', 'too_large', 1)",
    )
    .await;
    // Webhook events (the per-delivery log): two on the old day, one on an old
    // day with nothing else (sealed for its events alone), one recent.
    execute(
        &app,
        "INSERT INTO webhook_events (source, webhook_id, outcome, recorded_at) VALUES \
         ('members', 'msg_old_1', 'accepted', date_trunc('day', now(), 'UTC') - interval '40 days' + interval '2 hours'), \
         ('members', 'msg_old_1', 'applied', date_trunc('day', now(), 'UTC') - interval '40 days' + interval '121 minutes'), \
         ('members', 'msg_old_2', 'failed', date_trunc('day', now(), 'UTC') - interval '35 days'), \
         ('members', 'msg_recent', 'accepted', date_trunc('day', now(), 'UTC') - interval '2 days')",
    )
    .await;
    let old = "finished_at < date_trunc('day', now(), 'UTC') - interval '30 days'";
    let old_day_stats = expected_job_stats(&app, chrono::Duration::days(1)).await;
    let old_finished = app
        .count(&format!("SELECT count(*) AS n FROM jobs WHERE {old}"))
        .await;
    let unfinished = app
        .count("SELECT count(*) AS n FROM jobs WHERE finished_at IS NULL")
        .await;
    let recent = app
        .count("SELECT count(*) AS n FROM jobs WHERE finished_at >= now() - interval '30 days' AND task NOT LIKE 'stats.%'")
        .await;
    assert!(old_finished > 0 && unfinished > 0);

    run(
        &app,
        "stats.retention",
        json!({"max_age_days": 30, "batch": 7}),
    )
    .await;

    assert_eq!(
        app.count(&format!("SELECT count(*) AS n FROM jobs WHERE {old}"))
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) AS n FROM jobs WHERE finished_at IS NULL")
            .await,
        unfinished
    );
    assert_eq!(
        app.count("SELECT count(*) AS n FROM jobs WHERE finished_at >= now() - interval '30 days' AND task NOT LIKE 'stats.%'")
            .await,
        recent
    );
    // The old day was rolled up from its complete rows before they went.
    let day = chrono::Utc::now()
        .duration_trunc(chrono::Duration::days(1))
        .unwrap()
        - chrono::Duration::days(40);
    let sealed = table(&app, "job_stats_daily").await;
    let sealed: Vec<_> = sealed.into_iter().filter(|r| r.bucket == day).collect();
    assert!(!sealed.is_empty());
    assert_matches(
        &sealed,
        &old_day_stats,
        day,
        day + chrono::Duration::days(1),
    );
    assert_eq!(
        app.count("SELECT count(*) AS n FROM stats_sealed_days")
            .await,
        2
    );
    // The old day's rejection counts and webhook events were rolled up, then
    // deleted; recent ones stay.
    assert_eq!(
        app.count("SELECT count(*) AS n FROM webhook_rejections")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) AS n FROM webhook_events WHERE webhook_id = 'msg_recent'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) AS n FROM webhook_events WHERE webhook_id LIKE 'msg_old%'")
            .await,
        0
    );
    for table in ["webhook_stats_hourly", "webhook_stats_daily"] {
        let rows = webhook_table(&app, table).await;
        let old_day: Vec<_> = rows
            .iter()
            .filter(|r| r.bucket >= day && r.bucket < day + chrono::Duration::days(1))
            .cloned()
            .collect();
        assert_eq!(
            stat_totals(&old_day),
            totals([
                ("members", "accepted", "", 1),
                ("members", "applied", "", 1),
                ("members", "rejected", "bad_signature", 12),
                ("(unknown)", "rejected", "unknown_source", 2),
            ]),
            "{table}"
        );
    }
}

#[derive(Debug, Clone, PartialEq, QueryableByName)]
struct WebhookStat {
    #[diesel(sql_type = Timestamptz)]
    bucket: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Text)]
    outcome: String,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = BigInt)]
    events: i64,
    #[diesel(sql_type = Timestamptz)]
    computed_at: DateTime<Utc>,
}

async fn webhook_table(app: &TestApp, name: &str) -> Vec<WebhookStat> {
    load(
        app,
        &format!("SELECT * FROM {name} ORDER BY bucket, source, outcome, reason"),
    )
    .await
}

/// (source, outcome, reason) -> events, summed over buckets.
type Totals = BTreeMap<(String, String, String), i64>;

fn totals<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str, &'a str, i64)>) -> Totals {
    let mut totals = Totals::new();
    for (source, outcome, reason, n) in rows {
        *totals
            .entry((source.to_owned(), outcome.to_owned(), reason.to_owned()))
            .or_default() += n;
    }
    totals
}

fn stat_totals(rows: &[WebhookStat]) -> Totals {
    totals(rows.iter().map(|r| {
        (
            r.source.as_str(),
            r.outcome.as_str(),
            r.reason.as_str(),
            r.events,
        )
    }))
}

/// What the test sent, plus one event per `webhook_events` row (counted here,
/// not by the rollup's SQL).
async fn expected_webhook_totals(app: &TestApp, rejected: &[(&str, &str, i64)]) -> Totals {
    #[derive(QueryableByName)]
    struct Event {
        #[diesel(sql_type = Text)]
        source: String,
        #[diesel(sql_type = Text)]
        outcome: String,
    }
    let events: Vec<Event> = load(app, "SELECT source, outcome FROM webhook_events").await;
    let mut expected = totals(
        events
            .iter()
            .map(|e| (e.source.as_str(), e.outcome.as_str(), "", 1)),
    );
    expected.extend(totals(
        rejected
            .iter()
            .map(|&(source, reason, n)| (source, "rejected", reason, n)),
    ));
    expected
}

async fn rejections_recorded(app: &TestApp) -> i64 {
    app.count("SELECT coalesce(sum(requests), 0)::bigint AS n FROM webhook_rejections")
        .await
}

/// UTC minutes touched between `start` and now.
fn minutes_since(start: DateTime<Utc>) -> i64 {
    let minute = |t: DateTime<Utc>| t.timestamp().div_euclid(60);
    minute(Utc::now()) - minute(start) + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_webhooks_are_counted_by_reason_rolled_up_and_exported() {
    use crate::webhooks::{self as hooks, Keys, TOLERANCE};
    use conveyor_platform::webhook_signature::{self, SigningKey};

    let keys = Keys::new();
    let app = hooks::spawn(1, &keys, |_| {}).await;
    let body = hooks::update("p1", "2026-01-01T00:00:00Z", "a@x.io").to_string();
    let post = |headers: Vec<(&'static str, String)>| {
        let (app, body) = (&app, body.clone());
        async move { hooks::post_raw(app, "members", &headers, body).await }
    };
    let signed = |key: &str, id: &str, ts: i64| {
        let signature = SigningKey::parse(key)
            .unwrap()
            .sign(id, ts, body.as_bytes());
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", signature),
        ]
    };

    // 20 bad signatures (a key the source does not have): 401.
    let stranger = webhook_signature::generate_hmac_secret();
    let flood_started = Utc::now();
    for i in 0..20 {
        let response = post(signed(&stranger, &format!("bad{i}"), hooks::now())).await;
        assert_eq!(response.status(), 401);
    }
    let flood_minutes = minutes_since(flood_started);
    // 2 stale timestamps, well outside the tolerance: 401.
    for i in 0..2 {
        let ts = hooks::now() - TOLERANCE as i64 - 120;
        let response = post(signed(&keys.hmac_old, &format!("old{i}"), ts)).await;
        assert_eq!(response.status(), 401);
    }
    // 3 malformed header sets: 400.
    let good = signed(&keys.hmac_old, "m1", hooks::now());
    for headers in [
        vec![good[0].clone(), good[2].clone()],
        vec![
            good[0].clone(),
            ("webhook-timestamp", "yesterday".to_owned()),
            good[2].clone(),
        ],
        vec![
            good[0].clone(),
            good[1].clone(),
            ("webhook-signature", "v1".to_owned()),
        ],
    ] {
        assert_eq!(post(headers).await.status(), 400);
    }
    // A source nobody configured: 404, stored under `(unknown)`, never its name.
    let response = hooks::post_raw(&app, "strangers", &[], body.clone()).await;
    assert_eq!(response.status(), 404);
    // One accepted webhook, applied by the worker.
    let job = hooks::send(
        &app,
        &keys.hmac_new,
        &hooks::update("p2", "2026-01-01T00:00:00Z", "b@x.io"),
    )
    .await;
    app.wait_for_state(job, "succeeded", Duration::from_secs(30))
        .await;

    // The counts reach the database in the next batch; rejections made no jobs.
    crate::harness::wait_until(Duration::from_secs(15), || async {
        rejections_recorded(&app).await == 26
    })
    .await;
    assert_eq!(app.count("SELECT count(*) AS n FROM jobs").await, 1);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM webhook_rejections WHERE source = 'strangers'")
            .await,
        0
    );
    // One row per minute, source and reason, however many requests.
    assert!(
        app.count("SELECT count(*) AS n FROM webhook_rejections WHERE reason = 'bad_signature'")
            .await
            <= flood_minutes
    );

    let mut rejected = vec![
        ("members", "bad_signature", 20),
        ("members", "stale_timestamp", 2),
        ("members", "bad_headers", 3),
        ("(unknown)", "unknown_source", 1),
    ];
    let roll = || async {
        run(&app, "stats.rollup_hourly", json!({"lookback": 3})).await;
        run(&app, "stats.rollup_daily", json!({"lookback": 2})).await;
    };
    roll().await;
    let hourly = webhook_table(&app, "webhook_stats_hourly").await;
    let daily = webhook_table(&app, "webhook_stats_daily").await;
    let expected = expected_webhook_totals(&app, &rejected).await;
    assert!(expected.contains_key(&("members".into(), "applied".into(), String::new())));
    assert_eq!(stat_totals(&hourly), expected);
    assert_eq!(stat_totals(&daily), expected);

    // Twice gives identical tables, computed_at included.
    roll().await;
    assert_eq!(webhook_table(&app, "webhook_stats_hourly").await, hourly);
    assert_eq!(webhook_table(&app, "webhook_stats_daily").await, daily);

    // A rejection after the rollup is counted by the next one.
    let response = post(signed(&stranger, "late", hooks::now())).await;
    assert_eq!(response.status(), 401);
    crate::harness::wait_until(Duration::from_secs(15), || async {
        rejections_recorded(&app).await == 27
    })
    .await;
    rejected[0].2 += 1;
    roll().await;
    let expected = expected_webhook_totals(&app, &rejected).await;
    let hourly = webhook_table(&app, "webhook_stats_hourly").await;
    assert_eq!(stat_totals(&hourly), expected);
    assert_eq!(
        stat_totals(&webhook_table(&app, "webhook_stats_daily").await),
        expected
    );

    // The API: JSON and CSV agree, filtered to rejections or to one reason.
    let (hour, day) = current_windows(&app).await;
    let span = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let range = format!(
        "from={}&to={}",
        span(hour - chrono::Duration::hours(2)),
        span(hour + chrono::Duration::hours(1))
    );
    let (json_rows, csv_rows) = json_and_csv::<WebhookRow>(
        &app,
        &format!("/v1/stats/webhooks?{range}&outcome=rejected"),
    )
    .await;
    assert_eq!(json_rows, csv_rows);
    let by_reason = totals(json_rows.iter().map(|r| {
        (
            r.source.as_str(),
            r.outcome.as_str(),
            r.reason.as_str(),
            r.events,
        )
    }));
    let rejected_only: Totals = expected
        .into_iter()
        .filter(|((_, outcome, _), _)| outcome == "rejected")
        .collect();
    assert_eq!(by_reason, rejected_only);
    let days = format!(
        "from={}&to={}",
        span(day - chrono::Duration::days(1)),
        span(day + chrono::Duration::days(1))
    );
    let (json_rows, csv_rows) = json_and_csv::<WebhookRow>(
        &app,
        &format!("/v1/stats/webhooks?{days}&granularity=day&reason=stale_timestamp"),
    )
    .await;
    assert_eq!(json_rows, csv_rows);
    assert!(
        json_rows
            .iter()
            .all(|r| r.outcome == "rejected" && r.reason == "stale_timestamp"),
        "{json_rows:?}"
    );
    assert_eq!(json_rows.iter().map(|r| r.events).sum::<i64>(), 2);
    let response = app
        .client
        .get(app.url("/v1/stats/jobs?reason=bad_signature"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

/// Two overlapping `stats.retention` runs: B read the unsealed days (D among
/// them) and waits at its first write; A seals D, commits, and stops half way
/// through deleting D's raw rows. B then goes on: it must not recompute D from
/// the half-deleted rows (which would overwrite A's numbers with lower ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_retention_runs_never_recompute_a_sealed_day_from_half_deleted_rows() {
    let app = TestApp::spawn_with(2, |_| {}).await;
    insert_jobs(
        &app,
        120,
        "date_trunc('day', now(), 'UTC') - interval '40 days'",
        86_400,
        13,
    )
    .await;
    let day = chrono::Utc::now()
        .duration_trunc(chrono::Duration::days(1))
        .unwrap()
        - chrono::Duration::days(40);
    let expected = expected_job_stats(&app, chrono::Duration::days(1)).await;

    // The first write of the first run (B) after it read the day list waits
    // at the gate: a rollup row (before the fix) or the sealed day (after).
    execute(&app, "CREATE SEQUENCE gate_once").await;
    let gate = Gate::close(
        &app,
        "job_stats_hourly",
        "INSERT",
        "nextval('gate_once') = 1",
    );
    execute(
        &app,
        "CREATE TRIGGER gate BEFORE INSERT ON stats_sealed_days FOR EACH ROW EXECUTE FUNCTION gate()",
    )
    .await;
    // A's 21st deleted job waits until `deletes` is released, so 14 deletions
    // (two batches of 7) are committed and D's raw rows half gone.
    let mut deletes = app.db.conn();
    deletes
        .batch_execute(
            "SELECT pg_advisory_lock(7332);
             CREATE SEQUENCE deleted;
             CREATE FUNCTION hold_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF nextval('deleted') > 14 THEN
                     PERFORM pg_advisory_xact_lock_shared(7332);
                 END IF;
                 RETURN OLD;
             END $$;
             CREATE TRIGGER hold_deletes BEFORE DELETE ON jobs
                 FOR EACH ROW EXECUTE FUNCTION hold_deletes();",
        )
        .unwrap();

    let args = json!({"max_age_days": 30, "batch": 7});
    let b = app.enqueue("stats.retention", args.clone()).await;
    wait_until(Duration::from_secs(30), || async {
        advisory_waits(&app).await == 1
    })
    .await;
    // A seals D and waits half way through its deletes (or, should B hold
    // D's rollup lock at the gate, waits for that lock and plays B's part).
    let a = app.enqueue("stats.retention", args).await;
    wait_until(Duration::from_secs(30), || async {
        advisory_waits(&app).await == 2
    })
    .await;
    gate.open();
    // B ends its seal transaction, then its deletes wait like A's (at the
    // hold, or for the row A's held delete locked).
    wait_until(Duration::from_secs(30), || async {
        app.count(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND query LIKE 'DELETE FROM jobs%'",
        )
        .await
            == 2
    })
    .await;
    deletes
        .batch_execute("SELECT pg_advisory_unlock(7332)")
        .unwrap();
    for id in [a, b] {
        app.wait_for_state(id, "succeeded", Duration::from_secs(30))
            .await;
    }
    assert_eq!(
        app.count(
            "SELECT count(*) AS n FROM jobs WHERE finished_at < date_trunc('day', now(), 'UTC') - interval '30 days'"
        )
        .await,
        0
    );
    let daily: Vec<_> = table(&app, "job_stats_daily")
        .await
        .into_iter()
        .filter(|r| r.bucket == day)
        .collect();
    assert_matches(&daily, &expected, day, day + chrono::Duration::days(1));
}

/// Two overlapping hourly rollups: A read the jobs before a late one committed
/// and waits at its upsert; B starts after the late job committed. A's older
/// counts must not end up over B's newer ones: the rollups of one table run
/// one after the other, the second reading after the first committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_rollups_never_put_back_stale_counts() {
    let app = TestApp::spawn_with(2, |_| {}).await;
    insert_jobs(&app, 40, "now() - interval '20 minutes'", 600, 5).await;
    // A's upsert of its first row waits at the gate, its snapshot taken.
    execute(&app, "CREATE SEQUENCE gate_once").await;
    let gate = Gate::close(
        &app,
        "job_stats_hourly",
        "INSERT",
        "nextval('gate_once') = 1",
    );
    let a = app
        .enqueue("stats.rollup_hourly", json!({"lookback": 3}))
        .await;
    wait_until(Duration::from_secs(30), || async {
        advisory_waits(&app).await == 1
    })
    .await;
    // The late job commits, then B runs: it finishes (before the fix) or
    // waits for A (after).
    execute(
        &app,
        "INSERT INTO jobs (id, task, queue, state, args, attempts, max_attempts, enqueued_at, started_at, finished_at) \
         VALUES (gen_random_uuid(), 'diag.noop', 'default', 'succeeded', '{}', 1, 5, \
                 now() - interval '3 seconds', now() - interval '2 seconds', now() - interval '1 second')",
    )
    .await;
    let b = app
        .enqueue("stats.rollup_hourly", json!({"lookback": 3}))
        .await;
    let b_done = format!("SELECT count(*) AS n FROM jobs WHERE id = '{b}' AND state = 'succeeded'");
    wait_until(Duration::from_secs(30), || async {
        advisory_waits(&app).await == 2 || app.count(&b_done).await == 1
    })
    .await;
    gate.open();
    for id in [a, b] {
        app.wait_for_state(id, "succeeded", Duration::from_secs(30))
            .await;
    }

    let expected = expected_job_stats(&app, chrono::Duration::hours(1)).await;
    let (hour, _) = current_windows(&app).await;
    assert_matches(
        &table(&app, "job_stats_hourly").await,
        &expected,
        hour - chrono::Duration::hours(2),
        hour + chrono::Duration::hours(1),
    );
}

/// The hourly webhook rollup selects `webhook_events` by `recorded_at` alone,
/// every 5 minutes: with sequential (and bitmap) scans priced out, its plan
/// must read only its window's events, through `webhook_events_recorded_at`,
/// not the whole index led by `source`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_rollup_reads_only_its_window_of_webhook_events() {
    use conveyor_schema::stats::Granularity;
    use conveyor_tasks::stats::rollup;

    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut conn = db.conn();
        // 5 000 events days before the window, then 5 in it.
        conn.batch_execute(
            "INSERT INTO webhook_events (source, webhook_id, outcome, recorded_at)
             SELECT CASE WHEN g % 3 = 0 THEN 'members' ELSE 'billing' END, 'msg_old_' || g,
                    'applied', now() - interval '2 days' - interval '1 minute' * g
             FROM generate_series(1, 5000) g;
             INSERT INTO webhook_events (source, webhook_id, outcome, recorded_at)
             SELECT 'members', 'msg_new_' || g, 'accepted', now() - interval '30 minutes'
             FROM generate_series(1, 5) g;",
        )
        .unwrap();
        conn.batch_execute("VACUUM ANALYZE webhook_events").unwrap();
        conn.batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
            .unwrap();
        let statement = rollup::webhooks_statement(&mut conn, Granularity::Hour)
            .unwrap()
            .unwrap();
        let now = Utc::now();
        let plan: PlanJson =
            diesel::sql_query(format!("EXPLAIN (ANALYZE, FORMAT JSON) {statement}"))
                .bind::<Timestamptz, _>(now - chrono::Duration::hours(3))
                .bind::<Timestamptz, _>(now + chrono::Duration::hours(1))
                .get_result(&mut conn)
                .unwrap();
        assert_reads_only(&plan, "webhook_events", "webhook_events_recorded_at", 5.0);
        let events: i64 = diesel::sql_query(
            "SELECT coalesce(sum(events), 0)::bigint AS n FROM webhook_stats_hourly",
        )
        .get_result::<N>(&mut conn)
        .unwrap()
        .n;
        assert_eq!(events, 5);
    })
    .await
    .unwrap();
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// (sent, failed, unknown, rows) of `table` for `campaign`.
async fn mail_totals(app: &TestApp, table: &str, campaign: Uuid) -> [i64; 4] {
    let mut totals = [0; 4];
    for (total, sum) in
        totals
            .iter_mut()
            .zip(["sum(sent)", "sum(failed)", "sum(unknown)", "count(*)"])
    {
        *total = app
            .count(&format!(
                "SELECT coalesce({sum}, 0)::bigint AS n FROM {table} WHERE campaign_id = '{campaign}'"
            ))
            .await;
    }
    totals
}

/// Rows of `table` for task `task`.
async fn task_rows(app: &TestApp, table: &str, task: &str) -> i64 {
    app.count(&format!(
        "SELECT count(*) AS n FROM {table} WHERE task = '{task}'"
    ))
    .await
}

/// A recomputed window's rows are exactly the groups of its raw rows: a group
/// whose rows all left the window is deleted, not left with its old counts
/// beside the new ones. Mail: recipients that fell into doubt (`unknown`),
/// then resend-unknown made `pending` and they were sent an hour later. Jobs:
/// finished jobs an operator deleted (a final job row never changes again; a
/// replay is a fresh job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_rows_left_a_recomputed_window_disappears() {
    let app = app().await;
    let campaign = Uuid::now_v7();
    execute(
        &app,
        &format!(
            "INSERT INTO campaigns (id, name, template, from_addr, state) \
             VALUES ('{campaign}', 'stats', 'welcome', 'news@example.com', 'sending'); \
             INSERT INTO campaign_recipients (campaign_id, email, state, updated_at) \
             SELECT '{campaign}', 'r' || i || '@example.com', 'unknown', \
                    date_trunc('hour', now(), 'UTC') - interval '1 hour' + i * interval '1 minute' \
             FROM generate_series(1, 5) i; \
             INSERT INTO jobs (id, task, queue, state, args, attempts, max_attempts, enqueued_at, started_at, finished_at) \
             SELECT gen_random_uuid(), 'diag.deleted', 'default', 'succeeded', '{{}}', 1, 5, f - interval '2 seconds', \
                    f - interval '1 second', f \
             FROM (SELECT date_trunc('hour', now(), 'UTC') - interval '1 hour' + i * interval '1 minute' AS f \
                   FROM generate_series(1, 3) i) s;"
        ),
    )
    .await;
    insert_jobs(
        &app,
        40,
        "date_trunc('hour', now(), 'UTC') - interval '1 hour'",
        3600,
        3,
    )
    .await;
    let roll = || async {
        run(&app, "stats.rollup_hourly", json!({})).await;
        run(&app, "stats.rollup_daily", json!({})).await;
    };
    roll().await;
    for table in ["mail_stats_hourly", "mail_stats_daily"] {
        assert_eq!(
            mail_totals(&app, table, campaign).await,
            [0, 0, 5, 1],
            "{table}"
        );
    }
    for table in ["job_stats_hourly", "job_stats_daily"] {
        assert_eq!(task_rows(&app, table, "diag.deleted").await, 1, "{table}");
    }

    // resend-unknown (as `control.rs` writes it); the jobs are deleted.
    execute(
        &app,
        &format!(
            "UPDATE campaign_recipients SET state = 'pending', chunk_id = NULL, next_attempt_at = NULL \
             WHERE campaign_id = '{campaign}' AND state = 'unknown'; \
             DELETE FROM jobs WHERE task = 'diag.deleted';"
        ),
    )
    .await;
    roll().await;
    for table in ["job_stats_hourly", "job_stats_daily"] {
        assert_eq!(
            task_rows(&app, table, "diag.deleted").await,
            0,
            "{table}: rows of the deleted jobs' task"
        );
    }
    for table in ["mail_stats_hourly", "mail_stats_daily"] {
        assert_eq!(
            mail_totals(&app, table, campaign).await,
            [0, 0, 0, 0],
            "{table}: (sent, failed, unknown, rows) after resend-unknown"
        );
    }
    // The other tasks' rows are still those of a recomputation.
    let (hour, _) = current_windows(&app).await;
    assert_matches(
        &table(&app, "job_stats_hourly").await,
        &expected_job_stats(&app, chrono::Duration::hours(1)).await,
        hour - chrono::Duration::hours(1),
        hour,
    );

    // Sent now: counted once, as sent.
    execute(
        &app,
        &format!(
            "UPDATE campaign_recipients SET state = 'sent', sent_at = now(), updated_at = now() \
             WHERE campaign_id = '{campaign}'"
        ),
    )
    .await;
    roll().await;
    for table in ["mail_stats_hourly", "mail_stats_daily"] {
        assert_eq!(
            mail_totals(&app, table, campaign).await,
            [5, 0, 0, 1],
            "{table}: (sent, failed, unknown, rows) once sent"
        );
    }
}

/// A gap between hourly rollups longer than their lookback is caught up: the
/// last completed run is recorded at the start of the hour three hours back,
/// and jobs that finished in that hour are counted by the next run with the
/// usual lookback (3: it alone would start two hours back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_between_hourly_rollups_is_caught_up() {
    let app = app().await;
    execute(
        &app,
        "INSERT INTO stats_rollup_marks (granularity, completed_to) \
         VALUES ('hour', date_trunc('hour', now(), 'UTC') - interval '3 hours')",
    )
    .await;
    insert_jobs(
        &app,
        60,
        "date_trunc('hour', now(), 'UTC') - interval '3 hours'",
        3600,
        7,
    )
    .await;
    run(&app, "stats.rollup_hourly", json!({})).await;
    let (hour, _) = current_windows(&app).await;
    let three_back = hour - chrono::Duration::hours(3);
    assert_matches(
        &table(&app, "job_stats_hourly").await,
        &expected_job_stats(&app, chrono::Duration::hours(1)).await,
        three_back,
        three_back + chrono::Duration::hours(1),
    );
    // The run completed everything before the current hour.
    assert_eq!(
        app.count(
            "SELECT count(*) AS n FROM stats_rollup_marks \
             WHERE granularity = 'hour' AND completed_to = date_trunc('hour', now(), 'UTC')"
        )
        .await,
        1
    );
}
