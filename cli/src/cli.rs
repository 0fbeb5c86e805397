//! The subcommands and what each runs.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
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

    use super::Args;

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
