//! The scheduler fires each tick exactly once across worker processes, keeps
//! going when one dies, catches up (or not) after downtime, and re-publishes a
//! tick whose claimer died before publishing, claims none while it cannot
//! publish; a tick's job, re-published or not, carries the tick as its
//! idempotency key. The 30-second test is the only long one.

use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use conveyor_platform::schedule::{CatchUp, ScheduleConfig};
use diesel::prelude::*;
use diesel::sql_types::{Bool, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{TestApp, wait_until};

fn every_second(name: &str, catch_up: CatchUp) -> ScheduleConfig {
    ScheduleConfig {
        name: name.into(),
        cron: "* * * * * *".into(),
        task: "diag.noop".into(),
        args: json!({}),
        timezone: "UTC".into(),
        catch_up,
    }
}

#[derive(Debug, QueryableByName)]
struct TickRow {
    #[diesel(sql_type = Timestamptz)]
    tick_at: DateTime<Utc>,
    #[diesel(sql_type = SqlUuid)]
    job_id: Uuid,
    #[diesel(sql_type = Bool)]
    catch_up: bool,
    #[diesel(sql_type = Text)]
    claimed_by: String,
    #[diesel(sql_type = Timestamptz)]
    claimed_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    published_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    job_state: Option<String>,
}

async fn ticks(app: &TestApp, schedule: &str) -> Vec<TickRow> {
    let url = app.db.url.clone();
    let schedule = schedule.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        diesel::sql_query(
            "SELECT t.tick_at, t.job_id, t.catch_up, t.claimed_by, t.claimed_at, t.published_at, \
                    j.state AS job_state \
             FROM schedule_ticks t LEFT JOIN jobs j ON j.id = t.job_id \
             WHERE t.schedule = $1 ORDER BY t.tick_at",
        )
        .bind::<Text, _>(schedule)
        .load::<TickRow>(&mut conn)
        .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_worker_processes_fire_each_tick_once_and_survive_a_kill() {
    let mut app = TestApp::spawn_with(0, |config| {
        config
            .schedules
            .push(every_second("every-second", CatchUp::Skip));
    })
    .await;
    let toml = "[stats]\ndefault_schedules = false\n\n[[schedules]]\nname = \"every-second\"\n\
                cron = \"* * * * * *\"\ntask = \"diag.noop\"\n";
    for _ in 0..3 {
        app.spawn_worker_process_with(5_000, Some(toml));
    }
    wait_until(Duration::from_secs(20), || async {
        app.count("SELECT count(*) AS n FROM schedule_ticks").await > 0
    })
    .await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let victim = &mut app.processes[0];
    victim.kill().unwrap();
    victim.wait().unwrap();
    let killed_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(started.elapsed())).await;

    let rows = ticks(&app, "every-second").await;
    assert!(rows.len() >= 25, "only {} ticks in 30 s", rows.len());
    // No gaps: consecutive seconds from the first tick to the last.
    for pair in rows.windows(2) {
        assert_eq!(
            pair[1].tick_at - pair[0].tick_at,
            chrono::Duration::seconds(1),
            "gap or irregular tick between {} and {}",
            pair[0].tick_at,
            pair[1].tick_at
        );
    }
    let after_kill = rows.iter().filter(|r| r.tick_at > killed_at).count();
    assert!(
        after_kill >= 10,
        "ticks stopped after the kill: {after_kill}"
    );
    // Exactly one job per tick: distinct job ids, one record each, and no
    // other diag.noop job exists.
    let ids: std::collections::HashSet<_> = rows.iter().map(|r| r.job_id).collect();
    assert_eq!(ids.len(), rows.len());
    assert!(rows.iter().all(|r| r.job_state.is_some()));
    assert!(rows.iter().all(|r| !r.catch_up));
    let total = rows.len() as i64;
    let jobs = app
        .count("SELECT count(*) AS n FROM jobs WHERE task = 'diag.noop'")
        .await;
    assert!(
        jobs >= total && jobs <= total + 2,
        "{jobs} jobs for {total} ticks (at most the ticks fired since the snapshot)"
    );
    let claimers: std::collections::HashSet<_> = rows.iter().map(|r| &r.claimed_by).collect();
    eprintln!(
        "{total} ticks, {after_kill} after the kill, claimed by {} workers",
        claimers.len()
    );
    // Every tick's job was published and ran.
    let last = rows.last().unwrap().tick_at;
    wait_until(Duration::from_secs(15), || async {
        app.count(&format!(
            "SELECT count(*) AS n FROM schedule_ticks t JOIN jobs j ON j.id = t.job_id \
             WHERE t.schedule = 'every-second' AND t.tick_at <= '{}' \
               AND (j.state <> 'succeeded' OR t.published_at IS NULL)",
            last.to_rfc3339()
        ))
        .await
            == 0
    })
    .await;

    // The API shows the schedule, its last and next tick, and recent ticks.
    let list: Value = app.get_json("/v1/schedules").await;
    let schedule = &list[0];
    assert_eq!(schedule["name"], "every-second");
    assert_eq!(schedule["catch_up"], "skip");
    assert!(schedule["last_tick"]["job_id"].is_string(), "{list}");
    let next: DateTime<Utc> = schedule["next_tick_at"].as_str().unwrap().parse().unwrap();
    let last_tick: DateTime<Utc> = schedule["last_tick"]["tick_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(next > last_tick);
    let recent: Vec<Value> = app
        .get_json("/v1/schedules/every-second/ticks?limit=5")
        .await;
    assert_eq!(recent.len(), 5);
    let times: Vec<DateTime<Utc>> = recent
        .iter()
        .map(|t| t["tick_at"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] > w[1]),
        "newest first: {times:?}"
    );
    let missing = app
        .client
        .get(app.url("/v1/schedules/nope/ticks"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let bad = app
        .client
        .get(app.url("/v1/schedules/every-second/ticks?limit=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
}

/// The scheduler's grace in the downtime tests. A tick seen later than this
/// was missed. It must exceed how long one scheduler pass can take, or a
/// worker that is merely slow misses ticks too: on a loaded machine (the whole
/// suite on 2 cores) a pass of this in-process worker can take over a second.
const GRACE: Duration = Duration::from_secs(3);

/// Runs one every-second schedule on an in-process worker, stops it for
/// eight seconds (grace 3 s, so at least five ticks are missed), restarts it,
/// and returns (last tick before the stop, ticks after it).
async fn downtime(catch_up: CatchUp) -> (DateTime<Utc>, Vec<TickRow>) {
    let mut app = TestApp::spawn_with(1, |config| {
        config.scheduler.grace_ms = GRACE.as_millis() as u64;
        config.schedules.push(every_second("catch-up", catch_up));
    })
    .await;
    wait_until(Duration::from_secs(30), || async {
        app.count("SELECT count(*) AS n FROM schedule_ticks").await >= 2
    })
    .await;
    app.stop_workers().await;
    let before = ticks(&app, "catch-up").await;
    let last = before.last().unwrap().tick_at;
    tokio::time::sleep(Duration::from_secs(8)).await;
    app.start_worker().await;
    let restarted = Utc::now();
    wait_until(Duration::from_secs(30), || async {
        app.count(&format!(
            "SELECT count(*) AS n FROM schedule_ticks WHERE tick_at > '{}'",
            (restarted + chrono::Duration::seconds(2)).to_rfc3339()
        ))
        .await
            > 0
    })
    .await;
    let after = ticks(&app, "catch-up")
        .await
        .into_iter()
        .filter(|t| t.tick_at > last)
        .collect();
    (last, after)
}

fn missed_window(last: DateTime<Utc>, after: &[TickRow]) -> (DateTime<Utc>, usize) {
    let first_on_time = after.iter().find(|t| !t.catch_up).unwrap().tick_at;
    let missed = (first_on_time - last).num_seconds() as usize - 1;
    (first_on_time, missed)
}

/// Whether `tick` was claimed only after the grace had passed, i.e. fired late
/// for a tick that no worker had fired on time.
fn fired_late(tick: &TickRow) -> bool {
    tick.claimed_at - tick.tick_at >= chrono::Duration::from_std(GRACE).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_once_fires_one_job_for_the_missed_ticks() {
    let (last, after) = downtime(CatchUp::Once).await;
    let (first_on_time, missed) = missed_window(last, &after);
    assert!(missed >= 5, "only {missed} ticks were missed");
    let in_gap: Vec<_> = after.iter().filter(|t| t.tick_at < first_on_time).collect();
    assert_eq!(
        in_gap.len(),
        1,
        "one job for {missed} missed ticks: {in_gap:?}"
    );
    // ...for the latest of them, fired late, with its job recorded.
    let caught_up = in_gap[0];
    assert!(caught_up.catch_up);
    assert_eq!(
        caught_up.tick_at,
        first_on_time - chrono::Duration::seconds(1)
    );
    assert!(fired_late(caught_up), "{caught_up:?}");
    assert!(caught_up.job_state.is_some());
    // No other catch-up, unless the restarted worker itself fell behind by more
    // than the grace (a pass slower than that on a starved machine): such a
    // tick is a catch-up for ticks missed then, never for the downtime.
    let later: Vec<_> = after
        .iter()
        .filter(|t| t.catch_up && t.tick_at > first_on_time)
        .collect();
    assert!(later.iter().all(|t| fired_late(t)), "{later:#?}");
    if !later.is_empty() {
        eprintln!(
            "the worker fell behind after the restart: {} later catch-up(s)",
            later.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_skip_fires_nothing_for_the_missed_ticks() {
    let (last, after) = downtime(CatchUp::Skip).await;
    let (first_on_time, missed) = missed_window(last, &after);
    assert!(missed >= 5, "only {missed} ticks were missed");
    assert!(
        after
            .iter()
            .all(|t| t.tick_at >= first_on_time && !t.catch_up)
    );
    // ...and the schedule runs on after the downtime.
    assert!(after.len() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_claimed_but_never_published_is_republished() {
    let mut app = TestApp::spawn_with(0, |config| {
        config.scheduler.max_sleep_ms = 200;
        config.schedules.push(ScheduleConfig {
            cron: "0 0 1 1 *".into(),
            ..every_second("yearly", CatchUp::Skip)
        });
    })
    .await;
    let job_id = abandoned_tick(&app).await;
    app.start_worker().await;
    app.wait_for_state(job_id, "succeeded", Duration::from_secs(15))
        .await;
    let rows = ticks(&app, "yearly").await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].published_at.is_some());
    assert_ne!(rows[0].claimed_by, "dead-worker");
    assert_eq!(
        app.count("SELECT count(*) AS n FROM jobs").await,
        1,
        "re-publishing made no new job"
    );
}

/// What a worker killed between its claim's commit and the publish leaves
/// behind for schedule `yearly`: the tick's job record, as its claim wrote it
/// (keyed by the tick), and the tick unpublished since a minute ago, past
/// `scheduler.republish_after_ms`; returns the job's id.
async fn abandoned_tick(app: &TestApp) -> Uuid {
    let job_id = Uuid::now_v7();
    let tick_at = Utc
        .with_ymd_and_hms(Utc::now().year(), 1, 1, 0, 0, 0)
        .unwrap();
    let url = app.db.url.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        diesel::sql_query(
            "INSERT INTO jobs (id, task, queue, state, args, max_attempts, enqueued_at, idempotency_key) \
             VALUES ($1, 'diag.noop', 'default', 'queued', '{}', 5, now() - interval '1 minute', $2)",
        )
        .bind::<SqlUuid, _>(job_id)
        .bind::<Text, _>(tick_key("yearly", tick_at))
        .execute(&mut conn)
        .unwrap();
        diesel::sql_query(
            "INSERT INTO schedule_ticks (schedule, tick_at, job_id, claimed_by, claimed_at) \
             VALUES ('yearly', $1, $2, 'dead-worker', now() - interval '1 minute')",
        )
        .bind::<Timestamptz, _>(tick_at)
        .bind::<SqlUuid, _>(job_id)
        .execute(&mut conn)
        .unwrap();
    })
    .await
    .unwrap();
    job_id
}

/// `schedule:<name>@<tick, RFC 3339 UTC>`: the key a tick's job carries.
fn tick_key(name: &str, tick_at: DateTime<Utc>) -> String {
    format!(
        "schedule:{name}@{}",
        tick_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticks_job_carries_the_tick_as_its_key_also_when_republished() {
    let mut app = TestApp::spawn_with(0, |config| {
        config.scheduler.max_sleep_ms = 200;
        // The worker fires ticks but runs none of their jobs: their messages stay queued.
        config.worker.queues = vec!["mail".into()];
        config.schedules.push(every_second("often", CatchUp::Skip));
        config.schedules.push(ScheduleConfig {
            cron: "0 0 1 1 *".into(),
            ..every_second("yearly", CatchUp::Skip)
        });
    })
    .await;
    let abandoned = abandoned_tick(&app).await;
    app.start_worker().await;
    wait_until(Duration::from_secs(15), || async {
        ticks(&app, "yearly").await[0].published_at.is_some()
            && ticks(&app, "often").await.len() >= 2
    })
    .await;
    // No tick may fire between reading the ticks and draining their messages.
    app.stop_workers().await;
    let mut keys = std::collections::HashMap::new();
    for name in ["yearly", "often"] {
        for row in ticks(&app, name).await {
            keys.insert(row.job_id, tick_key(name, row.tick_at));
        }
    }
    let work = app.topology().work_queue("default");
    let messages = app.drain_queue(&work).await;
    assert!(messages.len() >= 3, "{} messages", messages.len());
    for (_, body) in &messages {
        let envelope: Value = serde_json::from_slice(body).unwrap();
        let id: Uuid = envelope["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            envelope["idempotency_key"].as_str(),
            keys.get(&id).map(String::as_str),
            "{envelope}"
        );
        let record = app.job(id).await.unwrap();
        assert_eq!(
            record.idempotency_key.as_deref(),
            keys.get(&id).map(String::as_str)
        );
    }
    assert!(messages.iter().any(|(_, body)| {
        serde_json::from_slice::<Value>(body).unwrap()["id"] == abandoned.to_string()
    }));
}

/// A worker whose publisher is not connected (starting up, or the broker away)
/// claims no tick: a tick claimed then would wait for the re-publish sweep
/// (15 s by default) before its job is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tick_is_claimed_while_the_publisher_is_not_connected() {
    use conveyor_platform::amqp::{Publisher, Topology};
    use conveyor_platform::schedule::{Schedule, SchedulerConfig};

    let db = crate::harness::TestDb::create();
    let stop = tokio_util::sync::CancellationToken::new();
    // Nothing listens on port 1: the publisher never connects.
    let publisher = Publisher::start(
        &["amqp://guest:guest@127.0.0.1:1/%2f"],
        "test",
        Topology::for_config(&conveyor_platform::Config::default()),
        1,
        Duration::from_secs(1),
        stop.clone(),
    );
    let scheduler = conveyor_worker::scheduler::Scheduler {
        db: conveyor_schema::pool::pool(&db.url, 2),
        publisher,
        metrics: conveyor_platform::metrics::Metrics::new(),
        schedules: std::sync::Arc::new(vec![
            Schedule::parse(every_second("often", CatchUp::Skip)).unwrap(),
        ]),
        config: SchedulerConfig {
            max_sleep_ms: 200,
            ..SchedulerConfig::default()
        },
        worker_id: "unconnected".into(),
    };
    let running = scheduler.spawn(stop.clone());
    // An every-second schedule would have claimed two or three ticks by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    running.await.unwrap();
    let claimed: i64 = tokio::task::spawn_blocking(move || {
        use conveyor_schema::db::schedule_ticks;
        schedule_ticks::table
            .count()
            .get_result(&mut db.conn())
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(claimed, 0, "ticks claimed that could not be published");
}
