//! `deploy/` says only true things about the project: the compose file (and
//! its Grafana provisioning), the Kubernetes manifests (and the KEDA
//! `ScaledObject`), the systemd units and the Dockerfile parse, every
//! `conveyor` subcommand they run exists, every `CONVEYOR_*` variable they set
//! is a configuration key, every port and probe path they name is one the code
//! serves, every metric they scale on is one we export, every file they mount
//! is in the repository; every `conveyor …` command in the runbook (directly or
//! through `docker compose run`) is a real subcommand with real flags. Docker
//! and a cluster are not available here, so nothing is started: this is what
//! can be checked.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use conveyor_platform::Config;
use serde::Deserialize;
use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|err| panic!("deploy/{path}: {err}"))
}

/// Every YAML document in `deploy/<path>`, with `<<:` merge keys applied, as JSON values.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut yaml = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|err| panic!("deploy/{path} does not parse: {err}"));
            yaml.apply_merge()
                .unwrap_or_else(|err| panic!("deploy/{path}: bad merge key: {err}"));
            serde_json::to_value(yaml).unwrap()
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `conveyor <words…> --help` succeeds; returns its help text. Cached: each path runs once.
fn help(words: &[&str]) -> String {
    static CACHE: Mutex<Option<HashMap<String, Option<String>>>> = Mutex::new(None);
    let key = words.join(" ");
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let found = cache
        .get_or_insert_with(HashMap::new)
        .entry(key.clone())
        .or_insert_with(|| {
            let out = Command::new(env!("CARGO_BIN_EXE_conveyor"))
                .args(words)
                .arg("--help")
                .env_clear()
                .output()
                .expect("run conveyor --help");
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        });
    let found = found.clone();
    drop(cache);
    found.unwrap_or_else(|| panic!("`conveyor {key}` is not a conveyor subcommand"))
}

/// The leading subcommand words of `args` (up to the first flag or value that
/// is not a subcommand), checked against `--help`.
fn subcommand_path<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut path: Vec<&str> = Vec::new();
    for word in args {
        if word.starts_with('-') {
            break;
        }
        let parent = help(&path);
        let listed = parent
            .lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .any(|l| l.split_whitespace().next() == Some(*word));
        if !listed {
            break;
        }
        path.push(word);
    }
    assert!(
        !path.is_empty(),
        "`conveyor {}` names no subcommand",
        args.join(" ")
    );
    help(&path);
    path
}

/// Every dotted key of the configuration tree (`namespace`, `amqp.url`, …).
pub(crate) fn config_keys() -> BTreeSet<String> {
    let tree = serde_json::to_value(Config::default()).unwrap();
    let mut keys = BTreeSet::new();
    for (section, value) in tree.as_object().unwrap() {
        match value.as_object() {
            Some(fields) => keys.extend(fields.keys().map(|k| format!("{section}.{k}"))),
            None => {
                keys.insert(section.clone());
            }
        }
    }
    keys
}

/// Fails unless `CONVEYOR_X` names a configuration key (the first `_` separates section from key).
pub(crate) fn assert_config_var(name: &str, context: &str) {
    let Some(rest) = name.strip_prefix("CONVEYOR_") else {
        return;
    };
    let key = rest.to_ascii_lowercase().replacen('_', ".", 1);
    assert!(
        config_keys().contains(&key),
        "{context}: {name} is not a configuration key (`{key}`)"
    );
}

fn default_ports() -> (u16, u16) {
    let config = Config::default();
    (
        config.ingress.addr.port(),
        config.worker.metrics_addr.port(),
    )
}

fn grace_secs() -> u64 {
    Config::default().worker.grace_period_ms.div_ceil(1000)
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn seconds(text: &str) -> u64 {
    text.trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("`{text}` is not a number of seconds"))
}

#[test]
fn compose_file_runs_real_commands_on_real_ports() {
    let compose = yaml_documents("docker-compose.yml").remove(0);
    let services = compose["services"].as_object().expect("services");
    let (ingress_port, worker_port) = default_ports();
    for name in [
        "rabbitmq1",
        "rabbitmq2",
        "rabbitmq3",
        "postgres",
        "migrate",
        "ingress",
        "worker1",
        "worker2",
        "prometheus",
        "grafana",
        "mailpit",
    ] {
        assert!(
            services.contains_key(name),
            "compose has no `{name}` service"
        );
    }
    let mut conveyor_services = 0;
    for (name, service) in services {
        let image = service["image"].as_str().unwrap_or_default();
        if image.starts_with("conveyor:") {
            conveyor_services += 1;
            assert_eq!(
                service["build"]["dockerfile"], "deploy/Dockerfile",
                "{name} must build our image"
            );
            assert!(deploy("Dockerfile").exists());
            subcommand_path(&strings(&service["command"]));
            for var in service["environment"].as_object().unwrap().keys() {
                assert_config_var(var, &format!("compose service {name}"));
            }
            let stop = seconds(service["stop_grace_period"].as_str().unwrap());
            assert!(
                stop > grace_secs(),
                "{name}: stop_grace_period {stop}s does not cover the drain"
            );
        }
        for mount in strings(&service["volumes"]) {
            if let Some(source) = mount.strip_prefix("./") {
                let file = source.split(':').next().unwrap();
                assert!(
                    deploy(file).exists(),
                    "{name} mounts deploy/{file}, which does not exist"
                );
            }
        }
    }
    assert_eq!(
        conveyor_services, 4,
        "migrate, ingress and two workers run our image"
    );
    assert_eq!(strings(&services["migrate"]["command"]), ["migrate", "run"]);
    assert_eq!(
        strings(&services["ingress"]["ports"]),
        [format!("{ingress_port}:{ingress_port}")]
    );

    // Every broker node is in the URL list, and it is the version we test against.
    let urls = services["ingress"]["environment"]["CONVEYOR_AMQP_URL"]
        .as_str()
        .unwrap();
    for node in ["rabbitmq1", "rabbitmq2", "rabbitmq3"] {
        assert!(
            urls.contains(&format!("@{node}:5672/")),
            "CONVEYOR_AMQP_URL lacks {node}"
        );
        assert!(
            services[node]["image"]
                .as_str()
                .unwrap()
                .starts_with("rabbitmq:3.10")
        );
        assert_eq!(
            services[node]["environment"]["RABBITMQ_ERLANG_COOKIE"],
            services["rabbitmq1"]["environment"]["RABBITMQ_ERLANG_COOKIE"],
            "one cookie for the cluster"
        );
    }
    assert!(
        services["postgres"]["image"]
            .as_str()
            .unwrap()
            .starts_with("postgres:15")
    );
    let cluster = read("compose/rabbitmq.conf");
    for node in ["rabbit@rabbitmq1", "rabbit@rabbitmq2", "rabbit@rabbitmq3"] {
        assert!(
            cluster.contains(node),
            "compose/rabbitmq.conf does not list {node}"
        );
    }

    // Prometheus scrapes the ports the processes listen on, and loads our rules.
    let prometheus = yaml_documents("compose/prometheus.yml").remove(0);
    assert_eq!(
        strings(&prometheus["rule_files"]),
        ["/etc/prometheus/rules.yml"]
    );
    let targets: Vec<String> = prometheus["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|job| job["static_configs"].as_array().unwrap().iter())
        .flat_map(|c| strings(&c["targets"]).into_iter().map(str::to_owned))
        .collect();
    for target in [
        format!("ingress:{ingress_port}"),
        format!("worker1:{worker_port}"),
        format!("worker2:{worker_port}"),
    ] {
        assert!(
            targets.contains(&target),
            "prometheus does not scrape {target}"
        );
    }
}

#[test]
fn dockerfile_builds_one_binary_for_a_non_root_user_on_the_default_ports() {
    let text = read("Dockerfile");
    let (ingress_port, worker_port) = default_ports();
    // Two stages: the runtime image copies the binary out of the build stage.
    let stages: Vec<Vec<&str>> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let build = match stages[0].as_slice() {
        [_, as_, name] if as_.eq_ignore_ascii_case("as") => *name,
        other => panic!("the first stage is not named: FROM {}", other.join(" ")),
    };
    let runtime_at = text
        .find("\nFROM debian:bookworm-slim")
        .expect("the runtime stage");
    assert!(
        text[runtime_at..].contains(&format!("COPY --from={build} ")),
        "the runtime stage does not COPY --from={build}"
    );
    assert!(text.contains("cargo build --release --locked --bin conveyor"));
    assert!(text.contains("FROM debian:bookworm-slim"));
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "runs as root"
    );
    let expose = text
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("an EXPOSE line");
    assert_eq!(expose.trim(), format!("{ingress_port} {worker_port}"));
    for line in text.lines().filter(|l| l.contains("CONVEYOR_")) {
        for word in line.split_whitespace() {
            if let Some((name, _)) = word.split_once('=') {
                assert_config_var(name.trim_start_matches("ENV "), "Dockerfile");
            }
        }
    }
    let cmd = text
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("CMD");
    let cmd: Vec<String> = serde_json::from_str(cmd).unwrap();
    subcommand_path(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The containers of every workload in a Kubernetes document.
fn containers(doc: &Value) -> Vec<&Value> {
    let pod = match doc["kind"].as_str() {
        Some("Deployment") | Some("Job") => &doc["spec"]["template"]["spec"],
        _ => return Vec::new(),
    };
    pod["containers"]
        .as_array()
        .map(|c| c.iter().collect())
        .unwrap_or_default()
}

#[test]
fn kubernetes_manifests_run_real_commands_and_probe_real_endpoints() {
    let secret = yaml_documents("k8s/secret.example.yaml").remove(0);
    let secret_keys: BTreeSet<&str> = secret["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let (ingress_port, _) = default_ports();
    let mut seen = BTreeSet::new();
    for file in [
        "k8s/ingress.yaml",
        "k8s/migrate-job.yaml",
        "autoscaling/worker-deployment.yaml",
    ] {
        for doc in yaml_documents(file) {
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            seen.insert(format!(
                "{}/{name}",
                doc["kind"].as_str().unwrap_or_default()
            ));
            for container in containers(&doc) {
                let image = container["image"].as_str().unwrap();
                assert!(
                    image.starts_with("conveyor:"),
                    "{file}: image `{image}` is not ours"
                );
                subcommand_path(&strings(&container["args"]));
                for var in container["env"].as_array().into_iter().flatten() {
                    assert_config_var(var["name"].as_str().unwrap(), file);
                    if let Some(key) = var["valueFrom"]["secretKeyRef"]["key"].as_str() {
                        assert_eq!(
                            var["valueFrom"]["secretKeyRef"]["name"],
                            secret["metadata"]["name"]
                        );
                        assert!(
                            secret_keys.contains(key),
                            "{file}: secret key `{key}` is not in secret.example.yaml"
                        );
                    }
                }
            }
        }
    }
    for expected in [
        "Deployment/conveyor-ingress",
        "Service/conveyor-ingress",
        "Job/conveyor-migrate",
    ] {
        assert!(seen.contains(expected), "no {expected} in deploy/k8s");
    }

    let ingress = yaml_documents("k8s/ingress.yaml");
    let deployment = ingress.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let container = containers(deployment)[0];
    assert_eq!(strings(&container["args"]), ["ingress"]);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["ports"][0]["containerPort"], ingress_port);
    let addr = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "CONVEYOR_INGRESS_ADDR")
        .unwrap()["value"]
        .as_str()
        .unwrap();
    assert!(addr.ends_with(&format!(":{ingress_port}")));
    let service = ingress.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        container["ports"][0]["name"]
    );
    let selected = "app.kubernetes.io/name";
    assert_eq!(
        service["spec"]["selector"][selected],
        deployment["spec"]["template"]["metadata"]["labels"][selected]
    );

    let job = yaml_documents("k8s/migrate-job.yaml").remove(0);
    assert_eq!(strings(&containers(&job)[0]["args"]), ["migrate", "run"]);
    assert_eq!(
        job["spec"]["backoffLimit"], 0,
        "a failed migration needs a person"
    );
}

/// Fails unless `name` is a metric registered in platform/src/metrics.rs (the one
/// place metrics are declared, served by the ingress and the workers).
fn assert_exported_metric(name: &str, context: &str) {
    let declared = include_str!("../../../platform/src/metrics.rs");
    assert!(
        declared.contains(&format!("\"{name}\"")),
        "{context}: `{name}` is not a metric we export"
    );
}

#[test]
fn the_worker_deployment_probes_real_routes_and_keda_scales_it_on_our_metric() {
    let (_, worker_port) = default_ports();
    let deployment = yaml_documents("autoscaling/worker-deployment.yaml").remove(0);
    assert_eq!(deployment["kind"], "Deployment");
    let name = deployment["metadata"]["name"].as_str().unwrap();
    let container = containers(&deployment)[0];
    assert_eq!(strings(&container["args"]), ["worker"]);

    // The port is the worker's default metrics port, and the container listens on it.
    let port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["containerPort"] == worker_port)
        .unwrap_or_else(|| panic!("no containerPort {worker_port} (worker.metrics_addr)"));
    let env = |var: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == var)
            .unwrap_or_else(|| panic!("the worker Deployment does not set {var}"))
    };
    assert!(
        env("CONVEYOR_WORKER_METRICS_ADDR")["value"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{worker_port}"))
    );
    assert_eq!(
        env("CONVEYOR_MAIL_SMTP_URL")["valueFrom"]["secretKeyRef"]["key"],
        "smtp-url",
        "mail tasks need the Secret's SMTP URL"
    );
    // The probes ask that port for routes the worker serves.
    let routes = include_str!("../../../worker/src/http.rs");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == port["name"] || get["port"] == worker_port,
            "{probe} asks port {} instead of {worker_port}",
            get["port"]
        );
        assert!(
            routes.contains(&format!(".route(\"{path}\"")),
            "the worker serves no {path}"
        );
    }
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(grace > grace_secs(), "{grace}s does not cover the drain");

    // KEDA scales that Deployment, on a metric we export.
    let scaled = yaml_documents("autoscaling/keda-scaledobject.yaml").remove(0);
    assert_eq!(scaled["kind"], "ScaledObject");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], name);
    let triggers = scaled["spec"]["triggers"].as_array().unwrap();
    assert!(!triggers.is_empty());
    for trigger in triggers {
        let query = trigger["metadata"]["query"].as_str().expect("a query");
        let metrics = crate::deploy::metric_names(query);
        assert!(!metrics.is_empty(), "`{query}` queries none of our metrics");
        for metric in metrics {
            assert_exported_metric(&metric, "keda-scaledobject.yaml");
        }
    }
}

#[test]
fn grafana_provisioning_points_at_compose_prometheus_and_the_mounted_dashboard() {
    let compose = yaml_documents("docker-compose.yml").remove(0);
    let grafana = &compose["services"]["grafana"];
    let mounts: Vec<(&str, &str)> = strings(&grafana["volumes"])
        .into_iter()
        .map(|m| {
            let mut parts = m.split(':');
            (parts.next().unwrap(), parts.next().unwrap())
        })
        .collect();
    let mounted_at = |source: &str| {
        mounts
            .iter()
            .find(|(from, _)| *from == source)
            .unwrap_or_else(|| panic!("grafana does not mount {source}"))
            .1
    };

    let datasources = yaml_documents("compose/grafana/datasources.yml").remove(0);
    assert!(
        mounted_at("./compose/grafana/datasources.yml")
            .starts_with("/etc/grafana/provisioning/datasources/")
    );
    let prometheus = datasources["datasources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["type"] == "prometheus")
        .expect("a prometheus datasource (the dashboard's datasource variable asks for one)");
    let url = prometheus["url"].as_str().unwrap();
    let (host, port) = url
        .strip_prefix("http://")
        .and_then(|rest| rest.trim_end_matches('/').split_once(':'))
        .unwrap_or_else(|| panic!("datasource url `{url}` is not http://host:port"));
    let service = &compose["services"][host];
    assert!(
        service["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("prom/prometheus")),
        "the datasource's host `{host}` is not the compose Prometheus"
    );
    let container_port = strings(&service["ports"])[0].rsplit(':').next().unwrap();
    assert_eq!(
        port, container_port,
        "the datasource asks another port than Prometheus listens on"
    );

    let dashboards = yaml_documents("compose/grafana/dashboards.yml").remove(0);
    assert!(
        mounted_at("./compose/grafana/dashboards.yml")
            .starts_with("/etc/grafana/provisioning/dashboards/")
    );
    let folder = dashboards["providers"][0]["options"]["path"]
        .as_str()
        .expect("a dashboards folder");
    let dashboard = mounted_at("./grafana/conveyor.json");
    assert_eq!(
        Path::new(dashboard).parent(),
        Some(Path::new(folder)),
        "the dashboard is mounted outside the provider's folder"
    );
}

/// `key=value` lines of a systemd unit (the last value wins, as in systemd for these keys).
fn unit(path: &str) -> HashMap<String, Vec<String>> {
    let mut entries: HashMap<String, Vec<String>> = HashMap::new();
    for line in read(path).lines() {
        if let Some((key, value)) = line.split_once('=')
            && !line.starts_with('#')
        {
            entries
                .entry(key.trim().to_owned())
                .or_default()
                .push(value.trim().to_owned());
        }
    }
    entries
}

#[test]
fn systemd_units_drain_on_sigterm_and_restart_on_failure() {
    for (path, subcommand) in [
        ("systemd/conveyor-ingress.service", vec!["ingress"]),
        ("systemd/conveyor-worker@.service", vec!["worker"]),
        ("systemd/conveyor-migrate.service", vec!["migrate", "run"]),
    ] {
        let unit = unit(path);
        let exec = &unit["ExecStart"][0];
        let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
        assert_eq!(args, subcommand, "{path}");
        subcommand_path(&args);
        for env in unit.get("Environment").into_iter().flatten() {
            assert_config_var(env.split('=').next().unwrap(), path);
        }
        if subcommand[0] == "migrate" {
            assert_eq!(unit["Type"], ["oneshot"]);
            continue;
        }
        assert_eq!(unit["KillSignal"], ["SIGTERM"], "{path}");
        assert_eq!(unit["Restart"], ["on-failure"], "{path}");
        let stop = seconds(&unit["TimeoutStopSec"][0]);
        assert!(
            stop > grace_secs(),
            "{path}: TimeoutStopSec={stop} does not cover the drain"
        );
    }
}

/// Every `conveyor …` line inside a fenced code block of the runbook.
fn runbook_commands(markdown: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_code = false;
    for line in markdown.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code && trimmed.starts_with("conveyor ") {
            commands.push(trimmed.to_owned());
        }
    }
    commands
}

/// Every `docker compose … run --rm …` line inside a fenced code block, or in a comment.
fn compose_run_commands(text: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let (code, comment) = (in_code, trimmed.strip_prefix('#').map(str::trim));
        let candidate = comment.unwrap_or(trimmed);
        if (code || comment.is_some())
            && candidate.starts_with("docker compose ")
            && candidate.contains(" run --rm ")
        {
            commands.push(candidate.to_owned());
        }
    }
    commands
}

/// `conveyor WORDS` is a real subcommand and every `--flag` of it exists; returns the subcommand path.
fn real_command(command: &str, words: &[&str]) -> String {
    let path = subcommand_path(words);
    let help = help(&path);
    for flag in words.iter().filter(|w| w.starts_with("--")) {
        let flag = flag.split('=').next().unwrap();
        assert!(
            help.split(|c: char| c.is_whitespace() || c == ',')
                .any(|w| w == flag),
            "`{command}`: `conveyor {}` has no {flag}",
            path.join(" ")
        );
    }
    path.join(" ")
}

#[test]
fn runbook_commands_are_real_subcommands_with_real_flags() {
    let runbook = read("RUNBOOK.md");
    let commands = runbook_commands(&runbook);
    assert!(
        commands.len() >= 8,
        "the runbook shows too few commands: {commands:?}"
    );
    let mut paths = BTreeSet::new();
    for command in &commands {
        let words: Vec<&str> = command.split_whitespace().skip(1).collect();
        paths.insert(real_command(command, &words));
    }
    // `docker compose … run --rm SERVICE ARGS` in the runbook and in the compose
    // file's header: SERVICE runs our image, so ARGS go to `conveyor`.
    let compose_runs: Vec<String> = compose_run_commands(&runbook)
        .into_iter()
        .chain(compose_run_commands(&read("docker-compose.yml")))
        .collect();
    assert!(
        compose_runs.len() >= 2,
        "the runbook and the compose file do not say how to make an API key in compose"
    );
    let compose = yaml_documents("docker-compose.yml").remove(0);
    assert!(
        read("Dockerfile").contains(r#"ENTRYPOINT ["/usr/local/bin/conveyor"]"#),
        "compose run passes its arguments to conveyor only with this entrypoint"
    );
    for command in &compose_runs {
        let (_, after) = command.split_once(" run --rm ").unwrap();
        let mut words = after.split_whitespace();
        let service = words.next().expect("a service");
        assert!(
            compose["services"][service]["image"]
                .as_str()
                .is_some_and(|image| image.starts_with("conveyor:")),
            "`{command}`: compose service `{service}` does not run our image"
        );
        let words: Vec<&str> = words.collect();
        paths.insert(real_command(command, &words));
    }
    // The runbook covers the commands its sections promise.
    for needed in [
        "migrate status",
        "migrate run",
        "migrate revert",
        "dlq list",
        "dlq replay",
        "keys create",
    ] {
        assert!(
            paths.contains(needed),
            "the runbook never shows `conveyor {needed}`"
        );
    }
}

#[test]
fn the_checks_reject_what_does_not_exist() {
    // The helpers above must be able to fail, or the tests prove nothing.
    assert!(std::panic::catch_unwind(|| subcommand_path(&["deploy"])).is_err());
    assert!(
        std::panic::catch_unwind(|| assert_config_var("CONVEYOR_INGRESS_ADRESS", "test")).is_err()
    );
    assert_config_var("CONVEYOR_AMQP_SHUFFLE_NODES", "test");
    assert_eq!(
        runbook_commands("text\n```sh\nconveyor migrate run\n```\nconveyor not-in-code\n"),
        ["conveyor migrate run"]
    );
    assert_eq!(
        compose_run_commands(
            "#   docker compose run --rm migrate keys list\ndocker compose run --rm x y\n```\ndocker compose up\n```\n"
        ),
        ["docker compose run --rm migrate keys list"]
    );
    assert!(
        std::panic::catch_unwind(|| real_command(
            "conveyor keys create --nope",
            &["keys", "create", "--nope"]
        ))
        .is_err()
    );
    assert!(std::panic::catch_unwind(|| assert_exported_metric("conveyor_nope", "test")).is_err());
    assert_exported_metric("conveyor_jobs_succeeded_total", "test");
    assert!(Path::new(&deploy("RUNBOOK.md")).exists());
}

/// The precondition of the runbook's rollback: an older binary (one that does
/// not know the newest migration) is refused by default, starts on the newer
/// schema with `database.allow_newer_schema`, while a binary whose migrations
/// are not all applied always refuses to.
#[tokio::test]
async fn an_older_binary_starts_on_a_newer_schema_but_not_on_an_older_one() {
    use diesel::connection::SimpleConnection;
    let db = tokio::task::spawn_blocking(crate::harness::TestDb::create)
        .await
        .unwrap();
    let config = crate::harness::test_config(&db);
    let mut conn = db.conn();
    conn.batch_execute(
        "INSERT INTO __diesel_schema_migrations (version) VALUES ('20991231000000')",
    )
    .unwrap();
    let database = config.database.clone();
    let err = tokio::task::spawn_blocking(move || {
        conveyor_platform::migrations::ensure_current(&database)
    })
    .await
    .unwrap()
    .expect_err("a newer schema is refused by default");
    assert!(err.to_string().contains("allow_newer_schema"), "{err}");
    let mut database = config.database.clone();
    database.allow_newer_schema = true;
    tokio::task::spawn_blocking(move || conveyor_platform::migrations::ensure_current(&database))
        .await
        .unwrap()
        .expect("a newer schema is accepted when allowed");
    conn.batch_execute(
        "DELETE FROM __diesel_schema_migrations WHERE version = (SELECT min(version) FROM __diesel_schema_migrations)",
    )
    .unwrap();
    let mut database = config.database.clone();
    database.allow_newer_schema = true;
    let err = tokio::task::spawn_blocking(move || {
        conveyor_platform::migrations::ensure_current(&database)
    })
    .await
    .unwrap()
    .expect_err("a missing migration is refused, whatever allow_newer_schema says");
    assert!(err.to_string().contains("pending"), "{err}");
}

/// The runbook's throughput table is the latest `make bench-cluster` run, as in benches/RESULTS.md.
#[test]
fn runbook_throughput_numbers_are_those_of_benches_results() {
    let block = |text: &str| {
        text.split("<!-- cluster-scaling:begin")
            .nth(1)
            .and_then(|rest| rest.split("<!-- cluster-scaling:end -->").next())
            .map(str::to_owned)
    };
    let results = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../benches/RESULTS.md"),
    )
    .unwrap();
    let in_results = block(&results).expect("benches/RESULTS.md has a bench-cluster table");
    assert!(
        in_results.contains("| three-node cluster |"),
        "{in_results}"
    );
    assert_eq!(
        block(&read("RUNBOOK.md")).as_deref(),
        Some(in_results.as_str()),
        "deploy/RUNBOOK.md's throughput table differs from benches/RESULTS.md (make bench-cluster writes both)"
    );
}
