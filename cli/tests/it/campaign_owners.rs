//! A campaign belongs to the producer whose key created it: what another
//! producer's key sees and can do (nothing), on every route that names a
//! campaign and through an Idempotency-Key; what `admin` sees (everything).

use diesel::{Connection, PgConnection, RunQueryDsl};
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::TestApp;
use crate::mail_api::{campaign, campaign_state, post_as};

/// Every route that names a campaign: method, path (with `{id}`) and body.
fn routes_naming_a_campaign() -> Vec<(Method, &'static str, Option<Value>)> {
    let alan = json!({"recipients": [{"email": "alan@example.com", "vars": {"name": "Alan"}}]});
    vec![
        (Method::GET, "/v1/campaigns/{id}", None),
        (Method::GET, "/v1/campaigns/{id}/recipients", None),
        (Method::POST, "/v1/campaigns/{id}/recipients", Some(alan)),
        (Method::POST, "/v1/campaigns/{id}/send", Some(json!({}))),
        (Method::POST, "/v1/campaigns/{id}/pause", Some(json!({}))),
        (Method::POST, "/v1/campaigns/{id}/resume", Some(json!({}))),
        (Method::POST, "/v1/campaigns/{id}/cancel", Some(json!({}))),
        (
            Method::POST,
            "/v1/campaigns/{id}/resend-unknown",
            Some(json!({})),
        ),
    ]
}

/// Everything a call on campaign `id` can change, as JSON text: its row, its
/// ledger, and the planner jobs enqueued.
async fn footprint(app: &TestApp, id: &str) -> String {
    #[derive(diesel::QueryableByName)]
    struct Footprint {
        #[diesel(sql_type = diesel::sql_types::Text)]
        text: String,
    }
    let url = app.db.url.clone();
    let sql = format!(
        "SELECT json_build_object(
            'campaign', (SELECT row_to_json(c) FROM campaigns c WHERE id = '{id}'),
            'ledger', (SELECT json_agg(r ORDER BY r.id) FROM campaign_recipients r WHERE campaign_id = '{id}'),
            'planners', (SELECT count(*) FROM jobs WHERE task = 'mail.plan_campaign'))::text AS text"
    );
    tokio::task::spawn_blocking(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        diesel::sql_query(sql)
            .get_result::<Footprint>(&mut conn)
            .unwrap()
            .text
    })
    .await
    .unwrap()
}

/// Asserts that `client` gets, on every route naming campaign `id`, the very
/// 404 problem an unknown id gets, and that campaign `id` is left as it was.
async fn looks_unknown_to(app: &TestApp, client: &reqwest::Client, id: &str) {
    let before = footprint(app, id).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    for (method, path, body) in routes_naming_a_campaign() {
        let mut answers = Vec::new();
        for which in [id, unknown.as_str()] {
            let mut request = client.request(method.clone(), app.url(&path.replace("{id}", which)));
            if let Some(body) = &body {
                request = request.json(body);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 404, "{method} {path}");
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            let problem: Value = response.json().await.unwrap();
            assert_eq!(
                problem["detail"],
                format!("no campaign {which}"),
                "{method} {path}: {problem}"
            );
            answers.push(problem.to_string().replace(which, "{id}"));
        }
        assert_eq!(answers[0], answers[1], "{method} {path}");
        assert_eq!(footprint(app, id).await, before, "{method} {path}");
    }
}

/// `POST /v1/campaigns/{id}/{action}` as `client`: the status and the JSON body.
async fn act(app: &TestApp, client: &reqwest::Client, id: &str, action: &str) -> (u16, Value) {
    post_as(
        client,
        app,
        &format!("/v1/campaigns/{id}/{action}"),
        &json!({}),
    )
    .await
}

/// A campaign belongs to the producer whose key created it: another
/// producer's `campaigns` key gets, in every state the campaign passes
/// through, the 404 of an unknown id on every route that names it, and changes
/// nothing; every key of the owner may act, and `admin` sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_producer_can_neither_see_nor_change_a_campaign() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let billing = app.client_with(&app.create_key_with("billing", &["campaigns"], None).await);
    // A second key of the same producer.
    let billing_too = app.client_with(&app.create_key_with("billing", &["campaigns"], None).await);
    let shipping = app.client_with(&app.create_key_with("shipping", &["campaigns"], None).await);
    let ada = json!([{"email": "ada@example.com", "vars": {"name": "Ada"}}]);
    let (status, created) = post_as(&billing, &app, "/v1/campaigns", &campaign(ada)).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM campaigns WHERE id = '{id}' AND producer = 'billing'"
        ))
        .await,
        1
    );
    // Draft: shipping's send, cancel or append would take.
    looks_unknown_to(&app, &shipping, &id).await;
    let (status, sent) = act(&app, &billing, &id, "send").await;
    assert_eq!((status, &sent["state"]), (200, &json!("sending")), "{sent}");
    // Sending: its pause would take.
    looks_unknown_to(&app, &shipping, &id).await;
    assert_eq!(act(&app, &billing_too, &id, "pause").await.0, 200);
    // Paused: its resume would take.
    looks_unknown_to(&app, &shipping, &id).await;
    assert_eq!(act(&app, &billing, &id, "resume").await.0, 200);
    // Sending with a recipient in doubt: its resend-unknown would take.
    assert_eq!(
        app.count(&format!(
            "WITH r AS (UPDATE campaign_recipients SET state = 'unknown' \
             WHERE campaign_id = '{id}' RETURNING 1) SELECT count(*) AS n FROM r"
        ))
        .await,
        1
    );
    looks_unknown_to(&app, &shipping, &id).await;
    let (status, resent) = act(&app, &billing, &id, "resend-unknown").await;
    assert_eq!(
        (status, &resent["recipients"]),
        (200, &json!(1)),
        "{resent}"
    );

    // Every key of the owner, and admin, read it.
    for client in [&billing, &billing_too, &app.client] {
        let response = client
            .get(app.url(&format!("/v1/campaigns/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let status: Value = response.json().await.unwrap();
        assert_eq!(
            (&status["id"], &status["state"]),
            (&json!(id), &json!("sending"))
        );
        let page = client
            .get(app.url(&format!("/v1/campaigns/{id}/recipients")))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
    }
    // Admin acts on any producer's campaign.
    assert_eq!(act(&app, &app.client, &id, "cancel").await.0, 200);
    assert_eq!(campaign_state(&app, &id).await, "cancelled");
}

/// Campaigns created before `campaigns.producer` existed have none: only
/// `admin` sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_without_a_producer_is_admin_only() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let billing = app.client_with(&app.create_key_with("billing", &["campaigns"], None).await);
    let ada = json!([{"email": "ada@example.com", "vars": {"name": "Ada"}}]);
    let (status, created) = post_as(&billing, &app, "/v1/campaigns", &campaign(ada)).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    app.count(&format!(
        "WITH c AS (UPDATE campaigns SET producer = NULL WHERE id = '{id}' RETURNING 1) \
         SELECT count(*) AS n FROM c"
    ))
    .await;
    looks_unknown_to(&app, &billing, &id).await;
    assert_eq!(campaign_state(&app, &id).await, "draft");
    assert_eq!(act(&app, &app.client, &id, "send").await.0, 200);
}

/// Idempotency-Keys are claimed per producer: another producer's send with the
/// key the owner used is not a replay of the owner's answer, and acts on
/// nothing; its creation with the same key and body makes its own campaign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_producer_acts_on_no_campaign_through_an_idempotency_key() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let billing = app.client_with(&app.create_key_with("billing", &["campaigns"], None).await);
    let shipping = app.client_with(&app.create_key_with("shipping", &["campaigns"], None).await);
    let keyed = |client: &reqwest::Client, key: &str, path: &str, body: &Value| {
        client
            .post(app.url(path))
            .header("idempotency-key", key)
            .json(body)
            .send()
    };
    let ada = campaign(json!([{"email": "ada@example.com", "vars": {"name": "Ada"}}]));
    let created = keyed(&billing, "create-1", "/v1/campaigns", &ada)
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let send = format!("/v1/campaigns/{id}/send");

    // Before the owner sends, and after (its answer stored under the key).
    let stolen = keyed(&shipping, "send-1", &send, &json!({})).await.unwrap();
    assert_eq!(stolen.status(), 404);
    assert_eq!(campaign_state(&app, &id).await, "draft");
    let sent = keyed(&billing, "send-1", &send, &json!({})).await.unwrap();
    assert_eq!(sent.status(), 200);
    let before = footprint(&app, &id).await;
    let replayed = keyed(&shipping, "send-1", &send, &json!({})).await.unwrap();
    assert_eq!(replayed.status(), 404);
    assert!(replayed.headers().get("idempotent-replayed").is_none());
    assert_eq!(footprint(&app, &id).await, before);

    // The same key and body make shipping's own campaign, not billing's again.
    let own = keyed(&shipping, "create-1", "/v1/campaigns", &ada)
        .await
        .unwrap();
    assert_eq!(own.status(), 201);
    let own = own.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(own, id);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) AS n FROM campaigns WHERE id = '{own}' AND producer = 'shipping'"
        ))
        .await,
        1
    );
}
