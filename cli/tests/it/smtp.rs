//! A real SMTP server for tests (mailin-embedded over TCP on port 0) that
//! records every message it accepts and can refuse chosen recipients on purpose.

use std::collections::HashMap;
use std::net::{IpAddr, TcpListener};
use std::sync::{Arc, Mutex};

use mailin_embedded::{Handler, Response, Server};

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
