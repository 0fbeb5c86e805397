//! `TestApp`: the real ingress and workers on port 0 against a private
//! database and broker namespace, plus helpers to look inside both.

#![allow(
    dead_code,
    reason = "each test module uses a different part of the harness"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use conveyor_platform::Config;
use conveyor_platform::amqp::{Publisher, Topology};
use conveyor_schema::db::jobs;
use conveyor_schema::models::Job;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const PG_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Installs a test logger when `TEST_LOG` is set; silent otherwise.
fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = conveyor_platform::telemetry::init(&Default::default()).map(std::mem::forget);
        }
    });
}

/// A fresh database copied from a migrated template, dropped on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn create() -> Self {
        let template = template_database();
        let name = format!("t_{}", Uuid::new_v4().simple());
        let mut admin = admin();
        let mut tries = 0;
        loop {
            match admin.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}")) {
                Ok(()) => break,
                Err(err) if tries < 20 && err.to_string().contains("being accessed") => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(err) => panic!("create test database: {err}"),
            }
        }
        Self {
            url: format!("{PG_SERVER}/{name}"),
            name,
        }
    }

    /// An empty database (no migrations), for migration tests.
    pub fn create_empty() -> Self {
        let name = format!("t_{}", Uuid::new_v4().simple());
        admin()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create empty db");
        Self {
            url: format!("{PG_SERVER}/{name}"),
            name,
        }
    }

    pub fn conn(&self) -> PgConnection {
        PgConnection::establish(&self.url).expect("connect to test db")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

fn admin() -> PgConnection {
    PgConnection::establish(&format!("{PG_SERVER}/postgres")).expect("connect to postgres")
}

/// The name of a template database holding the current migrations, created once
/// (under an advisory lock, so parallel test processes agree).
///
/// Its name hashes the migrations' paths within `migrations/` and their contents,
/// so every checkout of the same migrations (a CI clone, a second worktree)
/// shares one template; it stays on the server as the suite's cache.
fn template_database() -> String {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let mut hasher = Sha256::new();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        let mut entries: Vec<_> = walk(&dir);
        entries.sort();
        for path in entries {
            let relative = path.strip_prefix(&dir).unwrap();
            hasher.update(relative.to_string_lossy().as_bytes());
            hasher.update(std::fs::read(&path).unwrap());
        }
        let digest = hasher.finalize();
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        let name = format!("conveyor_tmpl_{hex}");
        let mut admin = admin();
        admin
            .batch_execute("SELECT pg_advisory_lock(4242)")
            .unwrap();
        #[derive(QueryableByName)]
        struct Found {
            #[diesel(sql_type = Text)]
            datname: String,
        }
        let exists = diesel::sql_query("SELECT datname FROM pg_database WHERE datname = $1")
            .bind::<Text, _>(&name)
            .load::<Found>(&mut admin)
            .unwrap()
            .into_iter()
            .any(|f| f.datname == name);
        if !exists {
            let building = format!("{name}_building");
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
                .unwrap();
            admin
                .batch_execute(&format!("CREATE DATABASE {building}"))
                .unwrap();
            let mut config = Config::default();
            config.database.url = format!("{PG_SERVER}/{building}").into();
            conveyor_platform::migrations::run_pending(&config.database).expect("migrate template");
            admin
                .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {name}"))
                .unwrap();
        }
        admin
            .batch_execute("SELECT pg_advisory_unlock(4242)")
            .unwrap();
        name
    })
    .clone()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The config of a test: private database and namespace, port 0 everywhere, short grace.
pub fn test_config(db: &TestDb) -> Config {
    let mut config = Config {
        namespace: format!("t{}", &Uuid::new_v4().simple().to_string()[..12]),
        ..Config::default()
    };
    config.database.url = db.url.clone().into();
    config.database.pool_size = 8;
    config.amqp.url = AMQP_URL.into();
    config.ingress.addr = "127.0.0.1:0".parse().unwrap();
    config.worker.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.worker.grace_period_ms = 5_000;
    // Built-in rollup schedules would add jobs at 5-minute boundaries, and the
    // headshot sweep one at :41; tests that want them opt in.
    config.stats.default_schedules = false;
    config.webhooks.headshot_sweep = false;
    config
}

/// A client with `Authorization: Bearer <key>` on every request (a request's own header wins).
pub fn client_with(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
    value.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Inserts a key straight into the test database.
async fn create_key(
    db: &TestDb,
    producer: &str,
    scopes: &[&str],
    limit: Option<(f64, i32)>,
) -> String {
    let url = db.url.clone();
    let new = conveyor_ingress::auth::keys::NewKey {
        producer: producer.to_owned(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        expires_at: None,
        rate_per_sec: limit.map(|l| l.0),
        burst: limit.map(|l| l.1),
    };
    tokio::task::spawn_blocking(move || {
        let mut conn = PgConnection::establish(&url).expect("connect to test db");
        conveyor_ingress::auth::keys::create(&mut conn, new)
            .expect("create key")
            .1
    })
    .await
    .unwrap()
}

/// An in-process worker.
pub struct RunningWorker {
    pub shutdown: CancellationToken,
    pub worker: conveyor_worker::Worker,
}

/// Ingress plus workers on a private database and namespace.
pub struct TestApp {
    pub config: Config,
    pub db: TestDb,
    pub base: String,
    pub client: reqwest::Client,
    pub workers: Vec<RunningWorker>,
    pub processes: Vec<Child>,
    /// Extra `CONVEYOR_*` variables for worker processes (config the process cannot get otherwise).
    pub process_env: Vec<(String, String)>,
    /// Config files of worker processes, deleted on drop.
    pub config_files: Vec<tempfile::TempPath>,
    ingress_shutdown: CancellationToken,
    /// The in-process ingress's task, awaited on drop before the topology is deleted.
    ingress_finished: Option<tokio::task::JoinHandle<()>>,
    pub metrics_url: String,
    /// An API key with the `admin` scope and a limit no test reaches; `client` sends it.
    pub admin_key: String,
}

impl TestApp {
    /// Ingress and one in-process worker.
    pub async fn spawn() -> Self {
        Self::spawn_with(1, |_| {}).await
    }

    /// Ingress and `workers` in-process workers, after `tweak` adjusts the config.
    pub async fn spawn_with(workers: usize, tweak: impl FnOnce(&mut Config)) -> Self {
        init_logging();
        let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
        let mut config = test_config(&db);
        tweak(&mut config);
        let ingress_shutdown = CancellationToken::new();
        let ingress = conveyor_ingress::start(config.clone(), ingress_shutdown.clone())
            .await
            .expect("start ingress");
        let admin_key = create_key(&db, "test-admin", &["admin"], Some((1e9, 1_000_000_000))).await;
        let mut app = Self {
            base: format!("http://{}", ingress.addr),
            client: client_with(&admin_key),
            admin_key,
            workers: Vec::new(),
            processes: Vec::new(),
            process_env: Vec::new(),
            config_files: Vec::new(),
            ingress_shutdown,
            ingress_finished: Some(ingress.finished),
            metrics_url: String::new(),
            config,
            db,
        };
        for _ in 0..workers {
            app.start_worker().await;
        }
        app
    }

    /// `POST /v1/jobs` of `diag.noop` with `client`.
    pub async fn enqueue_response(&self, client: &reqwest::Client) -> reqwest::Response {
        client
            .post(self.url("/v1/jobs"))
            .json(&json!({"task": "diag.noop", "args": {}}))
            .send()
            .await
            .unwrap()
    }

    /// The status of [`Self::enqueue_response`].
    pub async fn enqueue_status(&self, client: &reqwest::Client) -> u16 {
        self.enqueue_response(client).await.status().as_u16()
    }

    /// A client that sends `key` on every request.
    pub fn client_with(&self, key: &str) -> reqwest::Client {
        client_with(key)
    }

    /// A new key for producer `test` with `scopes` and the default rate limit.
    pub async fn create_key(&self, scopes: &[&str]) -> String {
        create_key(&self.db, "test", scopes, None).await
    }

    /// A new key for `producer` with `scopes` and its own `(rate, burst)`.
    pub async fn create_key_with(
        &self,
        producer: &str,
        scopes: &[&str],
        limit: Option<(f64, i32)>,
    ) -> String {
        create_key(&self.db, producer, scopes, limit).await
    }

    /// Starts one more in-process worker.
    pub async fn start_worker(&mut self) {
        self.start_worker_with(conveyor_tasks::registry()).await;
    }

    /// Starts one more in-process worker running `registry` (for tests that
    /// tune a task's options, e.g. a short timeout or a small concurrency).
    pub async fn start_worker_with(&mut self, registry: conveyor_tasks::Registry) {
        let shutdown = CancellationToken::new();
        let worker = conveyor_worker::start(self.config.clone(), registry, shutdown.clone())
            .await
            .expect("start worker");
        self.metrics_url = format!("http://{}/metrics", worker.http_addr);
        wait_until(Duration::from_secs(10), || async {
            reqwest::get(format!("http://{}/readyz", worker.http_addr))
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        self.workers.push(RunningWorker { shutdown, worker });
    }

    /// Starts a worker as a separate `conveyor worker` process.
    pub fn spawn_worker_process(&mut self, grace_ms: u64) -> u32 {
        self.spawn_worker_process_with(grace_ms, None)
    }

    /// Like [`Self::spawn_worker_process`], with `config_toml` written to a file
    /// passed as `--config` (for what env variables cannot say, like `[[schedules]]`).
    pub fn spawn_worker_process_with(&mut self, grace_ms: u64, config_toml: Option<&str>) -> u32 {
        let log = if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        self.spawn_worker(grace_ms, config_toml, log)
    }

    /// Like [`Self::spawn_worker_process`], with the worker's log (stderr) written to `log`.
    pub fn spawn_worker_process_logging_to(&mut self, grace_ms: u64, log: &std::path::Path) -> u32 {
        let file = std::fs::File::create(log).expect("worker log file");
        self.spawn_worker(grace_ms, None, Stdio::from(file))
    }

    fn spawn_worker(&mut self, grace_ms: u64, config_toml: Option<&str>, log: Stdio) -> u32 {
        let namespace = self.config.namespace.clone();
        let settings = [
            ("CONVEYOR_WORKER_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("CONVEYOR_WORKER_GRACE_PERIOD_MS", grace_ms.to_string()),
        ];
        self.spawn_process("worker", &namespace, &settings, config_toml, log)
    }

    /// Starts `conveyor ingress` as a separate process in `namespace`, listening
    /// on `addr`, with its log (stderr) written to `log`.
    pub fn spawn_ingress_process_logging_to(
        &mut self,
        namespace: &str,
        addr: std::net::SocketAddr,
        log: &std::path::Path,
    ) -> u32 {
        let file = std::fs::File::create(log).expect("ingress log file");
        let settings = [("CONVEYOR_INGRESS_ADDR", addr.to_string())];
        self.spawn_process("ingress", namespace, &settings, None, Stdio::from(file))
    }

    fn spawn_process(
        &mut self,
        subcommand: &str,
        namespace: &str,
        settings: &[(&str, String)],
        config_toml: Option<&str>,
        log: Stdio,
    ) -> u32 {
        let mut command = Command::new(env!("CARGO_BIN_EXE_conveyor"));
        if let Some(toml) = config_toml {
            let mut file = tempfile::NamedTempFile::new().expect("config file");
            std::io::Write::write_all(&mut file, toml.as_bytes()).expect("write config");
            command.arg("--config").arg(file.path());
            self.config_files.push(file.into_temp_path());
        }
        let child = command
            .arg(subcommand)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CONVEYOR_DATABASE_URL", &self.db.url)
            .env("CONVEYOR_AMQP_URL", AMQP_URL)
            .env("CONVEYOR_NAMESPACE", namespace)
            .env("CONVEYOR_LOG_LEVEL", "info")
            .envs(settings.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(
                self.process_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .env(
                "CONVEYOR_STATS_DEFAULT_SCHEDULES",
                self.config.stats.default_schedules.to_string(),
            )
            .env(
                "CONVEYOR_WEBHOOKS_HEADSHOT_SWEEP",
                self.config.webhooks.headshot_sweep.to_string(),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("spawn conveyor {subcommand}: {err}"));
        let pid = child.id();
        self.processes.push(child);
        pid
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /v1/jobs` with `body` as JSON.
    pub async fn post_job(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/jobs"))
            .json(&body)
            .send()
            .await
            .expect("POST /v1/jobs")
    }

    /// `POST path` with `body` as JSON and `key` as its `Idempotency-Key`, by `client`.
    pub async fn post_keyed(
        &self,
        client: &reqwest::Client,
        path: &str,
        key: &str,
        body: &Value,
    ) -> reqwest::Response {
        client
            .post(self.url(path))
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|err| panic!("POST {path}: {err}"))
    }

    /// Enqueues `task` with `args`, asserting 202; returns the job id.
    pub async fn enqueue(&self, task: &str, args: Value) -> Uuid {
        let response = self.post_job(json!({"task": task, "args": args})).await;
        assert_eq!(
            response.status(),
            202,
            "{}",
            response.text().await.unwrap_or_default()
        );
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().parse().unwrap()
    }

    /// The job record.
    pub async fn job(&self, id: Uuid) -> Option<Job> {
        let url = self.db.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = PgConnection::establish(&url).unwrap();
            jobs::table
                .find(id)
                .select(Job::as_select())
                .first(&mut conn)
                .optional()
                .unwrap()
        })
        .await
        .unwrap()
    }

    /// Waits until job `id` is in `state` (panics after `timeout`).
    pub async fn wait_for_state(&self, id: Uuid, state: &str, timeout: Duration) -> Job {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if let Some(job) = &job
                && job.state == state
            {
                return job.clone();
            }
            assert!(
                Instant::now() < deadline,
                "job {id} not {state} after {timeout:?}: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Holds `LOCK TABLE <table> IN SHARE MODE` (it blocks inserts and
    /// updates, not reads) until the returned sender sends or is dropped.
    pub async fn block_inserts(&self, table: &str) -> std::sync::mpsc::Sender<()> {
        let url = self.db.url.clone();
        let lock = format!("BEGIN; LOCK TABLE {table} IN SHARE MODE");
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut conn = PgConnection::establish(&url).unwrap();
            conn.batch_execute(&lock).unwrap();
            locked.send(()).unwrap();
            let _ = released.recv();
            conn.batch_execute("COMMIT").unwrap();
        });
        is_locked.await.unwrap();
        release
    }

    /// Waits until a statement of the ingress waits on a lock (one that
    /// [`Self::block_inserts`] holds), at most 10 s.
    pub async fn wait_for_a_lock_wait(&self) {
        let waiting = "SELECT count(*) AS n FROM pg_stat_activity \
                       WHERE datname = current_database() AND wait_event_type = 'Lock'";
        wait_until(Duration::from_secs(10), || async {
            self.count(waiting).await > 0
        })
        .await;
    }

    /// Runs `sql` returning one bigint column named `n`.
    pub async fn count(&self, sql: &str) -> i64 {
        let url = self.db.url.clone();
        let sql = sql.to_owned();
        tokio::task::spawn_blocking(move || {
            #[derive(QueryableByName)]
            struct N {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            let mut conn = PgConnection::establish(&url).unwrap();
            diesel::sql_query(&sql)
                .get_result::<N>(&mut conn)
                .unwrap()
                .n
        })
        .await
        .unwrap()
    }

    pub fn topology(&self) -> Topology {
        Topology::for_config(&self.config)
    }

    /// A connected publisher on the test's topology, for messages the ingress
    /// would not send; it stops when `stop` is cancelled.
    pub async fn publisher(&self, stop: &CancellationToken) -> Publisher {
        let publisher = Publisher::start(
            &[AMQP_URL],
            "test",
            self.topology(),
            1,
            Duration::from_secs(5),
            stop.clone(),
        );
        assert!(
            publisher.wait_connected(Duration::from_secs(10)).await,
            "the test's publisher did not connect"
        );
        publisher
    }

    /// Publishes a second message of keyed job `id` (`task` with `args`, key
    /// `key`): what a retry of an in-doubt keyed request publishes.
    pub async fn publish_keyed_again(&self, id: Uuid, task: &str, args: Value, key: &str) {
        let mut again = conveyor_schema::Envelope::new(task, args);
        again.id = id;
        again.idempotency_key = Some(key.into());
        self.publish_envelope(&again).await;
    }

    /// `GET path` with the admin key; the answer's JSON body.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Publishes `envelope` to the `default` work queue, confirmed.
    pub async fn publish_envelope(&self, envelope: &conveyor_schema::Envelope) {
        self.publish_envelope_to("default", envelope).await;
    }

    /// Publishes `envelope` to the work queue `queue`, confirmed.
    pub async fn publish_envelope_to(&self, queue: &str, envelope: &conveyor_schema::Envelope) {
        let stop = CancellationToken::new();
        let message = conveyor_platform::amqp::Outgoing::job(&self.topology(), queue, envelope);
        self.publisher(&stop).await.publish(&message).await.unwrap();
        stop.cancel();
    }

    /// The last started worker's `/metrics` text.
    pub async fn worker_metrics(&self) -> String {
        reqwest::get(&self.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Messages ready in broker queue `name`.
    pub async fn queue_len(&self, name: &str) -> u32 {
        let conn = lapin::Connection::connect(AMQP_URL, Default::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let queue = channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = conn.close(200, "done".into()).await;
        queue.message_count()
    }

    /// Takes every message from broker queue `name` (acking them): (headers, body) pairs.
    pub async fn drain_queue(&self, name: &str) -> Vec<(FieldTable, Vec<u8>)> {
        let conn = lapin::Connection::connect(AMQP_URL, Default::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(name.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let headers = message
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            out.push((headers, message.delivery.data.clone()));
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
        }
        let _ = conn.close(200, "done".into()).await;
        out
    }

    /// Starts the ingress's shutdown (as its first SIGTERM would).
    pub fn stop_ingress(&self) {
        self.ingress_shutdown.cancel();
    }

    /// Stops in-process workers (draining) and waits for them.
    pub async fn stop_workers(&mut self) {
        for worker in self.workers.drain(..) {
            worker.shutdown.cancel();
            let _ = worker.worker.finished.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.ingress_shutdown.cancel();
        for worker in &self.workers {
            worker.shutdown.cancel();
        }
        let components = self
            .ingress_finished
            .take()
            .into_iter()
            .chain(self.workers.drain(..).map(|w| w.worker.finished))
            .collect();
        stop_components(components);
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let topology = self.topology();
        // Drop runs inside the test's runtime; clean the broker from a thread of our own.
        crate::harness::delete_topology(topology);
    }
}

/// How long [`TestApp`]'s drop lets in-process components drain before aborting
/// them: past the test config's 5 s grace period, so a worker stops on its own.
const STOP_TIMEOUT: Duration = Duration::from_secs(6);

/// Waits for the (already cancelled) in-process components to stop, aborting
/// those still running after [`STOP_TIMEOUT`]. Deleting the topology while one
/// still runs lets it see its queues vanish, reconnect and declare part of the
/// topology again, which then outlives the test on the shared broker.
fn stop_components(components: Vec<tokio::task::JoinHandle<()>>) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| {
                runtime.block_on(async {
                    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
                    for mut component in components {
                        if tokio::time::timeout_at(deadline, &mut component)
                            .await
                            .is_err()
                        {
                            component.abort();
                            let _ = component.await;
                        }
                    }
                })
            });
        }
        // Without a runtime thread to spare, stop them where they are.
        _ => components.iter().for_each(|c| c.abort()),
    }
}

/// Waits (blocking) for process `index` of `app` to exit, at most `timeout`.
pub fn wait_exit(app: &mut TestApp, index: usize, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = app.processes[index].try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process {index} did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port that was free a moment ago (for a child process that must listen
/// on an address the test knows).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `check` every 25 ms until it is true; panics after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Deletes `topology`'s queues and exchanges from the shared broker, on a
/// thread and runtime of its own (callable from `Drop` inside a test's runtime).
pub(crate) fn delete_topology(topology: Topology) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok(conn) = lapin::Connection::connect(AMQP_URL, Default::default()).await {
                if let Ok(channel) = conn.create_channel().await {
                    let _ = topology.delete(&channel).await;
                }
                let _ = conn.close(200, "cleanup".into()).await;
            }
        });
    })
    .join();
}

/// The one row of `EXPLAIN (ANALYZE, FORMAT JSON) …`.
#[derive(QueryableByName)]
pub struct PlanJson {
    /// The plan, as JSON text.
    #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
    pub json: String,
}

/// Every scan of `relation` in an `EXPLAIN (ANALYZE, FORMAT JSON)` plan, as
/// (node type, index name or "", rows read over all its loops).
pub fn scans_of(plan: &Value, relation: &str) -> Vec<(String, String, f64)> {
    fn walk(node: &Value, relation: &str, scans: &mut Vec<(String, String, f64)>) {
        if let Some(kind) = node["Node Type"].as_str().filter(|k| k.contains("Scan"))
            && node["Relation Name"] == relation
        {
            let loops = node["Actual Loops"].as_f64().unwrap_or(1.0);
            scans.push((
                kind.to_owned(),
                node["Index Name"].as_str().unwrap_or("").to_owned(),
                node["Actual Rows"].as_f64().unwrap_or(0.0) * loops,
            ));
        }
        for child in node["Plans"].as_array().into_iter().flatten() {
            walk(child, relation, scans);
        }
    }
    let mut scans = Vec::new();
    walk(&plan[0]["Plan"], relation, &mut scans);
    scans
}

/// Asserts that `plan` (`EXPLAIN (ANALYZE, FORMAT JSON)`) reads `relation`
/// only through index scans of `index`, and at most `most_rows` rows of it.
pub fn assert_reads_only(plan: &PlanJson, relation: &str, index: &str, most_rows: f64) {
    let plan: Value = serde_json::from_str(&plan.json).unwrap();
    let scans = scans_of(&plan, relation);
    assert!(!scans.is_empty(), "{plan}");
    for (kind, used, rows) in &scans {
        assert!(
            kind.starts_with("Index") && used == index,
            "{kind} on {used:?}: {plan}"
        );
        assert!(*rows <= most_rows, "read {rows} rows of {relation}: {plan}");
    }
}

/// Asserts a problem+json answer with `status` (in the body too); returns the problem.
pub async fn problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    body
}

/// Runs `sql` (several statements) on `app`'s database, on a connection of its own.
pub async fn run_sql(app: &TestApp, sql: String) {
    let url = app.db.url.clone();
    tokio::task::spawn_blocking(move || {
        use diesel::Connection;
        diesel::PgConnection::establish(&url)
            .unwrap()
            .batch_execute(&sql)
            .unwrap();
    })
    .await
    .unwrap();
}
