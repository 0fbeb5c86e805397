//! `webhook.profile_sync`: one verified profile webhook, applied by a worker.
//!
//! The ingress checks the signature over the raw body, then decodes the body
//! into a [`ProfileEvent`] and its `data` into the [`ProfileChange`] its action
//! calls for, so a job is only ever published for a well-formed event. The job's
//! arguments carry the event as received plus where it came from.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ArgsError, TaskOptions, TaskSpec};

/// `webhook.profile_sync`: applies one profile event, idempotently and in `occurred_at` order.
pub struct ProfileSync;

impl TaskSpec for ProfileSync {
    const NAME: &'static str = "webhook.profile_sync";
    type Args = ProfileSyncArgs;
    /// Only the webhook endpoint enqueues it, after checking the signature.
    const PUBLIC: bool = false;
    /// The event's checks ([`ProfileEvent::change`]), so a replay's
    /// replacement arguments are held to them too.
    fn check_args(args: &ProfileSyncArgs) -> Result<(), ArgsError> {
        args.event.change().map(drop).map_err(|err| ArgsError {
            pointer: format!("/args/event{}", err.pointer),
            message: err.message,
        })
    }
    fn options() -> TaskOptions {
        TaskOptions {
            max_attempts: 8,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            timeout: PROFILE_SYNC_TIMEOUT,
            concurrency: 32,
            ..TaskOptions::on_queue("webhooks")
        }
    }
}

/// `webhook.profile_sync`'s attempt timeout.
const PROFILE_SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// `webhook.headshot_sweep {}`: removes `headshots` rows that no profile names
/// and that were created more than [`HEADSHOT_SWEEP_MIN_AGE`] ago (with their
/// files), then, with directory storage, headshot files that no row names and
/// that are as old, and temporary files as old. Fired hourly by a built-in
/// schedule whatever `webhooks.headshots.storage`; operators may also enqueue
/// it (it is idempotent).
pub struct HeadshotSweep;

/// How old an unnamed headshot file, or a `headshots` row no profile names,
/// must be before the sweep removes it. A `store` writes its file and commits
/// the row naming it, and its import then points the profile at that row, in
/// one `webhook.profile_sync` attempt, so within its timeout; the locks on the
/// checksum and on the row already keep the sweep off a file being stored and
/// a row being used (the import stores the image anew if it loses), and this
/// age is the margin on top (and all that protects a temporary file, which
/// nothing locks): thirty times that timeout.
pub const HEADSHOT_SWEEP_MIN_AGE: Duration = Duration::from_secs(3600);

const _: () = assert!(
    HEADSHOT_SWEEP_MIN_AGE.as_secs() >= 10 * PROFILE_SYNC_TIMEOUT.as_secs(),
    "the sweep must leave alone any file a profile_sync attempt may still commit a row for"
);

impl TaskSpec for HeadshotSweep {
    const NAME: &'static str = "webhook.headshot_sweep";
    type Args = HeadshotSweepArgs;
    fn options() -> TaskOptions {
        TaskOptions {
            max_attempts: 3,
            backoff_base: Duration::from_secs(30),
            backoff_cap: Duration::from_secs(300),
            timeout: Duration::from_secs(600),
            concurrency: 1,
            // The workers that store headshots, so the ones that have the directory.
            ..TaskOptions::on_queue("webhooks")
        }
    }
}

/// Arguments of `webhook.headshot_sweep`: none.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadshotSweepArgs {}

/// Arguments of `webhook.profile_sync`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSyncArgs {
    /// The configured source that sent it.
    pub source: String,
    /// Its `webhook-id` header.
    pub webhook_id: String,
    /// The body, as validated.
    pub event: ProfileEvent,
}

/// What a profile webhook's body says happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProfileAction {
    /// Profile fields changed; `data` is the profile's current fields.
    Update,
    /// A new photo to fetch; `data` has its URL (and optionally its SHA-256).
    ImportHeadshot,
    /// The profile is gone; `data` is empty or absent.
    Delete,
}

impl ProfileAction {
    /// The wire name, e.g. `IMPORT_HEADSHOT`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Update => "UPDATE",
            Self::ImportHeadshot => "IMPORT_HEADSHOT",
            Self::Delete => "DELETE",
        }
    }
}

/// A profile webhook body: `{"action", "profile_id", "occurred_at", "data"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileEvent {
    /// What happened.
    pub action: ProfileAction,
    /// The producer's profile id (1 to 200 characters).
    pub profile_id: String,
    /// When it happened at the producer (RFC 3339); orders the changes. From
    /// 4714 BC (what PostgreSQL stores) to [`OCCURRED_AT_MAX_AHEAD`] past the
    /// ingress's clock.
    pub occurred_at: DateTime<Utc>,
    /// Action-specific fields; see [`ProfileEvent::change`].
    #[serde(default)]
    pub data: Value,
}

/// How far past the ingress's clock an event's `occurred_at` may be: an
/// allowance for the producer's clock running fast. Changes are applied in
/// `occurred_at` order, so one stamped further ahead (a clock years off, a
/// typo like `2099`) would make every later change of its profile stale for
/// good; it is refused (422) instead. A day is far beyond any clock kept by
/// NTP, yet small enough that such an event cannot shadow a profile for long.
pub const OCCURRED_AT_MAX_AHEAD: Duration = Duration::from_secs(24 * 3600);

/// The fields of an `UPDATE`: the profile as it now is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFields {
    /// E-mail address.
    pub email: String,
    /// Name shown to people.
    pub display_name: String,
    /// BCP 47 language tag, e.g. `en-GB`.
    #[serde(default)]
    pub locale: Option<String>,
}

/// The data of an `IMPORT_HEADSHOT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadshotRef {
    /// `http` or `https` URL of the image.
    pub url: String,
    /// Lowercase hex SHA-256 of the image, when the producer knows it: an
    /// unchanged checksum skips the download, a different one fails it.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// The typed change an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileChange {
    /// Replace the profile's fields.
    Update(ProfileFields),
    /// Fetch and store a new headshot.
    ImportHeadshot(HeadshotRef),
    /// Clear the profile and leave a tombstone.
    Delete,
}

fn data_as<T: DeserializeOwned>(data: &Value) -> Result<T, ArgsError> {
    serde_path_to_error::deserialize(data).map_err(|err| ArgsError {
        pointer: format!("/data{}", crate::json_pointer::pointer_to(err.path())),
        message: err.inner().to_string(),
    })
}

fn invalid(pointer: &str, message: impl Into<String>) -> ArgsError {
    ArgsError {
        pointer: pointer.to_owned(),
        message: message.into(),
    }
}

impl ProfileEvent {
    /// Checks the event as the ingress receives it at `now`: [`Self::change`],
    /// and an `occurred_at` at most [`OCCURRED_AT_MAX_AHEAD`] past `now`. (The
    /// worker checks only the former: by its turn, `now` has moved on.)
    pub fn received(&self, now: DateTime<Utc>) -> Result<ProfileChange, ArgsError> {
        let change = self.change()?;
        let ahead = chrono::TimeDelta::from_std(OCCURRED_AT_MAX_AHEAD).unwrap_or_default();
        if self.occurred_at > now + ahead {
            return Err(invalid(
                "/occurred_at",
                format!(
                    "`occurred_at` {} is too far ahead: times from {} to {} h past the \
                     server's clock ({}) are accepted",
                    self.occurred_at
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    crate::timestamptz::EARLIEST,
                    OCCURRED_AT_MAX_AHEAD.as_secs() / 3600,
                    now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ),
            ));
        }
        Ok(change)
    }

    /// Checks the event and decodes `data` for its action. The error's pointer
    /// is relative to the body (`/profile_id`, `/occurred_at`, `/data/email`,
    /// …). An `occurred_at` PostgreSQL cannot store is refused here, so by the
    /// worker as well (one already queued fails at once instead of at every
    /// attempt).
    pub fn change(&self) -> Result<ProfileChange, ArgsError> {
        if self.profile_id.is_empty() || self.profile_id.chars().count() > 200 {
            return Err(invalid("/profile_id", "must be 1 to 200 characters"));
        }
        crate::timestamptz::check("occurred_at", self.occurred_at)
            .map_err(|err| invalid("/occurred_at", err.to_string()))?;
        match self.action {
            ProfileAction::Update => {
                let fields: ProfileFields = data_as(&self.data)?;
                if !fields.email.contains('@') || fields.email.len() > 320 {
                    return Err(invalid("/data/email", "is not an e-mail address"));
                }
                if fields.display_name.chars().count() > 200 {
                    return Err(invalid(
                        "/data/display_name",
                        "must be at most 200 characters",
                    ));
                }
                if fields
                    .locale
                    .as_ref()
                    .is_some_and(|l| l.is_empty() || l.len() > 35)
                {
                    return Err(invalid("/data/locale", "must be 1 to 35 characters"));
                }
                Ok(ProfileChange::Update(fields))
            }
            ProfileAction::ImportHeadshot => {
                let headshot: HeadshotRef = data_as(&self.data)?;
                let scheme_ok =
                    headshot.url.starts_with("https://") || headshot.url.starts_with("http://");
                if !scheme_ok || headshot.url.len() > 2048 {
                    return Err(invalid(
                        "/data/url",
                        "must be an http(s) URL of at most 2048 characters",
                    ));
                }
                if let Some(sha) = &headshot.sha256
                    && (sha.len() != 64 || !sha.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
                {
                    return Err(invalid("/data/sha256", "must be 64 lowercase hex digits"));
                }
                Ok(ProfileChange::ImportHeadshot(headshot))
            }
            ProfileAction::Delete => match &self.data {
                Value::Null => Ok(ProfileChange::Delete),
                Value::Object(map) if map.is_empty() => Ok(ProfileChange::Delete),
                _ => Err(invalid("/data", "a DELETE carries no data")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(body: Value) -> Result<ProfileChange, ArgsError> {
        let event: ProfileEvent =
            serde_json::from_value(body).map_err(|e| invalid("/", e.to_string()))?;
        event.change()
    }

    #[test]
    fn each_action_decodes_its_data() {
        let at = "2026-01-01T00:00:00Z";
        assert!(matches!(
            event(
                json!({"action": "UPDATE", "profile_id": "p", "occurred_at": at,
                         "data": {"email": "a@b.c", "display_name": "A"}})
            ),
            Ok(ProfileChange::Update(_))
        ));
        assert!(matches!(
            event(
                json!({"action": "IMPORT_HEADSHOT", "profile_id": "p", "occurred_at": at,
                         "data": {"url": "https://x/y.png"}})
            ),
            Ok(ProfileChange::ImportHeadshot(_))
        ));
        assert_eq!(
            event(json!({"action": "DELETE", "profile_id": "p", "occurred_at": at})),
            Ok(ProfileChange::Delete)
        );
    }

    #[test]
    fn bad_data_is_pointed_at() {
        let at = "2026-01-01T00:00:00Z";
        let err = event(
            json!({"action": "UPDATE", "profile_id": "p", "occurred_at": at,
                               "data": {"email": "a@b.c", "display_name": "A", "age": 3}}),
        )
        .unwrap_err();
        assert_eq!(err.pointer, "/data/age");
        let err = event(
            json!({"action": "IMPORT_HEADSHOT", "profile_id": "p", "occurred_at": at,
                               "data": {"url": "file:///etc/passwd"}}),
        )
        .unwrap_err();
        assert_eq!(err.pointer, "/data/url");
        let err =
            event(json!({"action": "DELETE", "profile_id": "", "occurred_at": at})).unwrap_err();
        assert_eq!(err.pointer, "/profile_id");
    }

    #[test]
    fn occurred_at_is_bounded_by_postgres_and_the_clock() {
        let body = |at: &str| -> ProfileEvent {
            serde_json::from_value(
                json!({"action": "DELETE", "profile_id": "p", "occurred_at": at}),
            )
            .unwrap()
        };
        let now: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let err = body("-100000-01-01T00:00:00Z").received(now).unwrap_err();
        assert_eq!(err.pointer, "/occurred_at");
        assert!(
            err.message.contains("4714-11-24 00:00:00 UTC BC"),
            "{}",
            err.message
        );
        assert_eq!(
            body("-4713-11-24T00:00:00Z").received(now),
            Ok(ProfileChange::Delete)
        );
        assert_eq!(
            body("2026-01-02T00:00:00Z").received(now),
            Ok(ProfileChange::Delete)
        );
        let err = body("2026-01-02T00:00:00.000001Z")
            .received(now)
            .unwrap_err();
        assert_eq!(err.pointer, "/occurred_at");
        assert!(err.message.contains("24 h past"), "{}", err.message);
        // The worker, later, holds it to PostgreSQL's range alone.
        assert_eq!(
            body("2026-01-02T00:00:00.000001Z").change(),
            Ok(ProfileChange::Delete)
        );
        let args = ProfileSyncArgs {
            source: "s".into(),
            webhook_id: "w".into(),
            event: body("-100000-01-01T00:00:00Z"),
        };
        let err = ProfileSync::check_args(&args).unwrap_err();
        assert_eq!(err.pointer, "/args/event/occurred_at");
    }
}
