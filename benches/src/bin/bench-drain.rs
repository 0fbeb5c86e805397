//! Scenario 2, drain: pre-enqueue N `diag.noop` jobs, start K `conveyor worker`
//! processes, and time until every job is `succeeded` in the database.
//!
//! The rate is N over the time from the first attempt's start to the last
//! job's finish (both read from the job records, so process start-up is not
//! counted); the wall-clock rate from spawning the processes is reported too.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use conveyor_benches::procs::WorkerProcess;
use conveyor_benches::results::Recorder;
use conveyor_benches::{Common, Fresh, db, preload};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Jobs to drain.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The release `conveyor` binary.
    #[arg(long)]
    conveyor_bin: PathBuf,
    /// Give up after this long.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let common = &args.common;
    let Fresh {
        db,
        admin,
        work_queue,
    } = Fresh::start(common).await?;

    let preload_rate = preload::noop_jobs(common, args.jobs, None, preload::FAST).await?;
    let queued = admin.depth(&work_queue).await? as usize;
    println!(
        "preloaded {} jobs at {preload_rate:.0}/s; {queued} in the queue",
        args.jobs
    );
    anyhow::ensure!(
        queued == args.jobs,
        "expected {} queued messages",
        args.jobs
    );

    let target = i64::try_from(args.jobs)?;
    let spawned = Instant::now();
    let workers = (0..args.workers)
        .map(|_| WorkerProcess::spawn(&args.conveyor_bin, common))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = spawned + Duration::from_secs(args.timeout_seconds);
    loop {
        // The broker's queue depth is free to read; a count over the jobs table is a
        // sequential scan that would take CPU from the workers being measured. So the
        // table is counted only once the queue holds no more ready messages.
        let done = if admin.depth(&work_queue).await? > 0 {
            0
        } else {
            db::count_state(&db, "succeeded").await?
        };
        if done >= target {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {target} jobs succeeded within {} s",
            args.timeout_seconds
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = spawned.elapsed().as_secs_f64();
    for worker in workers {
        worker.stop();
    }
    let busy = db::busy_span_seconds(&db).await?;
    let rate = args.jobs as f64 / busy;
    println!(
        "{} worker(s): {} jobs in {busy:.2} s busy ({rate:.0}/s), {wall:.2} s from spawn",
        args.workers, args.jobs
    );
    let scenario = format!("drain_{}w", args.workers);
    let out = Recorder::new(common, &scenario, "conveyor");
    out.put("rate", rate, "jobs/s")?;
    out.put("rate_from_spawn", args.jobs as f64 / wall, "jobs/s")?;
    Recorder::new(common, "preload", "conveyor").put("rate", preload_rate, "jobs/s")?;
    admin.close().await;
    Ok(())
}
