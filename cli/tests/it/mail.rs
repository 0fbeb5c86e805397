//! The mail fan-out's proof: a real SMTP server over TCP records every message,
//! and no address ever receives a campaign twice — with workers drained, killed
//! or replayed mid-campaign.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use conveyor_platform::Config;
use conveyor_platform::amqp::Outgoing;
use conveyor_schema::Envelope;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::harness::{TestApp, wait_until};
use crate::smtp::{Behaviour, TestSmtp};

const SMTP_CONCURRENCY: usize = 8;

fn mail_config(config: &mut Config, smtp: &TestSmtp) {
    mail_config_for(config, &smtp.url);
}

/// The mail settings of these tests, for the SMTP server at `smtp_url`.
pub(crate) fn mail_config_for(config: &mut Config, smtp_url: &str) {
    config.mail.smtp_url = smtp_url.to_owned().into();
    config.mail.smtp_concurrency = SMTP_CONCURRENCY;
    config.mail.smtp_timeout_ms = 2_000;
    config.mail.claim_ttl_ms = 3_000;
    config.mail.retry_backoff_ms = 200;
}

/// The mail settings of [`mail_config_for`], for worker processes.
pub(crate) fn process_env(app: &mut TestApp, smtp: &TestSmtp) {
    for (key, value) in [
        ("CONVEYOR_MAIL_SMTP_URL", smtp.url.clone()),
        (
            "CONVEYOR_MAIL_SMTP_CONCURRENCY",
            SMTP_CONCURRENCY.to_string(),
        ),
        ("CONVEYOR_MAIL_SMTP_TIMEOUT_MS", "2000".into()),
        ("CONVEYOR_MAIL_CLAIM_TTL_MS", "3000".into()),
        ("CONVEYOR_MAIL_RETRY_BACKOFF_MS", "200".into()),
    ] {
        app.process_env.push((key.into(), value));
    }
}

pub(crate) fn address(i: usize) -> String {
    format!("guest{i:05}@example.com")
}

/// Creates a campaign of `n` recipients and starts it; returns its id.
pub(crate) async fn start_campaign(app: &TestApp, n: usize, rate: Option<f64>) -> String {
    start_campaign_to(app, (0..n).map(address).collect(), rate).await
}

/// Creates a campaign to `addresses` and starts it; returns its id.
pub(crate) async fn start_campaign_to(
    app: &TestApp,
    addresses: Vec<String>,
    rate: Option<f64>,
) -> String {
    let recipients: Vec<Value> = addresses
        .into_iter()
        .enumerate()
        .map(|(i, email)| json!({"email": email, "vars": {"name": format!("Guest {i}")}}))
        .collect();
    let body = json!({
        "name": "Launch party",
        "template": "event_announcement",
        "from": "Events <events@example.com>",
        "rate_per_sec": rate,
        "vars": {"event": {"title": "Launch party", "date": "2 May", "venue": "Pier 9"}},
        "recipients": recipients,
    });
    let response = app
        .client
        .post(app.url("/v1/campaigns"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = app
        .client
        .post(app.url(&format!("/v1/campaigns/{id}/send")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    id
}

/// Posts a state change (`pause`, `resume`, `cancel`) to campaign `id`; returns the status.
pub(crate) async fn control(app: &TestApp, id: &str, action: &str) -> u16 {
    app.client
        .post(app.url(&format!("/v1/campaigns/{id}/{action}")))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn campaign(app: &TestApp, id: &str) -> Value {
    app.get_json(&format!("/v1/campaigns/{id}")).await
}

pub(crate) async fn wait_completed(app: &TestApp, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = campaign(app, id).await;
        if status["state"] == "completed" {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "campaign not completed in {timeout:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn sent_so_far(app: &TestApp) -> i64 {
    app.count("SELECT count(*) AS n FROM campaign_recipients WHERE state = 'sent'")
        .await
}

pub(crate) fn assert_no_duplicates(smtp: &TestSmtp) -> usize {
    let per_address = smtp.per_address();
    let twice: Vec<_> = per_address.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "addresses that received the campaign twice: {twice:?}"
    );
    per_address.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_recipients_two_workers_each_receives_exactly_one() {
    let smtp = TestSmtp::start();
    let app = TestApp::spawn_with(2, |c| mail_config(c, &smtp)).await;
    let id = start_campaign(&app, 2000, None).await;
    let status = wait_completed(&app, &id, Duration::from_secs(120)).await;
    assert_eq!(status["counts"]["sent"], 2000, "{status}");
    assert_eq!(assert_no_duplicates(&smtp), 2000);
    let message_ids: HashSet<String> = smtp
        .received()
        .iter()
        .map(|m| {
            m.data
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        message_ids.len(),
        2000,
        "each message has its own deterministic Message-ID"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_campaign_then_a_fresh_worker_finishes_without_duplicates() {
    let smtp = TestSmtp::start();
    let mut app = TestApp::spawn_with(0, |c| mail_config(c, &smtp)).await;
    process_env(&mut app, &smtp);
    let pid = app.spawn_worker_process(10_000);
    let id = start_campaign(&app, 2000, Some(400.0)).await;
    wait_until(Duration::from_secs(60), || async {
        sent_so_far(&app).await >= 300
    })
    .await;
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| app.processes[0].wait().unwrap());
    assert!(status.success(), "drained worker exited with {status}");
    let at_stop = sent_so_far(&app).await;
    assert!(
        at_stop < 2000,
        "the campaign should have been mid-way, sent {at_stop}"
    );

    app.spawn_worker_process(10_000);
    let status = wait_completed(&app, &id, Duration::from_secs(120)).await;
    assert_eq!(status["counts"]["sent"], 2000, "{status}");
    assert_eq!(status["counts"]["pending"], 0);
    assert_eq!(assert_no_duplicates(&smtp), 2000);
}

/// Pausing stops the senders at their next group: nothing is mailed while
/// paused, no recipient stays claimed, every chunk hands its pending
/// recipients back, and resuming mails the rest, each address once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_stops_sending_at_the_next_group_and_resume_finishes_without_duplicates() {
    let smtp = TestSmtp::start();
    let app = TestApp::spawn_with(1, |c| mail_config(c, &smtp)).await;
    let id = start_campaign(&app, 1000, Some(200.0)).await;
    wait_until(Duration::from_secs(60), || async {
        sent_so_far(&app).await >= 100
    })
    .await;
    assert_eq!(control(&app, &id, "pause").await, 200);
    let count = |sql: &'static str| app.count(sql);
    wait_until(Duration::from_secs(30), || async {
        count("SELECT count(*) AS n FROM campaign_recipients WHERE state = 'sending'").await == 0
            && count(
                "SELECT count(*) AS n FROM campaign_recipients
                  WHERE state = 'pending' AND chunk_id IS NOT NULL",
            )
            .await
                == 0
    })
    .await;
    // A group claimed just before the pause committed may still finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_pause = smtp.received().len();
    assert_eq!(sent_so_far(&app).await, at_pause as i64);
    assert!(at_pause < 1000, "the campaign should have been mid-way");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(smtp.received().len(), at_pause, "mail sent while paused");

    assert_eq!(control(&app, &id, "resume").await, 200);
    let status = wait_completed(&app, &id, Duration::from_secs(120)).await;
    assert_eq!(status["counts"]["sent"], 1000, "{status}");
    assert_eq!(assert_no_duplicates(&smtp), 1000);
}

/// A throttled campaign hands the worker's SMTP conversations back after each
/// group, so an unthrottled campaign on the same worker is not kept waiting for
/// the slow one's whole chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_campaign_does_not_hold_the_conversations_between_groups() {
    let smtp = TestSmtp::start();
    let app = TestApp::spawn_with(1, |c| mail_config(c, &smtp)).await;
    // 100 recipients at 2/s: one chunk, 50 s.
    let slow = start_campaign(&app, 100, Some(2.0)).await;
    wait_until(Duration::from_secs(30), || async {
        sent_so_far(&app).await >= 1
    })
    .await;
    let others = (0..300)
        .map(|i| format!("other{i:05}@example.com"))
        .collect();
    let fast = start_campaign_to(&app, others, None).await;
    let status = wait_completed(&app, &fast, Duration::from_secs(30)).await;
    assert_eq!(status["counts"]["sent"], 300, "{status}");
    assert_eq!(campaign(&app, &slow).await["state"], "sending");
    assert_eq!(control(&app, &slow, "cancel").await, 200);
    assert_no_duplicates(&smtp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_three_times_never_sends_twice_and_reports_what_is_in_doubt() {
    let smtp = TestSmtp::start();
    let mut app = TestApp::spawn_with(0, |c| mail_config(c, &smtp)).await;
    process_env(&mut app, &smtp);
    let mut pid = app.spawn_worker_process(10_000);
    let id = start_campaign(&app, 2000, Some(500.0)).await;
    let mut rng_state = Uuid::new_v4().as_u128();
    for kill_number in 0..3 {
        // A random moment: after another 150–450 messages.
        rng_state = rng_state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let more = 150 + ((rng_state >> 64) as u64 % 300) as i64;
        let target = sent_so_far(&app).await + more;
        wait_until(Duration::from_secs(60), || async {
            sent_so_far(&app).await >= target.min(1990)
        })
        .await;
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        let index = app.processes.len() - 1;
        tokio::task::block_in_place(|| app.processes[index].wait().unwrap());
        eprintln!(
            "kill {} at {} sent",
            kill_number + 1,
            sent_so_far(&app).await
        );
        pid = app.spawn_worker_process(10_000);
    }
    let status = wait_completed(&app, &id, Duration::from_secs(180)).await;
    let delivered = assert_no_duplicates(&smtp);
    eprintln!("after 3 kills: {}", status["counts"]);
    let counts = &status["counts"];
    let (sent, failed, unknown) = (
        counts["sent"].as_i64().unwrap(),
        counts["failed"].as_i64().unwrap(),
        counts["unknown"].as_i64().unwrap(),
    );
    assert_eq!(
        sent + failed + unknown,
        2000,
        "every recipient ends sent, failed or unknown: {status}"
    );
    assert_eq!(counts["pending"], 0);
    assert!(
        unknown <= 3 * SMTP_CONCURRENCY as i64,
        "{unknown} in doubt after 3 kills"
    );
    assert!(delivered as i64 >= sent, "every `sent` row was received");
    // The campaign reports exactly what the ledger says.
    assert_eq!(
        unknown,
        app.count("SELECT count(*) AS n FROM campaign_recipients WHERE state = 'unknown'")
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_and_redelivered_planner_makes_no_extra_chunks_or_mail() {
    let smtp = TestSmtp::start();
    let app = TestApp::spawn_with(1, |c| mail_config(c, &smtp)).await;
    let id = start_campaign(&app, 600, Some(300.0)).await;
    let campaign_id: Uuid = id.parse().unwrap();
    wait_until(Duration::from_secs(30), || async {
        sent_so_far(&app).await >= 100
    })
    .await;
    let chunks_before = app.count("SELECT count(*) AS n FROM campaign_chunks").await;
    assert_eq!(chunks_before, 6);

    let stop = CancellationToken::new();
    let publisher = app.publisher(&stop).await;
    let planner_id = app
        .count("SELECT count(*) AS n FROM jobs WHERE task = 'mail.plan_campaign'")
        .await;
    assert_eq!(planner_id, 1);
    let replay = |replay_of: Option<Uuid>| {
        let mut envelope = Envelope::new("mail.plan_campaign", json!({"campaign_id": campaign_id}));
        envelope.replay_of = replay_of;
        Outgoing::job(&app.topology(), "mail", &envelope)
    };
    // Mid-campaign: a redelivery-like duplicate and a replay of the planner.
    publisher.publish(&replay(None)).await.unwrap();
    publisher
        .publish(&replay(Some(Uuid::now_v7())))
        .await
        .unwrap();
    wait_completed(&app, &id, Duration::from_secs(60)).await;
    // After completion: replay again.
    publisher
        .publish(&replay(Some(Uuid::now_v7())))
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), || async {
        app.count("SELECT count(*) AS n FROM jobs WHERE task = 'mail.plan_campaign' AND state = 'succeeded'").await == 4
    })
    .await;
    assert_eq!(
        app.count("SELECT count(*) AS n FROM campaign_chunks").await,
        chunks_before
    );
    assert_eq!(
        app.count("SELECT count(*) AS n FROM jobs WHERE task = 'mail.send_chunk'")
            .await,
        chunks_before
    );
    // Each sender job carries its chunk as key: a worker would skip a second
    // message of it (a planner that died between its publish and marking it).
    assert_eq!(
        app.count(
            "SELECT count(*) AS n FROM jobs j JOIN campaign_chunks c ON c.id = j.id \
              WHERE j.idempotency_key = 'campaign:' || c.campaign_id || '/chunk:' || c.id"
        )
        .await,
        chunks_before
    );
    assert_eq!(assert_no_duplicates(&smtp), 600);
    assert_eq!(smtp.received().len(), 600);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn temporary_failures_are_retried_once_accepted_and_permanent_ones_recorded() {
    let smtp = TestSmtp::start();
    for i in 0..5 {
        smtp.behave(&address(i), Behaviour::DeferTimes(2));
    }
    for i in 5..10 {
        smtp.behave(&address(i), Behaviour::Reject);
    }
    let app = TestApp::spawn_with(1, |c| mail_config(c, &smtp)).await;
    let id = start_campaign(&app, 40, None).await;
    let status = wait_completed(&app, &id, Duration::from_secs(60)).await;
    assert_eq!(
        (
            status["counts"]["sent"].as_i64(),
            status["counts"]["failed"].as_i64()
        ),
        (Some(35), Some(5)),
        "{status}"
    );
    let per_address = smtp.per_address();
    for i in 0..5 {
        assert_eq!(
            per_address.get(&address(i)),
            Some(&1),
            "deferred {} sent once",
            address(i)
        );
    }
    for i in 5..10 {
        assert_eq!(per_address.get(&address(i)), None);
    }
    let page: Value = app
        .get_json(&format!("/v1/campaigns/{id}/recipients?state=failed"))
        .await;
    let failed = page["items"].as_array().unwrap();
    assert_eq!(failed.len(), 5);
    for row in failed {
        let reply = row["last_reply"].as_str().unwrap();
        assert!(
            reply.contains("550") && reply.contains("mailbox unavailable"),
            "{reply}"
        );
    }
    assert_eq!(
        app.count("SELECT count(*) AS n FROM campaign_recipients WHERE email LIKE 'guest0000_@%' AND email < 'guest00005' AND state = 'sent' AND attempts = 3").await,
        5
    );
}
