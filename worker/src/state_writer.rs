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
//! again. A failed commit is retried with backoff until it succeeds, so a
//! database outage stalls acks (and, through the prefetch window, consumption)
//! instead of losing state.
//!
//! The upsert also creates the row when the job's publisher has not committed
//! it yet, and never moves a job out of a final state or back to an older attempt.
//!
//! A dead job's `dead_jobs` record travels with its `dead` state and is written
//! in the same transaction, after the state (so it sees every error).

use std::borrow::Cow;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_schema::nul::without_nul;
use conveyor_schema::pool::PgPool;
use conveyor_schema::prepared::walk_sql;
use conveyor_schema::{Envelope, JobState};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{Array, Int4, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dead_letters::DeadLetter;

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

struct Pending {
    item: Item,
    done: Option<Done>,
}

/// What happens once a pending entry is committed.
enum Done {
    /// The caller waiting in [`StateWriter::commit`] is woken.
    Wake(oneshot::Sender<()>),
    /// This runs on the writer task, and nobody waits.
    Then(Box<dyn FnOnce() + Send>),
}

impl Done {
    fn committed(self) {
        match self {
            Done::Wake(waiter) => {
                let _ = waiter.send(());
            }
            Done::Then(then) => then(),
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
    /// the queue is empty, or when `stop` is cancelled while a commit keeps failing.
    pub fn start(pool: PgPool, batching: Batching, stop: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(pool, rx, batching, stop));
        Self { tx }
    }

    /// Queues a change without waiting for its commit.
    pub fn record(&self, change: StateChange) {
        self.queue(Item::change(change), None);
    }

    /// Queues a change and runs `then` on the writer task once it is committed;
    /// if the writer stops first, `then` is dropped without running. The caller
    /// does not wait: a job's handler ends here instead of being woken again
    /// after the commit only to acknowledge its delivery.
    pub fn commit_then(&self, change: StateChange, then: impl FnOnce() + Send + 'static) {
        self.queue(Item::change(change), Some(Done::Then(Box::new(then))));
    }

    /// Queues a change and waits until it is committed. `false` when the writer
    /// stopped before committing it.
    pub async fn commit(&self, change: StateChange) -> bool {
        self.commit_item(Item::change(change)).await
    }

    /// Commits `change` (if any) and the dead-job record `dead` in one
    /// transaction; waits like [`commit`](Self::commit).
    pub async fn commit_dead(&self, change: Option<StateChange>, dead: DeadLetter) -> bool {
        self.commit_item(Item {
            change,
            dead: Some(dead),
        })
        .await
    }

    async fn commit_item(&self, item: Item) -> bool {
        let (done, committed) = oneshot::channel();
        self.queue(item, Some(Done::Wake(done))) && committed.await.is_ok()
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
        let mut waiters = Vec::with_capacity(batch.len());
        let mut changes = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        for pending in batch.drain(..) {
            waiters.extend(pending.done);
            changes.extend(pending.item.change);
            dead.extend(pending.item.dead);
        }
        let rows = changes.len();
        let started = std::time::Instant::now();
        let work = std::sync::Arc::new((plan(changes), dead));
        let rounds = &work.0;
        let mut backoff = Duration::from_millis(50);
        loop {
            let pool = pool.clone();
            let shared = work.clone();
            let result = tokio::task::spawn_blocking(move || {
                let mut conn = pool.get().map_err(|e| e.to_string())?;
                conn.transaction(|conn| {
                    let (rounds, dead) = &*shared;
                    rounds.iter().try_for_each(|round| upsert(conn, round))?;
                    dead.iter()
                        .try_for_each(|record| crate::dead_letters::insert(conn, record))
                })
                .map_err(|e| e.to_string())
            })
            .await;
            match result {
                Ok(Ok(())) => break,
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, rounds = rounds.len(), retry_in_ms = backoff.as_millis() as u64, "job state commit failed; retrying");
                }
                Err(err) => tracing::error!(error = %err, "job state writer task failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        tracing::debug!(
            rows,
            rounds = rounds.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "job states committed"
        );
        for done in waiters {
            done.committed();
        }
    }
}

/// One row of an upsert: a job's latest change in the batch, with the number
/// of attempt starts (`running` changes) folded into it.
#[derive(Debug)]
struct Row {
    change: StateChange,
    runs: i32,
}

/// Orders `changes` into upsert rounds in which each job appears once (an
/// upsert cannot touch one row twice).
///
/// Changes of the same attempt are folded into one row: the usual `running`
/// then `succeeded` of a fast job become a single `succeeded` row that keeps
/// the start time and counts the run, which is what applying both in order
/// gives. A final change stays final whatever of its attempt follows it. Only
/// when folding would lose something (an earlier change carries an error, or
/// the attempts differ) does a new round start.
fn plan(changes: Vec<StateChange>) -> Vec<Vec<Row>> {
    let mut rounds = Vec::new();
    let mut round: Vec<Row> = Vec::with_capacity(changes.len());
    let mut index = std::collections::HashMap::with_capacity(changes.len());
    for change in changes {
        let runs = i32::from(change.state == JobState::Running);
        match index.get(&change.id) {
            Some(&at) => {
                let row: &mut Row = &mut round[at];
                if row.change.error.is_none()
                    && row.change.attempt == change.attempt
                    && row.change.state.is_final()
                {
                    // A final state is never undone: a later change of the same
                    // attempt (the start of a second copy of a keyed job) only
                    // counts its run, as the upsert would refuse it.
                    row.runs += runs;
                } else if row.change.error.is_none() && row.change.attempt == change.attempt {
                    let started_at = change.started_at.or(row.change.started_at);
                    let producer = change.producer.or(row.change.producer.take());
                    row.change = StateChange {
                        started_at,
                        producer,
                        ..change
                    };
                    row.runs += runs;
                } else {
                    rounds.push(std::mem::take(&mut round));
                    index.clear();
                    index.insert(change.id, 0);
                    round.push(Row { change, runs });
                }
            }
            None => {
                index.insert(change.id, round.len());
                round.push(Row { change, runs });
            }
        }
    }
    if !round.is_empty() {
        rounds.push(round);
    }
    // Rows in id order, as the ingress inserts them, so that two transactions
    // never wait on each other's rows in a cycle.
    for round in &mut rounds {
        round.sort_unstable_by_key(|row| row.change.id);
    }
    rounds
}

const UPSERT: &str = "
INSERT INTO jobs (id, task, queue, state, args, attempts, runs, max_attempts, enqueued_at,
                  started_at, finished_at, last_error, errors, next_attempt_at, updated_at, producer)
SELECT d.id, d.task, d.queue, d.state, d.args, d.attempt, d.runs, d.max_attempts, d.enqueued_at,
       d.started_at, d.finished_at, d.error,
       CASE WHEN d.error IS NULL THEN '[]'::jsonb
            ELSE jsonb_build_array(jsonb_build_object('attempt', d.attempt, 'at', d.at, 'error', d.error)) END,
       d.next_attempt_at, now(), d.producer
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int4[], $7::int4[],
            $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::timestamptz[],
            $13::int4[], $14::timestamptz[], $15::text[])
     AS d(id, task, queue, state, args, attempt, max_attempts, enqueued_at,
          started_at, finished_at, error, next_attempt_at, runs, at, producer)
ON CONFLICT (id) DO UPDATE SET
    state = EXCLUDED.state,
    attempts = EXCLUDED.attempts,
    runs = jobs.runs + EXCLUDED.runs,
    started_at = COALESCE(EXCLUDED.started_at, jobs.started_at),
    finished_at = EXCLUDED.finished_at,
    last_error = COALESCE(EXCLUDED.last_error, jobs.last_error),
    errors = jobs.errors || EXCLUDED.errors,
    next_attempt_at = EXCLUDED.next_attempt_at,
    updated_at = now()
WHERE jobs.state NOT IN ('succeeded', 'dead') AND EXCLUDED.attempts >= jobs.attempts";

/// [`UPSERT`]'s parameters, one array per column: prepared once per connection
/// (see `conveyor_schema::prepared`).
struct UpsertStates<'a> {
    ids: Vec<Uuid>,
    tasks: Vec<&'a str>,
    queues: Vec<&'a str>,
    states: Vec<&'a str>,
    args: Vec<&'a serde_json::Value>,
    attempts: Vec<i32>,
    max_attempts: Vec<i32>,
    enqueued_at: Vec<DateTime<Utc>>,
    started_at: Vec<Option<DateTime<Utc>>>,
    finished_at: Vec<Option<DateTime<Utc>>>,
    errors: Vec<Option<Cow<'a, str>>>,
    next_attempt_at: Vec<Option<DateTime<Utc>>>,
    runs: Vec<i32>,
    at: Vec<DateTime<Utc>>,
    producers: Vec<Option<&'a str>>,
}

impl QueryFragment<Pg> for UpsertStates<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk_sql(UPSERT, out, |n, out| match n {
            1 => out.push_bind_param::<Array<SqlUuid>, _>(&self.ids),
            2 => out.push_bind_param::<Array<Text>, _>(&self.tasks),
            3 => out.push_bind_param::<Array<Text>, _>(&self.queues),
            4 => out.push_bind_param::<Array<Text>, _>(&self.states),
            5 => out.push_bind_param::<Array<Jsonb>, _>(&self.args),
            6 => out.push_bind_param::<Array<Int4>, _>(&self.attempts),
            7 => out.push_bind_param::<Array<Int4>, _>(&self.max_attempts),
            8 => out.push_bind_param::<Array<Timestamptz>, _>(&self.enqueued_at),
            9 => out.push_bind_param::<Array<Nullable<Timestamptz>>, _>(&self.started_at),
            10 => out.push_bind_param::<Array<Nullable<Timestamptz>>, _>(&self.finished_at),
            11 => out.push_bind_param::<Array<Nullable<Text>>, _>(&self.errors),
            12 => out.push_bind_param::<Array<Nullable<Timestamptz>>, _>(&self.next_attempt_at),
            13 => out.push_bind_param::<Array<Int4>, _>(&self.runs),
            14 => out.push_bind_param::<Array<Timestamptz>, _>(&self.at),
            _ => out.push_bind_param::<Array<Nullable<Text>>, _>(&self.producers),
        })
    }
}
conveyor_schema::prepared_statement!(UpsertStates);

fn upsert(conn: &mut PgConnection, rows: &[Row]) -> QueryResult<()> {
    fn column<'a, T>(rows: &'a [Row], field: impl Fn(&'a StateChange) -> T) -> Vec<T> {
        rows.iter().map(|row| field(&row.change)).collect()
    }
    if rows.is_empty() {
        return Ok(());
    }
    let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    UpsertStates {
        ids: column(rows, |c| c.id),
        tasks: column(rows, |c| c.task.as_str()),
        queues: column(rows, |c| c.queue.as_str()),
        states: column(rows, |c| c.state.as_str()),
        args: column(rows, |c| &c.args),
        attempts: column(rows, |c| int(c.attempt)),
        max_attempts: column(rows, |c| int(c.max_attempts)),
        enqueued_at: column(rows, |c| c.enqueued_at),
        started_at: column(rows, |c| c.started_at),
        finished_at: column(rows, |c| c.finished_at),
        // A task's error may quote anything, U+0000 included, which PostgreSQL refuses.
        errors: column(rows, |c| c.error.as_deref().map(without_nul)),
        next_attempt_at: column(rows, |c| c.next_attempt_at),
        runs: rows.iter().map(|row| row.runs).collect(),
        at: column(rows, |c| c.at),
        producers: column(rows, |c| c.producer.as_deref()),
    }
    .execute(conn)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(envelope: &Envelope, state: JobState) -> StateChange {
        StateChange::of(envelope, "default", 5, state)
    }

    #[test]
    fn running_then_final_folds_into_one_row() {
        let a = Envelope::new("diag.noop", json!({}));
        let b = Envelope::new("diag.noop", json!({}));
        let mut running_a = change(&a, JobState::Running);
        running_a.started_at = Some(Utc::now());
        running_a.producer = Some("shop".into());
        let mut done_a = change(&a, JobState::Succeeded);
        done_a.finished_at = Some(Utc::now());
        let rounds = plan(vec![
            running_a.clone(),
            change(&b, JobState::Running),
            done_a,
            change(&b, JobState::Succeeded),
        ]);
        assert_eq!(rounds.len(), 1);
        let rows = &rounds[0];
        assert_eq!(rows.len(), 2);
        let row_a = rows.iter().find(|row| row.change.id == a.id).unwrap();
        assert_eq!(row_a.change.state, JobState::Succeeded);
        assert_eq!(row_a.change.started_at, running_a.started_at);
        assert_eq!(row_a.change.producer.as_deref(), Some("shop"));
        assert!(row_a.change.finished_at.is_some());
        assert!(rows.iter().all(|row| row.runs == 1));
    }

    #[test]
    fn each_round_is_in_id_order() {
        let mut envelopes: Vec<Envelope> = (0..50)
            .map(|_| Envelope::new("diag.noop", json!({})))
            .collect();
        envelopes.reverse();
        let rounds = plan(
            envelopes
                .iter()
                .map(|e| change(e, JobState::Running))
                .collect(),
        );
        let ids: Vec<Uuid> = rounds[0].iter().map(|row| row.change.id).collect();
        assert!(ids.is_sorted());
        assert_eq!(ids.len(), 50);
    }

    #[test]
    fn a_final_change_stays_final_when_a_second_copy_starts_after_it() {
        let a = Envelope::new("diag.noop", json!({}));
        let rounds = plan(vec![
            change(&a, JobState::Running),
            change(&a, JobState::Succeeded),
            change(&a, JobState::Running),
        ]);
        assert_eq!(rounds.len(), 1);
        assert_eq!(rounds[0][0].change.state, JobState::Succeeded);
        assert_eq!(rounds[0][0].runs, 2);
    }

    #[test]
    fn a_change_after_an_error_or_of_another_attempt_starts_a_new_round() {
        let a = Envelope::new("diag.fail", json!({}));
        let mut retrying = change(&a, JobState::Retrying);
        retrying.error = Some("boom".into());
        let rounds = plan(vec![retrying, change(&a, JobState::Dead)]);
        assert_eq!(rounds.len(), 2);
        let next = a.next_attempt();
        let rounds = plan(vec![
            change(&a, JobState::Running),
            change(&next, JobState::Running),
        ]);
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[1][0].change.attempt, 2);
    }
}
