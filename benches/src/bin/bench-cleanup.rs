//! Removes a bench namespace from the broker: every queue and exchange the
//! topology declares, plus the ceiling queue.

use clap::Parser;
use conveyor_benches::{Common, broker::Admin};
use conveyor_platform::amqp::Topology;
use lapin::options::QueueDeleteOptions;
use lapin::types::ShortString;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let topology = Topology::for_config(&args.common.config());
    let admin = Admin::connect(&args.common.amqp_url).await?;
    admin.delete(&topology).await?;
    admin
        .channel
        .queue_delete(
            ShortString::from(format!("{}.ceiling", args.common.namespace)),
            QueueDeleteOptions::default(),
        )
        .await?;
    admin.close().await;
    println!("removed broker namespace {}", args.common.namespace);
    Ok(())
}
