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

/// Parses `--expires`: an RFC 3339 time in the future, or a positive whole
/// number of days, hours, minutes or seconds from now (`30d`, `12h`, `15m`,
/// `45s`). Input that is neither, a time already past, or one that reaches past
/// what a timestamp can hold, is an error naming the problem.
fn parse_expiry(text: &str) -> Result<DateTime<Utc>, String> {
    expiry_from(text, Utc::now())
}

/// [`parse_expiry`] with `now` given.
fn expiry_from(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        let at = at.with_timezone(&Utc);
        if at <= now {
            // A key that could never be used: most likely a typo in the date.
            return Err(format!("`{text}` is not in the future"));
        }
        return Ok(at);
    }
    // The digits are ASCII, so their end is a char boundary whatever follows.
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    if number.is_empty() {
        return Err(format!(
            "`{text}` is neither a duration like 30d/12h/15m nor RFC 3339"
        ));
    }
    let too_far = || format!("`{text}` is too far ahead");
    let n: i64 = number.parse().map_err(|_| too_far())?;
    if n == 0 {
        return Err(format!("`{text}`: must be positive"));
    }
    let span = match unit {
        "d" => Duration::try_days(n),
        "h" => Duration::try_hours(n),
        "m" => Duration::try_minutes(n),
        "s" => Duration::try_seconds(n),
        _ => return Err(format!("`{text}`: the unit must be d, h, m or s")),
    };
    span.and_then(|span| now.checked_add_signed(span))
        .ok_or_else(too_far)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn expiry_takes_a_duration_or_rfc3339() {
        let at = |text| expiry_from(text, now()).unwrap();
        assert_eq!(at("30d"), now() + Duration::days(30));
        assert_eq!(at("12h"), now() + Duration::hours(12));
        assert_eq!(at("15m"), now() + Duration::minutes(15));
        assert_eq!(at("45s"), now() + Duration::seconds(45));
        assert_eq!(
            at("2027-01-02T03:04:05+01:00").to_rfc3339(),
            "2027-01-02T02:04:05+00:00"
        );
    }

    #[test]
    fn bad_expiry_is_an_error_naming_the_problem() {
        for (text, problem) in [
            ("5é", "the unit must be d, h, m or s"),
            ("5w", "the unit must be d, h, m or s"),
            ("5dd", "the unit must be d, h, m or s"),
            ("é", "neither a duration"),
            ("", "neither a duration"),
            ("d", "neither a duration"),
            ("-5d", "neither a duration"),
            ("tomorrow", "neither a duration"),
            ("0h", "must be positive"),
            ("2026-03-01T10:00:00Z", "not in the future"),
            ("2025-12-31T23:00:00-01:00", "not in the future"),
            ("999999999999d", "too far ahead"),
            ("100000000d", "too far ahead"),
            ("99999999999999999999s", "too far ahead"),
        ] {
            let err = expiry_from(text, now()).unwrap_err();
            assert!(err.contains(problem), "{text}: {err}");
            assert_eq!(err.lines().count(), 1, "{text}: {err}");
        }
    }
}
