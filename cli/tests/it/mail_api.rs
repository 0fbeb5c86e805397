//! The campaign API: validation, duplicates, transitions and the keyset-paginated ledger.

use serde_json::{Value, json};

use crate::harness::TestApp;

fn campaign(recipients: Value) -> Value {
    json!({
        "name": "Spring meetup",
        "template": "event_announcement",
        "from": "Events <events@example.com>",
        "vars": {"event": {"title": "Spring meetup", "date": "1 April", "venue": "Hall 1"}},
        "recipients": recipients,
    })
}

async fn post(app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    let response = app
        .client
        .post(app.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
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
            .client
            .get(app.url(&format!("/v1/campaigns/{id}/recipients{query}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
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
    let status: Value = app
        .client
        .get(app.url(&format!("/v1/campaigns/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["counts"]["total"], 100_001);
    assert_eq!(status["counts"]["pending"], 100_001);
}
