//! Group commit of new jobs: record and publish many submissions together.
//!
//! A 202 must mean that both the job record and a broker-confirmed message
//! exist, and a failed publish must leave no record behind. Doing that per
//! request (one transaction, one confirm round trip) caps the ingress near the
//! database's single-commit rate, so submissions are batched:
//!
//! 1. a database connection is checked out (the pool checks it); if the
//!    database is unreachable, nothing is published and every submission gets 503;
//! 2. the batch's records are inserted in one transaction while, at the same
//!    time, the messages are published on one confirm channel, pipelined;
//! 3. once both are done, records whose publish failed are deleted and the
//!    transaction commits (or rolls back when nothing was confirmed);
//! 4. each waiting request is answered: 202 for a committed and confirmed job, 503 otherwise.
//!
//! Because the message may reach a worker before the insert reaches its row,
//! the worker's state upsert may create the row first; the insert then keeps
//! that state and adds only what the ingress knows (producer, idempotency key,
//! replay origin). A worker that upserts after the insert waits on the row
//! lock until the commit. Both write rows in id order, so they never wait on
//! each other in a cycle. Should the insert fail after messages were confirmed
//! (the database died mid-batch), those jobs still run and their submitters got
//! 503: the same "in doubt" outcome as a lost confirm.
//!
//! Batching is natural: whatever arrived while the previous batches were in
//! flight forms the next one, so a lone request is never delayed by a timer.

use std::sync::Arc;

use conveyor_platform::amqp::{Outgoing, PublishError, Publisher};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::db::jobs;
use conveyor_schema::models::NewJob;
use conveyor_schema::pool::PgPool;
use diesel::prelude::*;
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

/// One job waiting to be recorded and published.
pub struct Submission {
    /// Its record.
    pub record: NewJob,
    /// Its message.
    pub message: Outgoing,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<(), SubmitError>>,
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
    /// The ingress is shutting down.
    #[error("the ingress is shutting down")]
    Closed,
}

/// Hands submissions to the batching loop. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Submission>,
}

impl Recorder {
    /// Starts the batching loop.
    pub fn start(
        db: PgPool,
        publisher: Publisher,
        metrics: Metrics,
        batch_max: usize,
        in_flight: usize,
    ) -> Self {
        let (tx, rx) = mpsc::channel(batch_max * in_flight * 4);
        tokio::spawn(batch_loop(rx, db, publisher, metrics, batch_max, in_flight));
        Self { tx }
    }

    /// Records and publishes one job; `Ok` once both are durable.
    pub async fn submit(&self, record: NewJob, message: Outgoing) -> Result<(), SubmitError> {
        let (reply, outcome) = oneshot::channel();
        self.tx
            .send(Submission {
                record,
                message,
                reply,
            })
            .await
            .map_err(|_| SubmitError::Closed)?;
        outcome.await.unwrap_or(Err(SubmitError::Closed))
    }
}

async fn batch_loop(
    mut rx: mpsc::Receiver<Submission>,
    db: PgPool,
    publisher: Publisher,
    metrics: Metrics,
    batch_max: usize,
    in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(batch_max);
        if rx.recv_many(&mut batch, batch_max).await == 0 {
            return;
        }
        let (db, publisher, metrics) = (db.clone(), publisher.clone(), metrics.clone());
        tokio::spawn(async move {
            commit_batch(batch, &db, &publisher, &metrics).await;
            drop(slot);
        });
    }
}

/// What the async side tells the open transaction: commit without these ids, or roll back.
enum Decision {
    CommitWithout(Vec<Uuid>),
    RollBack,
}

/// The batch's insert, run in an open transaction on a blocking thread:
/// `began` once a (checked) connection is in hand, `inserted` once the rows
/// are in, then it waits for the [`Decision`].
fn run_transaction(
    pool: PgPool,
    records: Vec<NewJob>,
    began: oneshot::Sender<Result<(), String>>,
    inserted: oneshot::Sender<Result<(), String>>,
    decision: std::sync::mpsc::Receiver<Decision>,
) -> Result<(), String> {
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(err) => {
            let _ = began.send(Err(err.to_string()));
            return Err(err.to_string());
        }
    };
    // The pool checked the connection on checkout: the database is there, so
    // publishing may start while the transaction opens and the insert runs.
    let _ = began.send(Ok(()));
    let mut inserted = Some(inserted);
    let result = conn.transaction::<_, diesel::result::Error, _>(|conn| {
        let outcome = insert_records(conn, &records);
        if let Some(inserted) = inserted.take() {
            let _ = inserted.send(outcome.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
        outcome?;
        match decision.recv() {
            Ok(Decision::CommitWithout(failed)) => {
                if !failed.is_empty() {
                    diesel::delete(jobs::table.filter(jobs::id.eq_any(failed))).execute(conn)?;
                }
                Ok(())
            }
            _ => Err(diesel::result::Error::RollbackTransaction),
        }
    });
    if let Some(inserted) = inserted {
        // BEGIN itself failed.
        let _ = inserted.send(Err(result
            .as_ref()
            .err()
            .map_or_else(|| "transaction did not start".into(), |e| e.to_string())));
    }
    result.map_err(|e| e.to_string())
}

/// One constant statement for any batch size (prepared once per connection,
/// never re-planned), with one array parameter per column.
///
/// A worker that got a message before this insert reached its row has created
/// the row already (its state upsert): the insert keeps that state and adds
/// what only the ingress knows.
const INSERT: &str = "
INSERT INTO jobs (id, task, queue, state, args, max_attempts, idempotency_key, replay_of,
                  enqueued_at, next_attempt_at, producer)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int4[],
                     $7::text[], $8::uuid[], $9::timestamptz[], $10::timestamptz[], $11::text[])
ON CONFLICT (id) DO UPDATE SET
    producer = EXCLUDED.producer,
    idempotency_key = EXCLUDED.idempotency_key,
    replay_of = EXCLUDED.replay_of";

fn insert_records(conn: &mut PgConnection, records: &[NewJob]) -> QueryResult<usize> {
    use diesel::sql_types::{Array, Int4, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    diesel::sql_query(INSERT)
        .bind::<Array<SqlUuid>, _>(records.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(records.iter().map(|r| r.task.as_str()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(records.iter().map(|r| r.queue.as_str()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(records.iter().map(|r| r.state.as_str()).collect::<Vec<_>>())
        .bind::<Array<Jsonb>, _>(records.iter().map(|r| &r.args).collect::<Vec<_>>())
        .bind::<Array<Int4>, _>(records.iter().map(|r| r.max_attempts).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(
            records
                .iter()
                .map(|r| r.idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<SqlUuid>>, _>(
            records.iter().map(|r| r.replay_of).collect::<Vec<_>>(),
        )
        .bind::<Array<Timestamptz>, _>(records.iter().map(|r| r.enqueued_at).collect::<Vec<_>>())
        .bind::<Array<Nullable<Timestamptz>>, _>(
            records
                .iter()
                .map(|r| r.next_attempt_at)
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Text>>, _>(
            records
                .iter()
                .map(|r| r.producer.as_deref())
                .collect::<Vec<_>>(),
        )
        .execute(conn)
}

async fn commit_batch(
    mut batch: Vec<Submission>,
    db: &PgPool,
    publisher: &Publisher,
    metrics: &Metrics,
) {
    // Rows in id order, as the worker's state writer writes them: two
    // transactions that lock rows in one order cannot wait on each other.
    batch.sort_unstable_by_key(|submission| submission.record.id);
    let mut records = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for submission in batch {
        records.push(submission.record);
        messages.push(submission.message);
        replies.push(submission.reply);
    }
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    let started = std::time::Instant::now();

    let (began_tx, began_rx) = oneshot::channel();
    let (inserted_tx, inserted_rx) = oneshot::channel();
    let (decision_tx, decision_rx) = std::sync::mpsc::channel::<Decision>();
    let pool = db.clone();
    let transaction = tokio::task::spawn_blocking(move || {
        run_transaction(pool, records, began_tx, inserted_tx, decision_rx)
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
        Err(_) => {
            return reply_all(
                replies,
                SubmitError::Database("transaction task ended".into()),
            );
        }
    }
    let (inserted, results) = tokio::join!(inserted_rx, publisher.publish_all(&messages));
    let confirmed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let inserted = inserted.unwrap_or_else(|_| Err("transaction task ended".into()));
    let failed: Vec<Uuid> = ids
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_err())
        .map(|(id, _)| *id)
        .collect();
    let decision = if inserted.is_err() || failed.len() == ids.len() {
        Decision::RollBack
    } else {
        Decision::CommitWithout(failed)
    };
    let _ = decision_tx.send(decision);
    let committed = match (inserted, transaction.await) {
        (Err(err), _) => Err(err),
        (Ok(()), Ok(Ok(()))) => Ok(()),
        (Ok(()), Ok(Err(err))) if err.contains("rollback") || err.contains("Rollback") => Ok(()),
        (Ok(()), Ok(Err(err))) => Err(err),
        (Ok(()), Err(err)) => Err(err.to_string()),
    };
    if committed.is_err() {
        let in_doubt = results.iter().filter(|r| r.is_ok()).count();
        if in_doubt > 0 {
            tracing::warn!(
                in_doubt,
                "job records failed after their messages were confirmed; those jobs will run although their submitters got 503"
            );
        }
    }
    tracing::debug!(
        jobs = ids.len(),
        confirmed_ms,
        committed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "group commit"
    );
    for ((reply, result), message) in replies.into_iter().zip(results).zip(&messages) {
        let outcome = match (&committed, result) {
            (Err(err), _) => Err(SubmitError::Database(err.clone())),
            (Ok(()), Err(err)) => Err(SubmitError::Publish(err)),
            (Ok(()), Ok(())) => {
                let queue = message.routing_key.rsplit('.').next().unwrap_or("");
                metrics
                    .jobs_published
                    .with_label_values(&[message.task.as_str(), queue])
                    .inc();
                Ok(())
            }
        };
        let _ = reply.send(outcome);
    }
}
