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
    /// Database schema migrations.
    Migrate {
        /// Migration action.
        #[command(subcommand)]
        action: MigrateAction,
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
