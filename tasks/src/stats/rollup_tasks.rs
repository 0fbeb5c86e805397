//! `stats.rollup_hourly` and `stats.rollup_daily`: recompute the last few
//! windows (the current, still-filling one included) so late rows are counted.
//! Their statements are cancelled if the attempt times out
//! ([`run_cancel_on_drop`]), so a slow rollup never outlives its attempt and
//! holds its table's rollup lock against the retry.

use conveyor_schema::args::stats::{self, RollupArgs};
use conveyor_schema::pool::run_cancel_on_drop;
use conveyor_schema::stats::Granularity;

use super::rollup;
use crate::{JobContext, Task, TaskError};

/// Recomputes hourly windows.
pub struct RollupHourly;
/// Recomputes daily windows.
pub struct RollupDaily;

impl Task for RollupHourly {
    type Spec = stats::RollupHourly;
    async fn run(&self, args: RollupArgs, ctx: JobContext) -> Result<(), TaskError> {
        roll(Granularity::Hour, args.lookback.unwrap_or(3), ctx).await
    }
}

impl Task for RollupDaily {
    type Spec = stats::RollupDaily;
    async fn run(&self, args: RollupArgs, ctx: JobContext) -> Result<(), TaskError> {
        roll(Granularity::Day, args.lookback.unwrap_or(2), ctx).await
    }
}

async fn roll(granularity: Granularity, lookback: u32, ctx: JobContext) -> Result<(), TaskError> {
    let rolled = run_cancel_on_drop(&ctx.services.db, move |conn| {
        let current = rollup::current_window(conn, granularity)?;
        let to = current + granularity.duration();
        let from = to - granularity.duration() * i32::try_from(lookback).unwrap_or(1);
        rollup::all(conn, granularity, from, to).map(|rolled| (from, to, rolled))
    })
    .await?;
    let (from, to, rolled) = rolled;
    tracing::info!(
        granularity = granularity.unit(), %from, %to,
        jobs.rows = rolled.jobs,
        mail.rows = ?rolled.mail,
        webhooks.rows = ?rolled.webhooks,
        "rollup done (None: source table absent, skipped)"
    );
    Ok(())
}
