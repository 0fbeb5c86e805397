//! Issue 7's broker faults on a private standalone RabbitMQ node (`c4` of
//! deploy/cluster/rabbit.sh), with an ingress and two workers as processes:
//!
//! - the broker stopped under a publish load (`rabbitmqctl stop_app`, then
//!   `start_app`): every 202 job succeeds exactly once, every other answer is a
//!   503 with `Retry-After`, and the same ingress answers 202 again by itself;
//! - the broker blocking publishers on a memory alarm (`connection.blocked`):
//!   503 with `Retry-After` within the publish timeout, never a hang nor a 202,
//!   `/readyz` failing while the alarm lasts, 202 again once it clears, and a
//!   wait for a blocked publisher's readiness ending when it clears.
//!
//! The shared broker on 5672 is never touched. These tests are `#[ignore]`d;
//! `make cluster-test` starts the node and sets `CLUSTER_TEST_SOLO_AMQP_URL` and
//! `CLUSTER_TEST_PG` (see deploy/cluster/run-proof.sh).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::cluster::{ClusterEnv, Deployment, post_load, script, settled_tally, summarize, tally};

/// The standalone node's number in rabbit.sh.
const NODE: &str = "4";
/// The ingress's confirm deadline (`amqp.publish_timeout_ms`, default).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// What an answer may take beyond the publish timeout (a loaded 2-core machine).
const SLACK: Duration = Duration::from_secs(2);
/// The ingress must take work again this soon after the broker is back.
const RECOVER_WITHIN: Duration = Duration::from_secs(15);

fn solo_env() -> ClusterEnv {
    let (Ok(amqp_urls), Ok(pg_server)) = (
        std::env::var("CLUSTER_TEST_SOLO_AMQP_URL"),
        std::env::var("CLUSTER_TEST_PG"),
    ) else {
        panic!(
            "\n\n*** The broker-fault proofs need a private RabbitMQ node and PostgreSQL. ***\n\
             *** Run them with `make cluster-test` (see deploy/cluster/run-proof.sh).  ***\n\n"
        );
    };
    ClusterEnv {
        amqp_urls,
        pg_server,
        scripts: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster"),
    }
}

/// `rabbitmqctl ARGS` against the standalone node.
async fn ctl(args: &[&str]) -> String {
    let env = solo_env();
    let mut all = vec!["ctl", NODE];
    all.extend_from_slice(args);
    let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
    tokio::task::spawn_blocking(move || {
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        script(&env, "rabbit.sh", &all)
    })
    .await
    .unwrap()
}

/// Runs `rabbitmqctl ARGS` against the node when dropped, so a failing test
/// still leaves it started and without an alarm for the next one.
struct Restore(&'static [&'static str]);

impl Restore {
    /// The test restored the node itself.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let env = solo_env();
        let mut all = vec!["ctl", NODE];
        all.extend_from_slice(self.0);
        let _ = std::process::Command::new("bash")
            .arg(env.scripts.join("rabbit.sh"))
            .args(all)
            .status();
    }
}

async fn readyz(deployment: &Deployment) -> u16 {
    reqwest::get(format!("{}/readyz", deployment.ingress))
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Polls `/readyz` until it answers `status`; how long that took.
async fn readyz_becomes(deployment: &Deployment, status: u16, within: Duration) -> Duration {
    let since = Instant::now();
    crate::harness::wait_until(within, || async { readyz(deployment).await == status }).await;
    since.elapsed()
}

fn client(key: &str) -> reqwest::Client {
    crate::harness::client_with(key)
}

/// One `POST /v1/jobs` of `diag.noop`: (status, `Retry-After`, job id on 202
/// or on an in-doubt 503, time taken).
async fn post_one(
    client: &reqwest::Client,
    deployment: &Deployment,
) -> (u16, Option<String>, Option<Uuid>, Duration) {
    let sent = Instant::now();
    let response = client
        .post(format!("{}/v1/jobs", deployment.ingress))
        .json(&json!({"task": "diag.noop", "args": {}}))
        .timeout(PUBLISH_TIMEOUT * 6)
        .send()
        .await
        .expect("the ingress answers");
    let took = sent.elapsed();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let id = if status == 202 {
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().and_then(|id| id.parse().ok())
    } else {
        crate::cluster::in_doubt_job(response).await
    };
    (status, retry_after, id, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the private standalone RabbitMQ node: run `make cluster-test`"]
async fn stopping_the_broker_mid_load_loses_no_accepted_job() {
    const JOBS: usize = 6_000;
    const RATE_PER_SEC: u64 = 200;
    const FAULT_AFTER: Duration = Duration::from_secs(5);
    const DOWN_FOR: Duration = Duration::from_secs(8);

    let env = solo_env();
    let deployment = Deployment::start(&env).await;
    let started = Instant::now();
    let load = tokio::spawn(post_load(
        deployment.ingress.clone(),
        deployment.api_key.clone(),
        started,
        JOBS,
        RATE_PER_SEC,
    ));

    tokio::time::sleep(FAULT_AFTER).await;
    let restart = Restore(&["start_app"]);
    let stopping = started.elapsed();
    ctl(&["stop_app"]).await;
    let stopped = started.elapsed();
    eprintln!("broker: stop_app {stopping:?}..{stopped:?}");
    let not_ready_after = readyz_becomes(&deployment, 503, Duration::from_secs(10)).await;
    tokio::time::sleep(DOWN_FOR).await;
    ctl(&["start_app"]).await;
    restart.disarm();
    let back = started.elapsed();
    eprintln!("broker: start_app done at {back:?}");

    let outcomes = load.await.unwrap();
    let load_secs = started.elapsed().as_secs_f64();
    let final_tally = settled_tally(
        &deployment.db_url,
        &outcomes.accepted,
        &outcomes.in_doubt,
        Duration::from_secs(120),
    )
    .await;
    eprintln!(
        "broker stop_app proof: {JOBS} posted in {load_secs:.1} s; 202: {}, 503: {} (first..last {:?}, \
         last 202 at {:?}); /readyz failed {not_ready_after:?} after stop_app; {final_tally:?}; \
         503s by type and detail: {:?}",
        outcomes.accepted.len(),
        outcomes.unavailable,
        outcomes.unavailable_span,
        outcomes.last_accepted,
        summarize(&outcomes.refusals),
    );

    assert!(
        outcomes.unexpected.is_empty(),
        "answers other than 202/503 with Retry-After: {:?}",
        summarize(&outcomes.unexpected)
    );
    assert_eq!(outcomes.accepted.len() + outcomes.unavailable, JOBS);
    let (first_503, last_503) = outcomes
        .unavailable_span
        .expect("no 503 at all: the stopped broker went unnoticed");
    assert!(
        first_503 >= stopping,
        "a 503 at {first_503:?}, before the broker stopped"
    );
    // The same ingress process takes work again by itself, while the load still runs.
    assert!(
        last_503 <= back + RECOVER_WITHIN,
        "503s until {last_503:?}, the broker was back at {back:?}"
    );
    assert!(
        outcomes.last_accepted.is_some_and(|at| at > back),
        "no 202 after the broker came back"
    );
    final_tally.assert_each_accepted_job_ran_once(outcomes.accepted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the private standalone RabbitMQ node: run `make cluster-test`"]
async fn a_blocked_broker_is_503_within_the_publish_timeout_and_not_ready() {
    let env = solo_env();
    let deployment = Deployment::start(&env).await;
    let producer = client(&deployment.api_key);
    let mut accepted = Vec::new();
    let (status, _, id, _) = post_one(&producer, &deployment).await;
    assert_eq!(status, 202);
    accepted.extend(id);

    // A watermark of 0 raises the memory alarm at once: the node blocks every
    // connection that publishes (`connection.blocked`) until it is lifted.
    let lift = Restore(&["set_vm_memory_high_watermark", "0.4"]);
    ctl(&["set_vm_memory_high_watermark", "0"]).await;
    crate::harness::wait_until(Duration::from_secs(10), || async {
        ctl(&["eval", "rabbit_alarm:get_alarms()."])
            .await
            .contains("memory")
    })
    .await;

    // A publisher of the test's own, blocked by its publish (the broker blocks
    // a connection once it publishes), whose readiness is awaited below.
    let stop = tokio_util::sync::CancellationToken::new();
    let own = conveyor_platform::amqp::Publisher::start(
        &[env.amqp_urls.as_str()],
        "conveyor-test-blocked",
        deployment.topology(),
        1,
        Duration::from_secs(1),
        stop.clone(),
    );
    assert!(own.wait_connected(Duration::from_secs(10)).await);
    // To a queue that does not exist: should the broker take it once the alarm
    // lifts, it returns it, and no job of the deployment's is made.
    let probe = conveyor_platform::amqp::Outgoing {
        routing_key: format!("{}.nowhere", deployment.topology().namespace),
        ..conveyor_platform::amqp::Outgoing::job(
            &deployment.topology(),
            "default",
            &conveyor_schema::Envelope::new("diag.noop", json!({})),
        )
    };
    assert!(
        own.publish(&probe).await.is_err(),
        "a publish went through the alarm"
    );
    crate::harness::wait_until(Duration::from_secs(5), || async { !own.is_ready() }).await;

    // Ten at once (one group commit), then ten one by one.
    let burst = futures::future::join_all((0..10).map(|_| post_one(&producer, &deployment))).await;
    let mut answers = burst;
    for _ in 0..10 {
        answers.push(post_one(&producer, &deployment).await);
    }
    for (status, retry_after, _, took) in &answers {
        assert_eq!(
            *status, 503,
            "answered {status} while the broker blocks publishers"
        );
        assert!(retry_after.is_some(), "a 503 without Retry-After");
        assert!(
            *took <= PUBLISH_TIMEOUT + SLACK,
            "an answer took {took:?}, beyond the publish timeout"
        );
    }
    // The 503s that name a job in doubt (those that may have been published).
    let in_doubt: Vec<Uuid> = answers.iter().filter_map(|answer| answer.2).collect();
    // Not ready for as long as the alarm lasts (sampled for 3 s).
    let not_ready_after = readyz_becomes(&deployment, 503, PUBLISH_TIMEOUT + SLACK).await;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            readyz(&deployment).await,
            503,
            "/readyz passed during the alarm"
        );
    }
    // Nothing was recorded for the 503s.
    let during = {
        let (url, ids, doubtful) = (
            deployment.db_url.clone(),
            accepted.clone(),
            in_doubt.clone(),
        );
        tokio::task::spawn_blocking(move || tally(&url, &ids, &doubtful))
            .await
            .unwrap()
    };
    assert_eq!(during.ran_without_202, 0, "a record for a 503: {during:?}");

    // Whoever waits for the blocked publisher to be ready goes on once the
    // alarm lifts (the broker's `connection.unblocked`), not at the end of its wait.
    let waiting = {
        let own = own.clone();
        tokio::spawn(async move {
            let since = Instant::now();
            (
                own.wait_connected(Duration::from_secs(60)).await,
                since.elapsed(),
            )
        })
    };
    ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    lift.disarm();
    let (unblocked, waited) = waiting.await.unwrap();
    assert!(
        unblocked && waited < RECOVER_WITHIN,
        "a wait for the publisher ended {unblocked} after {waited:?}"
    );
    stop.cancel();
    let ready_after = readyz_becomes(&deployment, 200, RECOVER_WITHIN).await;
    for _ in 0..5 {
        let (status, _, id, _) = post_one(&producer, &deployment).await;
        assert_eq!(
            status, 202,
            "the ingress did not take work after the alarm cleared"
        );
        accepted.extend(id);
    }
    let final_tally = settled_tally(
        &deployment.db_url,
        &accepted,
        &in_doubt,
        Duration::from_secs(60),
    )
    .await;
    let slowest = answers.iter().map(|a| a.3).max().unwrap_or_default();
    eprintln!(
        "blocked broker: 20 answers 503 (slowest {slowest:?}); /readyz failed {not_ready_after:?} \
         after them and passed {ready_after:?} after the alarm cleared; {final_tally:?} \
         (503-answered jobs that ran anyway, published before the block: {}; 503s in doubt: {})",
        final_tally.ran_without_202,
        in_doubt.len()
    );
    assert_eq!(
        final_tally.succeeded_once,
        accepted.len() as i64,
        "{final_tally:?}"
    );
    assert_eq!(
        final_tally.ran_unannounced, 0,
        "a job ran although its 503 did not say in-doubt: {final_tally:?}"
    );
}
