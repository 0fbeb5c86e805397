//! Retention at volume: a backlog beyond what the old cap of 1 000 batches per
//! run could delete goes in one run; a run stops when its `max_seconds` are up
//! and the next carries on; and a stats statement whose caller gave up (its
//! attempt timed out) is cancelled instead of running on unseen.

use std::time::Duration;

use conveyor_schema::pool::{pool, run_cancel_on_drop};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::json;

use crate::harness::{PlanJson, TestApp, TestDb, assert_reads_only};
use crate::stats::{execute, insert_jobs, run};

/// Finished jobs older than the 30 days these tests keep.
async fn old_finished(app: &TestApp) -> i64 {
    app.count(
        "SELECT count(*) AS n FROM jobs WHERE state IN ('succeeded', 'dead') \
           AND finished_at < date_trunc('day', now(), 'UTC') - interval '30 days'",
    )
    .await
}

const FORTY_DAYS_AGO: &str = "date_trunc('day', now(), 'UTC') - interval '40 days'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_retention_run_works_off_a_backlog_of_more_than_a_thousand_batches() {
    let app = TestApp::spawn_with(1, |_| {}).await;
    insert_jobs(&app, 1_400, FORTY_DAYS_AGO, 86_400, 3).await;
    let before = old_finished(&app).await;
    assert!(before > 1_000, "{before} old finished jobs");

    run(
        &app,
        "stats.retention",
        json!({"max_age_days": 30, "batch": 1}),
    )
    .await;

    assert_eq!(old_finished(&app).await, 0, "of {before}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_run_stops_when_its_seconds_are_up_and_the_next_one_carries_on() {
    let app = TestApp::spawn_with(1, |_| {}).await;
    insert_jobs(&app, 600, FORTY_DAYS_AGO, 86_400, 5).await;
    // Each deleted job costs 5 ms, so two seconds delete at most 400 of them.
    execute(
        &app,
        "CREATE FUNCTION slow_delete() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(0.005); RETURN OLD; END $$; \
         CREATE TRIGGER slow_delete BEFORE DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION slow_delete()",
    )
    .await;
    let before = old_finished(&app).await;

    run(
        &app,
        "stats.retention",
        json!({"max_age_days": 30, "batch": 1, "max_seconds": 2}),
    )
    .await;
    let left = old_finished(&app).await;
    assert!(
        left > 0 && left < before,
        "{left} of {before} left after a two-second run"
    );
    // The day was sealed (rolled up from all its rows) before any went.
    let sealed_with = app
        .count(
            "SELECT coalesce(sum(succeeded + dead), 0)::bigint AS n FROM job_stats_daily \
             WHERE bucket = date_trunc('day', now(), 'UTC') - interval '40 days'",
        )
        .await;
    assert_eq!(sealed_with, before);

    execute(&app, "DROP TRIGGER slow_delete ON jobs").await;
    run(&app, "stats.retention", json!({"max_age_days": 30})).await;
    assert_eq!(old_finished(&app).await, 0);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM stats_sealed_days")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_call_whose_caller_gave_up_is_cancelled_statement_after_statement() {
    let db = TestDb::create();
    let pool = pool(&db.url, 3);
    let (outcomes, outcome) = std::sync::mpsc::channel();
    let call = run_cancel_on_drop(&pool, move |conn| {
        // Work that ignores a failed statement and goes on: its next one must
        // be cancelled too.
        let first = diesel::sql_query("SELECT pg_sleep(30) /* abandoned */").execute(conn);
        let second = diesel::sql_query("SELECT pg_sleep(31) /* abandoned */").execute(conn);
        let _ = outcomes.send((first.is_err(), second.is_err()));
        second
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .is_err(),
        "the call ended before its caller gave up"
    );

    let (first_failed, second_failed) = tokio::task::spawn_blocking(move || {
        outcome
            .recv_timeout(Duration::from_secs(5))
            .expect("the abandoned statements still ran 5 s after the caller gave up")
    })
    .await
    .unwrap();
    assert!(first_failed && second_failed);
    let mut conn = PgConnection::establish(&db.url).unwrap();
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let running = diesel::sql_query(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE query LIKE '%abandoned%' AND state = 'active' AND pid <> pg_backend_pid()",
    )
    .get_result::<Count>(&mut conn)
    .unwrap();
    assert_eq!(running.n, 0);
    // The pool's connections are fine for the next caller.
    let next = conveyor_schema::pool::run(&pool, |conn| {
        diesel::sql_query("SELECT pg_sleep(0.2)").execute(conn)
    })
    .await;
    assert!(next.is_ok(), "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_the_days_to_seal_reads_a_few_index_entries_per_day_not_every_old_row() {
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut conn = db.conn();
        // 20 000 finished jobs over two old days, and one more old day of
        // webhook events only.
        conn.batch_execute(
            "INSERT INTO jobs (id, task, queue, state, args, attempts, max_attempts, enqueued_at, started_at, finished_at)
             SELECT gen_random_uuid(), 'diag.noop', 'default', 'succeeded', '{}', 1, 5, f, f, f
             FROM (SELECT date_trunc('day', now(), 'UTC') - interval '41 days' + g * interval '8 seconds' AS f
                   FROM generate_series(1, 20000) g) s;
             INSERT INTO webhook_events (source, webhook_id, outcome, recorded_at)
             SELECT 'members', 'msg_' || g, 'applied', date_trunc('day', now(), 'UTC') - interval '35 days' + g * interval '1 minute'
             FROM generate_series(1, 500) g;",
        )
        .unwrap();
        conn.batch_execute("VACUUM ANALYZE jobs").unwrap();
        conn.batch_execute("VACUUM ANALYZE webhook_events").unwrap();
        conn.batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
            .unwrap();
        let cutoff = "date_trunc('day', now(), 'UTC') - interval '30 days'";
        let statement = conveyor_tasks::stats::days_to_seal_statement();
        let plan: PlanJson = diesel::sql_query(format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) {}",
            statement.replace("$1", cutoff)
        ))
        .get_result(&mut conn)
        .unwrap();
        assert_reads_only(&plan, "jobs", "jobs_finished_at", 3.0);
        assert_reads_only(&plan, "webhook_events", "webhook_events_recorded_at", 2.0);

        #[derive(QueryableByName, Debug, PartialEq)]
        struct Day {
            #[diesel(sql_type = diesel::sql_types::Text)]
            day: String,
        }
        let days: Vec<Day> = diesel::sql_query(format!(
            "SELECT to_char(day AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day FROM ({}) s",
            statement.replace("$1", cutoff)
        ))
        .load(&mut conn)
        .unwrap();
        let expected: Vec<Day> = diesel::sql_query(format!(
            "SELECT DISTINCT to_char(day AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day FROM ( \
               SELECT date_trunc('day', finished_at, 'UTC') AS day FROM jobs WHERE finished_at < {cutoff} \
               UNION SELECT date_trunc('day', recorded_at, 'UTC') FROM webhook_events WHERE recorded_at < {cutoff}) s \
             ORDER BY 1"
        ))
        .load(&mut conn)
        .unwrap();
        assert_eq!(days.len(), 3, "{days:?}");
        assert_eq!(days, expected);
    })
    .await
    .unwrap();
}
