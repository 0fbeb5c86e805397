//! Group commit of job-state changes.
//!
//! Every attempt produces one or two state changes (`running`, then
//! `succeeded`/`retrying`/`dead`). Committing each in its own transaction would
//! cap a worker near the database's single-row commit rate, so changes are
//! queued to one writer that commits whatever has accumulated as a single
//! multi-row upsert. Commits start at most once per `worker.state_linger_ms`
//! unless the batch already holds [`ENOUGH_FOR_A_COMMIT`] changes: at a low
//! rate the linger gathers several jobs per flush, and under load a batch that size
//! does not wait for it. A final change's delivery is acknowledged only
//! after its commit: the caller of a retry or dead letter waits for it
//! ([`StateWriter::commit`]); a success is acknowledged by the writer itself once
//! committed ([`StateWriter::commit_then`]), so its handler need not be woken
//! again.
//!
//! A failed commit is retried with backoff until it succeeds, so a database
//! outage stalls acks (and, through the prefetch window, consumption) instead
//! of losing state. Except when PostgreSQL refuses the batch for what it holds
//! (a row it will refuse however often it is sent, see [`isolate`]): then the
//! writer commits the batch in halves, each in its own transaction, halving
//! again what fails, down to single entries, so that everything else commits.
//! An entry refused on its own is not retried: it is counted
//! (`conveyor_worker_state_rows_refused_total`), logged, and handed back to
//! its caller as [`Refused`], which dead-letters its delivery instead (see
//! `execute`): the message goes to the dead-letter queue with the database's
//! error as its reason, its `dead_jobs` record is written, in a fallback form
//! if the full one is refused too, and the delivery is acknowledged. A refused
//! `running` change (which nobody waits for) is only counted and logged: the
//! attempt's final change meets the same refusal and takes that road. So one
//! bad row costs one job, not the worker; before this, it stalled every
//! commit and ack of the worker, then of the next worker its redelivered
//! message reached. A batch that commits costs what it did before: the
//! halving starts only once a commit has failed.
//!
//! The upsert also creates the row when the job's publisher has not committed
//! it yet, and never moves a job out of a final state or back to an older attempt.
//!
//! A dead job's `dead_jobs` record travels with its `dead` state and is written
//! in the same transaction, after the state (so it sees every error). A record
//! that stands in for a state PostgreSQL refused brings the job's row to `dead`
//! in a minimal form, in the record's transaction ([`mark_dead`]), so that a
//! refused job is not shown `running` for ever.

mod isolate;
mod mark_dead;
mod upsert;

pub use isolate::about_the_data;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::pool::PgPool;
use conveyor_schema::{Envelope, JobState};
use diesel::prelude::*;
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dead_letters::DeadLetter;
use isolate::Fate;
use upsert::{plan, upsert};

/// One job's new state.
#[derive(Debug, Clone)]
pub struct StateChange {
    /// Job id.
    pub id: Uuid,
    /// Task name (for the row, when it must be created).
    pub task: String,
    /// Logical queue.
    pub queue: String,
    /// Arguments (for the row, when it must be created).
    pub args: serde_json::Value,
    /// The attempt this change belongs to.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// When the job was enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// The new state.
    pub state: JobState,
    /// Set on `running`.
    pub started_at: Option<DateTime<Utc>>,
    /// Set on `succeeded` and `dead`.
    pub finished_at: Option<DateTime<Utc>>,
    /// The failure, on `retrying` and `dead`.
    pub error: Option<String>,
    /// When the next attempt is due, on `retrying`.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the change happened (the time recorded with an error).
    pub at: DateTime<Utc>,
    /// Set on `running`: the producer that enqueued the job, written only
    /// when this change creates the row (the ingress could not record it).
    pub producer: Option<String>,
    /// Set on `running`: the worker running the attempt (`jobs.runner`, see
    /// `crate::runner`).
    pub runner: Option<Arc<str>>,
}

impl StateChange {
    /// A change of `envelope`'s job to `state`, with nothing else set.
    pub fn of(envelope: &Envelope, queue: &str, max_attempts: u32, state: JobState) -> Self {
        Self {
            id: envelope.id,
            task: envelope.task.clone(),
            queue: queue.to_owned(),
            args: envelope.args.clone(),
            attempt: envelope.attempt,
            max_attempts,
            enqueued_at: envelope.enqueued_at,
            state,
            started_at: None,
            finished_at: None,
            error: None,
            next_attempt_at: None,
            at: Utc::now(),
            producer: None,
            runner: None,
        }
    }
}

/// How the writer forms a transaction.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most changes in one transaction.
    pub max: usize,
    /// Least time between the starts of two commits.
    pub linger: Duration,
}

/// What became of what a caller waited for ([`StateWriter::commit`],
/// [`StateWriter::commit_dead`]).
#[derive(Debug)]
pub enum Commit {
    /// Committed.
    Committed,
    /// PostgreSQL refused it on its own, for what it holds: it never commits,
    /// and it was not retried.
    Refused(Box<Refused>),
    /// The writer stopped first (shut down while commits kept failing).
    Stopped,
}

impl Commit {
    /// `true` when committed.
    pub fn is_committed(&self) -> bool {
        matches!(self, Self::Committed)
    }
}

/// An entry PostgreSQL refused on its own, handed back to its caller.
#[derive(Debug)]
pub struct Refused {
    /// The database's error message (at most `MAX_ERROR_LEN` bytes).
    pub error: String,
    /// The refused state change, if the entry held one.
    pub change: Option<StateChange>,
    /// The refused dead-job record, if the entry held one.
    pub dead: Option<DeadLetter>,
}

/// The longest database error kept in a [`Refused`] (it may quote a value).
pub const MAX_ERROR_LEN: usize = 1024;

struct Pending {
    item: Item,
    done: Option<Done>,
}

/// What happens once a pending entry is committed or refused.
enum Done {
    /// The caller waiting in [`StateWriter::commit`] is woken.
    Wake(oneshot::Sender<Result<(), Box<Refused>>>),
    /// This runs on the writer task, and nobody waits.
    Then(Box<dyn FnOnce(Result<(), Box<Refused>>) + Send>),
}

impl Done {
    fn settle(self, outcome: Result<(), Box<Refused>>) {
        match self {
            Done::Wake(waiter) => {
                let _ = waiter.send(outcome);
            }
            Done::Then(then) => then(outcome),
        }
    }
}

/// What one pending entry writes.
#[derive(Clone)]
struct Item {
    change: Option<StateChange>,
    dead: Option<DeadLetter>,
}

impl Item {
    fn change(change: StateChange) -> Self {
        Self {
            change: Some(change),
            dead: None,
        }
    }
}

/// Queues changes for the writer task. Cheap to clone.
#[derive(Clone)]
pub struct StateWriter {
    tx: mpsc::UnboundedSender<Pending>,
}

impl StateWriter {
    /// Starts the writer task. It stops once every `StateWriter` is dropped and
    /// the queue is empty, or when `stop` is cancelled while a commit keeps
    /// failing. It counts refused entries in `metrics`.
    pub fn start(
        pool: PgPool,
        batching: Batching,
        metrics: &Metrics,
        stop: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let refused = metrics.state_rows_refused.clone();
        tokio::spawn(write_loop(pool, rx, batching, refused, stop));
        Self { tx }
    }

    /// Queues a change without waiting for its commit. Should PostgreSQL
    /// refuse it, that is counted and logged only.
    pub fn record(&self, change: StateChange) {
        self.queue(Item::change(change), None);
    }

    /// Queues a change and runs `then` on the writer task once it is committed
    /// (with `Ok`) or refused (with what was refused); if the writer stops
    /// first, `then` is dropped without running. The caller does not wait: a
    /// job's handler ends here instead of being woken again after the commit
    /// only to acknowledge its delivery.
    pub fn commit_then(
        &self,
        change: StateChange,
        then: impl FnOnce(Result<(), Box<Refused>>) + Send + 'static,
    ) {
        self.queue(Item::change(change), Some(Done::Then(Box::new(then))));
    }

    /// Queues a change and waits until it is committed or refused.
    pub async fn commit(&self, change: StateChange) -> Commit {
        self.commit_item(Item::change(change)).await
    }

    /// Commits `change` (if any) and the dead-job record `dead` in one
    /// transaction (refused together, if refused); waits like
    /// [`commit`](Self::commit).
    pub async fn commit_dead(&self, change: Option<StateChange>, dead: DeadLetter) -> Commit {
        self.commit_item(Item {
            change,
            dead: Some(dead),
        })
        .await
    }

    /// Waits until every change queued before this call is committed (or
    /// refused); `false` when the writer stopped first.
    pub async fn flushed(&self) -> bool {
        let nothing = Item {
            change: None,
            dead: None,
        };
        !matches!(self.commit_item(nothing).await, Commit::Stopped)
    }

    async fn commit_item(&self, item: Item) -> Commit {
        let (done, outcome) = oneshot::channel();
        if !self.queue(item, Some(Done::Wake(done))) {
            return Commit::Stopped;
        }
        match outcome.await {
            Ok(Ok(())) => Commit::Committed,
            Ok(Err(refused)) => Commit::Refused(refused),
            Err(_) => Commit::Stopped,
        }
    }

    /// Hands `item` to the writer task; `false` when it has stopped.
    fn queue(&self, item: Item, done: Option<Done>) -> bool {
        self.tx.send(Pending { item, done }).is_ok()
    }
}

/// A batch of this many changes commits without waiting out the linger: one
/// flush per 64 or more jobs costs little, and under load lingering held the
/// drain back (see benches/RESULTS.md, "Session 9").
const ENOUGH_FOR_A_COMMIT: usize = 128;

async fn write_loop(
    pool: PgPool,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    batching: Batching,
    refused: IntCounter,
    stop: CancellationToken,
) {
    let batch_max = batching.max.max(1);
    let mut batch = Vec::with_capacity(batch_max);
    let mut last_commit: Option<tokio::time::Instant> = None;
    while rx.recv_many(&mut batch, batch_max).await > 0 {
        // At most one commit per `linger`, unless the batch already holds
        // enough to be worth a flush: changes arriving meanwhile share the
        // next one. At a low rate each change would otherwise be a commit and
        // a disk flush of its own, and those flushes delay the broker's on a
        // shared disk. Under load, waiting any longer would only hold
        // deliveries unacked, and with them the prefetch window.
        if let Some(due) = last_commit.map(|at| at + batching.linger) {
            while batch.len() < ENOUGH_FOR_A_COMMIT.min(batch_max) {
                let room = batch_max - batch.len();
                let more = rx.recv_many(&mut batch, room);
                if !matches!(tokio::time::timeout_at(due, more).await, Ok(n) if n > 0) {
                    break;
                }
            }
        }
        last_commit = Some(tokio::time::Instant::now());
        let mut backoff = Duration::from_millis(50);
        loop {
            // The batch goes to the blocking thread and comes back, whatever
            // happens there, so that it is not copied for a retry.
            let pool = pool.clone();
            let work = std::mem::take(&mut batch);
            let written = tokio::task::spawn_blocking(move || {
                let written = std::panic::catch_unwind(AssertUnwindSafe(|| write(&pool, &work)))
                    .unwrap_or_else(|_| Written::Nothing("the commit panicked".into()));
                (work, written)
            })
            .await;
            let Ok((work, written)) = written else {
                return; // The runtime is shutting down.
            };
            batch = work;
            let failure = match written {
                Written::All => {
                    for pending in batch.drain(..) {
                        if let Some(done) = pending.done {
                            done.settle(Ok(()));
                        }
                    }
                    break;
                }
                Written::Nothing(failure) => failure,
                Written::Isolated(fates, failure) => {
                    settle_isolated(&mut batch, fates, &refused);
                    match failure {
                        None => break,
                        Some(failure) => failure,
                    }
                }
            };
            tracing::warn!(error = %failure, entries = batch.len(), retry_in_ms = backoff.as_millis() as u64, "job state commit failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Settles the entries of `batch` that [`isolate`] committed or found refused
/// (by `fates`, in batch order) and keeps the rest, which met a failure that
/// is not about them, for the next attempt.
fn settle_isolated(batch: &mut Vec<Pending>, fates: Vec<Fate>, refused: &IntCounter) {
    let mut fates = fates.into_iter();
    batch.retain_mut(|pending| match fates.next() {
        Some(Fate::Committed) => {
            if let Some(done) = pending.done.take() {
                done.settle(Ok(()));
            }
            false
        }
        Some(Fate::Refused(error)) => {
            refused.inc();
            let item = &mut pending.item;
            let (id, what) = match (&item.change, &item.dead) {
                (Some(change), _) => (change.id, change.state.as_str()),
                (None, Some(dead)) => (dead.id, "dead-job record"),
                (None, None) => (Uuid::nil(), "nothing"),
            };
            tracing::error!(job.id = %id, what, error, "PostgreSQL refused a job's state on its own; it is not retried");
            if let Some(done) = pending.done.take() {
                let refused = Refused {
                    error,
                    change: item.change.take(),
                    dead: item.dead.take(),
                };
                done.settle(Err(Box::new(refused)));
            }
            false
        }
        Some(Fate::Pending) | None => true,
    });
}

/// What a write of a batch did.
enum Written {
    /// Everything committed.
    All,
    /// Nothing committed, for a reason that is not the batch's data (the
    /// database cannot be reached, or is failing): try again later.
    Nothing(String),
    /// PostgreSQL refused the batch for what it holds, and [`isolate`] found
    /// each entry's fate (in batch order). Entries it did not reach, stopped
    /// by the failure given, are still `Pending`.
    Isolated(Vec<Fate>, Option<String>),
}

/// Writes `batch` in one transaction, or, when PostgreSQL refuses it for what
/// it holds, as much of it as PostgreSQL takes ([`isolate`]). Runs on a
/// blocking thread.
fn write(pool: &PgPool, batch: &[Pending]) -> Written {
    let started = std::time::Instant::now();
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(err) => return Written::Nothing(err.to_string()),
    };
    match transaction(&mut conn, batch) {
        Ok(rounds) => {
            tracing::debug!(
                entries = batch.len(),
                rounds,
                elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                "job states committed"
            );
            Written::All
        }
        Err(err) if isolate::about_the_data(&err) => {
            tracing::warn!(error = %err, entries = batch.len(), "PostgreSQL refused a batch of job states; committing it in parts to find what it refuses");
            let mut fates = vec![Fate::Pending; batch.len()];
            let failure = isolate::isolate(&mut conn, batch, &mut fates).err();
            Written::Isolated(fates, failure)
        }
        Err(err) => Written::Nothing(err.to_string()),
    }
}

/// Writes the entries in one transaction: their changes as upsert rounds,
/// then their dead-job records, each followed by the minimal `dead` state of
/// its job when it stands in for a refused one ([`mark_dead`]). The number of
/// rounds when it committed.
fn transaction(conn: &mut PgConnection, entries: &[Pending]) -> QueryResult<usize> {
    let changes = entries.iter().filter_map(|p| p.item.change.as_ref());
    let rounds = plan(changes, entries.len());
    conn.transaction(|conn| {
        rounds.iter().try_for_each(|round| upsert(conn, round))?;
        entries
            .iter()
            .filter_map(|p| p.item.dead.as_ref())
            .try_for_each(|record| {
                crate::dead_letters::insert(conn, record)?;
                mark_dead::mark_dead(conn, record)
            })
    })?;
    Ok(rounds.len())
}
