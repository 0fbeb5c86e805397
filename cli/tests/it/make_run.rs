//! `make run` itself (deploy/local/run.sh): the ingress and worker it starts
//! run a job enqueued with the key it prints, and one SIGINT to its process
//! group (what Ctrl-C sends from a terminal) stops both within the grace
//! period: each gets one signal, the worker drains (a job running at that
//! moment finishes, once), no conveyor process is left behind, and the servers
//! that were running before are still running.
//!
//! run.sh runs against a database and broker namespace of its own, on a free
//! ingress port and a port-0 worker metrics address, so it never collides with
//! a developer's `make run`; the database is dropped and the namespace's
//! queues deleted afterwards. MAKE_RUN_BIN points run.sh at the binary cargo
//! built for this test (a nested `cargo build` would wait for cargo's lock).

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_platform::Config;
use conveyor_platform::amqp::Topology;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{AMQP_URL, PG_SERVER};
use crate::local_broker_repair::StubRabbitmqctl;

/// The worker's drain deadline given to run.sh's processes.
const GRACE: Duration = Duration::from_secs(5);

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub(crate) fn answers(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_ok()
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Pids of the live `conveyor` processes whose environment has `CONVEYOR_NAMESPACE=<namespace>`.
fn conveyor_processes(namespace: &str) -> Vec<i32> {
    let bin = std::fs::canonicalize(env!("CARGO_BIN_EXE_conveyor")).unwrap();
    let marker = format!("CONVEYOR_NAMESPACE={namespace}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let dir = entry.path();
        let Ok(exe) = std::fs::read_link(dir.join("exe")) else {
            continue;
        };
        if exe != bin {
            continue;
        }
        let Ok(environ) = std::fs::read(dir.join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == marker.as_bytes())
            && stat_field(pid, 0).is_none_or(|state| state != "Z")
        {
            pids.push(pid);
        }
    }
    pids
}

/// Field `index` of /proc/<pid>/stat after the command name (0: state, 2: process group).
fn stat_field(pid: i32, index: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(index).map(str::to_owned)
}

/// The stored state and runs of job `id` in database `database`.
fn job_state(database: &str, id: Uuid) -> (String, i32) {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        state: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        runs: i32,
    }
    let mut conn = PgConnection::establish(&format!("{PG_SERVER}/{database}")).unwrap();
    let row: Row = diesel::sql_query("SELECT state, runs FROM jobs WHERE id = $1")
        .bind::<diesel::sql_types::Uuid, _>(id)
        .get_result(&mut conn)
        .unwrap();
    (row.state, row.runs)
}

/// run.sh and everything it owns; on drop (a failed assertion included) kills
/// whatever is left, drops the database and deletes the broker namespace.
pub(crate) struct MakeRun {
    pub(crate) child: Child,
    namespace: String,
    database: String,
    /// Every line run.sh and its processes wrote, stdout and stderr interleaved.
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// The `rabbitmqctl` first on run.sh's PATH: it answers ensure-services.sh's
    /// dead-lettering check, so that a real run never restarts the shared broker.
    _rabbitmqctl: StubRabbitmqctl,
}

impl MakeRun {
    fn start(port: u16) -> Self {
        Self::start_with(port, |_| {})
    }

    /// Like [`Self::start`], after `adjust` changes run.sh's command (its environment).
    pub(crate) fn start_with(port: u16, adjust: impl FnOnce(&mut Command)) -> Self {
        let namespace = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
        let database = format!("t_make_run_{}", Uuid::new_v4().simple());
        let rabbitmqctl = StubRabbitmqctl::new(&[]);
        let mut command = Command::new("bash");
        command
            .arg("deploy/local/run.sh")
            .current_dir(repo())
            .env("PATH", rabbitmqctl.path());
        // Only this test's configuration: none of the caller's CONVEYOR_* variables.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CONVEYOR_") {
                command.env_remove(name);
            }
        }
        command
            .env("MAKE_RUN_BIN", env!("CARGO_BIN_EXE_conveyor"))
            .env("CONVEYOR_DATABASE_URL", format!("{PG_SERVER}/{database}"))
            .env("CONVEYOR_AMQP_URL", AMQP_URL)
            .env("CONVEYOR_NAMESPACE", &namespace)
            .env("CONVEYOR_INGRESS_ADDR", format!("127.0.0.1:{port}"))
            .env("CONVEYOR_WORKER_METRICS_ADDR", "127.0.0.1:0")
            .env(
                "CONVEYOR_WORKER_GRACE_PERIOD_MS",
                GRACE.as_millis().to_string(),
            )
            .env("CONVEYOR_STATS_DEFAULT_SCHEDULES", "false")
            .env("CONVEYOR_LOG_LEVEL", "info")
            // One JSON object per log line, so the worker's lines can be told apart.
            .env("CONVEYOR_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, like a terminal's foreground job: Ctrl-C signals the group.
            .process_group(0);
        adjust(&mut command);
        let mut child = command.spawn().expect("start bash deploy/local/run.sh");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            read_lines(child.stdout.take().unwrap(), lines.clone()),
            read_lines(child.stderr.take().unwrap(), lines.clone()),
        ];
        Self {
            child,
            namespace,
            database,
            lines,
            readers,
            _rabbitmqctl: rabbitmqctl,
        }
    }

    /// Sends one SIGINT to run.sh's process group, as Ctrl-C in its terminal
    /// would, and waits up to `limit` for run.sh to exit (blocking).
    pub(crate) fn ctrl_c(&mut self, limit: Duration) -> std::process::ExitStatus {
        let signalled = Instant::now();
        killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGINT).unwrap();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                signalled.elapsed() < limit,
                "run.sh still running {limit:?} after SIGINT:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The rest of the first line containing `prefix`, waiting up to `timeout`.
    pub(crate) fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rest) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.find(prefix).map(|at| l[at + prefix.len()..].to_owned()))
            {
                return rest;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "run.sh exited ({status}) before printing {prefix:?}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "run.sh did not print {prefix:?} within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn read_lines(
    stream: impl Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("TEST_LOG").is_some() {
                eprintln!("make run | {line}");
            }
            lines.lock().unwrap().push(line);
        }
    })
}

impl Drop for MakeRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        for pid in conveyor_processes(&self.namespace) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Ok(mut admin) = PgConnection::establish(&format!("{PG_SERVER}/postgres")) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ));
        }
        let config = Config {
            namespace: self.namespace.clone(),
            ..Config::default()
        };
        let topology = Topology::for_config(&config);
        crate::harness::delete_topology(topology);
    }
}

/// Polls the job at `url` until it is in `state`, for up to 30 s.
async fn wait_for_state(client: &reqwest::Client, url: &str, state: &str, run: &MakeRun) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        if job["state"] == json!(state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job not {state}: {job}\n{}",
            run.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_run_runs_a_job_and_one_ctrl_c_drains_the_worker_and_stops_everything() {
    let started = Instant::now();
    assert!(
        answers(5432) && answers(5672),
        "PostgreSQL and RabbitMQ must be running before the test"
    );
    let port = free_port();
    let mut run = MakeRun::start(port);

    // The URL and key it prints.
    let base = tokio::task::block_in_place(|| {
        run.wait_for_line("Conveyor is running: ingress ", Duration::from_secs(60))
    });
    let base = base.split_whitespace().next().unwrap().to_owned();
    assert_eq!(base, format!("http://127.0.0.1:{port}"));
    let key = run
        .output()
        .lines()
        .find_map(|l| l.trim().strip_prefix("KEY=").map(str::to_owned))
        .expect("a KEY= line");
    assert!(key.starts_with("cvk_"), "{key}");

    // The two conveyor processes, each in a process group of its own, so the
    // group's SIGINT does not reach them: run.sh passes one SIGTERM on.
    let processes = conveyor_processes(&run.namespace);
    assert_eq!(processes.len(), 2, "{processes:?}\n{}", run.output());
    let group = run.child.id().to_string();
    for pid in &processes {
        assert_ne!(
            stat_field(*pid, 2).as_deref(),
            Some(group.as_str()),
            "conveyor process {pid} is in run.sh's process group"
        );
    }

    // The printed curl example, with the printed key.
    let client = crate::harness::client_with(&key);
    let response = client
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(r#"{"task": "diag.noop", "args": {}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let status_url = format!("{base}{}", accepted["status_url"].as_str().unwrap());
    wait_for_state(&client, &status_url, "succeeded", &run).await;

    // A job still running when Ctrl-C comes: the drain lets it finish.
    let response = client
        .post(format!("{base}/v1/jobs"))
        .json(&json!({"task": "diag.sleep", "args": {"ms": 1500}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let sleeper: Uuid = accepted["id"].as_str().unwrap().parse().unwrap();
    let sleeper_url = format!("{base}{}", accepted["status_url"].as_str().unwrap());
    wait_for_state(&client, &sleeper_url, "running", &run).await;

    // Ctrl-C.
    let status = tokio::task::block_in_place(|| run.ctrl_c(GRACE + Duration::from_secs(10)));
    // The readers see EOF once every process writing to the pipes has exited.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !run.readers.iter().all(|r| r.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "something run.sh started still holds its output open:\n{}",
            run.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = run.output();
    assert!(status.success(), "run.sh exited with {status}:\n{output}");
    assert!(
        output.contains("worker exited with status 0")
            && output.contains("ingress exited with status 0"),
        "{output}"
    );
    let worker_logged = |message: &str| {
        output.lines().any(|l| {
            l.contains(r#""target":"conveyor_worker"#)
                && l.contains(&format!(r#""message":"{message}""#))
        })
    };
    assert!(
        worker_logged("draining") && worker_logged("worker stopped"),
        "the worker did not log its drain:\n{output}"
    );
    assert!(
        output.contains(r#""message":"draining","in_flight":1"#),
        "the sleeping job was not in flight when the drain began:\n{output}"
    );
    let (state, runs) = job_state(&run.database, sleeper);
    assert_eq!(
        (state.as_str(), runs),
        ("succeeded", 1),
        "the job running at Ctrl-C did not finish in the drain:\n{output}"
    );
    assert!(
        !output.contains("second signal"),
        "a process got two signals:\n{output}"
    );
    assert_eq!(conveyor_processes(&run.namespace), Vec::<i32>::new());
    assert!(
        answers(5432) && answers(5672),
        "make run stopped servers that were running before it"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
