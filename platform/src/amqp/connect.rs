//! Opening a connection to a live broker node of a cluster.
//!
//! [`Nodes`] remembers which node served the last connection, so a reconnect
//! starts with the *next* node: a node that just died is tried last instead of
//! first, and a dead first node in the list never costs a connect timeout on
//! every reconnect. (Spreading processes over the nodes is done by the order
//! of the list: see `Config::amqp_urls`.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

/// How long one node may take to accept a connection before the next is tried.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// No broker node could be reached.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no broker node answered (last error: {0})")]
pub struct ConnectError(String);

/// The broker nodes of one client, with a cursor over them.
#[derive(Debug)]
pub struct Nodes {
    /// Node URLs as configured.
    urls: Vec<String>,
    /// Index of the node to try first on the next connect; moves past each node that served.
    next: AtomicUsize,
}

impl Nodes {
    /// The nodes at `urls`; the first connect tries them in this order.
    pub fn new(urls: &[&str]) -> Self {
        Self {
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The node URLs in the order the next [`connect`](Self::connect) tries them.
    pub fn order(&self) -> Vec<&str> {
        let n = self.urls.len();
        let start = self.next.load(Ordering::Relaxed);
        (0..n)
            .map(|i| self.urls[(start + i) % n].as_str())
            .collect()
    }

    /// Tries each node once, in [`order`](Self::order), each within 5 s, and
    /// returns the first connection; the next call starts after the node that
    /// answered. Fails with the last node's error when none answers.
    pub async fn connect(&self, connection_name: &str) -> Result<Connection, ConnectError> {
        let n = self.urls.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut last_error = String::from("no broker URL configured");
        for i in 0..n {
            let index = (start + i) % n;
            let url = &self.urls[index];
            match connect_one(url, connection_name).await {
                Ok(conn) => {
                    self.next.store((index + 1) % n, Ordering::Relaxed);
                    if i > 0 {
                        tracing::info!(node = %redact(url), "connected to a later broker node");
                    }
                    return Ok(conn);
                }
                Err(err) => last_error = err,
            }
        }
        Err(ConnectError(last_error))
    }
}

/// Tries each node URL in order (each within 5 s) and returns the first
/// connection; the error of the last node when none answers.
pub async fn connect(urls: &[&str], connection_name: &str) -> Result<Connection, ConnectError> {
    Nodes::new(urls).connect(connection_name).await
}

async fn connect_one(url: &str, connection_name: &str) -> Result<Connection, String> {
    let properties =
        ConnectionProperties::default().with_connection_name(connection_name.to_owned().into());
    match tokio::time::timeout(NODE_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => {
            tracing::warn!(node = %redact(url), error = %err, "broker node refused connection");
            Err(err.to_string())
        }
        Err(_) => {
            tracing::warn!(node = %redact(url), "broker node did not answer within 5 s");
            Err("connect timed out".into())
        }
    }
}

/// How long closing a connection may wait for the broker's `close-ok`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes `connection`, waiting at most 2 s for the broker to answer.
///
/// A connection whose socket just failed may not be marked broken yet, and
/// then `close` waits for a `close-ok` that never comes: a reconnect loop that
/// awaited it would hang for good (seen in the cluster proof when a node was
/// stopped). Every close of a connection that may be dead goes through here.
pub async fn close_quietly(connection: &Connection, reason: &str) {
    let closing = connection.close(200, reason.to_owned().into());
    if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        tracing::debug!(
            reason,
            "the broker did not answer close within 2 s; dropping the connection"
        );
    }
}

/// Closes `channel`, waiting at most 2 s for the broker to answer (see [`close_quietly`]).
pub async fn close_channel_quietly(channel: &lapin::Channel, reason: &str) {
    let closing = channel.close(200, reason.to_owned().into());
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_rotates_from_the_cursor() {
        let nodes = Nodes::new(&["a", "b", "c"]);
        assert_eq!(nodes.order(), ["a", "b", "c"]);
        nodes.next.store(2, Ordering::Relaxed);
        assert_eq!(nodes.order(), ["c", "a", "b"]);
    }

    #[tokio::test]
    async fn a_refusing_first_node_is_skipped_and_tried_last_next_time() {
        // Port 1 refuses at once; the second "node" is the local broker.
        let urls = [
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ];
        let nodes = Nodes::new(&urls);
        let conn = nodes.connect("conveyor-connect-test").await.unwrap();
        assert_eq!(
            nodes.order(),
            [urls[0], urls[1]],
            "the node after the one that served comes first on the next connect"
        );
        let _ = conn.close(200, "done".into()).await;
    }
}
