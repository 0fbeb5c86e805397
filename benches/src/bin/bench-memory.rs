//! The memory targets of the worker: resident memory of an idle `conveyor
//! worker`, then of the same process once 10 000 delayed jobs exist (they wait
//! in the broker's delay queues, so the worker should hold none of them).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use conveyor_benches::http::memory_mib;
use conveyor_benches::procs::WorkerProcess;
use conveyor_benches::results::Recorder;
use conveyor_benches::{Common, db, preload};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Delayed jobs to create.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// The release `conveyor` binary.
    #[arg(long)]
    conveyor_bin: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let common = &args.common;
    let db = db::pool(&common.database_url);
    db::truncate_jobs(&db).await?;
    let worker = WorkerProcess::spawn(&args.conveyor_bin, common)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, idle) = memory_mib(worker.pid())?;
    preload::noop_jobs(
        common,
        args.jobs,
        Some(Duration::from_secs(600)),
        preload::FAST,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, holding) = memory_mib(worker.pid())?;
    worker.stop();
    println!(
        "worker rss idle {idle:.1} MiB, with {} delayed jobs {holding:.1} MiB",
        args.jobs
    );
    let out = Recorder::new(common, "memory", "conveyor");
    out.put("worker_idle_rss", idle, "MiB")?;
    out.put("worker_delayed_rss", holding, "MiB")?;
    Ok(())
}
