//! Scenario 3, end-to-end latency: `diag.noop` posted at a steady rate (open
//! loop: each request leaves on schedule whatever the previous ones did) to a
//! running ingress with one `conveyor worker` process consuming. Reports
//! enqueue-to-start and enqueue-to-finish p50/p99 from the job records
//! (`enqueued_at` is stamped by the ingress when it accepts the request).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use conveyor_benches::http::{Client, NOOP_JOB};
use conveyor_benches::procs::WorkerProcess;
use conveyor_benches::results::Recorder;
use conveyor_benches::stats::{ms, quantile_ms};
use conveyor_benches::{Common, Fresh, db};
use tokio::time::MissedTickBehavior;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// The ingress under test.
    #[arg(long)]
    addr: SocketAddr,
    /// Jobs per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// How long.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Connections the requests are spread over.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// The release `conveyor` binary.
    #[arg(long)]
    conveyor_bin: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let common = &args.common;
    let Fresh { db, admin, .. } = Fresh::start(common).await?;
    let worker = WorkerProcess::spawn(&args.conveyor_bin, common)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Connection i sends at t0 + (i + k·C)/rate, so together they send `rate` per second.
    let period = Duration::from_secs_f64(f64::from(args.connections) / f64::from(args.rate));
    let total = u64::from(args.rate) * args.seconds;
    let t0 = tokio::time::Instant::now() + Duration::from_millis(100);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let addr = args.addr;
        let offset = Duration::from_secs_f64(f64::from(i) / f64::from(args.rate));
        let sends = total / u64::from(args.connections)
            + u64::from(u64::from(i) < total % u64::from(args.connections));
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await?;
            let mut ticks = tokio::time::interval_at(t0 + offset, period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut ids = Vec::new();
            let mut latencies = Vec::new();
            for _ in 0..sends {
                ticks.tick().await;
                let outcome = client.enqueue(NOOP_JOB).await?;
                latencies.push(ms(outcome.latency));
                ids.extend(outcome.ids);
            }
            anyhow::Ok((ids, latencies))
        }));
    }
    let mut ids = Vec::new();
    let mut http = Vec::new();
    for task in tasks {
        let (i, l) = task.await??;
        ids.extend(i);
        http.extend(l);
    }
    let achieved = ids.len() as f64 / (started.elapsed().as_secs_f64() - 0.1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while db::count_succeeded(&db, ids.clone()).await? < ids.len() as i64 {
        anyhow::ensure!(Instant::now() < deadline, "jobs did not finish within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop();
    let timings = db::timings(&db, ids.clone()).await?;
    let mut to_start: Vec<f64> = timings.iter().filter_map(|t| t.to_start_ms).collect();
    let mut to_finish: Vec<f64> = timings.iter().filter_map(|t| t.to_finish_ms).collect();
    println!(
        "{} jobs at {achieved:.0}/s; to start p50 {:.2} p99 {:.2} ms; to finish p50 {:.2} p99 {:.2} ms",
        ids.len(),
        quantile_ms(&mut to_start, 0.5),
        quantile_ms(&mut to_start, 0.99),
        quantile_ms(&mut to_finish, 0.5),
        quantile_ms(&mut to_finish, 0.99),
    );
    let out = Recorder::new(common, "latency", "conveyor");
    out.put("achieved_rate", achieved, "jobs/s")?;
    out.put("start_p50_ms", quantile_ms(&mut to_start, 0.5), "ms")?;
    out.put("start_p99_ms", quantile_ms(&mut to_start, 0.99), "ms")?;
    out.put("finish_p50_ms", quantile_ms(&mut to_finish, 0.5), "ms")?;
    out.put("finish_p99_ms", quantile_ms(&mut to_finish, 0.99), "ms")?;
    out.put("http_p99_ms", quantile_ms(&mut http, 0.99), "ms")?;
    admin.close().await;
    Ok(())
}
