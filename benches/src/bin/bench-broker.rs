//! The ceiling: what the broker alone does on this machine, with the same
//! guarantees Conveyor gives. A minimal lapin publisher sends persistent
//! messages (a real envelope as the body) to a quorum queue with publisher
//! confirms pipelined (a window of outstanding confirms), then a consumer with
//! manual acks drains it, acknowledging off the receive loop in `multiple` batches.
//!
//! `--publish-only --window 64` gives the publisher alone with as many confirms
//! outstanding as the HTTP enqueue has connections (64): the most 64 requests
//! that each wait for their confirm could get from this broker.

use std::time::Instant;

use clap::Parser;
use conveyor_benches::Common;
use conveyor_benches::broker::{declare_queue, stop_consuming};
use conveyor_benches::results::Recorder;
use conveyor_platform::amqp::connect;
use conveyor_schema::Envelope;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Messages to publish, then consume.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Unconfirmed publishes allowed in flight.
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    window: usize,
    /// Publish only (then delete the queue); the rate is recorded as
    /// `publish_rate_window_<window>` unless the window is the default.
    #[arg(long)]
    publish_only: bool,
    /// Consumer prefetch.
    #[arg(long, default_value_t = 1000)]
    prefetch: u16,
    /// Deliveries settled by one `multiple` ack (1 = ack each delivery); default prefetch / 4.
    #[arg(long)]
    ack_batch: Option<usize>,
}

/// The window of the ceiling the targets compare against.
const DEFAULT_WINDOW: usize = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let common = &args.common;
    let queue = ShortString::from(format!("{}.ceiling", common.namespace));
    let connection = connect(&[common.amqp_url.as_str()], "conveyor-bench-ceiling").await?;
    let channel = connection.create_channel().await?;
    declare_queue(&channel, &queue, "quorum").await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = Envelope::new("diag.noop", serde_json::json!({})).encode();
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"));

    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut failed = 0usize;
    for _ in 0..args.messages {
        if pending.len() >= args.window
            && let Some(confirm) = pending.next().await
        {
            failed += usize::from(!matches!(confirm, Ok(Confirmation::Ack(None))));
        }
        let confirm = channel
            .basic_publish(
                ShortString::from(""),
                queue.clone(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await?;
        pending.push(confirm);
    }
    while let Some(confirm) = pending.next().await {
        failed += usize::from(!matches!(confirm, Ok(Confirmation::Ack(None))));
    }
    let publish_rate = args.messages as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(failed == 0, "{failed} publishes were not confirmed");
    let out = Recorder::new(common, "ceiling", "ceiling");
    let publish_metric = if args.window == DEFAULT_WINDOW {
        "publish_rate".to_owned()
    } else {
        format!("publish_rate_window_{}", args.window)
    };
    out.put(&publish_metric, publish_rate, "msg/s")?;
    println!(
        "ceiling: publish {publish_rate:.0}/s (window {})",
        args.window
    );
    if !args.publish_only {
        let (metric, consume_rate) = consume_all(&connection, &queue, &args).await?;
        println!("ceiling: consume {consume_rate:.0}/s");
        out.put(metric, consume_rate, "msg/s")?;
    }
    channel
        .queue_delete(queue, QueueDeleteOptions::default())
        .await?;
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(())
}

/// Consumes the `args.messages` published to `queue` with manual acks; returns
/// the metric's name (by ack mode) and the rate.
async fn consume_all(
    connection: &lapin::Connection,
    queue: &ShortString,
    args: &Args,
) -> anyhow::Result<(&'static str, f64)> {
    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.clone(),
            ShortString::from("ceiling"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Acks leave in order from one task, off the receive loop; each acks a batch (`multiple`).
    let (acks, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<lapin::Acker>();
    let acking = tokio::spawn(async move {
        while let Some(acker) = ack_rx.recv().await {
            acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        anyhow::Ok(())
    });
    let started = Instant::now();
    let batch = args
        .ack_batch
        .unwrap_or(usize::from(args.prefetch / 4))
        .max(1);
    let mut received = 0usize;
    while received < args.messages {
        let Some(delivery) = consumer.next().await else {
            anyhow::bail!("consumer ended after {received} messages");
        };
        let delivery = delivery?;
        received += 1;
        if received.is_multiple_of(batch) || received == args.messages {
            let _ = acks.send(delivery.acker);
        }
    }
    drop(acks);
    acking.await??;
    let consume_rate = args.messages as f64 / started.elapsed().as_secs_f64();
    stop_consuming(&consumer_channel, &consumer).await?;
    let metric = if batch == 1 {
        "consume_rate_single_acks"
    } else {
        "consume_rate"
    };
    Ok((metric, consume_rate))
}
