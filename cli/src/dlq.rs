//! `conveyor dlq …`: browse, replay and discard dead jobs from a terminal.
//!
//! Reads `dead_jobs` directly and publishes replays through the platform's
//! confirmed [`Publisher`]; the operations, including the `--all-matching`
//! selection and the paced loop, are the same functions the admin HTTP API uses
//! (`conveyor_ingress::dead_jobs` and its `bulk`), so both behave and audit alike.
//! `--all-matching` takes every match, a batch at a time in death order, none
//! twice (with `--force` too) and none that died after the run began (its own
//! replays, dead again, among them). Such a run stops at the first failure
//! that is not about the record at hand (the database or the broker failing)
//! and its error names the cursor past the last record handled, which
//! `--after` takes to carry on, neither skipping nor repeating a record.
//! Ctrl-C stops it alike, before its next record (a second Ctrl-C exits at once).
//! `list` is paged like the HTTP listing: when more records match, it says on
//! stderr how to ask for the next page.

use std::fmt::Display;
use std::path::PathBuf;
use std::slice;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use conveyor_ingress::dead_jobs::bulk::{self, Cursor, Matches, Pace, Pacer};
use conveyor_ingress::dead_jobs::{
    self, DiscardError, DiscardOptions, DiscardOutcome, Filter, MAX_LIMIT, Position, ReplayError,
    ReplayOptions, ReplayOutcome, Summary,
};
use conveyor_platform::Config;
use conveyor_platform::amqp::{PublishError, Publisher, Topology};
use conveyor_schema::models::DeadJob;
use conveyor_schema::pool::{self, DbError, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

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

/// Records one `--all-matching` batch reads (ids and tasks only).
const BATCH: i64 = 1_000;

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

/// The ids to act on: those given, or every match of a filter, a batch at a time.
enum Targets {
    /// Given on the command line (handed out once).
    Given(Option<Vec<Uuid>>),
    /// `--all-matching`.
    Matching(Box<Run>),
}

impl Targets {
    /// The targets of `action` (`replay`, `discard`), and the filter to audit
    /// when they are chosen by it; `after`: where an earlier run stopped.
    fn new(
        ids: Vec<Uuid>,
        all_matching: bool,
        after: Option<Cursor>,
        filter: &FilterArgs,
        force: bool,
        action: &'static str,
    ) -> (Self, Option<serde_json::Value>) {
        if !all_matching {
            return (Self::Given(Some(ids)), None);
        }
        let filter = filter.filter(force, BATCH);
        let audit = filter.audit();
        let run = Run {
            action,
            filter,
            force,
            from: after,
            batch: None,
            handled: 0,
            finished: false,
        };
        (Self::Matching(Box::new(run)), Some(audit))
    }

    /// The next ids, those handed out before being done with; `None` when all were handed out.
    async fn next(&mut self, db: &PgPool) -> Result<Option<Vec<Uuid>>, DbError> {
        match self {
            Self::Given(ids) => Ok(ids.take()),
            Self::Matching(run) => run.next(db).await,
        }
    }

    /// An `--all-matching` run, which stops at a failure not about the record at hand.
    fn is_run(&self) -> bool {
        matches!(self, Self::Matching(_))
    }

    /// The error that ends the targets at id `at` of those handed out last
    /// (none: at reading the next ones), `failed` of those before it having failed.
    fn stopped(&self, at: Option<usize>, failed: usize, cause: &dyn Display) -> anyhow::Error {
        match self {
            Self::Given(_) => anyhow::anyhow!("{cause}"),
            Self::Matching(run) => run.stopped(at, failed, cause),
        }
    }
}

/// An `--all-matching` run: every match, a batch at a time, oldest first, each
/// once, none that died after its first batch was read; and where it stands,
/// so that a run that stops can say where to carry on.
struct Run {
    /// `replay` or `discard`, for its error.
    action: &'static str,
    /// Which records, `limit` a batch.
    filter: Filter,
    /// Records already replayed or discarded match too.
    force: bool,
    /// Where the next batch begins: `--after`, then past the batch before;
    /// none: at the oldest match.
    from: Option<Cursor>,
    /// The batch handed out last, until the next one is asked for.
    batch: Option<Matches>,
    /// Records of the batches before it, all handled.
    handled: usize,
    /// Every match was handed out.
    finished: bool,
}

impl Run {
    /// The ids of the next batch, those of the last one being handled; `None`
    /// when no match is left.
    async fn next(&mut self, db: &PgPool) -> Result<Option<Vec<Uuid>>, DbError> {
        if let Some(batch) = self.batch.take() {
            self.handled += batch.records.len();
            self.from = batch.next(batch.records.len());
            self.finished = self.from.is_none();
        }
        if self.finished {
            return Ok(None);
        }
        let batch = bulk::matching(db, &self.filter, self.force, self.from).await?;
        let ids: Vec<Uuid> = batch.records.iter().map(|t| t.id).collect();
        self.finished = ids.is_empty();
        self.batch = Some(batch);
        Ok(Some(ids).filter(|ids| !ids.is_empty()))
    }

    /// The error that ends the run at record `at` of the batch handed out last
    /// (none: at reading the next batch): what was done, why it stopped, and
    /// the cursor past the last record handled, from which `--after` takes
    /// the record it stopped at and none it handled. Without a cursor (it
    /// stopped before its first record, and was not given one), the cause alone.
    fn stopped(&self, at: Option<usize>, failed: usize, cause: &dyn Display) -> anyhow::Error {
        let (handled, cursor) = match (&self.batch, at) {
            (Some(batch), Some(at)) => (self.handled + at, batch.next(at)),
            _ => (self.handled, self.from),
        };
        let cause = cause
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let Some(cursor) = cursor else {
            return anyhow::anyhow!("{cause}");
        };
        let failed = match failed {
            0 => String::new(),
            n => format!(", {n} of them failed"),
        };
        anyhow::anyhow!(
            "{} --all-matching stopped after {handled} records{failed}: {cause}; carry on with the same flags and --after {cursor}",
            self.action
        )
    }
}

/// A replay failure that is not about the record (the database or the broker
/// failing, a publish in doubt), after which the next records would most
/// likely fail alike: it stops an `--all-matching` run. Nothing was recorded
/// for the record, so carrying on takes it again (one in doubt then makes the
/// same job). A record that cannot be replayed is reported and passed over.
fn stops_a_run(err: &ReplayError) -> bool {
    match err {
        ReplayError::NotFound(_)
        | ReplayError::Unreadable { .. }
        | ReplayError::UnknownTask(_)
        | ReplayError::InvalidArgs { .. }
        | ReplayError::Publish(PublishError::Returned(_)) => false,
        ReplayError::Publish(_)
        | ReplayError::InDoubt { .. }
        | ReplayError::OutOfTime(_)
        | ReplayError::Db(_) => true,
    }
}

/// The cause a run stopped by Ctrl-C gives.
const INTERRUPTED: &str = "interrupted (Ctrl-C)";

/// Cancelled at the first Ctrl-C (SIGINT), which a run heeds before its next
/// record, so that it stops where it can say how to carry on; a second one
/// exits at once (130), whatever is under way.
fn interrupted() -> CancellationToken {
    let interrupted = CancellationToken::new();
    let cancel = interrupted.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            cancel.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    interrupted
}

async fn replay_all(
    db: &PgPool,
    config: &Config,
    targets: Targets,
    options: ReplayOptions,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let topology = Topology::for_config(config);
    let publisher = Publisher::start(
        &config.amqp_urls(),
        "conveyor-cli",
        topology.clone(),
        1,
        config.publish_timeout(),
        stop.clone(),
    );
    if !options.dry_run && !publisher.wait_connected(Duration::from_secs(10)).await {
        bail!("cannot reach the broker at amqp.url");
    }
    let mut pacer = Pacer::new(Pace {
        rate,
        deadline: None,
    });
    let interrupted = interrupted();
    let replayed = replay_targets(
        db,
        &publisher,
        &topology,
        targets,
        &options,
        &mut pacer,
        &interrupted,
    )
    .await;
    stop.cancel();
    replayed
}

/// Replays every target, one line per outcome; the failures are reported on
/// stderr and fail the command once the rest are done, but one that stops a
/// run (see [`stops_a_run`]) ends it at once.
async fn replay_targets(
    db: &PgPool,
    publisher: &Publisher,
    topology: &Topology,
    mut targets: Targets,
    options: &ReplayOptions,
    pacer: &mut Pacer,
    interrupted: &CancellationToken,
) -> anyhow::Result<()> {
    let (mut failed, mut total) = (0, 0);
    while let Some(ids) = targets
        .next(db)
        .await
        .map_err(|err| targets.stopped(None, failed, &err))?
    {
        for (i, &id) in ids.iter().enumerate() {
            if interrupted.is_cancelled() {
                return Err(targets.stopped(Some(i), failed, &INTERRUPTED));
            }
            let mut told = None;
            bulk::replay_each(
                db,
                publisher,
                topology,
                slice::from_ref(&id),
                options,
                pacer,
                |_, outcome| told = Some(outcome),
            )
            .await;
            // Untold only when out of time, and no deadline is set here.
            match told.unwrap_or(Err(ReplayError::OutOfTime(id))) {
                Ok(outcome) => print_replayed(id, outcome),
                Err(err) if targets.is_run() && stops_a_run(&err) => {
                    return Err(targets.stopped(Some(i), failed, &err));
                }
                Err(err) => {
                    failed += 1;
                    eprintln!("{id}: {err}");
                }
            }
            total += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {total} replays failed");
    }
    Ok(())
}

fn print_replayed(id: Uuid, outcome: ReplayOutcome) {
    match outcome {
        ReplayOutcome::Replayed { new_job_id } => println!("{id}: replayed as job {new_job_id}"),
        ReplayOutcome::WouldReplay { task, args } => println!("{id}: would replay {task} {args}"),
        ReplayOutcome::AlreadyReplayed { replayed_as } => println!(
            "{id}: already replayed{} (use --force to replay again)",
            replayed_as
                .map(|j| format!(" as job {j}"))
                .unwrap_or_default()
        ),
        ReplayOutcome::Discarded => println!("{id}: discarded (use --force to replay anyway)"),
    }
}

/// Discards every target, like [`replay_targets`]: each outcome on its own
/// line, an unknown id counted as a failure and a non-zero exit at the end; a
/// database failure, not about the record, stops an `--all-matching` run at once.
async fn discard_all(
    db: &PgPool,
    mut targets: Targets,
    options: DiscardOptions,
) -> anyhow::Result<()> {
    let interrupted = interrupted();
    let (mut failed, mut total) = (0, 0);
    while let Some(ids) = targets
        .next(db)
        .await
        .map_err(|err| targets.stopped(None, failed, &err))?
    {
        for (i, &id) in ids.iter().enumerate() {
            if interrupted.is_cancelled() {
                return Err(targets.stopped(Some(i), failed, &INTERRUPTED));
            }
            let mut told = None;
            bulk::discard_each(db, slice::from_ref(&id), &options, None, |_, outcome| {
                told = Some(outcome)
            })
            .await;
            match told.unwrap_or(Err(DiscardError::OutOfTime(id))) {
                Ok(DiscardOutcome::Discarded) => println!("{id}: discarded"),
                Ok(DiscardOutcome::WouldDiscard) => println!("{id}: would discard"),
                Ok(DiscardOutcome::AlreadyDiscarded) => println!("{id}: already discarded"),
                Ok(DiscardOutcome::NotFound) => {
                    failed += 1;
                    eprintln!("{id}: no such dead job");
                }
                Err(err) if targets.is_run() => {
                    return Err(targets.stopped(Some(i), failed, &err));
                }
                Err(err) => {
                    failed += 1;
                    eprintln!("{id}: {err}");
                }
            }
            total += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {total} discards failed");
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
