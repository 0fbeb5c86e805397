//! Real SMTP servers for tests, over TCP on port 0: [`TestSmtp`]
//! (mailin-embedded) records every message it accepts and can refuse or defer
//! chosen recipients on purpose; [`StallingSmtp`] speaks just enough SMTP to
//! stop answering at a chosen point, as a hung server does, and records when
//! the client gave up on each conversation.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mailin_embedded::{Handler, Response, Server};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How the server answers RCPT TO for an address.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 451 for the first `times` attempts, then accept.
    DeferTimes(u32),
    /// Always 550.
    Reject,
}

/// One accepted message.
#[derive(Debug, Clone)]
pub struct Received {
    /// Envelope recipients.
    pub to: Vec<String>,
    /// The raw message.
    pub data: String,
    /// When its data ended (the server accepted it).
    pub at: Instant,
}

#[derive(Default)]
struct Shared {
    received: Vec<Received>,
    behaviours: HashMap<String, Behaviour>,
    attempts: HashMap<String, u32>,
}

#[derive(Clone)]
struct Recorder {
    shared: Arc<Mutex<Shared>>,
    to: Vec<String>,
    data: Vec<u8>,
}

impl Handler for Recorder {
    fn mail(&mut self, _ip: IpAddr, _domain: &str, _from: &str) -> Response {
        self.to.clear();
        self.data.clear();
        mailin_embedded::response::OK
    }

    fn rcpt(&mut self, to: &str) -> Response {
        let address = to.trim_matches(['<', '>']).to_ascii_lowercase();
        let mut shared = self.shared.lock().unwrap();
        let attempt = {
            let count = shared.attempts.entry(address.clone()).or_default();
            *count += 1;
            *count
        };
        match shared.behaviours.get(&address) {
            Some(Behaviour::Reject) => {
                Response::custom(550, "5.1.1 mailbox unavailable (test)".into())
            }
            Some(Behaviour::DeferTimes(times)) if attempt <= *times => {
                Response::custom(451, "4.3.0 try again later (test)".into())
            }
            _ => {
                self.to.push(address);
                mailin_embedded::response::OK
            }
        }
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let message = Received {
            to: std::mem::take(&mut self.to),
            data: String::from_utf8_lossy(&self.data).into_owned(),
            at: Instant::now(),
        };
        self.data.clear();
        self.shared.lock().unwrap().received.push(message);
        mailin_embedded::response::OK
    }
}

/// A running test SMTP server. It lives until the test process ends.
#[derive(Clone)]
pub struct TestSmtp {
    /// `smtp://127.0.0.1:<port>?tls=none`
    pub url: String,
    shared: Arc<Mutex<Shared>>,
}

impl TestSmtp {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let handler = Recorder {
            shared: shared.clone(),
            to: Vec::new(),
            data: Vec::new(),
        };
        let mut server = Server::new(handler);
        server
            .with_name("test.smtp")
            .with_num_threads(256)
            .with_tcp_listener(listener);
        std::thread::spawn(move || {
            let _ = server.serve();
        });
        Self {
            url: format!("smtp://127.0.0.1:{port}?tls=none"),
            shared,
        }
    }

    pub fn behave(&self, address: &str, behaviour: Behaviour) {
        self.shared
            .lock()
            .unwrap()
            .behaviours
            .insert(address.to_ascii_lowercase(), behaviour);
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().unwrap().received.clone()
    }

    /// Messages accepted per recipient address.
    pub fn per_address(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for message in self.received() {
            for to in message.to {
                *counts.entry(to).or_default() += 1;
            }
        }
        counts
    }
}

/// Where a [`StallingSmtp`] stops answering for an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// At `RCPT TO`: nothing of the message was sent.
    AtRcpt,
    /// After the message's final `.`: the server has the message, but its
    /// answer never comes.
    AtDataEnd,
}

/// One conversation in which a [`StallingSmtp`] stopped answering.
#[derive(Debug, Clone)]
pub struct Stalled {
    /// The recipient it stalled for.
    pub address: String,
    /// Where.
    pub at: Stall,
    /// When it stopped answering.
    pub since: Instant,
    /// When the client closed the connection (`None`: still open).
    pub closed: Option<Instant>,
}

#[derive(Default)]
struct StallShared {
    rules: HashMap<String, Stall>,
    rejected: HashSet<String>,
    /// Recipients of each message whose final `.` was read.
    received: Vec<Vec<String>>,
    stalls: Vec<Stalled>,
    /// Connections accepted.
    connections: usize,
}

/// A minimal SMTP server (tokio, plain text) that accepts every recipient
/// except those it rejects (550) or stalls for ([`Stall`]): from then on it
/// reads and ignores everything until the client closes the connection.
#[derive(Clone)]
pub struct StallingSmtp {
    /// `smtp://127.0.0.1:<port>?tls=none`
    pub url: String,
    shared: Arc<Mutex<StallShared>>,
}

impl StallingSmtp {
    /// Listens on port 0; serves until the test's runtime ends.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(StallShared::default()));
        let serving = shared.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serving.lock().unwrap().connections += 1;
                tokio::spawn(converse(stream, serving.clone()));
            }
        });
        Self {
            url: format!("smtp://127.0.0.1:{port}?tls=none"),
            shared,
        }
    }

    /// Stops answering at `at` whenever `address` is a recipient.
    pub fn stall(&self, address: &str, at: Stall) {
        let mut shared = self.shared.lock().unwrap();
        shared.rules.insert(address.to_ascii_lowercase(), at);
    }

    /// Answers `RCPT TO` for `address` with 550.
    pub fn reject(&self, address: &str) {
        let mut shared = self.shared.lock().unwrap();
        shared.rejected.insert(address.to_ascii_lowercase());
    }

    /// The recipients of every message whose end the server read, accepted or not.
    pub fn received(&self) -> Vec<Vec<String>> {
        self.shared.lock().unwrap().received.clone()
    }

    /// How many connections clients opened.
    pub fn connections(&self) -> usize {
        self.shared.lock().unwrap().connections
    }

    /// Every conversation it stalled, oldest first.
    pub fn stalls(&self) -> Vec<Stalled> {
        self.shared.lock().unwrap().stalls.clone()
    }
}

/// Serves one connection of a [`StallingSmtp`].
async fn converse(stream: tokio::net::TcpStream, shared: Arc<Mutex<StallShared>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    let mut recipients = Vec::new();
    if !reply(&mut write, "220 stalling.test ESMTP\r\n").await {
        return;
    }
    // Where it stalled: an index into `stalls`.
    let stalled = loop {
        line.clear();
        if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let command = line.trim_end().to_ascii_uppercase();
        let answer = if command.starts_with("EHLO") {
            "250-stalling.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
        } else if command.starts_with("MAIL FROM") || command == "RSET" {
            recipients.clear();
            "250 2.1.0 ok\r\n"
        } else if let Some(to) = command.strip_prefix("RCPT TO:") {
            let address = to
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .trim_matches(['<', '>'])
                .to_ascii_lowercase();
            let mut shared = shared.lock().unwrap();
            if shared.rejected.contains(&address) {
                "550 5.1.1 mailbox unavailable (test)\r\n"
            } else if shared.rules.get(&address) == Some(&Stall::AtRcpt) {
                break stall(&mut shared, address, Stall::AtRcpt);
            } else {
                recipients.push(address);
                "250 2.1.5 ok\r\n"
            }
        } else if command == "DATA" {
            if !reply(&mut write, "354 end with <CRLF>.<CRLF>\r\n").await {
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
            shared.received.push(recipients.clone());
            let stalling = recipients
                .iter()
                .find(|to| shared.rules.get(*to) == Some(&Stall::AtDataEnd))
                .cloned();
            if let Some(address) = stalling {
                break stall(&mut shared, address, Stall::AtDataEnd);
            }
            "250 2.0.0 queued\r\n"
        } else if command == "QUIT" {
            let _ = reply(&mut write, "221 2.0.0 bye\r\n").await;
            return;
        } else {
            "250 2.0.0 ok\r\n"
        };
        if !reply(&mut write, answer).await {
            return;
        }
    };
    // Hung: read and ignore everything until the client gives up.
    let mut sink = Vec::new();
    while matches!(lines.read_until(b'\n', &mut sink).await, Ok(n) if n > 0) {
        sink.clear();
    }
    shared.lock().unwrap().stalls[stalled].closed = Some(Instant::now());
}

/// Writes one answer; false when the client has gone.
async fn reply(write: &mut tokio::net::tcp::OwnedWriteHalf, text: &str) -> bool {
    write.write_all(text.as_bytes()).await.is_ok()
}

/// Records a stall; its index in `stalls`.
fn stall(shared: &mut StallShared, address: String, at: Stall) -> usize {
    shared.stalls.push(Stalled {
        address,
        at,
        since: Instant::now(),
        closed: None,
    });
    shared.stalls.len() - 1
}
