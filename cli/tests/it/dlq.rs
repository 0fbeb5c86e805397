//! `conveyor dlq …` and `/v1/admin/dead-jobs…`: list, show, replay (once unless
//! forced, with edited args validated), discard, and the audit of each.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{AMQP_URL, TestApp};

const WAIT: Duration = Duration::from_secs(30);

fn cli(app: &TestApp, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(args)
        .env_clear()
        .env("CONVEYOR_DATABASE_URL", &app.db.url)
        .env("CONVEYOR_AMQP_URL", AMQP_URL)
        .env("CONVEYOR_NAMESPACE", &app.config.namespace)
        .env("CONVEYOR_LOG_LEVEL", "warn")
        .output()
        .expect("run conveyor")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
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
