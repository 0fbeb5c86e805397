//! The OpenAPI document describes every route, is stable (snapshot) and valid
//! (checked by openapi-spec-validator, installed on first use like schemathesis).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::harness::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served_and_matches_snapshot() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let doc: Value = app.get_json("/openapi.json").await;
    for path in [
        "/v1/jobs",
        "/v1/jobs/batch",
        "/v1/jobs/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
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
    // The documented bound on a task's name is the one both sides enforce.
    assert_eq!(
        doc["components"]["schemas"]["EnqueueRequest"]["properties"]["task"]["maxLength"],
        conveyor_schema::MAX_TASK_NAME_LEN
    );
    // Every operation documents the header-size limit that guards all routes.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap().iter().filter(|(method, _)| {
            ["get", "post", "put", "patch", "delete"].contains(&method.as_str())
        }) {
            assert_eq!(
                operation["responses"]["431"]["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{method} {path}"
            );
        }
    }
    insta::assert_json_snapshot!("openapi", doc);
}

/// The pinned validator, installed once into `<target dir>/openapi-venv`.
const VALIDATOR: &str = "openapi-spec-validator==0.7.1";

/// `<target dir>/openapi-venv/bin/python` with [`VALIDATOR`] installed
/// (created on first use with `python3 -m venv` and pip).
fn validator_python() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_conveyor"));
    let venv = bin.ancestors().nth(2).unwrap().join("openapi-venv");
    let python = venv.join("bin/python");
    let installed = |python: &PathBuf| {
        Command::new(python)
            .args(["-m", "pip", "show", "-q", "openapi-spec-validator"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !installed(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3");
        assert!(
            made.success(),
            "python3 -m venv failed (Debian: apt-get install python3-venv)"
        );
        let pip = Command::new(&python)
            .args(["-m", "pip", "install", "-q", VALIDATOR])
            .status()
            .unwrap();
        assert!(pip.success(), "pip install {VALIDATOR} failed");
    }
    python
}

/// The served document is a valid OpenAPI document, as an independent
/// validator (openapi-spec-validator) reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_passes_an_independent_validator() {
    let app = TestApp::spawn_with(0, |_| {}).await;
    let doc = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, doc.as_bytes()).unwrap();
    let path = file.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(validator_python())
            .args(["-m", "openapi_spec_validator"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
