//! Scenario 1, HTTP enqueue: `diag.noop` posted to a running ingress from 64
//! keep-alive connections for a fixed time. Reports accepted jobs per second
//! and p50/p99 latency, then proves every 202 was real: each accepted id has a
//! job record, no record exists for a refused request, and the work queue
//! holds exactly one confirmed message per 202 (no worker runs meanwhile).
//!
//! With `--batch N` each request is a `POST /v1/jobs/batch` of N jobs instead,
//! recorded as scenario `http_enqueue_batch_N` (`make bench` runs N = 100 from
//! 16 connections, a row of its own beside the target scenario).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use conveyor_benches::http::{Client, NOOP_JOB, memory_mib, noop_batch};
use conveyor_benches::results::Recorder;
use conveyor_benches::stats::{ms, quantile_ms};
use conveyor_benches::{Common, Fresh, db};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// The ingress under test.
    #[arg(long)]
    addr: SocketAddr,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long to load it.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Jobs per request: more than 1 posts them to `/v1/jobs/batch`.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// The ingress process, to read its peak resident memory afterwards.
    #[arg(long)]
    ingress_pid: Option<u32>,
}

#[derive(Default)]
struct Tally {
    ids: Vec<uuid::Uuid>,
    latencies: Vec<f64>,
    refused: u64,
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

    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.connections);
    let batch = (args.batch > 1).then(|| noop_batch(args.batch));
    for _ in 0..args.connections {
        let addr = args.addr;
        let batch = batch.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut client = Client::connect(addr).await?;
            while Instant::now() < deadline {
                let outcome = match &batch {
                    Some(body) => client.enqueue_batch(body.clone()).await?,
                    None => client.enqueue(NOOP_JOB).await?,
                };
                tally.latencies.push(ms(outcome.latency));
                if outcome.ids.is_empty() {
                    tally.refused += 1;
                }
                tally.ids.extend(outcome.ids);
            }
            anyhow::Ok(tally)
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await??;
        all.ids.extend(tally.ids);
        all.latencies.extend(tally.latencies);
        all.refused += tally.refused;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let accepted = all.ids.len() as i64;

    // The proof that each 202 meant a record and a confirmed message.
    let recorded = db::count_ids(&db, all.ids.clone()).await?;
    let records = db::count_all(&db).await?;
    let queued = i64::from(admin.depth(&work_queue).await?);
    let consistent = recorded == accepted && records == accepted && queued == accepted;
    println!(
        "accepted={accepted} refused={} recorded={recorded} records={records} queued={queued} consistent={consistent}",
        all.refused
    );

    let scenario = match args.batch {
        0 | 1 => "http_enqueue".to_owned(),
        n => format!("http_enqueue_batch_{n}"),
    };
    let out = Recorder::new(common, &scenario, "conveyor");
    out.put("rate", accepted as f64 / elapsed, "jobs/s")?;
    out.put("p50_ms", quantile_ms(&mut all.latencies, 0.50), "ms")?;
    out.put("p99_ms", quantile_ms(&mut all.latencies, 0.99), "ms")?;
    out.put("refused", all.refused as f64, "requests")?;
    out.put("consistent", f64::from(u8::from(consistent)), "bool")?;
    if let Some(pid) = args.ingress_pid {
        let (peak, now) = memory_mib(pid)?;
        Recorder::new(common, "memory", "conveyor").put("ingress_peak_rss", peak, "MiB")?;
        println!("ingress rss now {now:.1} MiB, peak {peak:.1} MiB");
    }
    admin.purge(&work_queue).await?;
    admin.close().await;
    anyhow::ensure!(
        consistent,
        "202s, records and queued messages disagree: accepted {accepted}, records of accepted ids {recorded}, records {records}, queued {queued}"
    );
    Ok(())
}
