//! `conveyor keys …`: create, list and revoke producers' API keys.
//!
//! Talks to Postgres directly through `conveyor_ingress::auth::keys`; the new
//! key is printed once, alone on the last line, so scripts can take it with
//! `tail -n1`. Nothing else ever shows it again.

use anyhow::{Context, bail};
use chrono::{DateTime, Duration, Utc};
use clap::Subcommand;
use conveyor_ingress::auth::keys::{self, NewKey};
use conveyor_platform::Config;
use conveyor_schema::pool;

/// `conveyor keys …`
#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a key and print it (once).
    Create {
        /// The producer (service) the key belongs to.
        #[arg(long)]
        producer: String,
        /// `enqueue:<task or glob>` (e.g. `enqueue:diag.*`), `campaigns`, `webhooks:admin` or `admin`; repeatable.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Expiry: a duration (`30d`, `12h`, `15m`) or an RFC 3339 time.
        #[arg(long, value_parser = parse_expiry)]
        expires: Option<DateTime<Utc>>,
        /// Requests per second (default: `auth.default_rate_per_sec`).
        #[arg(long)]
        rate: Option<f64>,
        /// Bucket size (default: `auth.default_burst`).
        #[arg(long)]
        burst: Option<u32>,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by id (takes effect on every ingress within a few seconds).
    Revoke {
        /// The key id (`cvk_<id>` or `<id>`, as `keys list` shows).
        id: String,
    },
}

fn parse_expiry(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 = number
        .parse()
        .map_err(|_| format!("`{text}` is neither a duration like 30d/12h/15m nor RFC 3339"))?;
    let span = match unit {
        "d" => Duration::days(n),
        "h" => Duration::hours(n),
        "m" => Duration::minutes(n),
        "s" => Duration::seconds(n),
        _ => return Err(format!("`{text}`: the unit must be d, h, m or s")),
    };
    if n <= 0 {
        return Err(format!("`{text}`: must be positive"));
    }
    Ok(Utc::now() + span)
}

/// Runs one `keys` action.
pub async fn run(action: KeysAction, config: Config) -> anyhow::Result<()> {
    let db = pool::pool(
        &conveyor_platform::config::database_url(&config),
        config.database.pool_size.min(2),
    );
    match action {
        KeysAction::Create {
            producer,
            scopes,
            expires,
            rate,
            burst,
        } => {
            if producer.trim().is_empty() {
                bail!("--producer must not be empty");
            }
            for scope in &scopes {
                keys::check_scope(scope)?;
            }
            if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                bail!("--rate must be a positive number");
            }
            let burst = burst
                .map(|b| i32::try_from(b).ok().filter(|b| *b > 0))
                .map(|b| b.context("--burst must be between 1 and 2^31"))
                .transpose()?;
            let new = NewKey {
                producer,
                scopes,
                expires_at: expires,
                rate_per_sec: rate,
                burst,
            };
            let (row, key) = pool::run(&db, move |conn| keys::create(conn, new))
                .await
                .context("cannot create the key")?;
            println!(
                "created key {} for producer `{}` with scopes {}{}",
                row.id,
                row.producer,
                row.scopes.join(" "),
                row.expires_at
                    .map(|at| format!(", expires {}", at.to_rfc3339()))
                    .unwrap_or_default()
            );
            println!("store it now; it is not shown again:");
            println!("{key}");
        }
        KeysAction::List => {
            let rows = pool::run(&db, keys::list)
                .await
                .context("cannot list keys")?;
            println!(
                "{:<16}  {:<20}  {:<9}  {:<25}  SCOPES",
                "ID", "PRODUCER", "STATE", "EXPIRES"
            );
            let now = Utc::now();
            for row in rows {
                let state = if row.revoked_at.is_some() {
                    "revoked"
                } else if row.expires_at.is_some_and(|at| at <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<16}  {:<20}  {:<9}  {:<25}  {}",
                    row.id,
                    row.producer,
                    state,
                    row.expires_at
                        .map_or_else(|| "never".to_owned(), |at| at.to_rfc3339()),
                    row.scopes.join(" ")
                );
            }
        }
        KeysAction::Revoke { id } => {
            let shown = id.clone();
            let found = pool::run(&db, move |conn| keys::revoke(conn, &id))
                .await
                .context("cannot revoke the key")?;
            if !found {
                bail!("no key `{shown}`");
            }
            println!("revoked {shown}; every ingress refuses it within a few seconds");
        }
    }
    Ok(())
}
