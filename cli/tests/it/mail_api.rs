//! The campaign API: validation, duplicates, transitions, the keyset-paginated
//! ledger, and what a failed planner publish leaves.

use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::harness::TestApp;
use crate::publish_failures::{nacking_every_publish, replace_queue};

/// A valid campaign with `recipients`.
pub(crate) fn campaign(recipients: Value) -> Value {
    json!({
        "name": "Spring meetup",
        "template": "event_announcement",
        "from": "Events <events@example.com>",
        "vars": {"event": {"title": "Spring meetup", "date": "1 April", "venue": "Hall 1"}},
        "recipients": recipients,
    })
}

/// `POST path` with `body` and the admin key: the status and the JSON body.
pub(crate) async fn post(app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    post_as(&app.client, app, path, body).await
}

/// [`post`] with `client`'s key instead of the admin key.
pub(crate) async fn post_as(
    client: &reqwest::Client,
    app: &TestApp,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let response = client.post(app.url(path)).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_are_validated_before_anything_is_stored() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let ok = json!([{"email": "ada@example.com", "vars": {"name": "Ada"}}]);

    let mut unknown = campaign(ok.clone());
    unknown["template"] = json!("no_such_template");
    let (status, body) = post(&app, "/v1/campaigns", &unknown).await;
    assert_eq!(
        (status, body["pointer"].as_str()),
        (422, Some("/template")),
        "{body}"
    );

    // The template needs `name`; the first recipient lacks it.
    let (status, body) = post(
        &app,
        "/v1/campaigns",
        &campaign(json!([{"email": "ada@example.com"}])),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["pointer"], "/template");
    assert!(
        body["detail"].as_str().unwrap().contains("undefined"),
        "{body}"
    );

    let bad =
        json!([{"email": "ada@example.com", "vars": {"name": "Ada"}}, {"email": "not-an-address"}]);
    let (status, body) = post(&app, "/v1/campaigns", &campaign(bad)).await;
    assert_eq!(
        (status, body["pointer"].as_str()),
        (422, Some("/recipients/1/email")),
        "{body}"
    );

    let mut bad_from = campaign(ok.clone());
    bad_from["from"] = json!("nobody");
    assert_eq!(post(&app, "/v1/campaigns", &bad_from).await.0, 422);

    assert_eq!(app.count("SELECT count(*) AS n FROM campaigns").await, 0);
    assert_eq!(
        app.count("SELECT count(*) AS n FROM campaign_recipients")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_stored_once_and_the_ledger_pages_by_keyset() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let recipients: Vec<Value> = (0..250)
        .map(|i| json!({"email": format!("user{i}@example.com"), "vars": {"name": format!("User {i}")}}))
        .chain([json!({"email": "USER0@example.com", "vars": {"name": "Again"}})])
        .collect();
    let (status, created) = post(&app, "/v1/campaigns", &campaign(json!(recipients))).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["state"], "draft");
    assert_eq!(created["counts"]["total"], 250);
    let id = created["id"].as_str().unwrap().to_owned();

    let more =
        json!({"recipients": [{"email": "user1@example.com"}, {"email": "new@example.com"}]});
    let (status, added) = post(&app, &format!("/v1/campaigns/{id}/recipients"), &more).await;
    assert_eq!(status, 200);
    assert_eq!(
        (added["added"].as_u64(), added["duplicates"].as_u64()),
        (Some(1), Some(1))
    );

    let mut seen = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let query = match after {
            Some(a) => format!("?state=pending&limit=100&after={a}"),
            None => "?state=pending&limit=100".into(),
        };
        let page: Value = app
            .get_json(&format!("/v1/campaigns/{id}/recipients{query}"))
            .await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["email"].as_str().unwrap().to_owned());
        }
        match page["next_after"].as_i64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 251);
    let unique: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 251);

    // Transitions are guarded.
    assert_eq!(
        post(&app, &format!("/v1/campaigns/{id}/pause"), &json!({}))
            .await
            .0,
        409
    );
    assert_eq!(
        post(&app, &format!("/v1/campaigns/{id}/cancel"), &json!({}))
            .await
            .0,
        200
    );
    assert_eq!(
        post(&app, &format!("/v1/campaigns/{id}/send"), &json!({}))
            .await
            .0,
        409
    );
    let (status, _) = post(&app, &format!("/v1/campaigns/{id}/recipients"), &more).await;
    assert_eq!(status, 409);
    let missing = uuid::Uuid::now_v7();
    assert_eq!(
        post(&app, &format!("/v1/campaigns/{missing}/send"), &json!({}))
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_takes_a_hundred_thousand_recipients_in_appends() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let (status, created) = post(
        &app,
        "/v1/campaigns",
        &campaign(json!([{"email": "first@example.com", "vars": {"name": "First"}}])),
    )
    .await;
    assert_eq!(status, 201);
    let id = created["id"].as_str().unwrap().to_owned();
    for part in 0..4 {
        let recipients: Vec<Value> = (0..25_000)
            .map(
                |i| json!({"email": format!("p{part}-{i}@example.com"), "vars": {"name": "Guest"}}),
            )
            .collect();
        let (status, added) = post(
            &app,
            &format!("/v1/campaigns/{id}/recipients"),
            &json!({"recipients": recipients}),
        )
        .await;
        assert_eq!(status, 200, "{added}");
        assert_eq!(added["added"], 25_000);
    }
    let status: Value = app.get_json(&format!("/v1/campaigns/{id}")).await;
    assert_eq!(status["counts"]["total"], 100_001);
    assert_eq!(status["counts"]["pending"], 100_001);
}

/// Creates a one-recipient campaign; returns its id.
async fn create_draft(app: &TestApp) -> String {
    let ada = json!([{"email": "ada@example.com", "vars": {"name": "Ada"}}]);
    let (status, created) = post(app, "/v1/campaigns", &campaign(ada)).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

/// The campaign's state, read with the admin key.
pub(crate) async fn campaign_state(app: &TestApp, id: &str) -> Value {
    let status: Value = app.get_json(&format!("/v1/campaigns/{id}")).await;
    status["state"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_whose_planner_was_not_enqueued_get_it_when_the_call_is_repeated() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let id = create_draft(&app).await;
    let finish = format!(
        "WITH c AS (UPDATE campaigns SET state = 'completed', completed_at = now() WHERE id = '{id}' RETURNING 1), \
              r AS (UPDATE campaign_recipients SET state = 'sent' RETURNING 1) \
         SELECT (SELECT count(*) FROM c) + (SELECT count(*) FROM r) AS n"
    );
    assert_eq!(app.count(&finish).await, 2);
    let planners = "SELECT count(*) AS n FROM jobs WHERE task = 'mail.plan_campaign'";

    // The completed campaign resumes for a new recipient, but its planner's publish fails.
    let mail = app.topology().work_queue("mail");
    replace_queue(&mail, Some(nacking_every_publish())).await;
    let path = format!("/v1/campaigns/{id}/recipients");
    let alan = json!({"recipients": [{"email": "alan@example.com", "vars": {"name": "Alan"}}]});
    let (status, problem) = post(&app, &path, &alan).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(campaign_state(&app, &id).await, "sending");
    assert_eq!(app.count(planners).await, 0);

    // The same call again adds nobody, and enqueues the planner for Alan.
    replace_queue(&mail, Some(FieldTable::default())).await;
    let (status, added) = post(&app, &path, &alan).await;
    assert_eq!(status, 200, "{added}");
    assert_eq!(
        (added["added"].as_u64(), added["duplicates"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(app.count(planners).await, 1);
    assert_eq!(app.queue_len(&mail).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_a_send_fails_is_not_undone() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let id = create_draft(&app).await;
    replace_queue(
        &app.topology().work_queue("mail"),
        Some(nacking_every_publish()),
    )
    .await;
    // The send's planner waits to be recorded (its publish is nacked at once).
    let release = app.block_inserts("jobs").await;
    let (send_path, empty) = (format!("/v1/campaigns/{id}/send"), json!({}));
    let send = post(&app, &send_path, &empty);
    let cancel = async {
        app.wait_for_a_lock_wait().await;
        let cancelled = post(&app, &format!("/v1/campaigns/{id}/cancel"), &empty).await;
        release.send(()).unwrap();
        cancelled
    };
    let ((sent, problem), (cancelled, _)) = tokio::join!(send, cancel);
    assert_eq!(sent, 503, "{problem}");
    assert_eq!(cancelled, 200);
    // The failed send undoes only its own change: the cancel stands.
    assert_eq!(campaign_state(&app, &id).await, "cancelled");
}

/// An undone send leaves no trace of itself: the campaign is a draft again
/// and, never sent, has no `send_started_at`. An undone resume keeps the time
/// the first send began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undone_send_leaves_no_send_started_at() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let id = create_draft(&app).await;
    let status_path = format!("/v1/campaigns/{id}");
    let mail = app.topology().work_queue("mail");
    replace_queue(&mail, Some(nacking_every_publish())).await;
    let (send, empty) = (format!("/v1/campaigns/{id}/send"), json!({}));
    let (status, problem) = post(&app, &send, &empty).await;
    assert_eq!(status, 503, "{problem}");
    let undone: Value = app.get_json(&status_path).await;
    assert_eq!(undone["state"], "draft", "{undone}");
    assert_eq!(undone["send_started_at"], Value::Null, "{undone}");

    // Sent for real, then paused; a resume whose planner publish fails.
    replace_queue(&mail, Some(FieldTable::default())).await;
    assert_eq!(post(&app, &send, &empty).await.0, 200);
    let started = app.get_json::<Value>(&status_path).await["send_started_at"].clone();
    assert!(started.is_string(), "{started}");
    let pause = format!("/v1/campaigns/{id}/pause");
    assert_eq!(post(&app, &pause, &empty).await.0, 200);
    replace_queue(&mail, Some(nacking_every_publish())).await;
    let resume = format!("/v1/campaigns/{id}/resume");
    let (status, problem) = post(&app, &resume, &empty).await;
    assert_eq!(status, 503, "{problem}");
    let undone: Value = app.get_json(&status_path).await;
    assert_eq!(undone["state"], "paused", "{undone}");
    assert_eq!(undone["send_started_at"], started, "{undone}");
}
