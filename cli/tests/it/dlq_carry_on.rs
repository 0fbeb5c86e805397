//! `conveyor dlq replay|discard --all-matching`: a run that stops part-way
//! (the database failing, Ctrl-C) names its cursor, and `--after` carries on
//! from it, neither skipping nor repeating a record, also when it stopped
//! before its first record with `--since` an age; a record the database
//! refuses is reported and passed over instead of stopping the run; `--after`
//! without `--all-matching` is refused.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::Duration;

use diesel::PgConnection;
use diesel::connection::SimpleConnection;
use serde_json::json;
use uuid::Uuid;

use crate::dlq::{cli, cli_command, error_line, insert_dead, stdout};
use crate::dlq_bulk::footprint;
use crate::harness::TestApp;

const REPLAYS: &str = "SELECT count(*) AS n FROM jobs WHERE replay_of IS NOT NULL";
const DISCARDED: &str = "SELECT count(*) AS n FROM dead_jobs WHERE discarded_at IS NOT NULL";

/// What a stopped run's error line says before its cursor.
const CARRY_ON: &str = "; carry on with the same flags and --after ";

/// Dead `diag.fail` records with a replayable envelope, the g-th (from 1) dead
/// at `2026-03-01T00:00:00Z` + g ms, so their order is known.
async fn dead_with_envelopes(app: &TestApp, n: usize) {
    let envelope = conveyor_schema::Envelope::new("diag.fail", json!({"permanent": true}));
    let envelope = serde_json::to_string(&envelope).unwrap();
    let made = app
        .count(&format!(
            "WITH made AS (INSERT INTO dead_jobs (id, task, queue, reason, source, dead_at, envelope) \
             SELECT gen_random_uuid(), 'diag.fail', 'default', 'boom', 'worker', \
                    timestamptz '2026-03-01T00:00:00Z' + g * interval '1 millisecond', '{envelope}'::jsonb \
             FROM generate_series(1, {n}) g RETURNING 1) SELECT count(*) AS n FROM made"
        ))
        .await;
    assert_eq!(made, n as i64);
}

/// The `WHEN` condition of a trigger on the g-th record of [`dead_with_envelopes`].
fn the_nth(g: usize) -> String {
    format!("OLD.dead_at = timestamptz '2026-03-01T00:00:00Z' + {g} * interval '1 millisecond'")
}

/// Makes the database fail every change to the records `when` names, with
/// `raise` (a PL/pgSQL statement), until the returned connection runs
/// [`let_through`].
fn fail_updates(app: &TestApp, when: &str, raise: &str) -> PgConnection {
    let mut conn = app.db.conn();
    conn.batch_execute(&format!(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN {raise}; RETURN NEW; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON dead_jobs FOR EACH ROW
             WHEN ({when}) EXECUTE FUNCTION refuse();"
    ))
    .unwrap();
    conn
}

/// As a database that turned read-only (a failover) fails a write: SQLSTATE
/// 25006, which is not about the record, so it stops a run.
const READ_ONLY: &str = "RAISE EXCEPTION 'the test fails this write' \
                         USING ERRCODE = 'read_only_sql_transaction'";

/// As PostgreSQL refuses a value too long for its column: SQLSTATE 22001,
/// about the record's data.
const TOO_LONG: &str = "RAISE EXCEPTION 'the test refuses this record' \
                        USING ERRCODE = 'string_data_right_truncation'";

fn let_through(mut conn: PgConnection) {
    conn.batch_execute("DROP TRIGGER refuse ON dead_jobs")
        .unwrap();
}

/// The cursor of a stopped run's error line, which starts with `stopped`.
fn cursor_of(error: &str, stopped: &str) -> String {
    assert!(error.starts_with(stopped), "{error}");
    let (_, cursor) = error
        .split_once(CARRY_ON)
        .unwrap_or_else(|| panic!("no cursor: {error}"));
    cursor.to_owned()
}

/// Runs `args` (an `--all-matching` run over 1 004 records) while the
/// database fails writes to the 1 002nd, the second of a second batch of
/// 1 000: it stops there, in one error line that starts with `stopped`,
/// names the cause and the cursor, and has handled the 1 001 before it
/// (`done` lines on stdout). Returns that cursor.
async fn stopped_at_the_1002nd(app: &TestApp, args: &[&str], stopped: &str, done: &str) -> String {
    let failing = fail_updates(app, &the_nth(1_002), READ_ONLY);
    let output = cli(app, args);
    let error = error_line(&output);
    assert!(error.contains("the test fails this write"), "{error}");
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(out.matches(done).count(), 1_001, "{out}");
    let_through(failing);
    cursor_of(&error, stopped)
}

/// A forced `conveyor dlq replay --all-matching` whose second batch fails
/// part-way (the database, turned read-only, fails to record its second
/// record's replay) stops there: one error line naming the records done and
/// the cursor past the last one handled. Carried on with `--after` that
/// cursor (still forced), it replays the rest: every record replayed exactly
/// once, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_replay_stopped_part_way_carries_on_with_after() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let many = 1_004;
    dead_with_envelopes(&app, many).await;
    let replay = [
        "dlq",
        "replay",
        "--all-matching",
        "--task",
        "diag.fail",
        "--force",
    ];
    let cursor = stopped_at_the_1002nd(
        &app,
        &replay,
        "conveyor: replay --all-matching stopped after 1001 records: ",
        "replayed as job",
    )
    .await;
    assert_eq!(app.count(REPLAYS).await, 1_001);

    let rest = cli(&app, &[&replay[..], &["--after", &cursor]].concat());
    let out = stdout(&rest);
    assert_eq!(out.matches("replayed as job").count(), 3, "{out}");
    assert_eq!(app.count(REPLAYS).await, many as i64);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM dead_jobs WHERE replay_count <> 1")
            .await,
        0,
        "every record replayed exactly once"
    );
}

/// The same for `conveyor dlq discard --all-matching`: stopped at the failed
/// record, carried on with `--after`, every record discarded and audited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_discard_stopped_part_way_carries_on_with_after() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let many = 1_004;
    dead_with_envelopes(&app, many).await;
    let discard = ["dlq", "discard", "--all-matching", "--queue", "default"];
    let cursor = stopped_at_the_1002nd(
        &app,
        &discard,
        "conveyor: discard --all-matching stopped after 1001 records: ",
        ": discarded",
    )
    .await;
    let rest = cli(&app, &[&discard[..], &["--after", &cursor]].concat());
    let out = stdout(&rest);
    assert_eq!(out.matches(": discarded").count(), 3, "{out}");
    assert_eq!(app.count(DISCARDED).await, many as i64);
    for counted in ["*", "DISTINCT dead_job_id"] {
        assert_eq!(
            app.count(&format!(
                "SELECT count({counted}) AS n FROM dead_job_actions WHERE action = 'discard'"
            ))
            .await,
            many as i64,
            "each record discarded and audited once"
        );
    }
}

/// A run with `--since` an age that stops before its first record (the
/// database failing on it) names a cursor that keeps that `since`: carried on
/// once the older record has aged past `--since`, read again, it discards both.
/// (The cursor once held no position, and the carrying on read `--since 5s`
/// anew, skipping the older record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_before_its_first_record_keeps_its_since() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let ago = |ms: i64| (chrono::Utc::now() - chrono::Duration::milliseconds(ms)).to_rfc3339();
    let (older, newer) = (ago(3_500), ago(1_000));
    let ids = insert_dead(
        &app,
        &[("diag.fail", "boom", &older), ("diag.fail", "boom", &newer)],
    )
    .await;
    let discard = ["dlq", "discard", "--all-matching", "--since", "5s"];
    let failing = fail_updates(&app, &format!("OLD.id = '{}'", ids[0]), READ_ONLY);
    let error = error_line(&cli(&app, &discard));
    let cursor = cursor_of(
        &error,
        "conveyor: discard --all-matching stopped after 0 records: ",
    );
    let_through(failing);
    assert_eq!(app.count(DISCARDED).await, 0);
    // The older record is now more than 5 s old.
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let rest = stdout(&cli(&app, &[&discard[..], &["--after", &cursor]].concat()));
    for id in &ids {
        assert!(rest.contains(&format!("{id}: discarded")), "{id}: {rest}");
    }
    assert_eq!(app.count(DISCARDED).await, 2);
}

/// A record the database refuses for its data (SQLSTATE 22001, twice, while
/// it answers other queries) does not stop a run: it is named on stderr, the
/// records after it are handled, and the run ends counting it as failed.
/// (It once stopped the run, and carrying on stopped at it again, for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_database_refuses_is_passed_over() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    dead_with_envelopes(&app, 3).await;
    let refusing = fail_updates(&app, &the_nth(2), TOO_LONG);

    let discard = cli(&app, &["dlq", "discard", "--all-matching"]);
    assert_eq!(
        error_line(&discard),
        "conveyor: 1 of 3 discards failed",
        "{}",
        String::from_utf8_lossy(&discard.stderr)
    );
    let stderr = String::from_utf8_lossy(&discard.stderr);
    assert!(stderr.contains("the test refuses this record"), "{stderr}");
    assert_eq!(app.count(DISCARDED).await, 2, "the third record too");

    let replay = cli(&app, &["dlq", "replay", "--all-matching", "--force"]);
    assert_eq!(error_line(&replay), "conveyor: 1 of 3 replays failed");
    assert_eq!(app.count(REPLAYS).await, 2, "the third record too");
    let_through(refusing);
}

/// A failure that may be about the record but does not strike twice (here:
/// the first write to the second record only) is tried once more, and the
/// record handled: the run ends with every record done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_that_does_not_strike_twice_is_tried_again() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    dead_with_envelopes(&app, 3).await;
    app.db
        .conn()
        .batch_execute("CREATE SEQUENCE refusals")
        .unwrap();
    // `nextval` is not rolled back with the failed write: only the first refuses.
    let once = format!("IF nextval('refusals') = 1 THEN {TOO_LONG}; END IF");
    let refusing = fail_updates(&app, &the_nth(2), &once);
    let out = stdout(&cli(&app, &["dlq", "discard", "--all-matching"]));
    assert_eq!(out.matches(": discarded").count(), 3, "{out}");
    assert_eq!(app.count(DISCARDED).await, 3);
    let_through(refusing);
}

/// Runs `args` until `lines` lines of stdout contain `done`, then sends it
/// Ctrl-C (SIGINT); returns its whole stdout and its one error line.
fn interrupted_after(app: &TestApp, args: &[&str], done: &str, lines: usize) -> (String, String) {
    let mut child = cli_command(app, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run conveyor");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut out = String::new();
    while out.matches(done).count() < lines {
        assert!(stdout.read_line(&mut out).unwrap() > 0, "{out}");
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    stdout.read_to_string(&mut out).unwrap();
    let mut stderr = Vec::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    let output = std::process::Output {
        status: child.wait().unwrap(),
        stdout: out.clone().into_bytes(),
        stderr,
    };
    (out, error_line(&output))
}

/// Ctrl-C stops a `conveyor dlq replay --all-matching` before its next record,
/// in one line naming the cursor past the last one handled; carried on with
/// `--after` it, every record is replayed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_replay_stopped_by_ctrl_c_carries_on_with_after() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let many = 40;
    dead_with_envelopes(&app, many).await;
    let replay = [
        "dlq",
        "replay",
        "--all-matching",
        "--force",
        "--rate",
        "20/s",
    ];
    let (first, error) = interrupted_after(&app, &replay, "replayed as job", 5);
    let done = first.matches("replayed as job").count();
    assert!(done < many, "Ctrl-C came too late: {first}");
    let cursor = cursor_of(
        &error,
        &format!(
            "conveyor: replay --all-matching stopped after {done} records: interrupted (Ctrl-C)"
        ),
    );
    assert_eq!(app.count(REPLAYS).await, done as i64);

    let rest = cli(&app, &[&replay[..], &["--after", &cursor]].concat());
    let out = stdout(&rest);
    assert_eq!(out.matches("replayed as job").count(), many - done, "{out}");
    assert_eq!(app.count(REPLAYS).await, many as i64);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM dead_jobs WHERE replay_count <> 1")
            .await,
        0,
        "every record replayed exactly once"
    );
}

/// Ctrl-C while the next record waits for its turn at `--rate` (here 2 s)
/// stops the run at once, before that record: one replayed, "after 1 record".
/// (It once waited out the turn and replayed that record first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_a_rate_wait_replays_no_more() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    dead_with_envelopes(&app, 3).await;
    let replay = ["dlq", "replay", "--all-matching", "--rate", "0.5/s"];
    let (out, error) = interrupted_after(&app, &replay, "replayed as job", 1);
    assert_eq!(out.matches("replayed as job").count(), 1, "{out}");
    cursor_of(
        &error,
        "conveyor: replay --all-matching stopped after 1 record: interrupted (Ctrl-C)",
    );
    assert_eq!(app.count(REPLAYS).await, 1);
}

/// `--after` says where an `--all-matching` run stopped: with ids, or alone,
/// it is refused in one line, and nothing is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_after_without_all_matching() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    dead_with_envelopes(&app, 1).await;
    let id = Uuid::now_v7().to_string();
    let cursor = "1772323200000000";
    for args in [
        vec!["dlq", "replay", &id, "--after", cursor],
        vec!["dlq", "replay", "--after", cursor],
        vec!["dlq", "discard", &id, "--after", cursor],
        vec!["dlq", "discard", "--after", cursor],
    ] {
        let error = error_line(&cli(&app, &args));
        assert_eq!(
            error,
            "conveyor: --after carries on an --all-matching run: give it with --all-matching \
             and that run's filter flags, not ids",
            "{args:?}"
        );
    }
    assert_eq!(footprint(&app).await, [0, 0, 0]);
}
