//! Group commit of new jobs: record and publish many submissions together.
//!
//! A 202 must mean that both the job record and a broker-confirmed message
//! exist, and a failed publish must leave no record behind. Doing that per
//! request (one transaction, one confirm round trip) caps the ingress near the
//! database's single-commit rate, so submissions are batched:
//!
//! 1. the batch's records are inserted in one open transaction;
//! 2. the messages are published on one confirm channel, pipelined;
//! 3. records whose publish failed are deleted, then the transaction commits;
//! 4. each waiting request is answered: 202 for a committed and confirmed job, 503 otherwise.
//!
//! A worker that receives a message before step 3 commits simply waits on the
//! row lock (its upsert conflicts with the uncommitted insert). Batching is
//! natural: whatever arrived while the previous batches were in flight forms
//! the next one, so a lone request is never delayed by a timer.

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

async fn commit_batch(
    batch: Vec<Submission>,
    db: &PgPool,
    publisher: &Publisher,
    metrics: &Metrics,
) {
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

    let (inserted_tx, inserted_rx) = oneshot::channel::<Result<(), String>>();
    let (decision_tx, decision_rx) = std::sync::mpsc::channel::<Decision>();
    let pool = db.clone();
    let transaction = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut conn = match pool.get() {
            Ok(conn) => conn,
            Err(err) => {
                let _ = inserted_tx.send(Err(err.to_string()));
                return Err(err.to_string());
            }
        };
        let mut inserted_tx = Some(inserted_tx);
        let result = conn.transaction::<_, diesel::result::Error, _>(|conn| {
            let inserted = diesel::insert_into(jobs::table)
                .values(&records)
                .execute(conn);
            let signal = inserted_tx.take();
            if let Err(err) = inserted {
                if let Some(signal) = signal {
                    let _ = signal.send(Err(err.to_string()));
                }
                return Err(err);
            }
            if let Some(signal) = signal {
                let _ = signal.send(Ok(()));
            }
            match decision_rx.recv() {
                Ok(Decision::CommitWithout(failed)) => {
                    if !failed.is_empty() {
                        diesel::delete(jobs::table.filter(jobs::id.eq_any(failed)))
                            .execute(conn)?;
                    }
                    Ok(())
                }
                _ => Err(diesel::result::Error::RollbackTransaction),
            }
        });
        result.map_err(|e| e.to_string())
    });

    let reply_all = |replies: Vec<oneshot::Sender<Result<(), SubmitError>>>, err: SubmitError| {
        for reply in replies {
            let _ = reply.send(Err(err.clone()));
        }
    };
    match inserted_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return reply_all(replies, SubmitError::Database(err)),
        Err(_) => {
            return reply_all(
                replies,
                SubmitError::Database("transaction task ended".into()),
            );
        }
    }
    let inserted_ms = started.elapsed().as_secs_f64() * 1000.0;
    let results = publisher.publish_all(&messages).await;
    let confirmed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let failed: Vec<Uuid> = ids
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_err())
        .map(|(id, _)| *id)
        .collect();
    let decision = if failed.len() == ids.len() {
        Decision::RollBack
    } else {
        Decision::CommitWithout(failed)
    };
    let _ = decision_tx.send(decision);
    let committed = match transaction.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) if err.contains("rollback") || err.contains("Rollback") => Ok(()),
        Ok(Err(err)) => Err(err),
        Err(err) => Err(err.to_string()),
    };
    tracing::debug!(
        jobs = ids.len(),
        inserted_ms,
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
