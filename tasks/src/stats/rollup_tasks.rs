//! `stats.rollup_hourly` and `stats.rollup_daily`: recompute the last few
//! windows (the current, still-filling one included) so late rows are counted,
//! and every earlier window since the last completed run, so a gap between
//! runs is caught up.
//!
//! A run that recomputed everything up to the current window records its start
//! (`stats_rollup_marks.completed_to`: every window before it was recomputed
//! after it ended). The next run starts at the earlier of that mark and its
//! usual lookback. Without the mark, a gap longer than the lookback between
//! two runs (a backlog on the `default` queue the rollups share with producers'
//! jobs, a database or worker outage, failing runs) left the windows in
//! between as the last run saw them, missing every row that finished after it.
//!
//! The catch-up reaches back at most [`MAX_HOURLY_LOOKBACK`] hours or
//! [`MAX_DAILY_LOOKBACK`] days, the bounds a manual `lookback` has: retention
//! deletes raw rows only of days older than that (`MIN_RETENTION_DAYS`), and
//! recomputing a window replaces its rows, so a window must never be
//! recomputed from half-deleted rows. Older windows are left as they are (a
//! warning names them); retention recomputes jobs and webhooks once more
//! when it seals their day. The catch-up goes one window at a time, oldest
//! first, advancing the mark after each, and starts no window after
//! [`CATCH_UP_SECONDS`] (or once the worker drains): the usual windows are
//! then recomputed, the mark stays where the catch-up stopped, and the next
//! run carries on. So a run stays inside its attempt's timeout however long
//! the gap.
//!
//! Statements are cancelled if the attempt times out ([`run_cancel_on_drop`]),
//! so a slow rollup never outlives its attempt and holds its table's rollup
//! lock against the retry.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_schema::args::stats::{self, MAX_DAILY_LOOKBACK, MAX_HOURLY_LOOKBACK, RollupArgs};
use conveyor_schema::pool::run_cancel_on_drop;
use conveyor_schema::stats::Granularity;
use diesel::prelude::*;
use diesel::sql_types::{Text, Timestamptz};

use super::rollup;
use crate::{JobContext, Task, TaskError};

/// Recomputes hourly windows.
pub struct RollupHourly;
/// Recomputes daily windows.
pub struct RollupDaily;

/// Seconds after which a run starts no further catch-up window: under half of
/// the stats tasks' 600 s attempt timeout, leaving the rest to the window in
/// progress and the usual lookback.
pub const CATCH_UP_SECONDS: u64 = 240;

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

/// The windows one run recomputes.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The start of the current window: the mark once the run is done.
    current: DateTime<Utc>,
    /// The end of the current window.
    to: DateTime<Utc>,
    /// The start of the usual lookback.
    usual: DateTime<Utc>,
    /// Where the run starts: the earlier of the mark and `usual`, not before
    /// the catch-up's bound.
    from: DateTime<Utc>,
    /// The mark, when older than the catch-up's bound (windows from it to
    /// `from` are not recomputed).
    beyond_reach: Option<DateTime<Utc>>,
}

async fn roll(granularity: Granularity, lookback: u32, ctx: JobContext) -> Result<(), TaskError> {
    let started = Instant::now();
    let db = &ctx.services.db;
    let plan = run_cancel_on_drop(db, move |conn| plan(conn, granularity, lookback)).await?;
    if let Some(mark) = plan.beyond_reach {
        tracing::warn!(
            granularity = granularity.unit(), completed_to = %mark, from = %plan.from,
            "rollup: windows from completed_to to from were not recomputed since the last \
             completed run and are beyond the catch-up's reach; jobs and webhooks there are \
             recomputed when retention seals their day, mail is not"
        );
    }
    let width = granularity.duration();
    let mut done = plan.from;
    while done < plan.usual {
        if started.elapsed() >= Duration::from_secs(CATCH_UP_SECONDS) || ctx.shutdown.is_cancelled()
        {
            tracing::warn!(
                granularity = granularity.unit(), completed_to = %done, usual_from = %plan.usual,
                "rollup catch-up stopped at its time budget (or the worker's drain); the next run carries on"
            );
            break;
        }
        let (from, to) = (done, done + width);
        run_cancel_on_drop(db, move |conn| {
            rollup::all(conn, granularity, from, to)?;
            mark(conn, granularity, to)
        })
        .await?;
        done = to;
    }
    let caught_up = done >= plan.usual;
    let Plan {
        current, usual, to, ..
    } = plan;
    let rolled = run_cancel_on_drop(db, move |conn| {
        let rolled = rollup::all(conn, granularity, usual, to)?;
        if caught_up {
            mark(conn, granularity, current)?;
        }
        Ok(rolled)
    })
    .await?;
    tracing::info!(
        granularity = granularity.unit(), from = %plan.from, %to,
        caught_up.windows = (done - plan.from).num_seconds() / width.num_seconds(),
        jobs.rows = rolled.jobs,
        mail.rows = ?rolled.mail,
        webhooks.rows = ?rolled.webhooks,
        "rollup done (rows inserted, changed or deleted in the usual windows; None: source table absent, skipped)"
    );
    Ok(())
}

/// The windows to recompute, by the database clock and the recorded mark.
fn plan(conn: &mut PgConnection, granularity: Granularity, lookback: u32) -> QueryResult<Plan> {
    #[derive(QueryableByName)]
    struct Mark {
        #[diesel(sql_type = Timestamptz)]
        completed_to: DateTime<Utc>,
    }
    let width = granularity.duration();
    let current = rollup::current_window(conn, granularity)?;
    let to = current + width;
    let windows = |n: u32| width * i32::try_from(n).unwrap_or(1);
    let usual = to - windows(lookback);
    let bound = to - windows(reach(granularity));
    let mark =
        diesel::sql_query("SELECT completed_to FROM stats_rollup_marks WHERE granularity = $1")
            .bind::<Text, _>(granularity.unit())
            .get_result::<Mark>(conn)
            .optional()?
            .map(|m| m.completed_to);
    let from = mark.map_or(usual, |mark| mark.max(bound).min(usual));
    Ok(Plan {
        current,
        to,
        usual,
        from,
        beyond_reach: mark.filter(|mark| *mark < bound),
    })
}

/// The most windows a run recomputes, catch-up included.
fn reach(granularity: Granularity) -> u32 {
    match granularity {
        Granularity::Hour => MAX_HOURLY_LOOKBACK,
        Granularity::Day => MAX_DAILY_LOOKBACK,
    }
}

/// Records that every window of `granularity` before `completed_to` has been
/// recomputed after it ended; a mark never moves back (an overlapping run
/// behind another leaves it).
fn mark(
    conn: &mut PgConnection,
    granularity: Granularity,
    completed_to: DateTime<Utc>,
) -> QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO stats_rollup_marks AS m (granularity, completed_to) VALUES ($1, $2) \
         ON CONFLICT (granularity) DO UPDATE \
         SET completed_to = EXCLUDED.completed_to, updated_at = now() \
         WHERE m.completed_to < EXCLUDED.completed_to",
    )
    .bind::<Text, _>(granularity.unit())
    .bind::<Timestamptz, _>(completed_to)
    .execute(conn)
    .map(drop)
}
