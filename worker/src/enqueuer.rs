//! How tasks enqueue follow-up jobs: record them, then publish with confirms.
//!
//! Records are inserted with `ON CONFLICT DO NOTHING`, so a task that is retried
//! after a partial enqueue, and re-enqueues jobs with the same deterministic
//! ids, neither fails nor duplicates records.

use conveyor_platform::amqp::{Outgoing, Publisher};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::db::jobs;
use conveyor_schema::models::NewJob;
use conveyor_schema::pool::PgPool;
use conveyor_schema::{Envelope, find_task};
use conveyor_tasks::Enqueue;
use diesel::prelude::*;
use futures::FutureExt;
use futures::future::BoxFuture;

/// The worker's [`Enqueue`] implementation.
pub struct Enqueuer {
    /// Where records go.
    pub db: PgPool,
    /// Where messages go.
    pub publisher: Publisher,
    /// Counts published jobs.
    pub metrics: Metrics,
}

impl Enqueue for Enqueuer {
    fn enqueue(&self, jobs: Vec<Envelope>) -> BoxFuture<'_, anyhow::Result<()>> {
        async move {
            if jobs.is_empty() {
                return Ok(());
            }
            let mut records = Vec::with_capacity(jobs.len());
            let mut messages = Vec::with_capacity(jobs.len());
            for envelope in &jobs {
                let task = find_task(&envelope.task).ok_or_else(|| {
                    anyhow::anyhow!("cannot enqueue unknown task `{}`", envelope.task)
                })?;
                records.push(NewJob::queued(envelope, &task.options));
                messages.push(Outgoing::job(
                    self.publisher.topology(),
                    task.options.queue,
                    envelope,
                ));
            }
            conveyor_schema::pool::run(&self.db, move |conn| {
                diesel::insert_into(jobs::table)
                    .values(&records)
                    .on_conflict(jobs::id)
                    .do_nothing()
                    .execute(conn)
            })
            .await?;
            for (result, envelope) in self
                .publisher
                .publish_all(&messages)
                .await
                .into_iter()
                .zip(&jobs)
            {
                result.map_err(|err| {
                    anyhow::anyhow!("publishing job {} failed: {err}", envelope.id)
                })?;
                let queue = find_task(&envelope.task).map_or("", |t| t.options.queue);
                self.metrics
                    .jobs_published
                    .with_label_values(&[envelope.task.as_str(), queue])
                    .inc();
            }
            Ok(())
        }
        .boxed()
    }
}
