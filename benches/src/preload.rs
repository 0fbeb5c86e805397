//! Filling a queue fast, exactly as the ingress does it: the ingress's own
//! group-commit [`Recorder`] inserts the records and publishes with pipelined
//! confirms, without the HTTP hop (scenario 2 measures draining, not enqueueing).

use std::time::{Duration, Instant};

use conveyor_ingress::recorder::Recorder;
use conveyor_platform::amqp::{Outgoing, Publisher, Topology, delay_level_for};
use conveyor_platform::metrics::Metrics;
use conveyor_schema::models::NewJob;
use conveyor_schema::{Envelope, find_task};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::Common;

/// Submissions a preload keeps in flight: enough that the recorder, not the
/// number of waiting submitters, sets the pace.
pub const FAST: usize = 4096;

/// Records and publishes `count` `diag.noop` jobs (delayed by `delay` when set),
/// with `in_flight` submissions waiting at a time; returns the rate achieved,
/// in jobs per second.
pub async fn noop_jobs(
    common: &Common,
    count: usize,
    delay: Option<Duration>,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let config = common.config();
    let topology = Topology::for_config(&config);
    let stop = CancellationToken::new();
    let publisher = Publisher::start(
        &config.amqp_urls(),
        "conveyor-bench-preload",
        topology.clone(),
        config.ingress.publisher_channels,
        config.publish_timeout(),
        stop.clone(),
    );
    anyhow::ensure!(
        publisher.wait_connected(Duration::from_secs(10)).await,
        "preload: broker not reachable"
    );
    let recorder = Recorder::start(
        &conveyor_platform::config::database_url(&config),
        publisher,
        Metrics::new(),
        &config.ingress,
    )?;
    let task = find_task("diag.noop").ok_or_else(|| anyhow::anyhow!("no diag.noop"))?;
    let started = Instant::now();
    let failures = futures::stream::iter(0..count)
        .map(|_| {
            let recorder = recorder.clone();
            let topology = &topology;
            async move {
                let mut envelope = Envelope::new(task.name, serde_json::json!({}));
                let queue = task.options.queue;
                let message = match delay {
                    Some(delay) => {
                        envelope.not_before = Some(envelope.enqueued_at + delay);
                        Outgoing::delayed(topology, queue, &envelope, delay_level_for(delay))
                    }
                    None => Outgoing::job(topology, queue, &envelope),
                };
                let record = NewJob::queued(&envelope, &task.options);
                recorder.submit(record, message).await.is_err()
            }
        })
        .buffer_unordered(in_flight.max(1))
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    anyhow::ensure!(failures == 0, "preload: {failures} jobs were refused");
    Ok(rate)
}
