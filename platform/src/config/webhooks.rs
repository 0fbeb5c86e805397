//! The `[webhooks]` section: inbound webhook sources, their keys, and how
//! profile headshots are fetched and stored.
//!
//! ```toml
//! [webhooks]
//! body_limit_bytes = 65536
//!
//! [webhooks.sources.members]
//! keys = ["whpk_…", "whsec_…"]   # several during a rotation; any one may match
//! tolerance_secs = 300           # optional, default 300
//!
//! [webhooks.headshots]
//! allowed_hosts = ["images.example.com", "*.cdn.example.com"]
//! storage = "directory"          # or "database"
//! dir = "/var/lib/conveyor/headshots"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::webhook_signature::{KeyError, VerifyingKey};

/// Signed inbound webhooks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Largest webhook body, in bytes; a larger one is refused (413) before any hashing.
    pub body_limit_bytes: usize,
    /// How much longer than its acceptance window a `webhook-id` is remembered
    /// (the window is twice the tolerance: a timestamp may be that far in the past or future).
    pub dedup_margin_secs: u64,
    /// Producers by name (the `{source}` of `POST /v1/webhooks/{source}/profiles`).
    pub sources: BTreeMap<String, WebhookSource>,
    /// Downloading and storing profile headshots.
    pub headshots: HeadshotConfig,
    /// Run `webhook.headshot_sweep` hourly at :41 as a built-in schedule (a
    /// `[[schedules]]` entry of that name replaces it). Off, no sweep runs
    /// unless one is scheduled: old images no profile names stay.
    pub headshot_sweep: bool,
}

/// One producer of webhooks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSource {
    /// `whsec_…` (HMAC, `v1`) and/or `whpk_…` (Ed25519 public key, `v1a`) keys; any may match.
    #[serde(serialize_with = "expose_all")]
    pub keys: Vec<SecretString>,
    /// How far `webhook-timestamp` may be from now, either way, in seconds.
    #[serde(default = "default_tolerance")]
    pub tolerance_secs: u64,
}

/// Where downloaded headshots go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadshotStorage {
    /// In the `headshots` table, keyed by SHA-256.
    Database,
    /// As files named by their SHA-256 in `webhooks.headshots.dir`.
    Directory,
}

/// Headshot download policy and storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadshotConfig {
    /// Hosts images may be fetched from: exact names or IPs, or `*.example.com`
    /// for any subdomain. Empty refuses every download.
    pub allowed_hosts: Vec<String>,
    /// Permits hosts that resolve to loopback, private, link-local or other
    /// non-public addresses. Off by default (no fetching of internal services).
    pub allow_internal_addresses: bool,
    /// Largest image accepted, in bytes.
    pub max_bytes: u64,
    /// Deadline for one download, connect to last byte.
    pub timeout_ms: u64,
    /// Accepted `Content-Type`s of the response.
    pub content_types: Vec<String>,
    /// `database` or `directory`.
    pub storage: HeadshotStorage,
    /// The directory, when `storage = "directory"`.
    pub dir: Option<PathBuf>,
}

fn default_tolerance() -> u64 {
    300
}

fn expose_all<S: serde::Serializer>(keys: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(keys.iter().map(|k| k.expose_secret()))
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            body_limit_bytes: 64 * 1024,
            dedup_margin_secs: 300,
            sources: BTreeMap::new(),
            headshots: HeadshotConfig::default(),
            headshot_sweep: true,
        }
    }
}

impl Default for HeadshotConfig {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            allow_internal_addresses: false,
            max_bytes: 5 * 1024 * 1024,
            timeout_ms: 10_000,
            content_types: ["image/jpeg", "image/png", "image/webp", "image/gif"]
                .map(String::from)
                .to_vec(),
            storage: HeadshotStorage::Database,
            dir: None,
        }
    }
}

impl WebhookSource {
    /// The parsed keys.
    pub fn verifying_keys(&self) -> Result<Vec<VerifyingKey>, KeyError> {
        self.keys
            .iter()
            .map(|k| VerifyingKey::parse(k.expose_secret()))
            .collect()
    }

    /// How long a `webhook-id` must be remembered: past and future tolerance plus `margin`.
    pub fn dedup_retention_secs(&self, margin: u64) -> u64 {
        self.tolerance_secs.saturating_mul(2).saturating_add(margin)
    }
}

impl WebhooksConfig {
    /// Checks names, keys and limits, naming the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let entry = |key: String, problem: &str| ConfigError::InvalidEntry {
            key,
            problem: problem.to_owned(),
        };
        if self.body_limit_bytes == 0 {
            return Err(entry(
                "webhooks.body_limit_bytes".into(),
                "must be at least 1",
            ));
        }
        for (name, source) in &self.sources {
            let at = format!("webhooks.sources.{name}");
            if !valid_source_name(name) {
                return Err(entry(
                    at,
                    "a source name must be 1 to 64 lowercase ASCII letters, digits, `-` or `_`",
                ));
            }
            if source.keys.is_empty() {
                return Err(entry(format!("{at}.keys"), "needs at least one key"));
            }
            for (i, key) in source.keys.iter().enumerate() {
                if let Err(err) = VerifyingKey::parse(key.expose_secret()) {
                    return Err(entry(format!("{at}.keys[{i}]"), &err.to_string()));
                }
            }
            if source.tolerance_secs == 0 || source.tolerance_secs > 86_400 {
                return Err(entry(
                    format!("{at}.tolerance_secs"),
                    "must be between 1 and 86400",
                ));
            }
        }
        let h = &self.headshots;
        for (i, host) in h.allowed_hosts.iter().enumerate() {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty()
                || host != &host.to_ascii_lowercase()
                || !bare
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
            {
                return Err(entry(
                    format!("webhooks.headshots.allowed_hosts[{i}]"),
                    "must be a lowercase host name or IP (optionally `*.` + domain), without scheme or port",
                ));
            }
        }
        if h.max_bytes == 0 {
            return Err(entry(
                "webhooks.headshots.max_bytes".into(),
                "must be at least 1",
            ));
        }
        if h.timeout_ms == 0 {
            return Err(entry(
                "webhooks.headshots.timeout_ms".into(),
                "must be at least 1",
            ));
        }
        if h.content_types.is_empty() {
            return Err(entry(
                "webhooks.headshots.content_types".into(),
                "needs at least one type",
            ));
        }
        if h.storage == HeadshotStorage::Directory && h.dir.is_none() {
            return Err(entry(
                "webhooks.headshots.dir".into(),
                "is required when storage = \"directory\"",
            ));
        }
        Ok(())
    }
}

fn valid_source_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use crate::Config;
    use crate::webhook_signature::generate_hmac_secret;

    fn load(toml: &str) -> Result<Config, String> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        write!(file, "{toml}").unwrap();
        Config::load(Some(file.path())).map_err(|e| e.to_string())
    }

    #[test]
    fn sources_load_with_default_tolerance() {
        let key = generate_hmac_secret();
        let config = load(&format!(
            "[webhooks.sources.members]\nkeys = [\"{key}\"]\n[webhooks.sources.crm]\nkeys = [\"{key}\"]\ntolerance_secs = 60\n"
        ))
        .unwrap();
        assert_eq!(config.webhooks.sources["members"].tolerance_secs, 300);
        assert_eq!(config.webhooks.sources["crm"].tolerance_secs, 60);
        assert_eq!(
            config.webhooks.sources["crm"]
                .verifying_keys()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_bad_key_is_named_by_its_index_without_printing_it() {
        let good = generate_hmac_secret();
        let err = load(&format!(
            "[webhooks.sources.members]\nkeys = [\"{good}\", \"whsec_secret!!\"]\n"
        ))
        .unwrap_err();
        assert!(err.contains("`webhooks.sources.members.keys[1]`"), "{err}");
        assert!(!err.contains("secret!!"), "{err}");
    }

    #[test]
    fn other_mistakes_name_their_key() {
        let key = generate_hmac_secret();
        let cases = [
            (
                format!("[webhooks.sources.Members]\nkeys = [\"{key}\"]"),
                "webhooks.sources.Members",
            ),
            (
                "[webhooks.sources.m]\nkeys = []".into(),
                "webhooks.sources.m.keys",
            ),
            (
                format!("[webhooks.sources.m]\nkeys = [\"{key}\"]\ntolerance_secs = 0"),
                "webhooks.sources.m.tolerance_secs",
            ),
            (
                "[webhooks.headshots]\nstorage = \"directory\"".into(),
                "webhooks.headshots.dir",
            ),
            (
                "[webhooks.headshots]\nallowed_hosts = [\"https://x\"]".into(),
                "webhooks.headshots.allowed_hosts[0]",
            ),
        ];
        for (toml, key) in cases {
            let err = load(&toml).unwrap_err();
            assert!(err.contains(&format!("`{key}`")), "{toml}: {err}");
        }
    }
}
