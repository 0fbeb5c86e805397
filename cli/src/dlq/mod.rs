//! `conveyor dlq …`: browse, replay and discard dead jobs from a terminal.
//!
//! This module is the command line: the subcommands and their flags, `list`
//! and `show`, and what a replay or discard is asked to do. Reads `dead_jobs`
//! directly; the operations, including the `--all-matching` selection and the
//! paced loop, are the same functions the admin HTTP API uses
//! (`conveyor_ingress::dead_jobs` and its `bulk`), so both behave and audit
//! alike. Running them over the targets (the ids given, or every match of
//! `--all-matching`, with its cursor and Ctrl-C) is in [`all_matching`].
//! `list` is paged like the HTTP listing: when more records match, it says on
//! stderr how to ask for the next page.

mod all_matching;
mod attempt;

use std::path::PathBuf;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use conveyor_ingress::dead_jobs::bulk::{self, Cursor};
use conveyor_ingress::dead_jobs::{
    self, DiscardOptions, Filter, MAX_LIMIT, Position, ReplayOptions, Summary,
};
use conveyor_platform::Config;
use conveyor_schema::models::DeadJob;
use conveyor_schema::pool;
use uuid::Uuid;

use all_matching::{Targets, discard_all, replay_all};

/// `conveyor dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead jobs, newest first (not yet replayed or discarded unless --all).
    List {
        /// Which ones.
        #[command(flatten)]
        filter: FilterArgs,
        /// Also list replayed and discarded ones.
        #[arg(long)]
        all: bool,
        /// At most this many (1 to 10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=MAX_LIMIT))]
        limit: i64,
        /// Start past this record: the cursor an earlier page printed.
        #[arg(long, value_name = "CURSOR", value_parser = parse_cursor)]
        after: Option<Position>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead job: envelope, every error, x-death history, audit trail.
    Show {
        /// Dead job id.
        id: Uuid,
    },
    /// Re-publish dead jobs as fresh jobs (new id, attempt 1, linked to the dead record).
    Replay {
        /// Dead job ids.
        #[arg(
            required_unless_present_any = ["all_matching", "after"],
            conflicts_with = "all_matching"
        )]
        ids: Vec<Uuid>,
        /// Replay every dead job matching the filter flags instead of listed ids.
        #[arg(long)]
        all_matching: bool,
        /// Carry on an --all-matching run that stopped: the cursor its error named
        /// (give the same filter flags and --force as that run).
        #[arg(long, value_name = "CURSOR", value_parser = parse_run_cursor)]
        after: Option<Cursor>,
        /// Which ones (with --all-matching).
        #[command(flatten)]
        filter: FilterArgs,
        /// Replays per second at most.
        #[arg(long, value_name = "N/s", value_parser = parse_rate)]
        rate: Option<f64>,
        /// Validate and list what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replay records already replayed or discarded.
        #[arg(long)]
        force: bool,
        /// Replace the arguments with this JSON file's content (validated like a new job).
        #[arg(long, value_name = "FILE")]
        set_args: Option<PathBuf>,
        /// Who is replaying, for the audit (default: cli@<host>).
        #[arg(long)]
        actor: Option<String>,
    },
    /// Mark dead jobs discarded (audited; they stay in the table and the .dlq queue).
    Discard {
        /// Dead job ids.
        #[arg(
            required_unless_present_any = ["all_matching", "after"],
            conflicts_with = "all_matching"
        )]
        ids: Vec<Uuid>,
        /// Discard every dead job matching the filter flags.
        #[arg(long)]
        all_matching: bool,
        /// Carry on an --all-matching run that stopped: the cursor its error named
        /// (give the same filter flags as that run).
        #[arg(long, value_name = "CURSOR", value_parser = parse_run_cursor)]
        after: Option<Cursor>,
        /// Which ones (with --all-matching).
        #[command(flatten)]
        filter: FilterArgs,
        /// List what would be discarded; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Who is discarding, for the audit (default: cli@<host>).
        #[arg(long)]
        actor: Option<String>,
    },
}

/// Filter flags shared by the subcommands.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Exact task name.
    #[arg(long)]
    pub task: Option<String>,
    /// Exact logical queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Dead since: RFC 3339 time, or an age like 30m, 2h, 7d.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// The final error contains this text (case-insensitive).
    #[arg(long)]
    pub error_contains: Option<String>,
}

impl FilterArgs {
    fn filter(&self, all: bool, limit: i64) -> Filter {
        Filter {
            task: self.task.clone(),
            queue: self.queue.clone(),
            since: self.since,
            error_contains: self.error_contains.clone(),
            include_discarded: all,
            include_replayed: all,
            limit,
            ..Default::default()
        }
    }
}

fn parse_cursor(s: &str) -> Result<Position, String> {
    s.parse()
        .map_err(|err: dead_jobs::BadCursor| err.to_string())
}

fn parse_run_cursor(s: &str) -> Result<Cursor, String> {
    s.parse()
        .map_err(|err: dead_jobs::BadCursor| err.to_string())
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    bulk::parse_since(s).map_err(|err| err.to_string())
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let n: f64 = s
        .trim_end_matches("/s")
        .parse()
        .map_err(|_| format!("`{s}` is not a rate like 10 or 10/s"))?;
    bulk::check_rate(n).map_err(|err| format!("`{s}`: {err}"))
}

fn default_actor(actor: Option<String>) -> String {
    actor.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        format!("cli@{host}")
    })
}

/// Runs one `dlq` action.
pub async fn run(action: DlqAction, config: Config) -> anyhow::Result<()> {
    let db = pool::pool(
        &conveyor_platform::config::database_url(&config),
        config.database.pool_size.min(4),
    );
    match action {
        DlqAction::List {
            filter,
            all,
            limit,
            after,
            json,
        } => {
            let query = Filter {
                after,
                ..filter.filter(all, limit)
            };
            let (found, next) = dead_jobs::summaries(&db, query).await?;
            print_list(&found, json);
            if let Some(next) = next {
                eprintln!("more match: add --after {next} for the next page");
            }
        }
        DlqAction::Show { id } => {
            let (dead, actions) = dead_jobs::show(&db, id)
                .await?
                .with_context(|| format!("no dead job {id}"))?;
            print_one(&dead);
            for a in actions {
                println!(
                    "{} {} by {}{}",
                    a.at.to_rfc3339(),
                    a.action,
                    a.actor,
                    a.new_job_id
                        .map(|j| format!(" -> job {j}"))
                        .unwrap_or_default()
                );
            }
        }
        DlqAction::Replay {
            ids,
            all_matching,
            after,
            filter,
            rate,
            dry_run,
            force,
            set_args,
            actor,
        } => {
            check_after(after, all_matching)?;
            let args = match set_args {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("--set-args: cannot read {}", path.display()))?;
                    Some(
                        serde_json::from_str(&text).with_context(|| {
                            format!("--set-args: {} is not JSON", path.display())
                        })?,
                    )
                }
                None => None,
            };
            if let (true, Some(args)) = (all_matching, &args) {
                bulk::check_args(filter.task.as_deref(), args).map_err(|err| {
                    match err.pointer.as_str() {
                        "/args" => anyhow::anyhow!(
                            "--set-args with --all-matching needs --task (args belong to one task)"
                        ),
                        "/filter/task" => anyhow::anyhow!("--task: {err}"),
                        pointer => anyhow::anyhow!("invalid args at {pointer}: {err}"),
                    }
                })?;
            }
            let (targets, bulk) = Targets::new(ids, all_matching, after, &filter, force, "replay");
            let options = ReplayOptions {
                force,
                dry_run,
                args,
                actor: default_actor(actor),
                bulk,
                deadline: None,
            };
            replay_all(&db, &config, targets, options, rate).await?;
        }
        DlqAction::Discard {
            ids,
            all_matching,
            after,
            filter,
            dry_run,
            actor,
        } => {
            check_after(after, all_matching)?;
            let (targets, bulk) = Targets::new(ids, all_matching, after, &filter, false, "discard");
            let options = DiscardOptions {
                actor: default_actor(actor),
                dry_run,
                bulk,
                deadline: None,
            };
            discard_all(&db, targets, options).await?;
        }
    }
    Ok(())
}

/// Refuses `--after` but with `--all-matching`: it says where such a run stopped.
fn check_after(after: Option<Cursor>, all_matching: bool) -> anyhow::Result<()> {
    if after.is_some() && !all_matching {
        bail!(
            "--after carries on an --all-matching run: give it with --all-matching and that run's filter flags, not ids"
        );
    }
    Ok(())
}

fn print_list(found: &[Summary], json: bool) {
    if json {
        for d in found {
            let row = serde_json::json!({
                "id": d.id, "task": d.task, "queue": d.queue, "attempts": d.attempts,
                "reason": d.reason, "source": d.source, "dead_at": d.dead_at,
                "replayed_as": d.replayed_as, "discarded_at": d.discarded_at,
            });
            println!("{row}");
        }
        return;
    }
    println!(
        "{:36}  {:20}  {:10}  {:>3}  {:20}  REASON",
        "ID", "TASK", "QUEUE", "ATT", "DEAD AT"
    );
    for d in found {
        let reason: String = d.reason.chars().take(80).collect();
        println!(
            "{:36}  {:20}  {:10}  {:>3}  {:20}  {reason}",
            d.id,
            d.task,
            d.queue,
            d.attempts,
            d.dead_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
}

fn print_one(d: &DeadJob) {
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    println!("id:        {}", d.id);
    println!("task:      {}", d.task);
    println!("queue:     {}", d.queue);
    println!("attempts:  {}", d.attempts);
    println!("source:    {}", d.source);
    println!("dead at:   {}", d.dead_at.to_rfc3339());
    println!("reason:    {}", d.reason);
    if let Some(replayed) = d.replayed_as {
        println!("replayed:  as job {replayed} ({} times)", d.replay_count);
    }
    if let Some(at) = d.discarded_at {
        println!("discarded: {}", at.to_rfc3339());
    }
    match (&d.envelope, &d.body) {
        (Some(envelope), _) => println!("envelope:\n{}", pretty(envelope)),
        (None, Some(body)) => println!("body (unreadable):\n{body}"),
        _ => {}
    }
    println!("errors:\n{}", pretty(&d.errors));
    if let Some(x_death) = &d.x_death {
        println!("x-death:\n{}", pretty(x_death));
    }
}
