//! The subcommands and what each runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use conveyor_platform::config::ConfigError;
use conveyor_platform::{Config, migrations, shutdown};

/// Conveyor: durable background jobs over HTTP and RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "conveyor", version, about, long_about = None)]
pub struct Args {
    /// Configuration file (default: ./conveyor.toml when present). `CONVEYOR_*`
    /// environment variables override it, e.g. CONVEYOR_DATABASE_URL, CONVEYOR_AMQP_URL.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP ingress (enqueue, status, probes, metrics, OpenAPI) on `ingress.addr`.
    Ingress,
    /// Consume and run jobs; SIGTERM drains within `worker.grace_period_ms`.
    Worker,
    /// Signed webhooks: sign a body as a producer would, or make keys.
    Webhook {
        /// Webhook action.
        #[command(subcommand)]
        action: crate::webhook::WebhookAction,
    },
    /// Database schema migrations.
    Migrate {
        /// Migration action.
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Producers' API keys: create, list, revoke.
    Keys {
        /// Key action.
        #[command(subcommand)]
        action: crate::keys::KeysAction,
    },
    /// Dead jobs: list, show, replay, discard.
    Dlq {
        /// Dead-letter action.
        #[command(subcommand)]
        action: crate::dlq::DlqAction,
    },
}

/// `conveyor migrate …`
#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Create the database if missing and apply every pending migration (safe to run concurrently).
    Run,
    /// Revert the most recent migration (or all with --all).
    Revert {
        /// Revert every applied migration.
        #[arg(long)]
        all: bool,
    },
    /// List migrations and whether each is applied.
    Status,
}

/// Loads and validates the configuration ([`Config::load`]), then checks
/// `mail.smtp_url` with the parser the mail tasks connect with. The platform
/// cannot see the tasks, and checks only the URL's scheme; without this, a bad
/// `tls=` passed every command and stopped each worker at start.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    check_smtp_url(&config)?;
    Ok(config)
}

/// Builds (without connecting) the SMTP pool a worker builds from `mail.smtp_url`.
fn check_smtp_url(config: &Config) -> Result<(), ConfigError> {
    let timeout = Duration::from_millis(config.mail.smtp_timeout_ms);
    conveyor_tasks::mail::SmtpPool::new(&conveyor_platform::config::smtp_url(config), 1, timeout)
        .map(drop)
        .map_err(|err| {
            let problem = err.to_string();
            ConfigError::Invalid {
                key: "mail.smtp_url",
                problem: problem
                    .strip_prefix("mail.smtp_url: ")
                    .unwrap_or(&problem)
                    .to_owned(),
            }
        })
}

/// Runs `command` to completion.
pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Ingress => {
            let token = shutdown::on_signal();
            let ingress = conveyor_ingress::start(config, token).await?;
            ingress.finished.await?;
        }
        Command::Worker => {
            let token = shutdown::on_signal();
            let worker = conveyor_worker::start(config, conveyor_tasks::registry(), token).await?;
            worker.finished.await?;
        }
        Command::Migrate { action } => migrate(action, config).await?,
        Command::Dlq { action } => crate::dlq::run(action, config).await?,
        Command::Keys { action } => crate::keys::run(action, config).await?,
        Command::Webhook { action } => crate::webhook::run(action)?,
    }
    Ok(())
}

async fn migrate(action: MigrateAction, config: Config) -> anyhow::Result<()> {
    let db = config.database.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        match action {
            MigrateAction::Run => {
                let applied = migrations::run_pending(&db)?;
                if applied.is_empty() {
                    println!("nothing to migrate: the database is up to date");
                }
                for version in applied {
                    println!("applied {version}");
                }
            }
            MigrateAction::Revert { all: false } => match migrations::revert_last(&db)? {
                Some(version) => println!("reverted {version}"),
                None => println!("nothing to revert"),
            },
            MigrateAction::Revert { all: true } => {
                for version in migrations::revert_all(&db)? {
                    println!("reverted {version}");
                }
            }
            MigrateAction::Status => {
                for migration in migrations::status(&db)? {
                    let mark = if migration.applied {
                        "applied"
                    } else {
                        "pending"
                    };
                    println!("{mark:8} {}", migration.version);
                }
            }
        }
        Ok(())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use conveyor_platform::Config;

    use super::{Args, check_smtp_url};

    #[test]
    fn an_smtp_url_the_worker_cannot_use_is_a_config_error_naming_the_key() {
        let with = |url: &str| {
            let mut config = Config::default();
            config.mail.smtp_url = url.into();
            config
        };
        for good in [
            "smtp://127.0.0.1:2525?tls=none",
            "smtp://mail.example",
            "smtp://u:p@mail.example:587?tls=required",
            "smtp://mail.example?tls=opportunistic",
            "smtps://mail.example",
        ] {
            check_smtp_url(&with(good)).unwrap();
        }
        for bad in [
            "smtp://mail.example?tls=sometimes",
            "smtp://mail.example?tls=",
        ] {
            let config = with(bad);
            config.validate().unwrap();
            let err = check_smtp_url(&config).unwrap_err().to_string();
            assert!(
                err.starts_with(
                    "invalid configuration: `mail.smtp_url`: unknown scheme `smtp` or tls"
                ),
                "{bad}: {err}"
            );
            assert_eq!(err.lines().count(), 1, "{bad}: {err}");
        }
    }

    /// Every argument of `cmd` and its subcommands (except clap's own help and
    /// version) without a help text, and every subcommand without an about;
    /// `visited` counts the arguments looked at.
    fn missing_help(cmd: &clap::Command, path: &str, visited: &mut usize) -> Vec<String> {
        let mut problems = Vec::new();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            *visited += 1;
            let help = arg.get_help().or(arg.get_long_help());
            if help.is_none_or(|h| h.to_string().trim().is_empty()) {
                problems.push(format!("`{path}`: argument `{id}` has no help"));
            }
        }
        for sub in cmd.get_subcommands() {
            // clap's generated `help` subcommand
            if sub.get_name() == "help" {
                continue;
            }
            let sub_path = format!("{path} {}", sub.get_name());
            let about = sub.get_about().or(sub.get_long_about());
            if about.is_none_or(|a| a.to_string().trim().is_empty()) {
                problems.push(format!("`{sub_path}` has no about"));
            }
            problems.extend(missing_help(sub, &sub_path, visited));
        }
        problems
    }

    #[test]
    fn every_argument_has_help_and_every_subcommand_an_about() {
        let mut cmd = Args::command();
        // Builds the tree as `--help` sees it (global `--config` on every subcommand).
        cmd.build();
        let mut visited = 0;
        let problems = missing_help(&cmd, "conveyor", &mut visited);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        // The walk reached the leaves: `keys create --scope` is one of them.
        let scope = cmd
            .find_subcommand("keys")
            .and_then(|keys| keys.find_subcommand("create"))
            .and_then(|create| {
                create
                    .get_arguments()
                    .find(|a| a.get_long() == Some("scope"))
            });
        assert!(scope.is_some(), "`keys create --scope` not found");
        assert!(visited > 20, "only {visited} arguments looked at");
    }

    #[test]
    fn the_check_finds_an_argument_without_help() {
        let cmd = clap::Command::new("x")
            .arg(
                clap::Arg::new("documented")
                    .long("documented")
                    .help("Has help."),
            )
            .subcommand(clap::Command::new("sub").arg(clap::Arg::new("bare").long("bare")));
        let mut visited = 0;
        let problems = missing_help(&cmd, "x", &mut visited);
        assert_eq!(
            problems,
            [
                "`x sub` has no about",
                "`x sub`: argument `bare` has no help"
            ]
        );
        assert_eq!(visited, 2);
    }
}
