//! The dashboard in a real headless browser: sign in, load every page (the
//! queues page with its per-minute rates), replay a dead job by clicking and
//! see the replay succeed; a screenshot of each page goes to
//! `<target>/tmp/dashboard-screenshots/`. The other tests read pages over
//! plain HTTP: the jobs page's newest-first search, the schedules in force,
//! the discard flash, the dead-jobs listing's columns, and workers judged by
//! the database's clock.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use conveyor_platform::schedule::{CatchUp, ScheduleConfig};

use crate::harness::{AMQP_URL, PG_SERVER, TestApp, wait_until};
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
        // Returned unstarted, it is dead-lettered only without resets.
        config.amqp.delivery_limit_resets = 0;
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

    for (page, empty) in [
        ("campaigns", "No campaigns yet."),
        // The test config turns the built-in schedules off and adds none.
        ("schedules", "No schedules in force."),
    ] {
        browser.goto(&app.url(&format!("/dashboard/{page}"))).await;
        let text = browser.text("#empty").await;
        assert_eq!(text, empty);
        browser.screenshot(&shot(page)).await;
    }
    wait_until(WAIT, || async { shot("schedules").exists() }).await;
}

/// The jobs page's rows, as (id, task), in the order shown.
async fn listed_jobs(app: &TestApp, query: &str) -> Vec<(String, String)> {
    let html = app
        .client_with(&app.admin_key)
        .get(app.url(&format!("/dashboard/jobs?fragment=1{query}")))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap();
    html.split("<tr><td>")
        .skip(1)
        .map(|row| {
            let mut cells = row.split("</td><td>");
            let id = cells.next().unwrap().to_owned();
            (id, cells.next().unwrap().to_owned())
        })
        .collect()
}

/// What sorting the whole table gives: the newest 50 ids matching `filter`.
fn newest_by_full_sort(app: &TestApp, filter: &str) -> Vec<String> {
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
    }
    use diesel::RunQueryDsl;
    diesel::sql_query(format!(
        "SELECT id::text AS id FROM jobs WHERE {filter} ORDER BY enqueued_at DESC LIMIT 50"
    ))
    .load::<Id>(&mut app.db.conn())
    .unwrap()
    .into_iter()
    .map(|row| row.id)
    .collect()
}

/// The jobs page looks at recent rows first and widens its window only when
/// that holds less than a page, so it must still list exactly what a sort of
/// the whole table gives: newest first, including a job whose enqueuer's clock
/// runs ahead of the database's, and old jobs when nothing recent matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_page_lists_the_newest_jobs_first_however_old() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    use diesel::RunQueryDsl;
    let insert = |task: &str, enqueued: &str, updated: &str, count: i32| {
        diesel::sql_query(format!(
            "INSERT INTO jobs (id, task, queue, state, args, max_attempts, enqueued_at, updated_at)
             SELECT gen_random_uuid(), '{task}', 'default', 'succeeded', '{{}}', 1, {enqueued}, {updated}
             FROM generate_series(1, {count}) i"
        ))
        .execute(&mut app.db.conn())
        .unwrap();
    };
    let seconds_ago = "now() - i * interval '1 second'";
    let days_ago = "now() - interval '2 days' - i * interval '1 second'";
    insert("diag.noop", seconds_ago, seconds_ago, 60);
    insert("diag.fail", days_ago, days_ago, 3);
    // Enqueued 30.5 s ago by its enqueuer's clock, recorded 70 s ago by the database's.
    insert(
        "diag.sleep",
        "now() - interval '30.5 seconds'",
        "now() - interval '70 seconds'",
        1,
    );

    let all = listed_jobs(&app, "").await;
    assert_eq!(all.len(), 50);
    assert!(all.iter().any(|(_, task)| task == "diag.sleep"), "{all:?}");
    let ids: Vec<String> = all.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, newest_by_full_sort(&app, "true"));

    let old = listed_jobs(&app, "&task=diag.fail").await;
    let ids: Vec<String> = old.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(ids, newest_by_full_sort(&app, "task = 'diag.fail'"));

    // A full page of recent jobs hides the old ones, also when filtered by state.
    let succeeded = listed_jobs(&app, "&state=succeeded").await;
    assert!(succeeded.iter().all(|(_, task)| task != "diag.fail"));
    let ids: Vec<String> = succeeded.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, newest_by_full_sort(&app, "state = 'succeeded'"));
}

/// Filtered to a rare state, `running`, the jobs page finds its few rows
/// through `jobs_running_or_dead` rather than by reading the whole table
/// (no recent window holds a page of them, so the search ends unbounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_page_finds_running_jobs_through_their_index() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    use diesel::RunQueryDsl;
    use diesel::connection::SimpleConnection;
    app.db
        .conn()
        .batch_execute(
            "INSERT INTO jobs (id, task, queue, state, args, max_attempts, enqueued_at, updated_at)
             SELECT gen_random_uuid(), 'diag.noop', 'default',
                    CASE WHEN i % 5000 = 0 THEN 'running' ELSE 'succeeded' END, '{}', 1,
                    now() - interval '2 days' - i * interval '1 second',
                    now() - interval '2 days' - i * interval '1 second'
             FROM generate_series(1, 20000) i;
             ANALYZE jobs;",
        )
        .unwrap();
    let index_scans = || {
        #[derive(diesel::QueryableByName)]
        struct Scans {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            idx_scan: i64,
        }
        diesel::sql_query(
            "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'jobs_running_or_dead'",
        )
        .get_result::<Scans>(&mut app.db.conn())
        .unwrap()
        .idx_scan
    };
    let before = index_scans();

    let running = listed_jobs(&app, "&state=running").await;
    let ids: Vec<String> = running.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids, newest_by_full_sort(&app, "state = 'running'"));
    // A backend reports its index scans within about ten seconds of going idle.
    wait_until(WAIT, || async { index_scans() > before }).await;
}

/// `path`'s page as the admin sees it, after any redirect.
pub(crate) async fn page(app: &TestApp, path: &str) -> String {
    app.client
        .get(app.url(path))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The row of `<tr id="{id}">` in `html`.
fn row<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html
        .find(&format!("<tr id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no row {id} in {html}"));
    let rest = &html[start..];
    &rest[..rest.find("</tr>").unwrap()]
}

/// Runs `sql` in the test database as the `postgres` superuser.
fn execute(url: &str, sql: &str) {
    use diesel::Connection;
    use diesel::connection::SimpleConnection;
    diesel::PgConnection::establish(url)
        .unwrap()
        .batch_execute(sql)
        .unwrap();
}

/// The schedules page lists the schedules in force, as `GET /v1/schedules`
/// does: the built-in ones and the configured ones, each with its last tick
/// and that tick's job once it fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedules_page_shows_the_schedules_in_force_and_their_last_tick() {
    let mut app = TestApp::spawn_with(0, |config| {
        config.stats.default_schedules = true;
        config.schedules.push(ScheduleConfig {
            name: "often".into(),
            cron: "* * * * * *".into(),
            task: "diag.noop".into(),
            args: json!({}),
            timezone: "UTC".into(),
            catch_up: CatchUp::Skip,
        });
    })
    .await;
    let html = page(&app, "/dashboard/schedules").await;
    for name in [
        "stats.rollup_hourly",
        "stats.rollup_daily",
        "stats.retention",
    ] {
        let shown = row(&html, &format!("schedule-{name}"));
        assert!(shown.contains(name), "{shown}");
    }
    let often = row(&html, "schedule-often");
    assert!(
        often.contains("* * * * * *") && often.contains("diag.noop"),
        "{often}"
    );
    assert!(often.contains("never"), "not fired yet: {often}");

    app.start_worker().await;
    wait_until(WAIT, || async {
        app.count("SELECT count(*) AS n FROM schedule_ticks WHERE schedule = 'often' AND published_at IS NOT NULL")
            .await
            > 0
    })
    .await;
    app.stop_workers().await;
    #[derive(diesel::QueryableByName)]
    struct Last {
        #[diesel(sql_type = diesel::sql_types::Text)]
        tick_at: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        job_id: String,
    }
    use diesel::RunQueryDsl;
    let last = diesel::sql_query(
        "SELECT to_char(tick_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS tick_at, job_id::text AS job_id \
         FROM schedule_ticks WHERE schedule = 'often' ORDER BY tick_at DESC LIMIT 1",
    )
    .get_result::<Last>(&mut app.db.conn())
    .unwrap();
    let html = page(&app, "/dashboard/schedules?fragment=1").await;
    let often = row(&html, "schedule-often");
    assert!(
        often.contains(&last.tick_at) && often.contains(&last.job_id),
        "last tick {} (job {}) not shown: {often}",
        last.tick_at,
        last.job_id
    );
}

/// Discarding from the dashboard says what happened: a record discarded
/// now, one already discarded, and one that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_from_the_dashboard_says_what_happened() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let dead = Uuid::now_v7();
    execute(
        &app.db.url,
        &format!(
            "INSERT INTO dead_jobs (id, task, queue, reason, source) \
             VALUES ('{dead}', 'diag.noop', 'default', 'gave up', 'worker')"
        ),
    );
    let discard = |id: Uuid| {
        let app = &app;
        async move {
            let html = app
                .client
                .post(app.url(&format!("/dashboard/dead/{id}/discard")))
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .text()
                .await
                .unwrap();
            let start = html.find("id=\"flash\">").expect("a flash") + "id=\"flash\">".len();
            html[start..start + html[start..].find("</p>").unwrap()].to_owned()
        }
    };
    assert_eq!(discard(dead).await, format!("Discarded {dead}."));
    assert_eq!(
        discard(dead).await,
        format!("{dead} was already discarded; nothing done.")
    );
    let unknown = Uuid::now_v7();
    assert_eq!(
        discard(unknown).await,
        format!("No dead job {unknown}; nothing done.")
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM dead_job_actions WHERE dead_job_id = '{dead}'"
        ))
        .await,
        1
    );
}

/// Drops a login role once the test (and its database) is gone.
struct Role(String);

impl Drop for Role {
    fn drop(&mut self) {
        execute(
            &format!("{PG_SERVER}/postgres"),
            &format!("DROP ROLE IF EXISTS {}", self.0),
        );
    }
}

/// The dead-jobs page refreshes every 3 s with up to 200 records, so it reads
/// only the columns it shows, never a record's envelope (up to ~1 MiB), body,
/// errors or `x-death`: an ingress whose database role may not read those
/// columns still lists the record, and only its detail page is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_jobs_page_reads_only_the_columns_it_shows() {
    let role = Role(format!(
        "dash_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    ));
    let name = role.0.clone();
    let app = TestApp::spawn_with(0, |config| {
        let url = conveyor_platform::config::database_url(config);
        execute(
            &url,
            &format!(
                "CREATE ROLE {name} LOGIN;
                 GRANT USAGE, CREATE ON SCHEMA public TO {name};
                 GRANT ALL ON ALL TABLES IN SCHEMA public TO {name};
                 GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {name};
                 REVOKE SELECT ON dead_jobs FROM {name};
                 GRANT SELECT (id, task, queue, attempts, reason, source, dead_at, replayed_as,
                               replayed_at, discarded_at) ON dead_jobs TO {name};"
            ),
        );
        config.database.url = url
            .replacen("postgres://postgres@", &format!("postgres://{name}@"), 1)
            .into();
    })
    .await;
    let dead = Uuid::now_v7();
    execute(
        &app.db.url,
        &format!(
            "INSERT INTO dead_jobs (id, task, queue, envelope, attempts, errors, reason, source) \
             VALUES ('{dead}', 'diag.fail', 'default', jsonb_build_object('pad', repeat('x', 1000000)), \
                     3, '[{{\"attempt\": 3, \"error\": \"boom\"}}]', 'gave up after 3 attempts', 'worker')"
        ),
    );
    let html = page(&app, "/dashboard/dead?fragment=1").await;
    let listed = row(&html, &format!("dead-{dead}"));
    for shown in ["diag.fail", "default", "gave up after 3 attempts", "worker"] {
        assert!(listed.contains(shown), "{shown} missing: {listed}");
    }
    assert!(!html.contains("xxxx"), "the envelope is not shown");
    // The control: the detail page reads the envelope, which this role may not.
    let detail = app
        .client
        .get(app.url(&format!("/dashboard/dead/{dead}")))
        .send()
        .await
        .unwrap();
    assert_eq!(detail.status(), 503);
}

/// The workers page judges a heartbeat by the database's clock, which stamps
/// it, not by the ingress's: with the database's clock an hour behind the
/// ingress's, a worker seen just now is live and one silent past
/// `monitor.worker_gone_after_ms` is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_page_judges_heartbeats_by_the_database_clock() {
    let app = TestApp::spawn_with(0, |config| {
        // Every new session of the test database reads `now()` an hour behind.
        let url = conveyor_platform::config::database_url(config);
        let database = url
            .rsplit('/')
            .next()
            .unwrap()
            .split('?')
            .next()
            .unwrap()
            .to_owned();
        execute(
            &url,
            &format!(
                "CREATE SCHEMA clock;
                 CREATE FUNCTION clock.now() RETURNS timestamptz LANGUAGE sql STABLE
                     AS $$ SELECT pg_catalog.now() - interval '1 hour' $$;
                 ALTER DATABASE {database} SET search_path = public, clock, pg_catalog;"
            ),
        );
    })
    .await;
    let gone_after_ms = app.config.monitor.worker_gone_after_ms;
    execute(
        &app.db.url,
        &format!(
            "INSERT INTO workers (id, host, pid, version, started_at, queues, in_flight, last_seen_at) VALUES
                 ('w-live', 'h', 1, 'v', now(), '{{default}}', 0, now()),
                 ('w-gone', 'h', 2, 'v', now(), '{{default}}', 0,
                  now() - make_interval(secs => {gone_after_ms} / 1000.0 + 60))"
        ),
    );
    let html = page(&app, "/dashboard/workers?fragment=1").await;
    let status = |id: &str| {
        let start = html
            .find(&format!("<td>{id}</td>"))
            .unwrap_or_else(|| panic!("{id}: {html}"));
        html[start..]
            .split("</td>")
            .nth(1)
            .unwrap()
            .rsplit('>')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(status("w-live"), "live");
    assert_eq!(status("w-gone"), "gone");
}
