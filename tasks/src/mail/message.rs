//! Building one recipient's message and classifying the SMTP server's answer.
//!
//! Only an answer about the recipient's own message (or a conversation that
//! broke while sending it) is a [`Delivery`]. When no conversation could be
//! had at all (server unreachable, or refusing us at its greeting, STARTTLS
//! or AUTH), or the server refused the sender (`MAIL FROM`), [`send_one`]
//! returns [`Unavailable`] instead: even a 5xx there is about the server, the
//! campaign's `from` or our configuration, so it must not fail the recipient.

use lettre::Message;
use lettre::message::{Mailbox, MultiPart, header};
use uuid::Uuid;

use super::MailServices;

/// What the SMTP server said about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// 2xx: accepted.
    Sent(String),
    /// 4xx, or the conversation failed or timed out before the message was
    /// written: nothing was handed over, try again later.
    Deferred(String),
    /// 5xx, or the message cannot be built: never try again.
    Failed(String),
    /// The message was written but no answer came (timeout, broken
    /// connection): the server may have accepted it, so it is never sent again
    /// automatically (the ledger's `unknown`).
    Unknown(String),
}

/// No conversation with the SMTP server could be had, so the recipient was
/// not tried: the reason, naming the step and the server's answer (say
/// `SMTP server mail.example:587 refused authentication: 535 5.7.8 …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

/// The deterministic `Message-ID` of (campaign, recipient), so receiving
/// systems can deduplicate too.
pub fn message_id(campaign_id: Uuid, email: &str, from_domain: &str) -> String {
    let name = format!("{campaign_id}/{}", email.to_ascii_lowercase());
    let id = Uuid::new_v5(&Uuid::NAMESPACE_URL, name.as_bytes());
    format!("<{}@{from_domain}>", id.simple())
}

/// Everything about a campaign that is the same for each recipient.
pub struct Envelope<'a> {
    /// Campaign id.
    pub campaign_id: Uuid,
    /// Template name.
    pub template: &'a str,
    /// From.
    pub from: &'a Mailbox,
    /// Reply-To.
    pub reply_to: Option<&'a Mailbox>,
    /// Campaign variables.
    pub vars: &'a serde_json::Value,
}

/// Renders and sends one message; never panics, always classifies: what
/// happened to the recipient, or [`Unavailable`] when the server could not
/// be talked to (nothing was tried).
pub async fn send_one(
    mail: &MailServices,
    campaign: &Envelope<'_>,
    recipient_id: i64,
    email: &str,
    vars: &serde_json::Value,
) -> Result<Delivery, Unavailable> {
    let mut context = match campaign.vars {
        serde_json::Value::Object(map) => map.clone(),
        _ => Default::default(),
    };
    if let serde_json::Value::Object(own) = vars {
        context.extend(own.clone());
    }
    context.insert("email".into(), email.into());
    let unsubscribe = mail
        .settings
        .unsubscribe_url
        .replace("{campaign}", &campaign.campaign_id.to_string())
        .replace("{recipient}", &recipient_id.to_string());
    context.insert("unsubscribe_url".into(), unsubscribe.clone().into());
    let rendered = match mail
        .templates
        .render(campaign.template, &serde_json::Value::Object(context))
    {
        Ok(rendered) => rendered,
        Err(err) => return Ok(Delivery::Failed(err.to_string())),
    };
    let to: Mailbox = match email.parse() {
        Ok(to) => to,
        Err(err) => return Ok(Delivery::Failed(format!("invalid address: {err}"))),
    };
    let domain = campaign.from.email.domain().to_owned();
    let mut builder = Message::builder()
        .from(campaign.from.clone())
        .to(to)
        .subject(rendered.subject)
        .message_id(Some(message_id(campaign.campaign_id, email, &domain)))
        .header(ListUnsubscribe(format!("<{unsubscribe}>")));
    if let Some(reply_to) = campaign.reply_to {
        builder = builder.reply_to(reply_to.clone());
    }
    let message = match builder.multipart(MultiPart::alternative_plain_html(
        rendered.text,
        rendered.html,
    )) {
        Ok(message) => message,
        Err(err) => return Ok(Delivery::Failed(format!("cannot build message: {err}"))),
    };
    Ok(match mail.transport.send(&message).await {
        Ok(response) => Delivery::Sent(format!(
            "{} {}",
            response.code(),
            response.message().collect::<Vec<_>>().join(" ")
        )),
        Err(err) if err.is_unavailable() => return Err(Unavailable(err.to_string())),
        Err(err) if err.is_in_doubt() => Delivery::Unknown(err.to_string()),
        Err(err) if err.is_permanent() => Delivery::Failed(err.to_string()),
        Err(err) => Delivery::Deferred(err.to_string()),
    })
}

/// The `List-Unsubscribe` header.
#[derive(Clone)]
struct ListUnsubscribe(String);

impl header::Header for ListUnsubscribe {
    fn name() -> header::HeaderName {
        header::HeaderName::new_from_ascii_str("List-Unsubscribe")
    }
    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self(s.to_owned()))
    }
    fn display(&self) -> header::HeaderValue {
        header::HeaderValue::new(Self::name(), self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_deterministic_and_case_insensitive() {
        let campaign = Uuid::now_v7();
        let a = message_id(campaign, "Ada@Example.com", "example.org");
        assert_eq!(a, message_id(campaign, "ada@example.com", "example.org"));
        assert_ne!(
            a,
            message_id(Uuid::now_v7(), "ada@example.com", "example.org")
        );
        assert!(a.starts_with('<') && a.ends_with("@example.org>"));
    }
}
