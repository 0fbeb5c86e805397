//! `ensure-services.sh` does not stop at "RabbitMQ answers on its port": on
//! RabbitMQ 3.10 the supervisor of the quorum queues' at-least-once
//! dead-letter workers can give up and stay dead, after which every queue
//! Conveyor declares fails with `noproc` while the port still answers (a whole
//! CI run failed that way). So after the port answers, services.sh declares
//! and deletes such a queue with `rabbitmqctl eval`, and on a local broker that
//! cannot, restarts its app (stop_app, start_app) and checks again.
//!
//! The decisions are tested with a stand-in `rabbitmqctl` first on PATH
//! ([`StubRabbitmqctl`]): the shared RabbitMQ is never stopped here, since
//! other tests use it at the same time. The real check runs against the shared
//! broker only in dry-run mode, where a restart would only be printed.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use conveyor_platform::amqp::Topology;
use lapin::types::AMQPValue;

use crate::make_run::repo;

/// What a broken broker's `rabbitmqctl eval` printed for the check (3.10.8,
/// rabbit_fifo_dlx_sup terminated), shortened.
const NOPROC: &str = "{failed,\n {exit,\n  {{noproc,\n    {gen_server,call,\n     [rabbit_fifo_dlx_sup,\n      {start_child,\n       [{resource,<<\"/\">>,queue,<<\"conveyor.ensure-services.check.1\">>}]},\n      infinity]}},\n   {gen_statem,call,[x,y,30000]}}}}";

/// A stand-in `rabbitmqctl` in a scratch directory. Each `eval` answers with
/// the next of the answers it was given (`ok`; `failed`, the `noproc` of a dead
/// dead-letter supervisor; `unreachable`, a node the CLI cannot reach, exit
/// 69), `ok` once they run out; `stop_app` and `start_app` succeed and change
/// nothing; anything else fails. Every call is logged (`eval` without its
/// expression, which is kept in `expression`).
pub(crate) struct StubRabbitmqctl {
    dir: tempfile::TempDir,
}

impl StubRabbitmqctl {
    pub(crate) fn new(evals: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let mut answers = evals.join("\n");
        answers.push('\n');
        std::fs::write(dir.path().join("evals"), answers).unwrap();
        std::fs::write(dir.path().join("noproc"), NOPROC).unwrap();
        let script = dir.path().join("rabbitmqctl");
        std::fs::write(
            &script,
            format!(
                "#!/usr/bin/env bash\n\
                 [[ \"$1\" == -q ]] && shift\n\
                 case \"$1\" in\n\
                 eval)\n\
                   echo eval >>{d}/calls\n\
                   printf '%s' \"$2\" >{d}/expression\n\
                   answer=$(head -n1 {d}/evals); sed -i 1d {d}/evals\n\
                   case \"${{answer:-ok}}\" in\n\
                   ok) echo ok ;;\n\
                   failed) cat {d}/noproc; echo ;;\n\
                   unreachable) echo \"Error: unable to perform an operation on node 'rabbit@localhost'.\" >&2; exit 69 ;;\n\
                   *) exit 64 ;;\n\
                   esac ;;\n\
                 stop_app|start_app) echo \"$1\" >>{d}/calls; echo \"stub: $1\" ;;\n\
                 *) echo \"$*\" >>{d}/calls; exit 1 ;;\n\
                 esac\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    /// PATH with the stub first; panics unless `rabbitmqctl` then finds it.
    pub(crate) fn path(&self) -> String {
        let path = format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let found = Command::new("bash")
            .args(["-c", "command -v rabbitmqctl"])
            .env("PATH", &path)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&found.stdout).trim(),
            self.dir.path().join("rabbitmqctl").display().to_string(),
            "the stub must shadow the real rabbitmqctl"
        );
        path
    }

    /// The calls so far, in order.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The Erlang expression of the last `eval`.
    fn expression(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("expression")).unwrap()
    }
}

/// What a bash snippet printed, and whether it succeeded.
struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `script` after sourcing services.sh with `set -euo pipefail`, as
/// ensure-services.sh does, in dry-run mode when `dry`, with PATH `path`.
fn services(script: &str, dry: bool, path: Option<&str>) -> Outcome {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(format!(
            "set -euo pipefail; source deploy/local/services.sh; SERVICES_DRY_RUN={}; {script}",
            u8::from(dry)
        ))
        .current_dir(repo());
    if let Some(path) = path {
        command.env("PATH", path);
    }
    let out = command.output().expect("run bash");
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `ensure-services.sh ARGS`, as `make test` and .ci/run run it, against the
/// shared servers (which answer), with PATH `path`.
fn ensure_services(args: &[&str], path: &str) -> Outcome {
    let out = Command::new("bash")
        .arg("deploy/local/ensure-services.sh")
        .args(args)
        .current_dir(repo())
        .env("PATH", path)
        .env("CONVEYOR_DATABASE_URL", crate::harness::PG_SERVER)
        .env("CONVEYOR_AMQP_URL", crate::harness::AMQP_URL)
        .output()
        .unwrap();
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const CHECK_SHARED: &str = "svc_rabbitmq_ensure_dlx 127.0.0.1 5672 yes";
const DECLARES: &str = "RabbitMQ declares a quorum queue with at-least-once dead-lettering";

#[test]
fn a_broker_that_cannot_declare_dead_lettering_queues_gets_its_app_restarted_and_checked_again() {
    let stub = StubRabbitmqctl::new(&["failed", "ok"]);
    let out = ensure_services(&[], &stub.path());
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(stub.calls(), ["eval", "stop_app", "start_app", "eval"]);
    // One line, naming what failed.
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.starts_with(
            "ensure-services: RabbitMQ at 127.0.0.1:5672 answers but cannot declare a quorum \
             queue with at-least-once dead-lettering: {failed, {exit, {{noproc, {gen_server,call, \
             [rabbit_fifo_dlx_sup, "
        ),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stdout,
        format!(
            "PostgreSQL answers at 127.0.0.1:5432\n\
             RabbitMQ answers at 127.0.0.1:5672\n\
             Restarting RabbitMQ's app (rabbitmqctl stop_app, start_app)...\n\
             stub: stop_app\n\
             stub: start_app\n\
             {DECLARES} again\n"
        )
    );
}

#[test]
fn a_broker_still_broken_after_the_restart_fails_with_what_to_do() {
    let stub = StubRabbitmqctl::new(&["failed", "failed"]);
    let out = services(CHECK_SHARED, false, Some(&stub.path()));
    assert!(!out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(stub.calls(), ["eval", "stop_app", "start_app", "eval"]);
    let last = out.stderr.lines().last().unwrap_or_default();
    for needed in [
        "still cannot declare a quorum queue with at-least-once dead-lettering after an app restart",
        "noproc",
        "sudo systemctl restart rabbitmq-server",
        "/var/log/rabbitmq/",
    ] {
        assert!(last.contains(needed), "{needed:?} in: {}", out.stderr);
    }
}

#[test]
fn a_dry_run_checks_and_prints_the_restart_it_would_do() {
    let stub = StubRabbitmqctl::new(&["failed"]);
    let out = ensure_services(&["--dry-run"], &stub.path());
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(stub.calls(), ["eval"], "a dry run restarted the app");
    assert!(
        out.stderr.contains("answers but cannot declare"),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stdout,
        "PostgreSQL answers at 127.0.0.1:5432\n\
         RabbitMQ answers at 127.0.0.1:5672\n\
         Restarting RabbitMQ's app (rabbitmqctl stop_app, start_app)...\n\
         would run: rabbitmqctl stop_app\n\
         would run: rabbitmqctl start_app\n\
         would wait up to 60 s for RabbitMQ at 127.0.0.1:5672\n\
         would check again that RabbitMQ can declare a quorum queue with at-least-once dead-lettering\n"
    );
}

#[test]
fn a_healthy_unreachable_or_remote_broker_is_never_restarted() {
    let stub = StubRabbitmqctl::new(&["ok"]);
    let out = services(CHECK_SHARED, false, Some(&stub.path()));
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, format!("{DECLARES}\n"));
    assert_eq!(stub.calls(), ["eval"]);

    // A node the local CLI cannot administer (another node name, no cookie): a note.
    let stub = StubRabbitmqctl::new(&["unreachable"]);
    let out = services(CHECK_SHARED, false, Some(&stub.path()));
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout,
        "RabbitMQ: not checking that it can declare a quorum queue with at-least-once \
         dead-lettering (rabbitmqctl eval: Error: unable to perform an operation on node \
         'rabbit@localhost'.)\n"
    );
    assert_eq!(stub.calls(), ["eval"]);

    let stub = StubRabbitmqctl::new(&["failed"]);
    let out = services(
        "svc_rabbitmq_ensure_dlx rabbit.example.com 5672 no",
        false,
        Some(&stub.path()),
    );
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout,
        "RabbitMQ at rabbit.example.com:5672 is not local: not checking that it can declare \
         a quorum queue with at-least-once dead-lettering\n"
    );
    assert!(stub.calls().is_empty(), "{:?}", stub.calls());
}

/// The check declares what the platform declares: every argument of a work
/// queue (topology.rs) is in its expression, with the same string values.
#[test]
fn the_check_declares_a_work_queues_arguments() {
    let stub = StubRabbitmqctl::new(&["ok"]);
    let out = services(CHECK_SHARED, false, Some(&stub.path()));
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let expression = stub.expression();
    let topology = Topology {
        namespace: "ns".into(),
        queues: vec!["default".into()],
        delivery_limit: 5,
        quorum_group_size: Some(1),
    };
    let args = topology.work_queue_args("default");
    assert!(args.inner().len() >= 7, "{args:?}");
    for (key, value) in args.inner() {
        let key = key.as_str();
        assert!(
            expression.contains(&format!("{{<<\"{key}\">>, ")),
            "{key} is not declared by the check:\n{expression}"
        );
        if let (AMQPValue::LongString(value), false) = (value, key == "x-dead-letter-routing-key") {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                expression.contains(&format!("{{<<\"{key}\">>, longstr, <<\"{value}\">>}}"))
                    || (value.is_empty()
                        && expression.contains(&format!("{{<<\"{key}\">>, longstr, <<>>}}"))),
                "{key} = {value:?} is not what the check declares:\n{expression}"
            );
        }
    }
}

/// The real check against the shared broker, in dry-run mode (if it found the
/// broker broken it would only print the restart): it passes. Where the local
/// rabbitmqctl cannot administer the node (not root), it says it did not check.
#[test]
fn the_real_check_passes_on_the_running_broker() {
    let out = services(CHECK_SHARED, true, None);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    if is_root {
        assert_eq!(out.stdout, format!("{DECLARES}\n"), "{}", out.stderr);
    } else {
        assert!(
            out.stdout.starts_with("RabbitMQ: not checking"),
            "{}",
            out.stdout
        );
    }
}
