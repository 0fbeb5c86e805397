//! The scheduler loop every worker runs: fires each tick of each schedule
//! exactly once across all workers.
//!
//! Each pass reads the database clock and the latest claimed tick of every
//! schedule, works out the due ticks (`plan`), claims each in Postgres
//! (`claim`; one winner per tick, whatever the number of workers), publishes
//! the winner's job with a confirm, and re-publishes ticks that a dead worker
//! claimed but never published. Ticks are computed against the database's
//! clock, not the worker's, so workers whose clocks drift apart still agree on
//! which ticks are due; the local clock is used only to sleep until the next
//! tick (corrected by the measured offset). No pass runs while the worker's
//! publisher is not connected: a tick claimed then would wait for the
//! re-publish sweep.

mod claim;
mod plan;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use conveyor_platform::amqp::{Outgoing, Publisher};
use conveyor_platform::metrics::Metrics;
use conveyor_platform::schedule::{Schedule, SchedulerConfig};
use conveyor_schema::pool::PgPool;
use conveyor_schema::{Envelope, find_task};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the loop needs.
pub struct Scheduler {
    /// Where ticks are claimed and jobs recorded.
    pub db: PgPool,
    /// Confirmed publishing of the ticks' jobs.
    pub publisher: Publisher,
    /// Counts published jobs.
    pub metrics: Metrics,
    /// Every schedule in force.
    pub schedules: Arc<Vec<Schedule>>,
    /// Grace, re-publish delay, longest sleep.
    pub config: SchedulerConfig,
    /// Recorded in the tick rows this worker claims.
    pub worker_id: String,
}

impl Scheduler {
    /// Runs the loop until `stop` is cancelled. Does nothing when there are no schedules.
    pub fn spawn(self, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            if self.schedules.is_empty() {
                return;
            }
            tracing::info!(schedules = self.schedules.len(), "scheduler started");
            loop {
                // A tick claimed while its job cannot be published waits for
                // the re-publish sweep (`republish_after_ms`, 15 s): claim none
                // until the publisher is connected (at start, or after a
                // broker outage).
                if !self.publisher.is_ready() {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = self.publisher.wait_connected(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
                let wait = match self.pass().await {
                    Ok(wait) => wait,
                    Err(err) => {
                        tracing::warn!(error = format!("{err:#}"), "scheduler pass failed");
                        Duration::from_secs(1)
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            tracing::info!("scheduler stopped");
        })
    }

    /// One look at the database; returns how long to sleep before the next.
    async fn pass(&self) -> anyhow::Result<Duration> {
        let names = self.schedules.iter().map(|s| s.name().to_owned()).collect();
        let asked_at = Utc::now();
        let (db_now, lasts) = claim::read_state(&self.db, names).await?;
        let offset = db_now - asked_at;
        let grace = chrono::Duration::milliseconds(
            i64::try_from(self.config.grace_ms).unwrap_or(i64::MAX / 2),
        );
        for schedule in self.schedules.iter() {
            let last = lasts.get(schedule.name()).copied();
            for due in plan::due_ticks(schedule, last, db_now, grace) {
                let config = &schedule.config;
                let claimed = claim::claim(
                    &self.db,
                    &config.name,
                    &config.task,
                    &config.args,
                    due,
                    &self.worker_id,
                )
                .await?;
                if let Some(envelope) = claimed {
                    tracing::info!(
                        schedule = %config.name, tick = %due.tick_at, catch_up = due.catch_up,
                        job.id = %envelope.id, "tick claimed"
                    );
                    self.publish(&config.name, due.tick_at, &envelope).await;
                }
            }
        }
        for stale in
            claim::take_stale(&self.db, &self.worker_id, self.config.republish_after_ms).await?
        {
            tracing::warn!(
                schedule = %stale.schedule, tick = %stale.tick_at, job.id = %stale.envelope.id,
                "re-publishing a tick its claimer left unpublished"
            );
            self.publish(&stale.schedule, stale.tick_at, &stale.envelope)
                .await;
        }
        let db_now = Utc::now() + offset;
        let max_sleep = Duration::from_millis(self.config.max_sleep_ms);
        let wait = self
            .schedules
            .iter()
            .filter_map(|s| s.next_after(db_now))
            .min()
            .and_then(|next| (next - db_now).to_std().ok())
            .map_or(max_sleep, |wait| wait.min(max_sleep));
        // Wake just after the tick rather than just before it.
        Ok(wait + Duration::from_millis(2))
    }

    /// Publishes a tick's job and marks the tick published. A failure is
    /// logged and left to the re-publish sweep.
    async fn publish(&self, schedule: &str, tick_at: chrono::DateTime<Utc>, envelope: &Envelope) {
        let Some(task) = find_task(&envelope.task) else {
            tracing::error!(task = %envelope.task, "scheduled task is not in the catalogue");
            return;
        };
        let message = Outgoing::job(self.publisher.topology(), task.options.queue, envelope);
        match self.publisher.publish(&message).await {
            Ok(()) => {
                self.metrics
                    .jobs_published
                    .with_label_values(&[task.name, task.options.queue])
                    .inc();
                if let Err(err) =
                    claim::mark_published(&self.db, schedule.to_owned(), tick_at).await
                {
                    tracing::warn!(error = %err, schedule, "could not mark a tick published");
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, schedule, tick = %tick_at, "publishing a tick's job failed; it will be re-published");
            }
        }
    }
}
