//! Opening a connection to the first broker node that answers.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

/// No broker node could be reached.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no broker node answered (last error: {0})")]
pub struct ConnectError(String);

/// Tries each node URL in order (each within 5 s) and returns the first
/// connection; the error of the last node when none answers.
pub async fn connect(urls: &[&str], connection_name: &str) -> Result<Connection, ConnectError> {
    let mut last_error = String::from("no broker URL configured");
    for url in urls {
        let properties =
            ConnectionProperties::default().with_connection_name(connection_name.to_owned().into());
        match tokio::time::timeout(Duration::from_secs(5), Connection::connect(url, properties))
            .await
        {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(err)) => {
                tracing::warn!(node = %redact(url), error = %err, "broker node refused connection");
                last_error = err.to_string();
            }
            Err(_) => {
                tracing::warn!(node = %redact(url), "broker node did not answer within 5 s");
                last_error = "connect timed out".into();
            }
        }
    }
    Err(ConnectError(last_error))
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
