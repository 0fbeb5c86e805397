//! README and scripts agree with the configuration: the README documents every
//! key of the configuration tree, and every `CONVEYOR_*` variable a script,
//! the Makefile or the README names is a key (any other `CONVEYOR_*` variable
//! makes every conveyor process refuse to start, since all of them are read
//! as configuration).

use std::path::{Path, PathBuf};

use conveyor_platform::Config;
use serde_json::Value;

use crate::deploy_files::{assert_config_var, config_keys};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Dotted paths of the leaves of `value` (a table with entries is not a leaf;
/// an empty one, like `webhooks.sources`, is).
fn leaves(prefix: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, v) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(&path, v, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn readme_documents_every_configuration_key() {
    let readme = read(&repo().join("README.md"));
    let mut keys = Vec::new();
    leaves(
        "",
        &serde_json::to_value(Config::default()).unwrap(),
        &mut keys,
    );
    assert!(keys.len() > 60, "only {} keys found", keys.len());
    let missing: Vec<_> = keys
        .iter()
        .filter(|key| {
            // `key` in backticks, or `key.<something>` for a table of named entries
            !readme.contains(&format!("`{key}`")) && !readme.contains(&format!("`{key}."))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not mention these configuration keys: {missing:?}"
    );
}

/// Every `CONVEYOR_<NAME>` token in `text` (`CONVEYOR_*` and `CONVEYOR_<SECTION>` are not tokens).
fn conveyor_variables(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("CONVEYOR_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if end > "CONVEYOR_".len() {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

fn shell_scripts(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if !matches!(
                path.file_name().and_then(|n| n.to_str()),
                Some(".venv" | "target")
            ) {
                shell_scripts(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "sh") {
            out.push(path);
        }
    }
}

#[test]
fn scripts_and_readme_name_only_configuration_keys_as_conveyor_variables() {
    let root = repo();
    let mut files = vec![
        root.join(".ci/run"),
        root.join("Makefile"),
        root.join("README.md"),
    ];
    shell_scripts(&root.join("deploy"), &mut files);
    shell_scripts(&root.join("benches"), &mut files);
    assert!(
        files.iter().any(|f| f.ends_with("deploy/local/run.sh")),
        "{files:?}"
    );
    let mut seen = 0;
    for file in &files {
        for name in conveyor_variables(&read(file)) {
            seen += 1;
            assert_config_var(&name, &file.display().to_string());
        }
    }
    assert!(seen > 20, "only {seen} CONVEYOR_ variables found");
}

#[test]
fn a_variable_that_is_not_a_key_is_caught() {
    assert_eq!(
        conveyor_variables("export CONVEYOR_CI_CLUSTER=0 # CONVEYOR_* CONVEYOR_<SECTION>"),
        ["CONVEYOR_CI_CLUSTER"]
    );
    assert!(!config_keys().contains("ci.cluster"));
    let caught = std::panic::catch_unwind(|| assert_config_var("CONVEYOR_CI_CLUSTER", "test"));
    assert!(caught.is_err());
    assert_config_var("CONVEYOR_WORKER_METRICS_ADDR", "test");
}
