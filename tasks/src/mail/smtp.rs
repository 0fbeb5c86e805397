//! SMTP connections opened with `TCP_NODELAY`, pooled.
//!
//! lettre's pooled transport opens its sockets with Nagle's algorithm on and
//! writes a message and its `\r\n.\r\n` terminator separately, so the
//! terminator waits for the server's delayed ACK, about 40 ms on Linux, on
//! every message: some 22 messages per second per connection whatever the
//! server (measured against both test sinks, benches/RESULTS.md). Here the
//! socket is ours, with `TCP_NODELAY`, and the SMTP conversation (STARTTLS,
//! AUTH, MAIL/RCPT/DATA) is still lettre's `AsyncSmtpConnection`; deadpool
//! keeps the connections. `smtps://` (implicit TLS) connections are opened by
//! lettre itself, so they keep Nagle's delay.

use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, RecycleError, RecycleResult};
use lettre::Message;
use lettre::transport::smtp::Error as SmtpError;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;

/// A connection idle for longer than this is checked with `NOOP` before reuse
/// (servers close idle connections, typically after a minute or more).
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(10);

/// How the connection is secured, from the URL (the forms lettre's `from_url` accepts).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Security {
    /// `smtp://host?tls=none` or `smtp://host`: plain text.
    None,
    /// `?tls=opportunistic`: STARTTLS when offered.
    Opportunistic,
    /// `?tls=required`: STARTTLS or fail.
    Required,
    /// `smtps://`: TLS from the first byte.
    Implicit,
}

/// Where and how to connect, parsed once from `mail.smtp_url`.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
    security: Security,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeout: Duration,
}

impl Target {
    fn parse(smtp_url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let url =
            url::Url::parse(smtp_url).map_err(|err| anyhow::anyhow!("mail.smtp_url: {err}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("mail.smtp_url: no host"))?
            .trim_matches(['[', ']'])
            .to_owned();
        let tls = url
            .query_pairs()
            .find(|(key, _)| key == "tls")
            .map(|(_, value)| value.into_owned());
        let (security, default_port) = match (url.scheme(), tls.as_deref()) {
            ("smtp", None | Some("none")) => (Security::None, 25),
            ("smtp", Some("opportunistic")) => (Security::Opportunistic, 587),
            ("smtp", Some("required")) => (Security::Required, 587),
            ("smtps", _) => (Security::Implicit, 465),
            (scheme, tls) => anyhow::bail!(
                "mail.smtp_url: unknown scheme `{scheme}` or tls `{}` (smtp://…?tls=none|opportunistic|required, or smtps://…)",
                tls.unwrap_or_default()
            ),
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|err| anyhow::anyhow!("mail.smtp_url: credentials: {err}"))
        };
        let credentials = match url.password() {
            Some(password) => Some(Credentials::new(decode(url.username())?, decode(password)?)),
            None => None,
        };
        let hello = match url.path().trim_matches('/') {
            "" => ClientId::default(),
            name => ClientId::Domain(name.to_owned()),
        };
        Ok(Self {
            port: url.port().unwrap_or(default_port),
            host,
            security,
            credentials,
            hello,
            timeout,
        })
    }

    fn tls(&self) -> Result<TlsParameters, SmtpError> {
        TlsParameters::new(self.host.clone())
    }

    /// Opens, secures and authenticates one connection, within the timeout.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let connecting = async {
            let mut conn = if self.security == Security::Implicit {
                AsyncSmtpConnection::connect_tokio1(
                    (self.host.as_str(), self.port),
                    Some(self.timeout),
                    &self.hello,
                    Some(self.tls()?),
                    None,
                )
                .await?
            } else {
                let stream =
                    tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
                stream.set_nodelay(true)?;
                AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello).await?
            };
            let starttls = match self.security {
                Security::Required => true,
                Security::Opportunistic => conn.can_starttls(),
                Security::None | Security::Implicit => false,
            };
            if starttls {
                conn.starttls(self.tls()?, &self.hello).await?;
            }
            if let Some(credentials) = &self.credentials {
                conn.auth(DEFAULT_MECHANISMS, credentials).await?;
            }
            Ok::<_, SendError>(conn)
        };
        tokio::time::timeout(self.timeout, connecting)
            .await
            .map_err(|_| {
                SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting to the SMTP server timed out",
                ))
            })?
    }
}

/// Why a message was not handed over.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The SMTP server refused, or the conversation failed (lettre's classification).
    #[error(transparent)]
    Smtp(#[from] SmtpError),
    /// The socket could not be opened or the connect timed out.
    #[error("cannot connect to the SMTP server: {0}")]
    Connect(#[from] std::io::Error),
}

impl SendError {
    /// True for a 5xx answer: the same message will never be accepted.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Smtp(err) => err.is_permanent(),
            Self::Connect(_) => false,
        }
    }
}

struct Manager {
    target: Target,
}

impl managed::Manager for Manager {
    type Type = AsyncSmtpConnection;
    type Error = SendError;

    async fn create(&self) -> Result<AsyncSmtpConnection, SendError> {
        self.target.connect().await
    }

    async fn recycle(
        &self,
        conn: &mut AsyncSmtpConnection,
        metrics: &Metrics,
    ) -> RecycleResult<SendError> {
        if conn.has_broken() {
            return Err(RecycleError::message("the connection broke"));
        }
        if metrics.last_used() > CHECK_IDLE_AFTER && !conn.test_connected().await {
            return Err(RecycleError::message(
                "the server closed the idle connection",
            ));
        }
        Ok(())
    }
}

/// A pool of up to `size` SMTP connections to the server of one URL. Cheap to clone.
#[derive(Clone)]
pub struct SmtpPool {
    pool: managed::Pool<Manager>,
}

impl SmtpPool {
    /// Parses `smtp_url` (a bad URL is an error naming `mail.smtp_url`); connects lazily.
    pub fn new(smtp_url: &str, size: u32, timeout: Duration) -> anyhow::Result<Self> {
        let target = Target::parse(smtp_url, timeout)?;
        let pool = managed::Pool::builder(Manager { target })
            .max_size(usize::try_from(size.max(1)).unwrap_or(1))
            .build()
            .map_err(|err| anyhow::anyhow!("mail SMTP pool: {err}"))?;
        Ok(Self { pool })
    }

    /// Sends `message` on a pooled connection; a connection that failed is not reused.
    pub async fn send(&self, message: &Message) -> Result<Response, SendError> {
        let mut conn = self.pool.get().await.map_err(|err| match err {
            managed::PoolError::Backend(err) => err,
            other => SendError::Connect(std::io::Error::other(other.to_string())),
        })?;
        let sent = conn.send(message.envelope(), &message.formatted()).await;
        if conn.has_broken() {
            drop(Object::take(conn));
        }
        Ok(sent?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Target {
        Target::parse(url, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn urls_parse_like_lettres() {
        let plain = parse("smtp://127.0.0.1:2525?tls=none");
        assert_eq!((plain.host.as_str(), plain.port), ("127.0.0.1", 2525));
        assert_eq!(plain.security, Security::None);
        assert!(plain.credentials.is_none());
        assert_eq!(parse("smtp://mail.example").port, 25);

        let submission = parse("smtp://u%40x:p%2Fw@mail.example?tls=required");
        assert_eq!(submission.port, 587);
        assert_eq!(submission.security, Security::Required);
        assert_eq!(
            submission.credentials,
            Some(Credentials::new("u@x".into(), "p/w".into()))
        );
        assert_eq!(
            parse("smtp://mail.example:2587?tls=opportunistic").security,
            Security::Opportunistic
        );
        let implicit = parse("smtps://mail.example");
        assert_eq!(
            (implicit.port, implicit.security),
            (465, Security::Implicit)
        );
    }

    #[test]
    fn bad_urls_name_the_setting() {
        for url in [
            "smtp://mail.example?tls=sometimes",
            "http://mail.example",
            "not a url",
        ] {
            let err = Target::parse(url, Duration::from_secs(1)).unwrap_err();
            assert!(err.to_string().contains("mail.smtp_url"), "{url}: {err}");
        }
    }
}
