//! Every Prometheus metric Conveyor exports, declared in one place.
//!
//! Per-instance metrics (each ingress or worker process counts its own; sum
//! them across instances): `conveyor_jobs_*_total`, `conveyor_job_*_seconds`,
//! `conveyor_jobs_in_flight`, `conveyor_http_*`, `conveyor_webhooks_*`,
//! `conveyor_worker_*`. Service-wide metrics (polled
//! from the broker by the ingress only, so there is one set per deployment, not
//! one per worker): `conveyor_queue_*`, `conveyor_workers` and
//! `conveyor_dead_jobs`, each carrying the constant label `scope="service"` so
//! a query can tell them apart. Names follow Prometheus conventions: base units,
//! `_total` for counters, `_seconds` for durations.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Labels of the per-task metrics.
pub const TASK_LABELS: [&str; 2] = ["task", "queue"];

/// The process's metrics and the registry that serves them.
#[derive(Clone)]
pub struct Metrics {
    /// What `/metrics` renders.
    pub registry: Registry,
    /// Jobs confirmed by the broker after publishing (ingress, and tasks enqueueing children).
    pub jobs_published: IntCounterVec,
    /// Attempts started.
    pub jobs_started: IntCounterVec,
    /// Jobs finished successfully.
    pub jobs_succeeded: IntCounterVec,
    /// Attempts that failed and were scheduled for another attempt.
    pub jobs_retried: IntCounterVec,
    /// Jobs that reached the dead-letter queue.
    pub jobs_dead: IntCounterVec,
    /// Messages acknowledged without running: their job's record showed it
    /// finished, at a later attempt, or (a keyed job's second message) running.
    pub jobs_skipped: IntCounterVec,
    /// Redelivered messages held back because their attempt was running
    /// under a worker still alive (counted once per message). Worker.
    pub jobs_held_for_runner: IntCounterVec,
    /// Messages the broker dead-lettered for its delivery limit whose attempt
    /// had never started, given back to their work queue instead. Worker.
    pub jobs_delivery_limit_resets: IntCounterVec,
    /// Messages the broker dead-lettered for its delivery limit whose job had
    /// already succeeded (stale copies whose acks were lost), acknowledged
    /// without a dead-job record. Worker.
    pub jobs_delivery_limit_already_succeeded: IntCounterVec,
    /// Attempts running now.
    pub jobs_in_flight: IntGaugeVec,
    /// Run time of one attempt.
    pub job_duration: HistogramVec,
    /// Time from enqueue (or retry due time) to start.
    pub job_queue_wait: HistogramVec,
    /// HTTP requests served, by route template and status.
    pub http_requests: IntCounterVec,
    /// HTTP latency by route template.
    pub http_duration: HistogramVec,
    /// Messages waiting in broker queues, by queue and kind (`work`, `delay`, `dead_letter`). Service-wide.
    pub queue_messages_ready: IntGaugeVec,
    /// Consumers on each work queue. Service-wide.
    pub queue_consumers: IntGaugeVec,
    /// Age of the oldest job still `queued` or `retrying`, per queue. Service-wide.
    pub queue_oldest_job_age: prometheus::GaugeVec,
    /// Waiting jobs divided by live workers, per queue: the autoscaling target. Service-wide.
    pub queue_backlog_per_worker: prometheus::GaugeVec,
    /// Workers by heartbeat state (`live`, `gone`). Service-wide.
    pub workers: IntGaugeVec,
    /// Dead-job records neither replayed nor discarded, per queue. Service-wide.
    pub dead_jobs: IntGaugeVec,
    /// Always 1; labels carry version and git commit.
    pub build_info: IntGaugeVec,
    /// Inbound webhooks by configured source (`unknown` for any other name) and
    /// outcome (`accepted`, `duplicate`, or the rejection reason). Per-instance.
    pub webhooks_received: IntCounterVec,
    /// Jobs answered 503 that may run all the same, by reason: `unconfirmed`
    /// (the publish timed out, failed mid-way or was nacked), `unrecorded`
    /// (confirmed, but the record could not be written) or `abandoned`
    /// (recorded and confirmed after its request timed out or its client
    /// left). Ingress.
    pub jobs_in_doubt: IntCounterVec,
    /// Confirmed jobs whose group commit failed and whose record was then
    /// written again, so that they were accepted after all. Ingress.
    pub jobs_recorded_again: IntCounter,
    /// Job state changes (and dead-job records) PostgreSQL refused on their
    /// own, for what they hold: not retried, their deliveries dead-lettered
    /// instead. Worker.
    pub state_rows_refused: IntCounter,
}

/// The reasons of [`Metrics::jobs_in_doubt`].
pub const IN_DOUBT_REASONS: [&str; 3] = ["unconfirmed", "unrecorded", "abandoned"];

/// The constant label on every service-wide metric.
pub const SERVICE_SCOPE: (&str, &str) = ("scope", "service");

fn service_opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).const_label(SERVICE_SCOPE.0, SERVICE_SCOPE.1)
}

fn service_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(service_opts(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn service_float_gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::GaugeVec {
    let metric = prometheus::GaugeVec::new(service_opts(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn plain_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0,
    ];
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

impl Metrics {
    /// A fresh registry with every metric registered. The names are constants,
    /// so a failure here is a programming error caught by the first test.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let metrics = Self {
            jobs_published: counter(
                r,
                "conveyor_jobs_published_total",
                "Jobs published and confirmed by the broker.",
                &TASK_LABELS,
            ),
            jobs_started: counter(
                r,
                "conveyor_jobs_started_total",
                "Job attempts started.",
                &TASK_LABELS,
            ),
            jobs_succeeded: counter(
                r,
                "conveyor_jobs_succeeded_total",
                "Jobs that succeeded.",
                &TASK_LABELS,
            ),
            jobs_retried: counter(
                r,
                "conveyor_jobs_retried_total",
                "Failed attempts scheduled for a retry.",
                &TASK_LABELS,
            ),
            jobs_dead: counter(
                r,
                "conveyor_jobs_dead_total",
                "Jobs dead-lettered.",
                &TASK_LABELS,
            ),
            jobs_skipped: counter(
                r,
                "conveyor_jobs_skipped_total",
                "Messages acknowledged without running: their job had finished, moved on, or (a second message of a keyed job) was running.",
                &TASK_LABELS,
            ),
            jobs_held_for_runner: counter(
                r,
                "conveyor_jobs_held_for_runner_total",
                "Redelivered messages held back while their attempt ran under a worker still alive, instead of running beside it.",
                &TASK_LABELS,
            ),
            jobs_delivery_limit_resets: counter(
                r,
                "conveyor_jobs_delivery_limit_resets_total",
                "Messages dead-lettered by the broker's delivery limit before their attempt started, returned to their queue.",
                &TASK_LABELS,
            ),
            jobs_delivery_limit_already_succeeded: counter(
                r,
                "conveyor_jobs_delivery_limit_already_succeeded_total",
                "Messages dead-lettered by the broker's delivery limit whose job had already succeeded, acknowledged without a dead-job record.",
                &TASK_LABELS,
            ),
            jobs_in_flight: gauge(
                r,
                "conveyor_jobs_in_flight",
                "Job attempts running now.",
                &TASK_LABELS,
            ),
            job_duration: histogram(
                r,
                "conveyor_job_duration_seconds",
                "Run time of one attempt.",
                &TASK_LABELS,
            ),
            job_queue_wait: histogram(
                r,
                "conveyor_job_queue_wait_seconds",
                "Time from enqueue to start of an attempt.",
                &TASK_LABELS,
            ),
            http_requests: counter(
                r,
                "conveyor_http_requests_total",
                "HTTP requests served.",
                &["route", "status"],
            ),
            http_duration: histogram(
                r,
                "conveyor_http_request_duration_seconds",
                "HTTP request latency.",
                &["route"],
            ),
            queue_messages_ready: service_gauge(
                r,
                "conveyor_queue_messages_ready",
                "Messages ready in a broker queue (service-wide).",
                &["queue", "kind"],
            ),
            queue_consumers: service_gauge(
                r,
                "conveyor_queue_consumers",
                "Consumers on a work queue (service-wide).",
                &["queue"],
            ),
            queue_oldest_job_age: service_float_gauge(
                r,
                "conveyor_queue_oldest_job_age_seconds",
                "Age of the oldest waiting job (service-wide).",
                &["queue"],
            ),
            queue_backlog_per_worker: service_float_gauge(
                r,
                "conveyor_queue_backlog_per_worker",
                "Waiting jobs per live worker: the autoscaling target (service-wide).",
                &["queue"],
            ),
            workers: service_gauge(
                r,
                "conveyor_workers",
                "Workers by heartbeat state: live or gone (service-wide).",
                &["state"],
            ),
            dead_jobs: service_gauge(
                r,
                "conveyor_dead_jobs",
                "Dead-job records neither replayed nor discarded (service-wide).",
                &["queue"],
            ),
            build_info: gauge(
                r,
                "conveyor_build_info",
                "Build information; always 1.",
                &["version", "commit"],
            ),
            webhooks_received: counter(
                r,
                "conveyor_webhooks_received_total",
                "Inbound webhooks by source and outcome (accepted, duplicate or why rejected).",
                &["source", "outcome"],
            ),
            jobs_in_doubt: counter(
                r,
                "conveyor_jobs_in_doubt_total",
                "Jobs answered 503 that may run all the same, by reason (unconfirmed, unrecorded, abandoned).",
                &["reason"],
            ),
            jobs_recorded_again: plain_counter(
                r,
                "conveyor_jobs_recorded_again_total",
                "Confirmed jobs recorded again after their group commit failed, then accepted.",
            ),
            state_rows_refused: plain_counter(
                r,
                "conveyor_worker_state_rows_refused_total",
                "Job state changes and dead-job records PostgreSQL refused on their own (for their data); not retried, their deliveries dead-lettered instead.",
            ),
            registry,
        };
        // Exported from the start, so that a rate over them is 0 rather than absent.
        for reason in IN_DOUBT_REASONS {
            metrics.jobs_in_doubt.with_label_values(&[reason]);
        }
        metrics
            .build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("BUILD_GIT_COMMIT").unwrap_or("unknown"),
            ])
            .set(1);
        metrics
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn registers_without_conflict() {
        let text = super::Metrics::new().render();
        assert!(text.contains("conveyor_build_info"));
    }
}
