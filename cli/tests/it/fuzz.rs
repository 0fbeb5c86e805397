//! The fuzzing pass of issue 7: schemathesis generates requests for every
//! operation of `/openapi.json` (valid and invalid, plus stateful sequences)
//! against a real ingress with an `admin` key; any 5xx or crash fails the test.
//!
//! It runs in `make test`, bounded by `FUZZ_EXAMPLES` examples per operation
//! (default 25, about 15 s on 2 cores); `make fuzz` runs it alone with more.
//! `st` comes from the venv that `deploy/local/schemathesis.sh` installs
//! under the cargo target directory (`make test` runs it through `test-prereqs.sh`).

use std::path::PathBuf;
use std::process::Stdio;

use crate::harness::TestApp;

/// Examples per operation when `FUZZ_EXAMPLES` is unset.
const DEFAULT_EXAMPLES: u32 = 25;

/// `<target dir>/fuzz-venv/bin/st`, found from this build's `conveyor` binary.
fn schemathesis() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_conveyor"));
    let st = bin
        .ancestors()
        .nth(2)
        .map(|target| target.join("fuzz-venv/bin/st"))
        .filter(|st| st.is_file());
    st.unwrap_or_else(|| {
        panic!(
            "schemathesis is not installed next to {}: run `bash deploy/local/test-prereqs.sh` \
             (or `bash deploy/local/schemathesis.sh`) with the same CARGO_TARGET_DIR",
            bin.display()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_fuzzing_finds_no_server_error() {
    let st = schemathesis();
    let examples: u32 = std::env::var("FUZZ_EXAMPLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_EXAMPLES);
    let app = TestApp::spawn_with(0, |_| {}).await;
    // schemathesis keeps a crash cache in its working directory: a scratch one.
    let scratch = tempfile::tempdir().expect("scratch directory");
    let output = tokio::process::Command::new(&st)
        .arg("run")
        .arg(app.url("/openapi.json"))
        .args([
            "--header",
            &format!("Authorization: Bearer {}", app.admin_key),
        ])
        .args(["--checks", "not_a_server_error"])
        .args(["--max-examples", &examples.to_string()])
        .args(["--request-timeout", "10", "--workers", "2"])
        // No example database either; a failure prints its seed and a curl command.
        .args(["--generation-database", "none", "--no-color"])
        .current_dir(scratch.path())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    let tail: Vec<&str> = report.lines().rev().take(150).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    // The summary, shown by `make fuzz` (--no-capture).
    eprintln!("{}", tail[tail.len().saturating_sub(25)..].join("\n"));
    assert!(
        output.status.success(),
        "schemathesis found a server error or crash ({}):\n{}\n{}",
        output.status,
        tail.join("\n"),
        String::from_utf8_lossy(&output.stderr)
    );
    // Every operation of the document was exercised ("Selected: 24/24", "Tested: 24").
    let number_after = |label: &str| {
        report.lines().find_map(|line| {
            let rest = line.trim().strip_prefix(label)?.trim();
            rest.rsplit('/').next()?.parse::<u32>().ok()
        })
    };
    let (operations, tested) = (number_after("Selected:"), number_after("Tested:"));
    assert!(
        operations.is_some_and(|n| n > 20) && tested == operations,
        "schemathesis did not test every operation ({tested:?} of {operations:?}):\n{report}"
    );
}
