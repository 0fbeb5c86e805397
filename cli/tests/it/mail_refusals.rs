//! A server that will not talk to us at all (a wrong password's `535` to
//! AUTH, a `554` greeting), or refuses the sender (`553` to MAIL FROM), fails
//! no recipient and counts no attempt, through
//! the real path (API, planner, sender, ledger) against a real TCP server:
//! the sender job fails with the server's reason and retries, the campaign
//! stays `sending`, and once the server talks every recipient goes out once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

use crate::harness::{TestApp, free_port, wait_until};
use crate::mail::{mail_config_for, start_campaign_to, wait_completed};

/// How a [`RefusingSmtp`] treats the next conversations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Greets with `554`: our IP is not welcome.
    RefuseGreeting,
    /// Answers AUTH with `535`: wrong credentials.
    RefuseAuth,
    /// Answers MAIL FROM with `553`: the account may not send as the campaign's `from`.
    /// Read at each MAIL FROM, as the connection stays pooled after the refusal.
    RefuseSender,
    /// Greets, authenticates anyone and accepts every message.
    Accept,
}

#[derive(Debug)]
struct Shared {
    mode: Mode,
    /// Messages accepted per recipient.
    received: HashMap<String, usize>,
}

/// A minimal SMTP server (tokio, plain text, AUTH PLAIN) whose mode can be
/// changed while it runs, as an operator fixes a server or a password.
#[derive(Clone)]
struct RefusingSmtp {
    port: u16,
    shared: Arc<Mutex<Shared>>,
}

impl RefusingSmtp {
    async fn start(mode: Mode) -> Self {
        Self::start_on(0, mode).await
    }

    /// Listens on `port` (0: any free one).
    async fn start_on(port: u16, mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared {
            mode,
            received: HashMap::new(),
        }));
        let serving = shared.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(converse(stream, serving.clone()));
            }
        });
        Self { port, shared }
    }

    fn set_mode(&self, mode: Mode) {
        self.shared.lock().unwrap().mode = mode;
    }

    fn received(&self) -> HashMap<String, usize> {
        self.shared.lock().unwrap().received.clone()
    }
}

async fn converse(stream: tokio::net::TcpStream, shared: Arc<Mutex<Shared>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mode = shared.lock().unwrap().mode;
    if mode == Mode::RefuseGreeting {
        let _ = write
            .write_all(b"554 5.7.1 no SMTP service here for your IP (test)\r\n")
            .await;
        return;
    }
    let mut line = String::new();
    let mut recipients = Vec::new();
    let mut answer = "220 refusing.test ESMTP\r\n";
    loop {
        if write.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        line.clear();
        if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let command = line.trim_end().to_ascii_uppercase();
        answer = if command.starts_with("EHLO") {
            "250-refusing.test\r\n250 AUTH PLAIN\r\n"
        } else if command.starts_with("AUTH PLAIN") {
            match mode {
                Mode::RefuseAuth => "535 5.7.8 Authentication credentials invalid\r\n",
                _ => "235 2.7.0 Authentication successful\r\n",
            }
        } else if command.starts_with("MAIL FROM")
            && shared.lock().unwrap().mode == Mode::RefuseSender
        {
            "553 5.7.1 Sender address rejected: not owned by user (test)\r\n"
        } else if command.starts_with("MAIL FROM") || command == "RSET" {
            recipients.clear();
            "250 2.1.0 ok\r\n"
        } else if let Some(to) = command.strip_prefix("RCPT TO:") {
            recipients.push(to.trim().trim_matches(['<', '>']).to_ascii_lowercase());
            "250 2.1.5 ok\r\n"
        } else if command == "DATA" {
            if write.write_all(b"354 go ahead\r\n").await.is_err() {
                return;
            }
            loop {
                line.clear();
                if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if line == ".\r\n" {
                    break;
                }
            }
            let mut shared = shared.lock().unwrap();
            for to in recipients.drain(..) {
                *shared.received.entry(to).or_default() += 1;
            }
            "250 2.0.0 queued\r\n"
        } else if command == "QUIT" {
            let _ = write.write_all(b"221 2.0.0 bye\r\n").await;
            return;
        } else {
            "250 2.0.0 ok\r\n"
        };
    }
}

const RECIPIENTS: usize = 20;

fn address(i: usize) -> String {
    format!("member{i}@example.com")
}

/// Starts a campaign to [`RECIPIENTS`] recipients against the server on `port` (with
/// `user:pass@` and `tls`) and waits until its sender job has failed twice (a retry
/// met the refusal again) or the campaign ended; returns the campaign id and
/// the job's last error.
async fn refused_campaign(port: u16, tls: &str) -> (TestApp, String, String) {
    let url = format!("smtp://mailer:wrong%20secret@127.0.0.1:{port}?tls={tls}");
    let app = TestApp::spawn_with(1, move |config| {
        mail_config_for(config, &url);
        // A refusal counted as an attempt would fail its recipient at once.
        config.mail.max_smtp_attempts = 1;
    })
    .await;
    let id = start_campaign_to(&app, (0..RECIPIENTS).map(address).collect(), None).await;
    let ledger = |state: &str| {
        format!(
            "SELECT count(*) AS n FROM campaign_recipients \
             WHERE campaign_id = '{id}' AND state = '{state}'"
        )
    };
    wait_until(Duration::from_secs(30), || async {
        let campaign: Value = app.get_json(&format!("/v1/campaigns/{id}")).await;
        let failures = chunk_job_of(&app, &id)
            .await
            .map_or(0, |job| job.errors.as_array().map_or(0, Vec::len));
        campaign["state"] == "completed" || failures >= 2
    })
    .await;
    let campaign: Value = app.get_json(&format!("/v1/campaigns/{id}")).await;
    assert_eq!(app.count(&ledger("failed")).await, 0, "{campaign}");
    assert_ne!(campaign["state"], "completed", "{campaign}");
    assert_eq!(app.count(&ledger("pending")).await, RECIPIENTS as i64);
    let attempts = app
        .count(&format!(
            "SELECT coalesce(sum(attempts), 0)::bigint AS n FROM campaign_recipients \
             WHERE campaign_id = '{id}'"
        ))
        .await;
    assert_eq!(attempts, 0, "a refused connection counted as an attempt");
    let job = chunk_job_of(&app, &id).await.expect("the sender job");
    assert_ne!(job.state, "dead", "{job:?}");
    (app, id, job.last_error.unwrap_or_default())
}

/// The campaign's (single) sender job, once recorded.
async fn chunk_job_of(app: &TestApp, campaign: &str) -> Option<conveyor_schema::models::Job> {
    let url = app.db.url.clone();
    let campaign: Uuid = campaign.parse().unwrap();
    let chunk = tokio::task::spawn_blocking(move || {
        use conveyor_schema::db::campaign_chunks;
        use diesel::prelude::*;
        let mut conn = PgConnection::establish(&url).unwrap();
        campaign_chunks::table
            .filter(campaign_chunks::campaign_id.eq(campaign))
            .select(campaign_chunks::id)
            .first::<Uuid>(&mut conn)
            .optional()
            .unwrap()
    })
    .await
    .unwrap()?;
    app.job(chunk).await
}

/// Once the server talks, the campaign completes with every recipient sent once.
async fn sends_once_fixed(app: &TestApp, id: &str, server: &RefusingSmtp) {
    server.set_mode(Mode::Accept);
    let status = wait_completed(app, id, Duration::from_secs(30)).await;
    assert_eq!(status["counts"]["sent"], RECIPIENTS, "{status}");
    let received = server.received();
    let expected: HashMap<String, usize> = (0..RECIPIENTS).map(|i| (address(i), 1)).collect();
    assert_eq!(received, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtp_auth_refused_fails_no_recipient_and_the_job_names_the_refusal() {
    let server = RefusingSmtp::start(Mode::RefuseAuth).await;
    let (app, id, error) = refused_campaign(server.port, "none").await;
    assert!(
        error.contains("refused authentication: 535 5.7.8 Authentication credentials invalid"),
        "{error}"
    );
    sends_once_fixed(&app, &id, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtp_greeting_554_fails_no_recipient_and_the_job_names_the_refusal() {
    let server = RefusingSmtp::start(Mode::RefuseGreeting).await;
    let (app, id, error) = refused_campaign(server.port, "none").await;
    assert!(
        error.contains("refused the connection: 554 5.7.1 no SMTP service here"),
        "{error}"
    );
    sends_once_fixed(&app, &id, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtp_server_down_fails_no_recipient_and_counts_no_attempt() {
    let port = free_port();
    let (app, id, error) = refused_campaign(port, "none").await;
    assert!(error.contains("cannot be reached"), "{error}");
    let server = RefusingSmtp::start_on(port, Mode::Accept).await;
    sends_once_fixed(&app, &id, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_required_without_starttls_fails_no_recipient_and_names_the_setting() {
    let server = RefusingSmtp::start(Mode::Accept).await;
    let (_app, _id, error) = refused_campaign(server.port, "required").await;
    assert!(
        error.contains("refused STARTTLS") && error.contains("tls=required"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_sender_fails_no_recipient_and_the_job_names_the_refusal() {
    let server = RefusingSmtp::start(Mode::RefuseSender).await;
    let (app, id, error) = refused_campaign(server.port, "none").await;
    assert!(
        error.contains("refused the sender (MAIL FROM)")
            && error.contains("Sender address rejected"),
        "{error}"
    );
    sends_once_fixed(&app, &id, &server).await;
}
