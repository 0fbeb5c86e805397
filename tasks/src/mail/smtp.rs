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
//!
//! lettre sets no timeout on SMTP commands, so a server that stops answering
//! would hold a send slot (and its recipient's claim) until the job's timeout.
//! Here `mail.smtp_timeout_ms` bounds each message's whole send: getting a
//! connection (connect, STARTTLS, AUTH, or the idle check) and MAIL, RCPT,
//! DATA and the message. The conversation is driven step by step, so that a
//! failure is told apart by where it happened: before the message was written
//! nothing was handed over and the recipient may be tried again; after, the
//! server may have accepted it, and the recipient is in doubt
//! ([`SendError::InDoubt`]), never sent again automatically. A failure to get
//! a conversation at all (the server cannot be reached, or refuses us at its
//! greeting, STARTTLS or AUTH, whatever the reply code) is
//! [`SendError::Unavailable`]: it says nothing about the recipient, and its
//! message names the step and the server's answer, for the operator who must
//! fix the server or `mail.smtp_url`. So is a refusal of the sender, the
//! answer to `MAIL FROM` ([`SendError::SenderRefused`], say `553 sender
//! address rejected` for a campaign's `from` the account may not use, or a
//! `451` "too many messages" limit): it holds for every recipient alike. A
//! refusal (a 4xx
//! or 5xx answer, say to one bad address's `RCPT`) leaves the connection in
//! step with the server: it is reset with `RSET` and goes back to the pool, so a
//! list with bad addresses does not cost a reconnect each. A connection whose
//! conversation failed otherwise or timed out is closed, never reused.

use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, RecycleError, RecycleResult};
use lettre::Message;
use lettre::transport::smtp::Error as SmtpError;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::time::{Instant, timeout_at};

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
    /// Every failure here is [`SendError::Unavailable`], naming the step
    /// (connect, greeting, STARTTLS, AUTH) and the server's answer.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let server = format!("{}:{}", self.host, self.port);
        let unavailable = |what: &str, err: &dyn std::fmt::Display| {
            SendError::Unavailable(format!("SMTP server {server} {what}: {err}"))
        };
        let connecting = async {
            let mut conn = if self.security == Security::Implicit {
                let tls = self
                    .tls()
                    .map_err(|err| unavailable("TLS setup failed", &err))?;
                AsyncSmtpConnection::connect_tokio1(
                    (self.host.as_str(), self.port),
                    Some(self.timeout),
                    &self.hello,
                    Some(tls),
                    None,
                )
                .await
                .map_err(|err| unavailable("refused the connection", &said(&err)))?
            } else {
                let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|err| unavailable("cannot be reached", &err))?;
                stream
                    .set_nodelay(true)
                    .map_err(|err| unavailable("cannot be reached", &err))?;
                AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello)
                    .await
                    .map_err(|err| unavailable("refused the connection", &said(&err)))?
            };
            let starttls = match self.security {
                Security::Required => true,
                Security::Opportunistic => conn.can_starttls(),
                Security::None | Security::Implicit => false,
            };
            if starttls {
                if !conn.can_starttls() {
                    return Err(unavailable(
                        "refused STARTTLS",
                        &"it does not offer it, and mail.smtp_url says tls=required",
                    ));
                }
                let tls = self
                    .tls()
                    .map_err(|err| unavailable("TLS setup failed", &err))?;
                conn.starttls(tls, &self.hello)
                    .await
                    .map_err(|err| unavailable("refused STARTTLS", &said(&err)))?;
            }
            if let Some(credentials) = &self.credentials {
                conn.auth(DEFAULT_MECHANISMS, credentials)
                    .await
                    .map_err(|err| unavailable("refused authentication", &said(&err)))?;
            }
            Ok::<_, SendError>(conn)
        };
        tokio::time::timeout(self.timeout, connecting)
            .await
            .map_err(|_| {
                SendError::Unavailable(format!(
                    "SMTP server {server} gave no connection within {} ms (connect, greeting, STARTTLS, AUTH)",
                    self.timeout.as_millis()
                ))
            })?
    }
}

/// An SMTP error as the server said it (`535 5.7.8 …`) when it is an answer,
/// else lettre's words.
fn said(err: &SmtpError) -> String {
    match (err.status(), std::error::Error::source(err)) {
        (Some(code), Some(text)) => format!("{code} {text}"),
        _ => err.to_string(),
    }
}

/// Why a message was not sent, or may not have been.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The SMTP server refused (4xx, 5xx), or the conversation failed before
    /// the message was written (lettre's classification): not handed over.
    #[error(transparent)]
    Smtp(#[from] SmtpError),
    /// No conversation could be had: the server could not be reached, refused
    /// the connection at its greeting, STARTTLS or AUTH, or gave no connection
    /// within the timeout. About the server or our configuration, never about
    /// the recipient, whatever the reply code: nothing was handed over.
    #[error("{0}")]
    Unavailable(String),
    /// The server refused the sender: a 4xx or 5xx answer to `MAIL FROM`.
    /// About the campaign's `from` address or our account, and so the same
    /// for every recipient: nothing was handed over, and the recipient is not
    /// at fault.
    #[error("the SMTP server refused the sender (MAIL FROM): {0}")]
    SenderRefused(SmtpError),
    /// `mail.smtp_timeout_ms` passed before the message was written, waiting
    /// for an answer to MAIL, RCPT or DATA: not handed over.
    #[error("no answer from the SMTP server within {timeout_ms} ms, before the message was sent")]
    TimedOut {
        /// The timeout that passed.
        timeout_ms: u128,
    },
    /// The server cannot take this message as it is (it needs SMTPUTF8 or
    /// 8BITMIME, which the server does not offer): not handed over.
    #[error("the SMTP server cannot take this message: {0}")]
    Unsupported(&'static str),
    /// The message was written but its answer never came (the timeout
    /// passed, or the connection failed): the server may have accepted it.
    #[error("in doubt: {0}")]
    InDoubt(String),
}

impl SendError {
    /// True for a 5xx answer to the message's own commands: the same message
    /// will never be accepted. A refused connection is never permanent.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Smtp(err) => err.is_permanent(),
            Self::Unavailable(_)
            | Self::SenderRefused(_)
            | Self::TimedOut { .. }
            | Self::Unsupported(_)
            | Self::InDoubt(_) => false,
        }
    }

    /// True when no conversation could be had ([`SendError::Unavailable`]),
    /// or the server refused the sender ([`SendError::SenderRefused`]): the
    /// recipient was not tried, and nothing is known about it.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::SenderRefused(_))
    }

    /// True when the server may have accepted the message: sending it again
    /// could deliver it twice.
    pub fn is_in_doubt(&self) -> bool {
        matches!(self, Self::InDoubt(_))
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
    /// `mail.smtp_timeout_ms`: the most one message's send may take.
    timeout: Duration,
}

impl SmtpPool {
    /// Parses `smtp_url` (a bad URL is an error naming `mail.smtp_url`); connects lazily.
    pub fn new(smtp_url: &str, size: u32, timeout: Duration) -> anyhow::Result<Self> {
        let target = Target::parse(smtp_url, timeout)?;
        let pool = managed::Pool::builder(Manager { target })
            .max_size(usize::try_from(size.max(1)).unwrap_or(1))
            .build()
            .map_err(|err| anyhow::anyhow!("mail SMTP pool: {err}"))?;
        Ok(Self { pool, timeout })
    }

    /// `mail.smtp_timeout_ms`: the most one message's send may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `message` on a pooled connection within the timeout; the server's
    /// answer to the message on success. After a refusal the connection is
    /// reset and returned to the pool; one whose conversation failed otherwise
    /// or timed out is closed. The error says
    /// whether the message may have been accepted ([`SendError::is_in_doubt`]).
    pub async fn send(&self, message: &Message) -> Result<Response, SendError> {
        let deadline = Instant::now() + self.timeout;
        let timed_out = || SendError::TimedOut {
            timeout_ms: self.timeout.as_millis(),
        };
        let mut conn = match timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(managed::PoolError::Backend(err))) => return Err(err),
            Ok(Err(other)) => {
                return Err(SendError::Unavailable(format!(
                    "SMTP connection pool: {other}"
                )));
            }
            Err(_) => {
                return Err(SendError::Unavailable(format!(
                    "no SMTP connection within {} ms (connect, greeting, STARTTLS, AUTH, or a busy pool)",
                    self.timeout.as_millis()
                )));
            }
        };
        let mut written = false;
        let failure = match timeout_at(deadline, converse(&mut conn, message, &mut written)).await {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(err)) => Some(err),
            Err(_elapsed) => None,
        };
        // A refusal was an answer: the conversation is in step, and `RSET`
        // ends the transaction the refusal left open. Anything else left the
        // connection mid-command, in no state to reuse.
        let reusable = match &failure {
            Some(SendError::Unsupported(_)) => true,
            Some(SendError::Smtp(err) | SendError::SenderRefused(err))
                if err.is_permanent() || err.is_transient() =>
            {
                matches!(timeout_at(deadline, conn.command(Rset)).await, Ok(Ok(_)))
            }
            _ => false,
        };
        if !reusable {
            drop(Object::take(conn));
        }
        Err(match failure {
            None if written => SendError::InDoubt(format!(
                "no answer within {} ms after the message was sent",
                self.timeout.as_millis()
            )),
            None => timed_out(),
            // An answer to the message, even a refusal, is not in doubt.
            Some(SendError::Smtp(err))
                if written && !(err.is_permanent() || err.is_transient()) =>
            {
                SendError::InDoubt(format!(
                    "the conversation failed after the message was sent: {err}"
                ))
            }
            Some(err) => err,
        })
    }
}

/// One message's MAIL, RCPT and DATA, as lettre's `AsyncSmtpConnection::send`
/// speaks them, but setting `written` just before the message goes out, so a
/// caller that stops waiting knows whether the server may have it.
async fn converse(
    conn: &mut AsyncSmtpConnection,
    message: &Message,
    written: &mut bool,
) -> Result<Response, SendError> {
    let envelope = message.envelope();
    let body = message.formatted();
    let mut options = Vec::new();
    let non_ascii_address = envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .any(|address| !AsRef::<str>::as_ref(address).is_ascii());
    if non_ascii_address {
        if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            return Err(SendError::Unsupported("a non-ASCII address needs SMTPUTF8"));
        }
        options.push(MailParameter::SmtpUtfEight);
    }
    if !body.is_ascii() {
        if !conn.server_info().supports_feature(Extension::EightBitMime) {
            return Err(SendError::Unsupported("a non-ASCII message needs 8BITMIME"));
        }
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    conn.command(Mail::new(envelope.from().cloned(), options))
        .await
        .map_err(|err| {
            // An answer refuses the sender; a broken connection is not one.
            if err.is_permanent() || err.is_transient() {
                SendError::SenderRefused(err)
            } else {
                SendError::Smtp(err)
            }
        })?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), vec![])).await?;
    }
    conn.command(Data).await?;
    *written = true;
    Ok(conn.message(&body).await?)
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
