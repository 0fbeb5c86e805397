//! `make run` stops the servers it started, and only those: run.sh with a
//! RabbitMQ it has to start (a stand-in on a free port: stub `rabbitmq-server`
//! and `rabbitmqctl` first on PATH) and the real PostgreSQL, which answers.
//! One Ctrl-C must stop the stand-in through `rabbitmqctl shutdown` and leave
//! the real servers alone. The conveyor binary is a stand-in too (a real one
//! would need a real broker): `migrate` and `keys` print, `worker` waits for
//! SIGTERM, `ingress` serves `/readyz` until SIGTERM.
//!
//! The real `rabbitmqctl` is never reached: the test checks that the stub is
//! what `command -v` finds on run.sh's PATH before running it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::make_run::{MakeRun, answers, free_port};

fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Stand-ins for `rabbitmq-server`, `rabbitmqctl` and `conveyor` in `dir`,
/// logging each call to `dir/calls`.
fn stubs(dir: &Path, broker_port: u16, ingress_port: u16) {
    let d = dir.display();
    // The "broker": something listening on broker_port, detached like the real one.
    write_script(
        &dir.join("rabbitmq-server"),
        &format!(
            "#!/usr/bin/env bash\n\
             echo \"rabbitmq-server $*\" >>{d}/calls\n\
             [[ \"$1\" == -detached ]] || exit 1\n\
             setsid python3 -m http.server --bind 127.0.0.1 {broker_port} >/dev/null 2>&1 </dev/null &\n\
             echo $! >{d}/broker.pid\n"
        ),
    );
    write_script(
        &dir.join("rabbitmqctl"),
        &format!(
            "#!/usr/bin/env bash\n\
             echo \"rabbitmqctl $*\" >>{d}/calls\n\
             [[ \"$1\" == shutdown ]] || exit 1\n\
             pid=$(cat {d}/broker.pid)\n\
             kill \"$pid\"\n\
             while kill -0 \"$pid\" 2>/dev/null; do sleep 0.05; done\n"
        ),
    );
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/readyz"), "ok").unwrap();
    let ingress = format!(
        "import functools, http.server, signal, sys\n\
         signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n\
         handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory='{d}/www')\n\
         http.server.HTTPServer(('127.0.0.1', {ingress_port}), handler).serve_forever()\n"
    );
    std::fs::write(dir.join("ingress.py"), ingress).unwrap();
    write_script(
        &dir.join("conveyor"),
        &format!(
            "#!/usr/bin/env bash\n\
             echo \"conveyor $*\" >>{d}/calls\n\
             case \"$1\" in\n\
             migrate) echo 'nothing to migrate' ;;\n\
             keys) echo cvk_stub_key ;;\n\
             worker) trap 'echo worker stopped >&2; exit 0' TERM; while :; do sleep 0.05; done ;;\n\
             ingress) exec python3 -u {d}/ingress.py >/dev/null 2>&1 ;;\n\
             *) exit 2 ;;\n\
             esac\n"
        ),
    );
}

/// Kills the stand-in broker (pid in `dir/broker.pid`) if it still runs when the test ends.
struct StopBroker<'a>(&'a Path);

impl Drop for StopBroker<'_> {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.join("broker.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_run_stops_the_server_it_started_and_leaves_running_ones_alone() {
    assert!(
        answers(5432) && answers(5672),
        "PostgreSQL and RabbitMQ must be running before the test"
    );
    let dir = tempfile::tempdir().unwrap();
    let (broker_port, ingress_port) = (free_port(), free_port());
    assert!(!answers(broker_port));
    stubs(dir.path(), broker_port, ingress_port);
    let _stop_broker = StopBroker(dir.path());
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let found = Command::new("bash")
        .args(["-c", "command -v rabbitmqctl rabbitmq-server"])
        .env("PATH", &path)
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&found.stdout).into_owned();
    assert_eq!(
        found,
        format!(
            "{0}/rabbitmqctl\n{0}/rabbitmq-server\n",
            dir.path().display()
        ),
        "the stubs must shadow the real RabbitMQ commands"
    );

    let mut run = MakeRun::start_with(ingress_port, |command| {
        command
            .env("PATH", &path)
            .env("MAKE_RUN_BIN", dir.path().join("conveyor"))
            .env(
                "CONVEYOR_AMQP_URL",
                format!("amqp://guest:guest@127.0.0.1:{broker_port}/%2f"),
            );
    });
    tokio::task::block_in_place(|| run.wait_for_line("Press Ctrl-C", Duration::from_secs(60)));
    let output = run.output();
    assert!(
        output.contains("PostgreSQL answers at 127.0.0.1:5432"),
        "{output}"
    );
    assert!(output.contains("Starting RabbitMQ..."), "{output}");
    assert!(answers(broker_port), "the stand-in broker is not up");

    let status = tokio::task::block_in_place(|| run.ctrl_c(Duration::from_secs(15)));
    let output = run.output();
    assert!(status.success(), "run.sh exited with {status}:\n{output}");
    assert!(
        output.contains("Stopping RabbitMQ (started by this run)..."),
        "{output}"
    );
    assert!(!output.contains("Stopping PostgreSQL"), "{output}");
    assert!(
        output.contains("worker exited with status 0")
            && output.contains("ingress exited with status 0"),
        "{output}"
    );
    let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
    let servers: Vec<_> = calls
        .lines()
        .filter(|l| l.starts_with("rabbitmq"))
        .collect();
    assert_eq!(
        servers,
        ["rabbitmq-server -detached", "rabbitmqctl shutdown"],
        "{calls}"
    );
    assert!(
        !answers(broker_port),
        "the server run.sh started still runs"
    );
    assert!(
        answers(5432) && answers(5672),
        "make run stopped servers that were running before it"
    );
}

/// `make test` is one of a newcomer's two commands, so it makes sure of the
/// servers itself, as `make run` does, before anything that needs them.
#[test]
fn make_test_makes_sure_of_the_servers_before_the_suite() {
    let out = Command::new("make")
        .args(["-n", "test"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let plan = String::from_utf8_lossy(&out.stdout);
    let at = |what: &str| {
        plan.find(what)
            .unwrap_or_else(|| panic!("no {what}:\n{plan}"))
    };
    assert!(at("ensure-services.sh") < at("test-prereqs.sh"), "{plan}");
    assert!(at("test-prereqs.sh") < at("nextest run"), "{plan}");
}
