//! `deploy/`: the alert rules pass `promtool check rules`, every metric the
//! Grafana dashboard and the rules query exists in our `/metrics` output, and
//! the Kubernetes grace period covers the worker's drain.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{TestApp, wait_until};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Every `conveyor_…` identifier in `text`.
pub(crate) fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("conveyor_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Sample names (histograms give `_bucket`, `_sum`, `_count`) in a scrape.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

fn expressions(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => expressions(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let rules = deploy("prometheus/rules.yml");
    let Ok(output) = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
    else {
        eprintln!(
            "\n\n!!!!! SKIPPED: promtool is not installed, so deploy/prometheus/rules.yml was NOT checked.\n\
             !!!!! Install it with `bash deploy/local/test-prereqs.sh` (Debian package `prometheus`).\n\n"
        );
        return;
    };
    assert!(
        output.status.success(),
        "promtool rejected the rules:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn kubernetes_grace_period_covers_the_drain() {
    let yaml = std::fs::read_to_string(deploy("autoscaling/worker-deployment.yaml")).unwrap();
    let seconds: u64 = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let grace_ms = conveyor_platform::Config::default().worker.grace_period_ms;
    assert!(
        seconds * 1000 > grace_ms,
        "{seconds}s does not cover {grace_ms} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_query_only_metrics_we_export() {
    let app = TestApp::spawn_with(1, crate::metrics::fast_monitor).await;
    let ok = app.enqueue("diag.noop", json!({})).await;
    let dead = app.enqueue("diag.fail", json!({})).await;
    app.wait_for_state(ok, "succeeded", Duration::from_secs(20))
        .await;
    app.wait_for_state(dead, "dead", Duration::from_secs(20))
        .await;
    // A keyed job's second message, which the worker skips: the dashboard
    // shows skipped messages too.
    app.publish_keyed_again(ok, "diag.noop", json!({}), "dashboard")
        .await;
    wait_until(Duration::from_secs(20), || async {
        app.worker_metrics()
            .await
            .contains("conveyor_jobs_skipped_total{")
    })
    .await;
    let ingress = app.url("/metrics");
    wait_until(Duration::from_secs(20), || async {
        let text = reqwest::get(&ingress).await.unwrap().text().await.unwrap();
        text.contains("conveyor_workers{scope=\"service\",state=\"live\"} 1")
            && text.contains("conveyor_dead_jobs{queue=\"default\",scope=\"service\"} 1")
    })
    .await;
    let mut samples = BTreeSet::new();
    for url in [ingress.as_str(), app.metrics_url.as_str()] {
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        samples.extend(exported(&text));
    }

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/conveyor.json")).unwrap())
            .expect("the Grafana dashboard is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| p.len() >= 10)
    );
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let rules = std::fs::read_to_string(deploy("prometheus/rules.yml")).unwrap();
    let mut used = metric_names(&exprs.join("\n"));
    assert!(used.len() >= 15, "{used:?}");
    used.extend(metric_names(&rules));
    let missing: Vec<_> = used.difference(&samples).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}
