//! `conveyor webhook sign | keygen`: the producer's side of signed webhooks,
//! for testing an endpoint by hand and for making keys.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Subcommand};
use conveyor_platform::webhook_signature::{self, SigningKey};

/// `conveyor webhook …`
#[derive(Debug, Subcommand)]
pub enum WebhookAction {
    /// Sign the body read from standard input and print the three Standard Webhooks headers.
    Sign(SignArgs),
    /// Make a key: `--hmac` (one shared `whsec_` secret) or `--ed25519` (a `whsk_`/`whpk_` pair).
    Keygen(KeygenArgs),
}

/// Arguments of `conveyor webhook sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The source the webhook is for (its endpoint is `/v1/webhooks/<source>/profiles`).
    #[arg(long)]
    pub source: String,
    /// File holding the signing key: `whsec_…` (v1) or `whsk_…` (v1a).
    #[arg(long, value_name = "PATH")]
    pub key_file: PathBuf,
    /// The `webhook-id` (default: `msg_` + a random UUID).
    #[arg(long)]
    pub id: Option<String>,
    /// The `webhook-timestamp` in Unix seconds (default: now).
    #[arg(long)]
    pub timestamp: Option<i64>,
}

/// Arguments of `conveyor webhook keygen`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct KeygenArgs {
    /// An Ed25519 pair: the producer signs with `whsk_…`, Conveyor verifies with `whpk_…`.
    #[arg(long)]
    pub ed25519: bool,
    /// A shared HMAC secret `whsec_…`, configured on both sides.
    #[arg(long)]
    pub hmac: bool,
}

/// Runs a `conveyor webhook` action, printing to standard output.
pub fn run(action: WebhookAction) -> anyhow::Result<()> {
    match action {
        WebhookAction::Sign(args) => {
            let key = read_key(&args.key_file)?;
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .context("reading the body from standard input")?;
            let id = args
                .id
                .unwrap_or_else(|| format!("msg_{}", uuid::Uuid::new_v4().simple()));
            let timestamp = match args.timestamp {
                Some(ts) => ts,
                None => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .context("the system clock is before 1970")?
                    .as_secs()
                    .try_into()
                    .context("the system clock is too far in the future")?,
            };
            println!("webhook-id: {id}");
            println!("webhook-timestamp: {timestamp}");
            println!("webhook-signature: {}", key.sign(&id, timestamp, &body));
            eprintln!(
                "sign {} bytes exactly as sent, e.g. curl --data-binary @body.json to POST /v1/webhooks/{}/profiles",
                body.len(),
                args.source
            );
        }
        WebhookAction::Keygen(args) if args.hmac => {
            println!("{}", webhook_signature::generate_hmac_secret());
        }
        WebhookAction::Keygen(_) => {
            let (secret, public) = webhook_signature::generate_ed25519_pair();
            println!("signing-key: {secret}");
            println!("verifying-key: {public}");
        }
    }
    Ok(())
}

fn read_key(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--key-file {}: cannot read", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .with_context(|| format!("--key-file {}: the file is empty", path.display()))?;
    // `keygen --ed25519` output may be pasted whole: take the signing key.
    let key = line.strip_prefix("signing-key:").unwrap_or(line).trim();
    SigningKey::parse(key).with_context(|| format!("--key-file {}", path.display()))
}
