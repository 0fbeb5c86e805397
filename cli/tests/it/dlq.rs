//! `conveyor dlq …` and `/v1/admin/dead-jobs…`: list, show, replay (once unless
//! forced, with edited args validated), discard, and the audit of each.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{AMQP_URL, TestApp, problem};

const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn cli(app: &TestApp, args: &[&str]) -> Output {
    cli_command(app, args).output().expect("run conveyor")
}

/// `conveyor ARGS` against `app`'s database, broker and namespace, not yet run.
pub(crate) fn cli_command(app: &TestApp, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_conveyor"));
    command
        .args(args)
        .env_clear()
        .env("CONVEYOR_DATABASE_URL", &app.db.url)
        .env("CONVEYOR_AMQP_URL", AMQP_URL)
        .env("CONVEYOR_NAMESPACE", &app.config.namespace)
        .env("CONVEYOR_LOG_LEVEL", "warn");
    command
}

pub(crate) fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The one `conveyor: …` line of a failed command's stderr (the rest is its log).
pub(crate) fn error_line(output: &Output) -> String {
    assert!(!output.status.success(), "it succeeded");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("conveyor: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_owned()
}

async fn dead_job(app: &TestApp) -> Uuid {
    let id = app.enqueue("diag.fail", json!({})).await;
    app.wait_for_state(id, "dead", WAIT).await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_shows_replays_once_and_discards() {
    let app = TestApp::spawn().await;
    let dead = dead_job(&app).await;
    let other = dead_job(&app).await;
    let id = dead.to_string();

    let listed = stdout(&cli(&app, &["dlq", "list", "--task", "diag.fail"]));
    assert!(
        listed.contains(&id) && listed.contains(&other.to_string()),
        "{listed}"
    );
    let none = stdout(&cli(&app, &["dlq", "list", "--task", "diag.noop"]));
    assert!(!none.contains(&id), "{none}");
    let by_error = stdout(&cli(
        &app,
        &[
            "dlq",
            "list",
            "--error-contains",
            "GAVE UP",
            "--since",
            "10m",
        ],
    ));
    assert!(by_error.contains(&id), "{by_error}");

    let shown = stdout(&cli(&app, &["dlq", "show", &id]));
    assert!(shown.contains("failing attempt 5"), "{shown}");
    assert!(shown.contains("failing attempt 1"), "{shown}");

    // Edited args are validated like a new job's.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"until_attempt": "soon"}"#).unwrap();
    let refused = cli(
        &app,
        &["dlq", "replay", &id, "--set-args", bad.to_str().unwrap()],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("/args/until_attempt"),
        "{refused:?}"
    );

    let dry = stdout(&cli(&app, &["dlq", "replay", &id, "--dry-run"]));
    assert!(dry.contains("would replay diag.fail"), "{dry}");

    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"until_attempt": 1}"#).unwrap();
    let replayed = stdout(&cli(
        &app,
        &[
            "dlq",
            "replay",
            &id,
            "--set-args",
            good.to_str().unwrap(),
            "--actor",
            "alice",
        ],
    ));
    let new_id: Uuid = replayed
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{replayed}"));
    let job = app.wait_for_state(new_id, "succeeded", WAIT).await;
    assert_eq!((job.replay_of, job.attempts), (Some(dead), 1));

    let again = stdout(&cli(&app, &["dlq", "replay", &id]));
    assert!(again.contains("already replayed"), "{again}");
    let forced = stdout(&cli(&app, &["dlq", "replay", &id, "--force"]));
    assert!(forced.contains("replayed as job"), "{forced}");

    let discarded = stdout(&cli(&app, &["dlq", "discard", &other.to_string()]));
    assert!(discarded.contains("discarded"), "{discarded}");
    let listed = stdout(&cli(&app, &["dlq", "list"]));
    assert!(!listed.contains(&other.to_string()), "{listed}");

    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM dead_job_actions WHERE dead_job_id = '{id}' AND action = 'replay'"
        ))
        .await,
        2
    );
    assert_eq!(
        app.count("SELECT count(*) AS n FROM dead_job_actions WHERE actor = 'alice'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) AS n FROM dead_job_actions WHERE action = 'discard'")
            .await,
        1
    );
}

/// An id with no dead job is a failure for discard as for replay: a line
/// naming it, a one-line error and a non-zero exit; the other ids still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_discard_of_an_unknown_id_fails_like_replay() {
    let app = TestApp::spawn().await;
    let dead = dead_job(&app).await.to_string();
    let unknown = Uuid::new_v4().to_string();
    let stderr = |output: &Output| String::from_utf8_lossy(&output.stderr).into_owned();

    let replay = cli(&app, &["dlq", "replay", &unknown]);
    assert!(!replay.status.success(), "{replay:?}");
    assert!(stderr(&replay).contains(&unknown), "{replay:?}");

    let discard = cli(&app, &["dlq", "discard", &unknown]);
    assert!(!discard.status.success(), "{discard:?}");
    let err = stderr(&discard);
    assert!(
        err.contains(&format!("{unknown}: no such dead job")),
        "{err}"
    );
    assert!(err.contains("conveyor: 1 of 1 discards failed"), "{err}");
    assert!(
        String::from_utf8_lossy(&discard.stdout).is_empty(),
        "{discard:?}"
    );

    let both = cli(&app, &["dlq", "discard", &unknown, &dead]);
    assert!(!both.status.success(), "{both:?}");
    assert!(
        String::from_utf8_lossy(&both.stdout).contains(&format!("{dead}: discarded")),
        "{both:?}"
    );
    assert!(stderr(&both).contains("1 of 2 discards failed"), "{both:?}");
    assert_eq!(
        app.count("SELECT count(*) AS n FROM dead_job_actions WHERE action = 'discard'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_replays_all_matching_at_a_rate() {
    let app = TestApp::spawn().await;
    let first = dead_job(&app).await;
    let second = dead_job(&app).await;
    let out = stdout(&cli(
        &app,
        &[
            "dlq",
            "replay",
            "--all-matching",
            "--task",
            "diag.fail",
            "--rate",
            "20/s",
        ],
    ));
    assert_eq!(out.matches("replayed as job").count(), 2, "{out}");
    for id in [first, second] {
        assert_eq!(
            app.count(&format!(
                "SELECT count(*) AS n FROM jobs WHERE replay_of = '{id}'"
            ))
            .await,
            1
        );
    }
    let none = stdout(&cli(&app, &["dlq", "replay", "--all-matching"]));
    assert!(!none.contains("replayed as job"), "{none}");
}

async fn admin(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut request = app
        .client
        .request(method.parse().unwrap(), app.url(path))
        .bearer_auth(&app.admin_key)
        .header("x-conveyor-actor", "bob");
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_an_admin_key_and_replays_once() {
    let app = TestApp::spawn().await;
    let dead = dead_job(&app).await;
    let anonymous = reqwest::Client::new()
        .get(app.url("/v1/admin/dead-jobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = app
        .client
        .get(app.url("/v1/admin/dead-jobs"))
        .bearer_auth(format!("cvk_{}_{}", "0".repeat(16), "1".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let list: Value = admin(&app, "GET", "/v1/admin/dead-jobs?task=diag.fail", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["id"], dead.to_string());
    assert_eq!(list[0]["errors"].as_array().unwrap().len(), 5);

    let path = format!("/v1/admin/dead-jobs/{dead}/replay");
    let invalid = admin(&app, "POST", &path, Some(json!({"args": {"nope": 1}}))).await;
    assert_eq!(invalid.status(), 422);
    let replayed: Value = admin(
        &app,
        "POST",
        &path,
        Some(json!({"args": {"until_attempt": 1}})),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(replayed["outcome"], "replayed", "{replayed}");
    let new_id: Uuid = replayed["job_id"].as_str().unwrap().parse().unwrap();
    app.wait_for_state(new_id, "succeeded", WAIT).await;
    let again: Value = admin(&app, "POST", &path, Some(json!({})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["outcome"], "already_replayed");

    let shown: Value = admin(&app, "GET", &format!("/v1/admin/dead-jobs/{dead}"), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["actions"][0]["actor"], "http:bob");
    assert_eq!(shown["replay_count"], 1);

    let discard = admin(
        &app,
        "POST",
        &format!("/v1/admin/dead-jobs/{dead}/discard"),
        None,
    )
    .await;
    assert_eq!(discard.status(), 200);
    let missing = admin(
        &app,
        "POST",
        &format!("/v1/admin/dead-jobs/{}/discard", Uuid::now_v7()),
        None,
    )
    .await;
    assert_eq!(missing.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_closed_to_keys_without_the_admin_scope() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let producer = app.create_key(&["enqueue:*", "campaigns"]).await;
    let response = app
        .client_with(&producer)
        .get(app.url("/v1/admin/dead-jobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

/// A replay whose message the broker may have taken (its publish was nacked)
/// is answered in doubt, naming the job, and records nothing; replaying again
/// makes that same job, which runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_in_doubt_replayed_again_makes_the_same_job() {
    use crate::publish_failures::{nacking_every_publish, replace_queue};
    let mut app = TestApp::spawn().await;
    let dead = dead_job(&app).await;
    app.stop_workers().await;
    let work = app.topology().work_queue("default");
    replace_queue(&work, Some(nacking_every_publish())).await;

    let path = format!("/v1/admin/dead-jobs/{dead}/replay");
    let args = Some(json!({"args": {"until_attempt": 1}}));
    let first = admin(&app, "POST", &path, args.clone()).await;
    assert_eq!(first.status(), 503);
    let problem: Value = first.json().await.unwrap();
    assert_eq!(
        problem["type"], "https://conveyor.dev/problems/in-doubt",
        "{problem}"
    );
    let job: Uuid = problem["job_ids"][0].as_str().unwrap().parse().unwrap();
    assert!(app.job(job).await.is_none());
    let shown: Value = admin(&app, "GET", &format!("/v1/admin/dead-jobs/{dead}"), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["replay_count"], 0, "{shown}");

    // The broker takes messages again (a worker declares the queue afresh).
    replace_queue(&work, None).await;
    app.start_worker().await;
    let replayed: Value = admin(&app, "POST", &path, args).await.json().await.unwrap();
    assert_eq!(replayed["outcome"], "replayed", "{replayed}");
    assert_eq!(replayed["job_id"], job.to_string(), "{replayed}");
    app.wait_for_state(job, "succeeded", WAIT).await;
}

/// Inserts dead records straight into `dead_jobs`: `(task, reason, dead_at)`
/// each, no envelope, returning their ids.
pub(crate) async fn insert_dead(app: &TestApp, rows: &[(&str, &str, &str)]) -> Vec<Uuid> {
    use diesel::prelude::*;
    use diesel::sql_types::{Text, Uuid as SqlUuid};
    let ids: Vec<Uuid> = rows.iter().map(|_| Uuid::new_v4()).collect();
    let rows: Vec<(Uuid, String, String, String)> = ids
        .iter()
        .zip(rows)
        .map(|(id, (task, reason, at))| (*id, (*task).into(), (*reason).into(), (*at).into()))
        .collect();
    let url = app.db.url.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        for (id, task, reason, at) in rows {
            diesel::sql_query(
                "INSERT INTO dead_jobs (id, task, queue, reason, source, dead_at) \
                 VALUES ($1, $2, 'default', $3, 'worker', $4::timestamptz)",
            )
            .bind::<SqlUuid, _>(id)
            .bind::<Text, _>(task)
            .bind::<Text, _>(reason)
            .bind::<Text, _>(at)
            .execute(&mut conn)
            .unwrap();
        }
    })
    .await
    .unwrap();
    ids
}

/// The `rel="next"` target of a `Link` header, if any.
fn next_link(response: &reqwest::Response) -> Option<String> {
    let link = response.headers().get("link")?.to_str().unwrap();
    let target = link.strip_suffix(">; rel=\"next\"")?.strip_prefix('<')?;
    Some(target.to_owned())
}

/// Paging through the listing with its `next` link hands out every record
/// exactly once, newest first, records dead at the same instant included
/// (ordered by id among themselves), and past the first page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_pages_through_every_record_once() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    // 23 records over 6 instants: most share their dead_at with others.
    let times: Vec<String> = (0..23)
        .map(|i| format!("2026-03-01T00:00:0{}.123456Z", i / 4))
        .collect();
    let rows: Vec<(&str, &str, &str)> = times
        .iter()
        .map(|at| ("diag.fail", "boom", at.as_str()))
        .collect();
    let mut expected = insert_dead(&app, &rows).await;
    // A record the filter leaves out is not handed out on any page.
    insert_dead(&app, &[("diag.noop", "boom", "2026-03-01T00:00:02Z")]).await;

    let mut seen: Vec<(chrono::DateTime<chrono::Utc>, Uuid)> = Vec::new();
    let mut path = "/v1/admin/dead-jobs?task=diag.fail&limit=5".to_owned();
    let mut pages = 0;
    loop {
        let response = admin(&app, "GET", &path, None).await;
        assert_eq!(response.status(), 200, "{path}");
        let next = next_link(&response);
        let page: Vec<Value> = response.json().await.unwrap();
        pages += 1;
        assert!(page.len() <= 5, "{path}: {}", page.len());
        seen.extend(page.iter().map(|d| {
            (
                d["dead_at"].as_str().unwrap().parse().unwrap(),
                d["id"].as_str().unwrap().parse().unwrap(),
            )
        }));
        match next {
            Some(next) => {
                assert!(next.contains("task=diag.fail"), "{next}");
                path = next;
            }
            None => break,
        }
        assert!(pages < 10, "the pages do not end");
    }
    assert_eq!(pages, 5, "23 records in pages of 5");
    let mut order = seen.clone();
    order.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, order, "newest first, then by id");
    let mut ids: Vec<Uuid> = seen.iter().map(|(_, id)| *id).collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected, "each record exactly once");

    // The same through the CLI: --after takes the cursor it prints.
    let first = cli(
        &app,
        &["dlq", "list", "--task", "diag.fail", "--limit", "20"],
    );
    let listed = stdout(&first);
    let hint = String::from_utf8_lossy(&first.stderr).into_owned();
    let cursor = hint
        .split_whitespace()
        .skip_while(|word| *word != "--after")
        .nth(1)
        .unwrap_or_else(|| panic!("no --after in {hint:?}"));
    let rest = cli(
        &app,
        &[
            "dlq",
            "list",
            "--task",
            "diag.fail",
            "--limit",
            "20",
            "--after",
            cursor,
        ],
    );
    let rest_listed = stdout(&rest);
    assert!(String::from_utf8_lossy(&rest.stderr).is_empty(), "{rest:?}");
    for id in &expected {
        let times =
            listed.matches(&id.to_string()).count() + rest_listed.matches(&id.to_string()).count();
        assert_eq!(times, 1, "{id}:\n{listed}\n{rest_listed}");
    }
}

/// `limit` out of 1 to 10000 is refused (400 problem+json naming it and its
/// range), not quietly taken as 1 or 10000; a cursor that is not one is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_refuses_a_limit_out_of_range_or_a_bad_cursor() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    for (query, named) in [
        ("limit=0", "`limit` must be between 1 and 10000"),
        ("limit=-3", "`limit` must be between 1 and 10000"),
        ("limit=10001", "`limit` must be between 1 and 10000"),
        ("after=yesterday", "`after`"),
        ("after=1.not-a-uuid", "`after`"),
        // Before PostgreSQL's earliest time (4714 BC): refused, not a database error.
        (
            "after=-250000000000000000.0193a1b2-0000-7000-8000-000000000000",
            "`after`",
        ),
        // chrono reads signed years; PostgreSQL cannot store these (was a 503).
        (
            "since=-100000-01-01T00:00:00Z",
            "`since` -100000-01-01T00:00:00Z is out of range: times from 4714-11-24 00:00:00 UTC BC to",
        ),
        ("since=-4713-11-23T23:59:59Z", "`since`"),
    ] {
        let response = admin(&app, "GET", &format!("/v1/admin/dead-jobs?{query}"), None).await;
        let problem = problem(response, 400).await;
        assert!(
            problem["detail"].as_str().unwrap().contains(named),
            "{query}: {problem}"
        );
    }
    // The earliest time PostgreSQL stores is a valid `since` and cursor.
    for query in [
        "since=-4713-11-24T00:00:00Z",
        "after=-210866803200000000.0193a1b2-0000-7000-8000-000000000000",
    ] {
        let response = admin(&app, "GET", &format!("/v1/admin/dead-jobs?{query}"), None).await;
        assert_eq!(response.status(), 200, "{query}");
    }
    let refused = cli(&app, &["dlq", "list", "--limit", "0"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--limit"),
        "{refused:?}"
    );
}

/// `error_contains` is plain text: a backslash in it is a backslash (not
/// LIKE's escape character), and `%` and `_` are themselves, in the listing
/// and in a bulk operation alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_contains_takes_a_backslash_literally() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let at = "2026-03-01T00:00:00Z";
    let ids = insert_dead(
        &app,
        &[
            (
                "diag.fail",
                r#"invalid args: missing field \"x\" at line 1"#,
                at,
            ),
            (
                "diag.fail",
                r#"invalid args: missing field "x" at line 1"#,
                at,
            ),
            ("diag.fail", r"C:\temp\x_1 is 100% full", at),
            ("diag.fail", "xa1 is 1000 full", at),
        ],
    )
    .await;
    let listed = |text: &'static str| {
        let app = &app;
        async move {
            let query: String = text
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect();
            let found: Vec<Value> = admin(
                app,
                "GET",
                &format!("/v1/admin/dead-jobs?error_contains={query}"),
                None,
            )
            .await
            .json()
            .await
            .unwrap();
            let mut found: Vec<Uuid> = found
                .iter()
                .map(|d| d["id"].as_str().unwrap().parse().unwrap())
                .collect();
            found.sort();
            found
        }
    };
    assert_eq!(listed(r#"field \"x\""#).await, vec![ids[0]]);
    assert_eq!(listed(r#"field "x""#).await, vec![ids[1]]);
    assert_eq!(listed(r"\").await, sorted(vec![ids[0], ids[2]]));
    assert_eq!(listed(r"\x_1").await, vec![ids[2]]);
    assert_eq!(listed("100%").await, vec![ids[2]]);

    let dry: Value = admin(
        &app,
        "POST",
        "/v1/admin/dead-jobs/discard-matching",
        Some(json!({"filter": {"error_contains": r#"field \"x\""#}, "dry_run": true})),
    )
    .await
    .json()
    .await
    .unwrap();
    let would: Vec<&str> = dry["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(would, vec![ids[0].to_string()], "{dry}");
}

fn sorted(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    ids.sort();
    ids
}

/// `--all-matching` takes every match, past the 10 000 one query hands out,
/// each once, across batches whose boundaries fall among records dead at the
/// same instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_all_matching_takes_every_match_past_ten_thousand() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let many = 10_003;
    app.count(&format!(
        "WITH made AS (INSERT INTO dead_jobs (id, task, queue, reason, source, dead_at) \
         SELECT gen_random_uuid(), 'diag.fail', 'default', 'boom', 'worker', \
                timestamptz '2026-03-01T00:00:00Z' + (g / 7) * interval '1 millisecond' \
         FROM generate_series(1, {many}) g RETURNING 1) SELECT count(*) AS n FROM made"
    ))
    .await;
    let out = stdout(&cli(
        &app,
        &[
            "dlq",
            "discard",
            "--all-matching",
            "--task",
            "diag.fail",
            "--dry-run",
        ],
    ));
    let ids: Vec<&str> = out
        .lines()
        .filter_map(|line| line.strip_suffix(": would discard"))
        .collect();
    assert_eq!(ids.len(), many, "{}", out.lines().count());
    let distinct: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), many);
}

/// A database that refuses the connection: libpq's message holds a newline and
/// a tab, and the pool's error used to repeat its cause; the CLI still says it
/// in one line, once.
#[test]
fn an_unreachable_database_is_one_line_naming_it_once() {
    let output = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["dlq", "list"])
        .env_clear()
        .env("CONVEYOR_DATABASE_URL", "postgres://postgres@127.0.0.1:1/x")
        .env("CONVEYOR_AMQP_URL", AMQP_URL)
        .env("CONVEYOR_LOG_LEVEL", "off")
        .output()
        .expect("run conveyor");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("conveyor: database unavailable: "),
        "{stderr}"
    );
    assert_eq!(stderr.matches("Connection refused").count(), 1, "{stderr}");
}
