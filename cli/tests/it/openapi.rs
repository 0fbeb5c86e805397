//! The OpenAPI document describes every route and is stable (snapshot).

use serde_json::Value;

use crate::harness::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served_and_matches_snapshot() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/schedules",
        "/v1/schedules/{name}/ticks",
        "/v1/stats/{family}",
    ] {
        assert!(doc["paths"][path].is_object(), "missing {path}");
    }
    assert_eq!(
        doc["paths"]["/v1/jobs"]["post"]["responses"]["422"]["content"]["application/problem+json"]
            ["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
    insta::assert_json_snapshot!("openapi", doc);
}
