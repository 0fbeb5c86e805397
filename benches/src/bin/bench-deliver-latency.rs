//! How long the broker alone takes from publish to delivery, on a quorum queue
//! (what Conveyor uses) and on a classic durable queue (what Dramatiq uses):
//! persistent messages at a steady rate, one consumer with manual acks, no
//! database. This separates the broker's share of the enqueue-to-start latency
//! (scenario 3) from Conveyor's own.

use std::time::{Duration, Instant};

use clap::Parser;
use conveyor_benches::Common;
use conveyor_benches::broker::{declare_queue, stop_consuming};
use conveyor_benches::results::Recorder;
use conveyor_platform::amqp::connect;
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Messages per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds per queue type.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// Publish-to-delivery latencies in ms, sorted, for one queue type.
async fn measure(args: &Args, queue_type: &str) -> anyhow::Result<Vec<f64>> {
    let common = &args.common;
    let queue = ShortString::from(format!("{}.latency-{queue_type}", common.namespace));
    let connection = connect(&[common.amqp_url.as_str()], "conveyor-bench-latency").await?;
    let channel = connection.create_channel().await?;
    declare_queue(&channel, &queue, queue_type).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consumer_channel = connection.create_channel().await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.clone(),
            ShortString::from("latency"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let origin = Instant::now();
    let total = usize::try_from(args.rate * args.seconds)?;
    let receiving = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            let Some(delivery) = consumer.next().await else {
                anyhow::bail!("consumer ended");
            };
            let delivery = delivery?;
            let sent_ns = u64::from_le_bytes(delivery.data[..8].try_into()?);
            let now_ns = u64::try_from(origin.elapsed().as_nanos())?;
            latencies.push(now_ns.saturating_sub(sent_ns) as f64 / 1e6);
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        anyhow::Ok((latencies, consumer))
    });
    let properties = BasicProperties::default().with_delivery_mode(2);
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate));
    let mut confirms = Vec::with_capacity(total);
    for _ in 0..total {
        tick.tick().await;
        let mut body = u64::try_from(origin.elapsed().as_nanos())?
            .to_le_bytes()
            .to_vec();
        body.resize(200, b' ');
        confirms.push(
            channel
                .basic_publish(
                    ShortString::from(""),
                    queue.clone(),
                    BasicPublishOptions::default(),
                    &body,
                    properties.clone(),
                )
                .await?,
        );
    }
    for confirm in confirms {
        confirm.await?;
    }
    let (mut latencies, consumer) = receiving.await??;
    latencies.sort_by(f64::total_cmp);
    stop_consuming(&consumer_channel, &consumer).await?;
    channel
        .queue_delete(queue, QueueDeleteOptions::default())
        .await?;
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(latencies)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for queue_type in ["quorum", "classic"] {
        let latencies = measure(&args, queue_type).await?;
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        println!(
            "{queue_type}: {} messages at {}/s, publish-to-delivery p50 {p50:.2} ms, p99 {p99:.2} ms",
            latencies.len(),
            args.rate
        );
        let out = Recorder::new(&args.common, "broker_latency", queue_type);
        out.put("p50_ms", p50, "ms")?;
        out.put("p99_ms", p99, "ms")?;
    }
    Ok(())
}
