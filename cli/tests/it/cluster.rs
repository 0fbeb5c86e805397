//! The failover proof (issue 9): an ingress and two worker *processes* on a
//! three-node RabbitMQ cluster and a private PostgreSQL, 10 000 jobs posted at
//! a steady rate, and mid-load either the node leading the work queue or the
//! database is stopped and started again.
//!
//! It passes when every job that got a 202 ends `succeeded` with exactly one
//! run counted in PostgreSQL, every other answer was a 503 with `Retry-After`,
//! and within 30 s of the fault each worker both completes jobs again and
//! answers `/readyz` with 200 again (its consumers attached on open channels).
//!
//! "Exactly once" here means: one final `succeeded` transition per accepted job
//! and `runs == 1`, where `runs` counts attempt starts. Delivery is at least
//! once, so a job whose delivery was cut off by the fault *may* be started a
//! second time; the worker narrows that window (it never starts a delivery
//! whose connection is gone, and skips redeliveries of finished jobs), and this
//! test asserts the window stayed shut.
//!
//! Needs the cluster, so these tests are `#[ignore]`d: `make cluster-test`
//! starts the nodes and the database (deploy/cluster/), sets
//! `CLUSTER_TEST_AMQP_URLS` and `CLUSTER_TEST_PG`, runs them one at a
//! time, and tears everything down.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Uuid as SqlUuid};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

const JOBS: usize = 10_000;
const RATE_PER_SEC: u64 = 250;
/// Requests in flight at most; beyond this the rate drops rather than queueing without bound.
const MAX_IN_FLIGHT: usize = 512;
/// The fault starts this far into the load.
const FAULT_AFTER: Duration = Duration::from_secs(12);
/// Workers must be completing jobs, and answering `/readyz` with 200, again this soon after the fault.
const RESUME_WITHIN: Duration = Duration::from_secs(30);

/// What to break mid-load.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Stop the RabbitMQ node leading the work queue; start it 10 s later.
    QueueLeader,
    /// Stop PostgreSQL; start it 5 s later.
    Postgres,
}

/// The environment `make cluster-test` provides.
pub(crate) struct ClusterEnv {
    /// Comma-separated AMQP URLs of the nodes to use.
    pub(crate) amqp_urls: String,
    /// The private PostgreSQL server, without a database.
    pub(crate) pg_server: String,
    /// deploy/cluster/, for rabbit.sh and postgres.sh.
    pub(crate) scripts: PathBuf,
}

fn cluster_env() -> ClusterEnv {
    let (Ok(amqp_urls), Ok(pg_server)) = (
        std::env::var("CLUSTER_TEST_AMQP_URLS"),
        std::env::var("CLUSTER_TEST_PG"),
    ) else {
        panic!(
            "\n\n*** The cluster proof needs a three-node RabbitMQ cluster and a private PostgreSQL. ***\n\
             *** Run it with `make cluster-test` (see deploy/cluster/run-proof.sh).             ***\n\n"
        );
    };
    ClusterEnv {
        amqp_urls,
        pg_server,
        scripts: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster"),
    }
}

pub(crate) fn script(env: &ClusterEnv, name: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(env.scripts.join(name))
        .args(args)
        .output()
        .expect("run cluster script");
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One ingress and two worker processes on their own database and namespace.
pub(crate) struct Deployment {
    pub(crate) db_url: String,
    namespace: String,
    pub(crate) ingress: String,
    /// An `enqueue:*` key with a rate limit far above the load.
    pub(crate) api_key: String,
    worker_metrics: Vec<String>,
    children: Vec<Child>,
}

impl Deployment {
    pub(crate) async fn start(env: &ClusterEnv) -> Self {
        let namespace = format!("c{}", &Uuid::new_v4().simple().to_string()[..10]);
        let db_url = format!("{}/{namespace}", env.pg_server);
        // Placement is fixed so every failover path runs: the ingress starts
        // alone at node 1 and declares the queues, so node 1 leads them (the
        // broker's `client-local` leader locator); worker 0 also starts at node
        // 1, worker 1 at node 2. Stopping the leader thus cuts the ingress and
        // worker 0 off (they must reconnect elsewhere, and the ingress must
        // answer 503 meanwhile) while worker 1 keeps its connection through the
        // queue's leader election.
        let nodes: Vec<&str> = env.amqp_urls.split(',').collect();
        let starting_at = |first: usize| {
            let mut rotated = nodes.clone();
            rotated.rotate_left(first % nodes.len());
            rotated.join(",")
        };
        let base = |cmd: &mut Command| {
            let log = if std::env::var_os("TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            };
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("CONVEYOR_DATABASE_URL", &db_url)
                .env("CONVEYOR_AMQP_URL", starting_at(0))
                .env("CONVEYOR_AMQP_SHUFFLE_NODES", "false")
                .env("CONVEYOR_NAMESPACE", &namespace)
                .env("CONVEYOR_LOG_LEVEL", "warn")
                .stdout(Stdio::null())
                .stderr(log);
        };
        let bin = env!("CARGO_BIN_EXE_conveyor");
        let mut migrate = Command::new(bin);
        base(migrate.args(["migrate", "run"]));
        assert!(migrate.status().unwrap().success(), "conveyor migrate run");
        let mut create_key = Command::new(bin);
        base(create_key.args([
            "keys",
            "create",
            "--producer",
            "cluster-proof",
            "--scope",
            "enqueue:*",
            "--rate",
            "100000",
            "--burst",
            "100000",
        ]));
        let created = create_key
            .stdout(Stdio::piped())
            .output()
            .expect("conveyor keys create");
        assert!(created.status.success(), "conveyor keys create");
        let api_key = String::from_utf8_lossy(&created.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();

        let mut children = Vec::new();
        let ingress_port = free_port();
        let mut ingress = Command::new(bin);
        base(ingress.arg("ingress"));
        ingress.env("CONVEYOR_INGRESS_ADDR", format!("127.0.0.1:{ingress_port}"));
        children.push(ingress.spawn().expect("spawn ingress"));
        let ingress_url = format!("http://127.0.0.1:{ingress_port}");
        crate::harness::wait_until(Duration::from_secs(60), || async {
            reqwest::get(format!("{ingress_url}/readyz"))
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        let mut worker_metrics = Vec::new();
        for index in 0..2 {
            let port = free_port();
            let mut worker = Command::new(bin);
            base(worker.arg("worker"));
            worker
                .env("CONVEYOR_AMQP_URL", starting_at(index))
                .env("CONVEYOR_WORKER_METRICS_ADDR", format!("127.0.0.1:{port}"))
                .env("CONVEYOR_WORKER_GRACE_PERIOD_MS", "5000");
            children.push(worker.spawn().expect("spawn worker"));
            worker_metrics.push(format!("http://127.0.0.1:{port}"));
        }
        let deployment = Self {
            db_url,
            namespace,
            ingress: ingress_url,
            api_key,
            worker_metrics,
            children,
        };
        let mut probes = vec![format!("{}/readyz", deployment.ingress)];
        probes.extend(
            deployment
                .worker_metrics
                .iter()
                .map(|base| format!("{base}/readyz")),
        );
        for probe in probes {
            crate::harness::wait_until(Duration::from_secs(60), || async {
                reqwest::get(&probe)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            })
            .await;
        }
        deployment
    }

    fn work_queue(&self) -> String {
        format!("{}.default", self.namespace)
    }

    /// The broker topology of this deployment's namespace.
    pub(crate) fn topology(&self) -> conveyor_platform::amqp::Topology {
        conveyor_platform::amqp::Topology {
            namespace: self.namespace.clone(),
            queues: vec!["default".into()],
            delivery_limit: 20,
            quorum_group_size: None,
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the load generator saw.
#[derive(Default)]
pub(crate) struct Outcomes {
    /// Jobs answered 202.
    pub(crate) accepted: Vec<Uuid>,
    /// 503 answers (all carried `Retry-After`).
    pub(crate) unavailable: usize,
    /// The jobs of the 503s of type `in-doubt` (`job_ids`): not accepted, but they may run.
    pub(crate) in_doubt: Vec<Uuid>,
    /// Each 503's problem type and the start of its detail, for the log.
    pub(crate) refusals: Vec<String>,
    /// Anything else, described.
    pub(crate) unexpected: Vec<String>,
    /// When the first and last 503 came, relative to the start.
    pub(crate) unavailable_span: Option<(Duration, Duration)>,
    /// When the last 202 came, relative to the start.
    pub(crate) last_accepted: Option<Duration>,
}

/// Posts `jobs` `diag.noop` jobs at `rate_per_sec`.
pub(crate) async fn post_load(
    ingress: String,
    api_key: String,
    started: Instant,
    jobs: usize,
    rate_per_sec: u64,
) -> Outcomes {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {api_key}").parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate_per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..jobs {
        tick.tick().await;
        let slot = slots.clone().acquire_owned().await.unwrap();
        let (client, url, outcomes) = (
            client.clone(),
            format!("{ingress}/v1/jobs"),
            outcomes.clone(),
        );
        tasks.spawn(async move {
            let sent = client
                .post(url)
                .json(&json!({"task": "diag.noop", "args": {}}))
                .send()
                .await;
            drop(slot);
            let at = started.elapsed();
            match sent {
                Ok(response) if response.status() == 202 => {
                    let body: Value = response.json().await.unwrap();
                    let id = body["id"].as_str().unwrap().parse().unwrap();
                    let mut out = outcomes.lock().unwrap();
                    out.accepted.push(id);
                    out.last_accepted = out.last_accepted.max(Some(at));
                }
                Ok(response) if response.status() == 503 => {
                    let retry_after = response.headers().contains_key("retry-after");
                    let problem: Value = response.json().await.unwrap_or_default();
                    let in_doubt = in_doubt_id(&problem);
                    let mut out = outcomes.lock().unwrap();
                    let kind = problem["type"].as_str().unwrap_or("?");
                    let detail: String = problem["detail"]
                        .as_str()
                        .unwrap_or("?")
                        .chars()
                        .take(60)
                        .collect();
                    out.refusals.push(format!(
                        "{}: {detail}",
                        kind.rsplit('/').next().unwrap_or("?")
                    ));
                    if !retry_after {
                        out.unexpected.push("503 without Retry-After".into());
                    }
                    out.unavailable += 1;
                    out.in_doubt.extend(in_doubt);
                    let span = out.unavailable_span.get_or_insert((at, at));
                    span.1 = span.1.max(at);
                }
                Ok(response) => {
                    let status = response.status();
                    outcomes
                        .lock()
                        .unwrap()
                        .unexpected
                        .push(format!("status {status}"));
                }
                Err(err) => {
                    let failed = format!("request failed: {err}");
                    outcomes.lock().unwrap().unexpected.push(failed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(outcomes)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap()
}

/// The ingress's in-doubt and recorded-again counters, as `/metrics` shows them.
async fn ingress_counters(ingress: &str) -> String {
    let text = match reqwest::get(format!("{ingress}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(err) => return format!("no /metrics: {err}"),
    };
    text.lines()
        .filter(|line| {
            line.starts_with("conveyor_jobs_in_doubt_total")
                || line.starts_with("conveyor_jobs_recorded_again_total")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The job a one-job 503 names as in doubt (`type` `…/in-doubt`, `job_ids`), if it does.
pub(crate) async fn in_doubt_job(response: reqwest::Response) -> Option<Uuid> {
    in_doubt_id(&response.json().await.ok()?)
}

fn in_doubt_id(problem: &Value) -> Option<Uuid> {
    problem["type"]
        .as_str()?
        .ends_with("/in-doubt")
        .then(|| problem["job_ids"][0].as_str()?.parse().ok())?
}

/// `conveyor_jobs_succeeded_total` summed over labels, or `None` when the worker does not answer.
async fn succeeded_total(client: &reqwest::Client, base: &str) -> Option<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("conveyor_jobs_succeeded_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Samples every worker's success counter each 250 ms until `stop`.
async fn sample_workers(
    workers: Vec<String>,
    started: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Vec<(Duration, f64)>> {
    let client = reqwest::Client::new();
    let mut samples = vec![Vec::new(); workers.len()];
    while !stop.is_cancelled() {
        for (i, base) in workers.iter().enumerate() {
            if let Some(total) = succeeded_total(&client, base).await {
                samples[i].push((started.elapsed(), total));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    samples
}

/// Polls every worker's `/readyz` each 100 ms until `stop`: (when, answered 200).
/// A worker that does not answer counts as not ready.
async fn sample_readiness(
    workers: Vec<String>,
    started: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Vec<(Duration, bool)>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut samples = vec![Vec::new(); workers.len()];
    while !stop.is_cancelled() {
        for (i, base) in workers.iter().enumerate() {
            let asked = started.elapsed();
            let ready = client
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            samples[i].push((asked, ready));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// When the worker's `/readyz` first answered 200 in a probe sent at or after
/// `down` (the broken part certainly down, so a worker cut off by it has
/// already lost its consumers and is ready only once it consumes again).
fn ready_again_at(samples: &[(Duration, bool)], down: Duration) -> Option<Duration> {
    samples
        .iter()
        .find(|(t, ready)| *t >= down && *ready)
        .map(|(t, _)| *t)
}

/// The first and last not-ready probe from `began` on, for the report.
fn unready_span(samples: &[(Duration, bool)], began: Duration) -> Option<(Duration, Duration)> {
    let unready: Vec<Duration> = samples
        .iter()
        .filter(|(t, ready)| *t >= began && !*ready)
        .map(|(t, _)| *t)
        .collect();
    Some((*unready.first()?, *unready.last()?))
}

/// When the worker next completed a job after `fault_at` (the end of the first
/// sampling interval after the fault in which its counter rose).
fn resumed_at(samples: &[(Duration, f64)], fault_at: Duration) -> Option<Duration> {
    let after: Vec<_> = samples.iter().filter(|(t, _)| *t >= fault_at).collect();
    after
        .windows(2)
        .find(|pair| pair[1].1 > pair[0].1)
        .map(|pair| pair[1].0)
}

/// When a fault began and when the broken part was certainly down, from the start of the load.
#[derive(Debug, Clone, Copy)]
struct FaultTimes {
    began: Duration,
    down: Duration,
}

/// Breaks what `fault` names at `FAULT_AFTER` and repairs it.
async fn inject(fault: Fault, env: &ClusterEnv, queue: String, started: Instant) -> FaultTimes {
    tokio::time::sleep(FAULT_AFTER.saturating_sub(started.elapsed())).await;
    let env = ClusterEnv {
        amqp_urls: env.amqp_urls.clone(),
        pg_server: env.pg_server.clone(),
        scripts: env.scripts.clone(),
    };
    tokio::task::spawn_blocking(move || match fault {
        Fault::QueueLeader => {
            let leader = script(&env, "rabbit.sh", &["leader", &queue]);
            let node = leader
                .strip_prefix('c')
                .and_then(|rest| rest.split('@').next())
                .unwrap_or_else(|| panic!("unexpected leader `{leader}` of {queue}"))
                .to_owned();
            let members = script(&env, "rabbit.sh", &["members", &queue]);
            assert_eq!(members, "3", "{queue} should have a replica on every node");
            let began = started.elapsed();
            eprintln!("cluster: stopping {leader}, the leader of {queue}, at {began:?}");
            script(&env, "rabbit.sh", &["stop", &node]);
            let down = started.elapsed();
            eprintln!("cluster: {leader} is down at {down:?}");
            std::thread::sleep(Duration::from_secs(10));
            eprintln!(
                "cluster: starting {leader} again at {:?}",
                started.elapsed()
            );
            script(&env, "rabbit.sh", &["start", &node]);
            eprintln!("cluster: {leader} is back at {:?}", started.elapsed());
            FaultTimes { began, down }
        }
        Fault::Postgres => {
            let began = started.elapsed();
            eprintln!("cluster: stopping PostgreSQL at {began:?}");
            script(&env, "postgres.sh", &["stop"]);
            let down = started.elapsed();
            std::thread::sleep(Duration::from_secs(5));
            script(&env, "postgres.sh", &["start"]);
            eprintln!("cluster: PostgreSQL is back at {:?}", started.elapsed());
            FaultTimes { began, down }
        }
    })
    .await
    .unwrap()
}

/// The accepted jobs by outcome.
#[derive(QueryableByName, Debug)]
pub(crate) struct Tally {
    /// Succeeded, started once.
    #[diesel(sql_type = BigInt)]
    pub(crate) succeeded_once: i64,
    /// Succeeded, started more than once (a redelivery ran it again).
    #[diesel(sql_type = BigInt)]
    pub(crate) succeeded_more: i64,
    /// Recorded but not (yet) succeeded.
    #[diesel(sql_type = BigInt)]
    pub(crate) not_succeeded: i64,
    /// No record at all.
    #[diesel(sql_type = BigInt)]
    pub(crate) missing: i64,
    /// The load's jobs in the table that were answered 503 (their publish was
    /// confirmed or in doubt when the record's commit failed): allowed, reported.
    #[diesel(sql_type = BigInt)]
    pub(crate) ran_without_202: i64,
    /// Of those, the ones whose 503 did not say `in-doubt`: never allowed.
    #[diesel(sql_type = BigInt)]
    pub(crate) ran_unannounced: i64,
    /// Those jobs' rows, described, for the failure message.
    #[diesel(sql_type = Nullable<Text>)]
    pub(crate) unannounced_rows: Option<String>,
}

impl Tally {
    /// Every accepted job has its record, succeeded, and was started exactly once.
    pub(crate) fn assert_each_accepted_job_ran_once(&self, accepted: usize) {
        assert_eq!(self.missing, 0, "accepted jobs with no record");
        assert_eq!(self.not_succeeded, 0, "accepted jobs that did not succeed");
        assert_eq!(
            self.succeeded_more, 0,
            "accepted jobs started more than once"
        );
        assert_eq!(self.succeeded_once, accepted as i64);
        assert_eq!(
            self.ran_unannounced,
            0,
            "jobs that ran although their 503 did not say in-doubt: {}",
            self.unannounced_rows.as_deref().unwrap_or_default()
        );
    }
}

/// Counts the accepted jobs by outcome, and the load's other jobs that ran
/// without a 202 (those not among the `in_doubt` ids separately).
pub(crate) fn tally(db_url: &str, accepted: &[Uuid], in_doubt: &[Uuid]) -> Tally {
    let mut conn = PgConnection::establish(db_url).expect("connect to the cluster database");
    diesel::sql_query(
        "WITH a AS (SELECT unnest($1::uuid[]) AS id),
              -- The load's jobs not answered 202 (the worker's built-in schedules
              -- enqueue jobs of their own, `stats.rollup_hourly` every 5 minutes).
              other AS (SELECT * FROM jobs WHERE task = 'diag.noop' AND id NOT IN (SELECT id FROM a)),
              unannounced AS (SELECT * FROM other WHERE id <> ALL($2))
         SELECT count(*) FILTER (WHERE j.state = 'succeeded' AND j.runs = 1) AS succeeded_once,
                count(*) FILTER (WHERE j.state = 'succeeded' AND j.runs > 1) AS succeeded_more,
                count(*) FILTER (WHERE j.state IS DISTINCT FROM 'succeeded' AND j.id IS NOT NULL) AS not_succeeded,
                count(*) FILTER (WHERE j.id IS NULL) AS missing,
                (SELECT count(*) FROM other) AS ran_without_202,
                (SELECT count(*) FROM unannounced) AS ran_unannounced,
                (SELECT string_agg(format('%s %s runs=%s producer=%s enqueued=%s started=%s finished=%s',
                                          id, state, runs, producer, enqueued_at, started_at, finished_at), '; ')
                   FROM unannounced) AS unannounced_rows
         FROM a LEFT JOIN jobs j USING (id)",
    )
    .bind::<Array<SqlUuid>, _>(accepted)
    .bind::<Array<SqlUuid>, _>(in_doubt)
    .get_result(&mut conn)
    .expect("tally jobs")
}

/// [`tally`] once every accepted job succeeded, or as it stands after `within`.
pub(crate) async fn settled_tally(
    db_url: &str,
    accepted: &[Uuid],
    in_doubt: &[Uuid],
    within: Duration,
) -> Tally {
    let accepted = Arc::new(accepted.to_vec());
    let in_doubt = Arc::new(in_doubt.to_vec());
    let deadline = Instant::now() + within;
    loop {
        let (url, ids, doubtful) = (db_url.to_owned(), accepted.clone(), in_doubt.clone());
        let now = tokio::task::spawn_blocking(move || tally(&url, &ids, &doubtful))
            .await
            .unwrap();
        if now.succeeded_once + now.succeeded_more == accepted.len() as i64
            || Instant::now() > deadline
        {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn prove(fault: Fault) {
    let env = cluster_env();
    let deployment = Deployment::start(&env).await;
    let started = Instant::now();
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn(sample_workers(
        deployment.worker_metrics.clone(),
        started,
        stop_sampling.clone(),
    ));
    let readiness = tokio::spawn(sample_readiness(
        deployment.worker_metrics.clone(),
        started,
        stop_sampling.clone(),
    ));
    let load = tokio::spawn(post_load(
        deployment.ingress.clone(),
        deployment.api_key.clone(),
        started,
        JOBS,
        RATE_PER_SEC,
    ));
    let fault_at = inject(fault, &env, deployment.work_queue(), started).await;
    let outcomes = load.await.unwrap();
    let load_secs = started.elapsed().as_secs_f64();

    // Every accepted job must finish; give the backlog time to drain.
    let final_tally = settled_tally(
        &deployment.db_url,
        &outcomes.accepted,
        &outcomes.in_doubt,
        Duration::from_secs(180),
    )
    .await;
    stop_sampling.cancel();
    let samples = sampler.await.unwrap();
    let readiness = readiness.await.unwrap();
    let resumed: Vec<Option<Duration>> = samples
        .iter()
        .map(|worker| resumed_at(worker, fault_at.down))
        .collect();
    let ready_again: Vec<Option<Duration>> = readiness
        .iter()
        .map(|worker| ready_again_at(worker, fault_at.down))
        .collect();
    let unready: Vec<Option<(Duration, Duration)>> = readiness
        .iter()
        .map(|worker| unready_span(worker, fault_at.began))
        .collect();

    let counters = ingress_counters(&deployment.ingress).await;
    eprintln!(
        "cluster proof ({fault:?}): {} posted in {load_secs:.1} s; 202: {}, 503: {} (first..last {:?}); \
         fault at {fault_at:?}; workers completed jobs again at {resumed:?}; \
         /readyz not ready (first..last probe) {unready:?}, ready again at {ready_again:?}; {final_tally:?}; \
         503-answered jobs that ran anyway: {} (503s in doubt: {}; 503s by type and detail: {:?}); \
         ingress: {counters}",
        JOBS,
        outcomes.accepted.len(),
        outcomes.unavailable,
        outcomes.unavailable_span,
        final_tally.ran_without_202,
        outcomes.in_doubt.len(),
        summarize(&outcomes.refusals),
    );
    assert!(
        outcomes.unexpected.is_empty(),
        "answers other than 202/503: {:?}",
        summarize(&outcomes.unexpected)
    );
    assert_eq!(outcomes.accepted.len() + outcomes.unavailable, JOBS);
    final_tally.assert_each_accepted_job_ran_once(outcomes.accepted.len());
    if matches!(fault, Fault::Postgres) {
        // The broker confirmed every job it holds, and the database came back
        // within `ingress.rerecord_within_ms`: no 503 is left in doubt.
        assert_eq!(
            final_tally.ran_without_202, 0,
            "jobs that ran although they were answered 503"
        );
    }
    // A rise counts only once the broken part is certainly down; it is timed from when the fault began.
    for (worker, at) in resumed.iter().enumerate() {
        let at =
            at.unwrap_or_else(|| panic!("worker {worker} never completed a job after the fault"));
        let after = at.saturating_sub(fault_at.began);
        assert!(
            after <= RESUME_WITHIN,
            "worker {worker} completed jobs again only {after:?} after the fault"
        );
    }
    for (worker, at) in ready_again.iter().enumerate() {
        let at = at.unwrap_or_else(|| {
            panic!("worker {worker}'s /readyz never answered 200 after the fault")
        });
        let after = at.saturating_sub(fault_at.began);
        assert!(
            after <= RESUME_WITHIN,
            "worker {worker}'s /readyz answered 200 again only {after:?} after the fault"
        );
    }
}

pub(crate) fn summarize(items: &[String]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for item in items {
        *counts.entry(item.as_str()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the three-node cluster: run `make cluster-test`"]
async fn losing_the_work_queue_leader_loses_no_accepted_job() {
    prove(Fault::QueueLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the private PostgreSQL: run `make cluster-test`"]
async fn restarting_postgres_loses_no_accepted_job() {
    prove(Fault::Postgres).await;
}

#[test]
fn resumption_is_the_first_rise_after_the_fault() {
    let s = |secs: u64, total: f64| (Duration::from_secs(secs), total);
    let samples = [s(1, 10.0), s(2, 20.0), s(3, 20.0), s(4, 20.0), s(5, 25.0)];
    assert_eq!(
        resumed_at(&samples, Duration::from_secs(3)),
        Some(Duration::from_secs(5))
    );
    assert_eq!(resumed_at(&samples[..4], Duration::from_secs(3)), None);
}

#[test]
fn readiness_returns_at_the_first_ready_probe_after_the_fault() {
    let s = |secs: u64, ready: bool| (Duration::from_secs(secs), ready);
    let samples = [s(1, true), s(2, false), s(3, false), s(4, true), s(5, true)];
    assert_eq!(
        ready_again_at(&samples, Duration::from_secs(2)),
        Some(Duration::from_secs(4))
    );
    assert_eq!(ready_again_at(&samples[..3], Duration::from_secs(2)), None);
    assert_eq!(
        unready_span(&samples, Duration::from_secs(1)),
        Some((Duration::from_secs(2), Duration::from_secs(3)))
    );
    assert_eq!(unready_span(&samples[3..], Duration::from_secs(1)), None);
}

/// Why `amqp.quorum_initial_group_size` stays unset by default (the broker's
/// own default is already 3): a queue declared without it refuses to be
/// redeclared with it, so deriving it from the node count would stop every
/// process of an existing deployment from starting once a third URL is listed.
#[tokio::test]
async fn a_group_size_added_later_is_refused_by_the_broker() {
    let namespace = format!("g{}", &Uuid::new_v4().simple().to_string()[..10]);
    let mut config = conveyor_platform::Config {
        namespace,
        ..Default::default()
    };
    config.amqp.url = crate::harness::AMQP_URL.into();
    let before = conveyor_platform::amqp::Topology::for_config(&config);
    let after = conveyor_platform::amqp::Topology {
        quorum_group_size: Some(3),
        ..before.clone()
    };
    let conn = lapin::Connection::connect(crate::harness::AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    before.declare(&channel).await.unwrap();
    let redeclared = after.declare(&channel).await;
    let cleanup = conn.create_channel().await.unwrap();
    let _ = before.delete(&cleanup).await;
    let _ = conn.close(200, "done".into()).await;
    let err = redeclared
        .expect_err("the broker accepted a changed group size")
        .to_string();
    assert!(err.contains("x-quorum-initial-group-size"), "{err}");
}
