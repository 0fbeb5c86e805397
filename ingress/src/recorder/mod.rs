//! Group commit of new jobs: record and publish many submissions together.
//!
//! A 202 must mean that both the job record and a broker-confirmed message
//! exist, and a failed publish must leave no record behind. Doing that per
//! request (one transaction, one confirm round trip) caps the ingress near the
//! database's single-commit rate, so submissions are batched:
//!
//! 1. a lane (see `lane.rs`) opens a transaction; if the database is
//!    unreachable, nothing is published and every submission gets 503;
//! 2. the batch's records are inserted in that transaction while, at the same
//!    time, the messages are published on one confirm channel, pipelined;
//! 3. once both are done, records whose publish failed are deleted and the
//!    transaction commits (or rolls back when nothing was confirmed);
//! 4. each waiting request is answered: 202 for a committed and confirmed job, 503 otherwise.
//!
//! A submission whose request stopped waiting before its batch formed (timed
//! out, or its client left) is left out; once in a batch, it may run, and the
//! request's timeout says so (see `handed_over.rs`).
//!
//! Because the message may reach a worker before the insert reaches its row,
//! the worker's state upsert may create the row first; the insert then keeps
//! that state and adds only what the ingress knows (producer, idempotency key,
//! replay origin). A worker that upserts after the insert waits on the row
//! lock until the commit. Both write rows in id order, so they never wait on
//! each other in a cycle. Should the insert or the commit fail after messages
//! were confirmed (the database died mid-batch), those jobs will run: their
//! records are written again (see `rerecord.rs`) while their submitters wait,
//! and only if that fails too do they get 503, in doubt, as after a lost
//! confirm ([`SubmitError::may_have_been_enqueued`]).
//!
//! How batches form: when no batch is in flight, whatever is waiting leaves at
//! once, so a lone request is never delayed by a timer. While others are in
//! flight, a new batch waits (up to `ingress.batch_linger_ms`, or until one of
//! them finishes) to reach the size batches have lately had. Without that,
//! under load a slot freed by one batch was taken at once by the one or two
//! requests that had arrived meanwhile, and most transactions and confirm
//! round trips carried a single job.

pub mod handed_over;
mod insert;
mod lane;
mod rerecord;

pub use lane::APPLICATION_NAME as LANE_APPLICATION_NAME;

use std::sync::Arc;
use std::time::Duration;

use conveyor_platform::amqp::{Outgoing, PublishError, Publisher};
use conveyor_platform::config::IngressConfig;
use conveyor_platform::metrics::Metrics;
use conveyor_schema::models::NewJob;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use uuid::Uuid;

use lane::{Decision, Lanes, Work};

/// One job waiting to be recorded and published.
pub struct Submission {
    /// Its record.
    pub record: NewJob,
    /// Its message.
    pub message: Outgoing,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<(), SubmitError>>,
    /// When it was handed over (for the group commit's debug timings).
    pub arrived: std::time::Instant,
}

/// Why a job was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// The database could not record it.
    #[error("could not record the job: {0}")]
    Database(String),
    /// The broker did not confirm it.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The broker confirmed the job, so it will run, but its record could not be written.
    #[error("the broker confirmed the job, but its record could not be written: {0}")]
    Unrecorded(String),
    /// The ingress is shutting down.
    #[error("the ingress is shutting down")]
    Closed,
}

impl SubmitError {
    /// True when the job may run although it was not accepted: its message was
    /// confirmed, or its publish failed in a way that leaves that unknown.
    pub fn may_have_been_enqueued(&self) -> bool {
        match self {
            Self::Unrecorded(_) => true,
            Self::Publish(err) => err.may_have_been_enqueued(),
            Self::Database(_) | Self::Closed => false,
        }
    }
}

/// Hands submissions to the batching loop. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Submission>,
}

/// What a batch needs besides its submissions; shared by every batch.
struct Shared {
    lanes: Lanes,
    publisher: Publisher,
    metrics: Metrics,
    /// Where [`rerecord`](rerecord::rerecord) connects.
    database_url: String,
    rerecord_within: Duration,
}

impl Recorder {
    /// Starts the batching loop and its database lanes (one per batch in flight).
    pub fn start(
        database_url: &str,
        publisher: Publisher,
        metrics: Metrics,
        settings: &IngressConfig,
    ) -> std::io::Result<Self> {
        let lanes = Lanes::start(database_url, settings.batches_in_flight)?;
        let (tx, rx) = mpsc::channel(settings.batch_max * settings.batches_in_flight * 4);
        let batching = Batching {
            max: settings.batch_max.max(1),
            in_flight: settings.batches_in_flight.max(1),
            linger: Duration::from_millis(settings.batch_linger_ms),
        };
        let shared = Shared {
            lanes,
            publisher,
            metrics,
            database_url: lane::lane_url(database_url),
            rerecord_within: settings.rerecord_within(),
        };
        tokio::spawn(batch_loop(rx, Arc::new(shared), batching));
        Ok(Self { tx })
    }

    /// Records and publishes one job; `Ok` once both are durable.
    ///
    /// Should the request be abandoned while this waits, the job may run all
    /// the same: it stays in the request's [`handed_over`] list unless the
    /// answer is that it will not.
    pub async fn submit(&self, record: NewJob, message: Outgoing) -> Result<(), SubmitError> {
        let id = record.id;
        let (reply, outcome) = oneshot::channel();
        handed_over::note(id);
        let outcome = match self
            .tx
            .send(Submission {
                record,
                message,
                reply,
                arrived: std::time::Instant::now(),
            })
            .await
        {
            Ok(()) => outcome.await.unwrap_or(Err(SubmitError::Closed)),
            Err(_) => Err(SubmitError::Closed),
        };
        if outcome
            .as_ref()
            .is_err_and(|err| !err.may_have_been_enqueued())
        {
            handed_over::forget(id);
        }
        outcome
    }
}

/// How batches are cut.
#[derive(Clone, Copy)]
struct Batching {
    max: usize,
    in_flight: usize,
    linger: Duration,
}

async fn batch_loop(mut rx: mpsc::Receiver<Submission>, shared: Arc<Shared>, batching: Batching) {
    let slots = Arc::new(Semaphore::new(batching.in_flight));
    let finished = Arc::new(Notify::new());
    // Recent batch sizes, smoothed: what a batch cut while others are in flight aims for.
    let mut typical = 1.0_f64;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(batching.max);
        if rx.recv_many(&mut batch, batching.max).await == 0 {
            return;
        }
        let others_in_flight = batching.in_flight - 1 - slots.available_permits();
        let aim = (typical.round() as usize).clamp(1, batching.max);
        if others_in_flight > 0 && batch.len() < aim && !batching.linger.is_zero() {
            let deadline = tokio::time::Instant::now() + batching.linger;
            let one_finished = finished.notified();
            tokio::pin!(one_finished);
            while batch.len() < aim {
                let room = batching.max - batch.len();
                tokio::select! {
                    received = rx.recv_many(&mut batch, room) => {
                        if received == 0 { break; }
                    }
                    () = &mut one_finished => break,
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        typical = 0.8 * typical + 0.2 * batch.len() as f64;
        let (shared, finished) = (shared.clone(), finished.clone());
        tokio::spawn(async move {
            commit_batch(batch, shared).await;
            drop(slot);
            finished.notify_waiters();
        });
    }
}

async fn commit_batch(mut batch: Vec<Submission>, shared: Arc<Shared>) {
    // A submitter that stopped waiting (its request timed out, or its client
    // left) gets no answer: its job is left out, so that it does not run.
    batch.retain(|submission| !submission.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    // Rows in id order, as the worker's state writer writes them: two
    // transactions that lock rows in one order cannot wait on each other.
    batch.sort_unstable_by_key(|submission| submission.record.id);
    let mut records = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    let oldest = batch.iter().map(|submission| submission.arrived).min();
    for submission in batch {
        records.push(submission.record);
        messages.push(submission.message);
        replies.push(submission.reply);
    }
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    // Shared with the lane: should its transaction fail, some may be written again.
    let records = Arc::new(records);
    let started = std::time::Instant::now();
    let waited_ms = oldest.map_or(0.0, |at| (started - at).as_secs_f64() * 1000.0);

    let (began_tx, began_rx) = oneshot::channel();
    let (inserted_tx, inserted_rx) = oneshot::channel();
    let (decision_tx, decision_rx) = std::sync::mpsc::channel::<Decision>();
    let (finished_tx, finished_rx) = oneshot::channel();
    shared.lanes.submit(Work {
        records: records.clone(),
        began: began_tx,
        inserted: inserted_tx,
        decision: decision_rx,
        finished: finished_tx,
    });

    let reply_all = |replies: Vec<oneshot::Sender<Result<(), SubmitError>>>, err: SubmitError| {
        for reply in replies {
            let _ = reply.send(Err(err.clone()));
        }
    };
    // Nothing is published unless the database took the transaction: a
    // database outage answers 503 without a message behind it.
    match began_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return reply_all(replies, SubmitError::Database(err)),
        _ => {
            return reply_all(
                replies,
                SubmitError::Database("the recorder's database lanes ended".into()),
            );
        }
    }
    let began_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (inserted, results) = tokio::join!(inserted_rx, shared.publisher.publish_all(&messages));
    let confirmed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let inserted = inserted.unwrap_or_else(|_| Err("the recorder's database lane ended".into()));
    // An id in the batch twice (a request taken over under its idempotency key while
    // the first was still waiting) failed only if no copy of it was confirmed. The
    // set is needed only when something failed, which is rare.
    let confirmed: std::collections::HashSet<Uuid> = if results.iter().all(Result::is_ok) {
        std::collections::HashSet::new()
    } else {
        ids.iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(id, _)| *id)
            .collect()
    };
    let failed: Vec<Uuid> = ids
        .iter()
        .zip(&results)
        .filter(|(id, r)| r.is_err() && !confirmed.contains(id))
        .map(|(id, _)| *id)
        .collect();
    let decision = if inserted.is_err() || failed.len() == ids.len() {
        Decision::RollBack
    } else {
        Decision::CommitWithout(failed)
    };
    let _ = decision_tx.send(decision);
    // A rollback decided here (nothing confirmed) finishes `Ok`: each submission then
    // gets its publish error.
    let committed = inserted.and(
        finished_rx
            .await
            .unwrap_or_else(|_| Err("the recorder's database lane ended".into())),
    );
    tracing::debug!(
        jobs = ids.len(),
        waited_ms,
        began_ms,
        confirmed_ms,
        committed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "group commit"
    );
    let mut unrecorded = Unrecorded::default();
    for (index, ((reply, result), message)) in
        replies.into_iter().zip(results).zip(messages).enumerate()
    {
        // A copy of a job whose other copy was confirmed shares that outcome.
        let result = result.or_else(|err| {
            if confirmed.contains(&ids[index]) {
                Ok(())
            } else {
                Err(err)
            }
        });
        match (&committed, result) {
            (_, Err(err)) => {
                if err.may_have_been_enqueued() {
                    shared
                        .metrics
                        .jobs_in_doubt
                        .with_label_values(&["unconfirmed"])
                        .inc();
                }
                let _ = reply.send(Err(SubmitError::Publish(err)));
            }
            (Err(_), Ok(())) => {
                unrecorded.waiting.push((reply, message));
                unrecorded.records.push(records[index].clone());
            }
            (Ok(()), Ok(())) => {
                accept(reply, &message, &shared.metrics);
            }
        }
    }
    if let Err(err) = committed
        && !unrecorded.records.is_empty()
    {
        // Off the batch's slot: new batches need not wait for a database that is away.
        tokio::spawn(record_again(unrecorded, err, shared));
    }
}

/// Confirmed jobs whose batch's transaction failed.
#[derive(Default)]
struct Unrecorded {
    /// Each job's submitter and message (for the metric once it is accepted).
    waiting: Vec<(oneshot::Sender<Result<(), SubmitError>>, Outgoing)>,
    /// Their records, in the same order.
    records: Vec<NewJob>,
}

/// Writes the records of `jobs` again (see `rerecord.rs`) and answers their
/// submitters: accepted once written, else in doubt.
async fn record_again(jobs: Unrecorded, failure: String, shared: Arc<Shared>) {
    let Unrecorded { waiting, records } = jobs;
    let count = records.len();
    tracing::warn!(jobs = count, error = %failure, "a batch's transaction failed after its messages were confirmed; writing their records again");
    match rerecord::rerecord(shared.database_url.clone(), records, shared.rerecord_within).await {
        Ok(()) => {
            tracing::info!(jobs = count, "confirmed jobs recorded again; accepted");
            shared.metrics.jobs_recorded_again.inc_by(count as u64);
            for (reply, message) in waiting {
                accept(reply, &message, &shared.metrics);
            }
        }
        Err(err) => {
            tracing::warn!(
                jobs = count,
                error = %err,
                "confirmed jobs could not be recorded; they will run although their submitters got 503"
            );
            shared
                .metrics
                .jobs_in_doubt
                .with_label_values(&["unrecorded"])
                .inc_by(count as u64);
            for (reply, _) in waiting {
                let _ = reply.send(Err(SubmitError::Unrecorded(err.clone())));
            }
        }
    }
}

/// Counts a recorded and confirmed job as published and answers its
/// submitter. One that stopped waiting meanwhile was answered 503 in doubt
/// (see [`handed_over`]): counted as such.
fn accept(reply: oneshot::Sender<Result<(), SubmitError>>, message: &Outgoing, metrics: &Metrics) {
    let queue = message.routing_key.rsplit('.').next().unwrap_or("");
    metrics
        .jobs_published
        .with_label_values(&[message.task.as_str(), queue])
        .inc();
    if reply.send(Ok(())).is_err() {
        metrics
            .jobs_in_doubt
            .with_label_values(&["abandoned"])
            .inc();
    }
}
