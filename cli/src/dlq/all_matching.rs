//! Acting on the targets of `conveyor dlq replay|discard`: the ids given, or,
//! with `--all-matching`, every dead job the filter flags match.
//!
//! An `--all-matching` run takes every match, a batch at a time in death
//! order ([`bulk::matching`]), none twice (with `--force` too) and none that
//! died after the run began (its own replays, dead again, among them). It
//! stops at the first failure that is not about the record at hand (the
//! database or the broker failing) and its error names the cursor past the
//! last record handled ([`Matches::next`]), which `--after` takes to carry
//! on, neither skipping nor repeating a record. A record the database refuses
//! (see [`attempt`]) is reported and passed over, like one that cannot be
//! replayed. Ctrl-C stops it alike, before its next record, also while that
//! record waits for its turn at `--rate` (a second Ctrl-C exits at once).
//! Each record goes through the library's [`bulk::replay_each`] /
//! [`bulk::discard_each`], paced by one [`Pacer`] across the whole run.

use std::fmt::Display;
use std::slice;
use std::time::Duration;

use anyhow::bail;
use conveyor_ingress::dead_jobs::bulk::{self, Cursor, Matches, Pace, Pacer};
use conveyor_ingress::dead_jobs::{
    DiscardError, DiscardOptions, DiscardOutcome, Filter, ReplayError, ReplayOptions, ReplayOutcome,
};
use conveyor_platform::Config;
use conveyor_platform::amqp::{PublishError, Publisher, Topology};
use conveyor_schema::pool::{DbError, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::FilterArgs;
use super::attempt::{self, Tried};

/// Records one `--all-matching` batch reads (ids and tasks only).
const BATCH: i64 = 1_000;

/// The ids to act on: those given, or every match of a filter, a batch at a time.
pub(super) enum Targets {
    /// Given on the command line (handed out once).
    Given(Option<Vec<Uuid>>),
    /// `--all-matching`.
    Matching(Box<Run>),
}

impl Targets {
    /// The targets of `action` (`replay`, `discard`), and the filter to audit
    /// when they are chosen by it; `after`: where an earlier run stopped.
    pub(super) fn new(
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
pub(super) struct Run {
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
        let cause = crate::one_line(&cause.to_string());
        let Some(cursor) = cursor else {
            return anyhow::anyhow!("{cause}");
        };
        let records = match handled {
            1 => "record",
            _ => "records",
        };
        let failed = match failed {
            0 => String::new(),
            n => format!(", {n} of them failed"),
        };
        anyhow::anyhow!(
            "{} --all-matching stopped after {handled} {records}{failed}: {cause}; carry on with the same flags and --after {cursor}",
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

/// The database error of a failed replay, if it is one.
fn replay_db_error(err: &ReplayError) -> Option<&DbError> {
    match err {
        ReplayError::Db(err) => Some(err),
        _ => None,
    }
}

/// The database error of a failed discard, if it is one.
fn discard_db_error(err: &DiscardError) -> Option<&DbError> {
    match err {
        DiscardError::Db(err) => Some(err),
        DiscardError::OutOfTime(_) => None,
    }
}

/// What stops a run when the database fails on a record and on a probe too.
fn outage(error: &dyn Display, probe: &DbError) -> String {
    format!("{error}; the database fails a plain query too: {probe}")
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

pub(super) async fn replay_all(
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
    let interrupted = interrupted();
    let mut pacer = Pacer::new(Pace {
        rate,
        deadline: None,
    })
    .stopped_by(interrupted.clone());
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
/// run (see [`stops_a_run`] and [`attempt`]) ends it at once.
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
            let replay = async || {
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
                // Untold only when stopped by Ctrl-C: no deadline is set here.
                told.unwrap_or(Err(ReplayError::OutOfTime(id)))
            };
            match attempt::twice(db, replay, replay_db_error).await {
                Tried::Done(Ok(outcome)) => print_replayed(id, outcome),
                Tried::Done(Err(ReplayError::OutOfTime(_))) if interrupted.is_cancelled() => {
                    return Err(targets.stopped(Some(i), failed, &INTERRUPTED));
                }
                Tried::Done(Err(err)) if targets.is_run() && stops_a_run(&err) => {
                    return Err(targets.stopped(Some(i), failed, &err));
                }
                Tried::Outage { error, probe } if targets.is_run() => {
                    return Err(targets.stopped(Some(i), failed, &outage(&error, &probe)));
                }
                Tried::Done(Err(err)) | Tried::Refused(err) | Tried::Outage { error: err, .. } => {
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
/// line, an unknown id or a record the database refuses counted as a failure
/// and a non-zero exit at the end; a database failure not about the record
/// (see [`attempt`]) stops an `--all-matching` run at once.
pub(super) async fn discard_all(
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
            let discard = async || {
                let mut told = None;
                bulk::discard_each(db, slice::from_ref(&id), &options, None, |_, outcome| {
                    told = Some(outcome)
                })
                .await;
                // Untold only when out of time, and no deadline is set here.
                told.unwrap_or(Err(DiscardError::OutOfTime(id)))
            };
            match attempt::twice(db, discard, discard_db_error).await {
                Tried::Done(Ok(DiscardOutcome::Discarded)) => println!("{id}: discarded"),
                Tried::Done(Ok(DiscardOutcome::WouldDiscard)) => println!("{id}: would discard"),
                Tried::Done(Ok(DiscardOutcome::AlreadyDiscarded)) => {
                    println!("{id}: already discarded")
                }
                Tried::Done(Ok(DiscardOutcome::NotFound)) => {
                    failed += 1;
                    eprintln!("{id}: no such dead job");
                }
                Tried::Done(Err(err)) if targets.is_run() => {
                    return Err(targets.stopped(Some(i), failed, &err));
                }
                Tried::Outage { error, probe } if targets.is_run() => {
                    return Err(targets.stopped(Some(i), failed, &outage(&error, &probe)));
                }
                Tried::Done(Err(err)) | Tried::Refused(err) | Tried::Outage { error: err, .. } => {
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
