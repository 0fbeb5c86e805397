//! The decisions of `deploy/local/ensure-services.sh` (`make run`, `make
//! services`, `.ci/run`): its functions in deploy/local/services.sh are called
//! with made-up facts in dry-run mode, where every command that would change
//! the system is printed instead of run. Nothing is installed, started or
//! stopped here; the real servers only answer the read-only checks.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What a bash snippet printed, and whether it succeeded.
struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `script` after sourcing services.sh, as ensure-services.sh does
/// (`set -euo pipefail`), in dry-run mode recording into a scratch file.
fn dry_run(script: &str) -> Outcome {
    let record = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -euo pipefail; source deploy/local/services.sh; \
             SERVICES_DRY_RUN=1; SERVICES_STARTED_FILE={}; {script}",
            record.path().display()
        ))
        .current_dir(repo())
        .output()
        .expect("run bash");
    let recorded = std::fs::read_to_string(record.path()).unwrap();
    assert!(
        recorded.is_empty(),
        "a dry run wrote the record file: {recorded}"
    );
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The line index of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
}

// Facts: host port answers is_local debian_version binary_present root manager.
const PG_MISSING_ROOT_APT: &str = "svc_postgres_actions 127.0.0.1 5432 no yes '' no yes apt";

#[test]
fn postgres_missing_as_root_with_apt_updates_installs_trusts_starts_and_records() {
    let out = dry_run(PG_MISSING_ROOT_APT);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let s = &out.stdout;
    let update = line_of(s, "would run: apt-get update");
    let install = line_of(
        s,
        "would run: env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql",
    );
    let trust = line_of(s, "would prepend to /etc/postgresql/");
    let start = line_of(s, "main reload");
    let record = line_of(s, "would record: postgresql ");
    assert!(
        update < install && install < trust && trust < start && start < record,
        "{s}"
    );
    assert!(s.contains("/main/pg_hba.conf: host all postgres 127.0.0.1/32 trust; host all postgres ::1/128 trust"), "{s}");
    assert!(
        s.contains("would wait up to 30 s for PostgreSQL at 127.0.0.1:5432"),
        "{s}"
    );
}

#[test]
fn an_installed_cluster_is_started_and_recorded_but_never_reconfigured() {
    let out = dry_run("svc_postgres_actions 127.0.0.1 5432 no yes 15 no yes apt");
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let s = &out.stdout;
    assert!(
        s.contains("would run: pg_ctlcluster --skip-systemctl-redirect 15 main start"),
        "{s}"
    );
    assert!(s.contains("would record: postgresql 15 main"), "{s}");
    assert!(!s.contains("apt-get"), "{s}");
    assert!(!s.contains("pg_hba.conf"), "{s}");
}

#[test]
fn servers_that_answer_are_used_and_nothing_is_done_or_recorded() {
    let out = dry_run(
        "svc_postgres_actions 127.0.0.1 5432 yes yes 15 no yes apt; \
         svc_rabbitmq_actions 127.0.0.1 5672 yes yes yes yes apt",
    );
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout,
        "PostgreSQL answers at 127.0.0.1:5432\nRabbitMQ answers at 127.0.0.1:5672\n"
    );
}

#[test]
fn a_remote_server_that_does_not_answer_is_an_error_not_an_install() {
    let out = dry_run("svc_postgres_actions db.example.com 5432 no no '' no yes apt");
    assert!(!out.ok);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr.contains("not local") && out.stderr.contains("CONVEYOR_DATABASE_URL"),
        "{}",
        out.stderr
    );
}

#[test]
fn not_installed_messages_name_this_systems_installer_and_never_apt_elsewhere() {
    for (manager, postgres, rabbitmq) in [
        ("dnf", "sudo dnf install postgresql-server", "install-rpm"),
        ("yum", "sudo yum install postgresql-server", "install-rpm"),
        (
            "zypper",
            "sudo zypper install postgresql-server",
            "sudo zypper install rabbitmq-server",
        ),
        (
            "pacman",
            "sudo pacman -S postgresql",
            "sudo pacman -S rabbitmq",
        ),
        (
            "apk",
            "sudo apk add postgresql",
            "sudo apk add rabbitmq-server",
        ),
        (
            "brew",
            "brew install postgresql@16",
            "brew install rabbitmq",
        ),
        (
            "none",
            "https://www.postgresql.org/download/",
            "https://www.rabbitmq.com/docs/download",
        ),
    ] {
        // As root too: only apt is ever used to install.
        let out = dry_run(&format!(
            "svc_postgres_actions 127.0.0.1 5432 no yes '' no yes {manager}"
        ));
        assert!(!out.ok, "{manager}");
        assert!(out.stdout.is_empty(), "{manager}: {}", out.stdout);
        assert!(
            out.stderr.contains("PostgreSQL is not installed") && out.stderr.contains(postgres),
            "{manager}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("apt"), "{manager}: {}", out.stderr);

        let out = dry_run(&format!(
            "svc_rabbitmq_actions 127.0.0.1 5672 no yes no yes {manager}"
        ));
        assert!(!out.ok, "{manager}");
        assert!(out.stdout.is_empty(), "{manager}: {}", out.stdout);
        assert!(
            out.stderr.contains("RabbitMQ is not installed") && out.stderr.contains(rabbitmq),
            "{manager}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("apt"), "{manager}: {}", out.stderr);
    }
}

#[test]
fn without_root_apt_systems_are_told_the_apt_commands() {
    let out = dry_run("svc_postgres_actions 127.0.0.1 5432 no yes '' no no apt");
    assert!(!out.ok);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr
            .contains("sudo apt-get update && sudo apt-get install postgresql"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_postgres_installed_some_other_way_is_not_reinstalled() {
    let out = dry_run("svc_postgres_actions 127.0.0.1 5432 no yes '' yes yes apt");
    assert!(!out.ok);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr.contains("installed but does not answer"),
        "{}",
        out.stderr
    );
}

#[test]
fn rabbitmq_missing_as_root_with_apt_updates_installs_starts_and_records() {
    let out = dry_run("svc_rabbitmq_actions 127.0.0.1 5672 no yes no yes apt");
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let s = &out.stdout;
    let update = line_of(s, "would run: apt-get update");
    let install = line_of(
        s,
        "would run: env DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server",
    );
    let record = line_of(s, "would record: rabbitmq");
    let start = line_of(s, "would run: rabbitmq-server -detached");
    assert!(
        update < install && install < record && record < start,
        "{s}"
    );
    assert_eq!(s.matches("would record").count(), 1, "{s}");
}

#[test]
fn an_installed_rabbitmq_is_started_and_recorded() {
    let out = dry_run("svc_rabbitmq_actions 127.0.0.1 5672 no yes yes no none");
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let s = &out.stdout;
    assert!(
        line_of(s, "would run: rabbitmq-server -detached") < line_of(s, "would record: rabbitmq"),
        "{s}"
    );
    assert!(!s.contains("apt-get"), "{s}");
}

#[test]
fn apt_get_update_runs_once_when_both_servers_are_installed() {
    let out = dry_run(&format!(
        "{PG_MISSING_ROOT_APT}; svc_rabbitmq_actions 127.0.0.1 5672 no yes no yes apt"
    ));
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.matches("apt-get update").count(),
        1,
        "{}",
        out.stdout
    );
    assert_eq!(
        out.stdout.matches("apt-get install").count(),
        2,
        "{}",
        out.stdout
    );
}

#[test]
fn stop_recorded_stops_exactly_what_was_recorded_newest_first() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, b"postgresql 15 main\nrabbitmq\n").unwrap();
    let out = dry_run(&format!("svc_stop_recorded {}", file.path().display()));
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let runs: Vec<_> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("would run:"))
        .collect();
    assert_eq!(
        runs,
        [
            "would run: rabbitmqctl shutdown",
            "would run: pg_ctlcluster --skip-systemctl-redirect 15 main stop -m fast",
        ]
    );

    let empty = tempfile::NamedTempFile::new().unwrap();
    let out = dry_run(&format!("svc_stop_recorded {}", empty.path().display()));
    assert!(out.ok && out.stdout.is_empty(), "{}", out.stdout);
}

#[test]
fn trust_rules_go_first_in_pg_hba_conf_once_and_keep_the_rest() {
    let debian_default = "# Database administrative login by Unix domain socket\n\
                          local   all             postgres                                peer\n\
                          host    all             all             127.0.0.1/32            scram-sha-256\n";
    let mut hba = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut hba, debian_default.as_bytes()).unwrap();
    let path = hba.path().display().to_string();
    // Not a dry run: this edits the scratch file, twice.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -euo pipefail; source deploy/local/services.sh; \
             svc_pg_trust_local_tcp {path}; svc_pg_trust_local_tcp {path}"
        ))
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(hba.path()).unwrap();
    let rules: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rules,
        [
            vec!["host", "all", "postgres", "127.0.0.1/32", "trust"],
            vec!["host", "all", "postgres", "::1/128", "trust"],
            vec!["local", "all", "postgres", "peer"],
            vec!["host", "all", "all", "127.0.0.1/32", "scram-sha-256"],
        ],
        "{text}"
    );
    assert!(text.ends_with(debian_default), "{text}");
}

#[test]
fn urls_give_the_host_and_port_to_check() {
    let out = dry_run(
        "for u in postgres://postgres@127.0.0.1:5432/conveyor 'amqp://guest:guest@localhost/%2f' \
         'amqp://a:5681/%2f,amqp://b:5682/%2f' 'postgres://u:p@[::1]:5433/x?sslmode=disable'; \
         do svc_hostport \"$u\" 9; done",
    );
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "127.0.0.1 5432\nlocalhost 9\na 5681\n::1 5433\n"
    );
}

#[test]
fn ensure_services_dry_run_uses_the_running_servers_and_records_nothing() {
    let record = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new("bash")
        .args(["deploy/local/ensure-services.sh", "--dry-run", "--record"])
        .arg(record.path())
        .current_dir(repo())
        .env("CONVEYOR_DATABASE_URL", crate::harness::PG_SERVER)
        .env("CONVEYOR_AMQP_URL", crate::harness::AMQP_URL)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // The third line is the real dead-lettering check (local_broker_repair.rs),
    // or a note that this user's rabbitmqctl cannot administer the node.
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() == 3, "{stdout}");
    assert_eq!(
        lines[..2],
        [
            "PostgreSQL answers at 127.0.0.1:5432",
            "RabbitMQ answers at 127.0.0.1:5672"
        ]
    );
    assert!(
        lines[2] == "RabbitMQ declares a quorum queue with at-least-once dead-lettering"
            || lines[2].starts_with("RabbitMQ: not checking"),
        "{stdout}"
    );
    assert_eq!(std::fs::read_to_string(record.path()).unwrap(), "");
}

/// A scratch PostgreSQL cluster run by user `postgres`, stopped on drop.
struct ScratchCluster {
    bin: PathBuf,
    data: PathBuf,
    /// Holds `data`, the log and the socket; deleted after the stop.
    dir: tempfile::TempDir,
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&format!(
            "{}/pg_ctl -D {} -m immediate stop",
            self.bin.display(),
            self.data.display()
        ));
    }
}

fn as_postgres(command: &str) -> std::process::Output {
    Command::new("su")
        .args(["postgres", "-s", "/bin/sh", "-c", command])
        .output()
        .expect("run su")
}

fn psql_without_password(port: u16) -> bool {
    Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-w", "-c", "select 1"])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A scratch cluster made like Debian's (peer for the socket, scram-sha-256
/// for TCP) on a free port, with its socket in its `dir`. Needs
/// root, Debian's PostgreSQL server binaries and the `postgres` user; `None`
/// (after saying loudly what was not checked) otherwise.
fn scram_cluster(unchecked: &str) -> Option<(ScratchCluster, u16)> {
    let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| dir.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    bins.retain(|bin| bin.join("initdb").exists());
    bins.sort();
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    let (Some(bin), true) = (bins.pop(), is_root) else {
        eprintln!(
            "\n\n!!!!! SKIPPED: needs root and Debian's PostgreSQL server (/usr/lib/postgresql/*/bin/initdb);\n\
             !!!!! {unchecked} NOT checked against a real server.\n\n"
        );
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let chown = Command::new("chown")
        .arg("postgres")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(chown.success());
    let init = as_postgres(&format!(
        "{}/initdb -D {} -U postgres --auth-local=peer --auth-host=scram-sha-256",
        bin.display(),
        data.display()
    ));
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = as_postgres(&format!(
        "{}/pg_ctl -D {} -l {}/log -w -o '-p {port} -k {} -c listen_addresses=127.0.0.1' start",
        bin.display(),
        data.display(),
        dir.path().display(),
        dir.path().display()
    ));
    let cluster = ScratchCluster { bin, data, dir };
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    assert!(
        !psql_without_password(port),
        "the scratch cluster let postgres in without a password"
    );
    Some((cluster, port))
}

/// The rules really let the default URL's user in: a scratch cluster made
/// like Debian's (scram-sha-256 for TCP) refuses a passwordless login, and
/// accepts one after `svc_pg_trust_local_tcp` and a reload. Skipped loudly
/// where [`scram_cluster`] cannot run one.
#[test]
fn trust_rules_let_user_postgres_in_over_tcp_without_a_password() {
    let Some((cluster, port)) = scram_cluster("the pg_hba.conf trust rules were") else {
        return;
    };
    let (bin, data) = (cluster.bin.clone(), cluster.data.clone());

    let hba = data.join("pg_hba.conf");
    let owner = |path: &std::path::Path| {
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path).unwrap())
    };
    let owner_before = owner(&hba);
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -euo pipefail; source deploy/local/services.sh; svc_pg_trust_local_tcp {}",
            hba.display()
        ))
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(owner(&hba), owner_before, "pg_hba.conf changed owner");
    let reload = as_postgres(&format!(
        "{}/pg_ctl -D {} reload",
        bin.display(),
        data.display()
    ));
    assert!(reload.status.success());
    // A reload is asynchronous: give the postmaster a moment to re-read the file.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !psql_without_password(port) {
        assert!(
            std::time::Instant::now() < deadline,
            "user postgres still cannot log in over 127.0.0.1 without a password"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(cluster);
}

/// `ensure-services.sh` (for real, not a dry run: both servers answer, so it
/// changes nothing) against `database_url`, with the shared RabbitMQ, whose
/// dead-lettering check a stub `rabbitmqctl` answers (a real run must never
/// restart the shared broker's app).
fn ensure_services(database_url: Option<&str>) -> Outcome {
    let stub = crate::local_broker_repair::StubRabbitmqctl::new(&[]);
    let mut command = Command::new("bash");
    command
        .arg("deploy/local/ensure-services.sh")
        .current_dir(repo())
        .env("PATH", stub.path())
        .env("CONVEYOR_AMQP_URL", crate::harness::AMQP_URL)
        .env_remove("CONVEYOR_DATABASE_URL");
    if let Some(url) = database_url {
        command.env("CONVEYOR_DATABASE_URL", url);
    }
    let out = command.output().unwrap();
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A server that already runs but wants a password the URL does not give is
/// caught by `ensure-services.sh`, with the way out, rather than later by
/// `migrate run`; with the password in the URL it passes. The shared server
/// (trust) passes with the default URL and with a database not created yet.
#[test]
fn a_running_server_that_wants_a_password_is_explained_up_front() {
    for url in [
        None,
        Some(format!("{}/not_created_yet", crate::harness::PG_SERVER)),
    ] {
        let out = ensure_services(url.as_deref());
        assert!(out.ok, "{url:?}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains("PostgreSQL answers at 127.0.0.1:5432"),
            "{}",
            out.stdout
        );
    }

    let Some((cluster, port)) = scram_cluster("the login check of a running server was") else {
        return;
    };
    let out = ensure_services(Some(&format!(
        "postgres://postgres@127.0.0.1:{port}/conveyor"
    )));
    assert!(!out.ok, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("PostgreSQL answers at 127.0.0.1:{port}")),
        "{}",
        out.stdout
    );
    for needed in [
        "the login in CONVEYOR_DATABASE_URL does not work",
        "no password supplied",
        "CONVEYOR_DATABASE_URL=postgres://USER:PASSWORD@127.0.0.1:",
        "host all postgres 127.0.0.1/32 trust",
        "pg_hba.conf",
    ] {
        assert!(out.stderr.contains(needed), "{needed:?} in: {}", out.stderr);
    }
    assert!(
        !out.stdout.contains("RabbitMQ"),
        "it stopped at PostgreSQL: {}",
        out.stdout
    );

    // Give postgres a password (over the socket, where peer lets us in) and
    // put it in the URL: the check passes.
    let set = as_postgres(&format!(
        "psql -h {} -p {port} -U postgres -d postgres -c \"ALTER USER postgres PASSWORD 'local-secret'\"",
        cluster.dir.path().display()
    ));
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let out = ensure_services(Some(&format!(
        "postgres://postgres:local-secret@127.0.0.1:{port}/conveyor"
    )));
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert!(!out.stderr.contains("local-secret"), "{}", out.stderr);
    drop(cluster);
}
