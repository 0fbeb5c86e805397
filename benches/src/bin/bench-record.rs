//! Scenario 1 without HTTP: the ingress's group-commit recorder alone (records
//! committed, messages confirmed), fed by as many concurrent submitters as the
//! HTTP load generator has connections (64). Beside the HTTP enqueue it shows
//! what the HTTP hop costs; beside the bare publisher with 64 confirms
//! outstanding (`bench-broker --publish-only --window 64`), what recording costs.
//! Every record and message it made is removed again.

use clap::Parser;
use conveyor_benches::results::Recorder;
use conveyor_benches::{Common, Fresh, db, preload};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Jobs to record.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Submissions waiting at a time (the HTTP enqueue's connections).
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
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

    let rate = preload::noop_jobs(common, args.jobs, None, args.in_flight).await?;
    let records = db::count_all(&db).await?;
    let queued = admin.depth(&work_queue).await? as usize;
    println!(
        "recorder alone, {} in flight: {rate:.0} jobs/s; {records} records, {queued} queued",
        args.in_flight
    );
    anyhow::ensure!(
        records == i64::try_from(args.jobs)? && queued == args.jobs,
        "expected {} records and queued messages, found {records} and {queued}",
        args.jobs
    );
    Recorder::new(common, "http_enqueue", "recorder").put("rate", rate, "jobs/s")?;
    admin.purge(&work_queue).await?;
    db::truncate_jobs(&db).await?;
    admin.close().await;
    Ok(())
}
