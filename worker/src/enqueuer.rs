//! How tasks enqueue follow-up jobs: record them, then publish with confirms.
//!
//! Records are inserted with `ON CONFLICT DO NOTHING`, so a task that is retried
//! after a partial enqueue, and re-enqueues jobs with the same deterministic
//! ids, neither fails nor duplicates records.

use conveyor_platform::amqp::{Outgoing, PublishError, Publisher};
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
            let results = self.publisher.publish_all(&messages).await;
            count_published(&self.metrics, &jobs, results)
        }
        .boxed()
    }
}

/// Counts in `jobs_published` every job of `jobs` whose publish was confirmed
/// (`results[i]` is job *i*'s), whether or not others of the batch failed; the
/// error says how many failed and names the first.
fn count_published(
    metrics: &Metrics,
    jobs: &[Envelope],
    results: Vec<Result<(), PublishError>>,
) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for (result, envelope) in results.into_iter().zip(jobs) {
        match result {
            Ok(()) => {
                let queue = find_task(&envelope.task).map_or("", |t| t.options.queue);
                metrics
                    .jobs_published
                    .with_label_values(&[envelope.task.as_str(), queue])
                    .inc();
            }
            Err(err) => failed.push((envelope.id, err)),
        }
    }
    match failed.first() {
        None => Ok(()),
        Some((id, err)) => Err(anyhow::anyhow!(
            "publishing {} of {} jobs failed; the first, job {id}: {err}",
            failed.len(),
            jobs.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_confirmed_publish_is_counted_even_after_a_failure() {
        let metrics = Metrics::new();
        let jobs: Vec<Envelope> = (0..4)
            .map(|_| Envelope::new("diag.noop", json!({})))
            .collect();
        let failure = || Err(PublishError::Unavailable("not connected".into()));
        let err = count_published(&metrics, &jobs, vec![Ok(()), failure(), Ok(()), failure()])
            .unwrap_err()
            .to_string();
        let published = metrics
            .jobs_published
            .with_label_values(&["diag.noop", "default"])
            .get();
        assert_eq!(published, 2);
        assert!(
            err.contains("2 of 4") && err.contains(&jobs[1].id.to_string()),
            "{err}"
        );
        count_published(&metrics, &jobs, vec![Ok(()); 4]).unwrap();
        let published = metrics
            .jobs_published
            .with_label_values(&["diag.noop", "default"])
            .get();
        assert_eq!(published, 6);
    }
}
