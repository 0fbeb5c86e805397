//! Statistics tasks: rollups of raw rows into hourly and daily tables, and the
//! retention of raw job records. Normally fired by the built-in schedules;
//! operators may also enqueue them by hand (they are idempotent).
//!
//! Lookbacks are bounded so a rollup can never reach back into windows whose
//! raw rows retention is deleting (see `conveyor_platform::schedule`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{TaskOptions, TaskSpec};

fn stats_options() -> TaskOptions {
    TaskOptions {
        max_attempts: 5,
        backoff_base: Duration::from_secs(5),
        backoff_cap: Duration::from_secs(60),
        timeout: Duration::from_secs(600),
        concurrency: 1,
        ..TaskOptions::on_queue("default")
    }
}

/// `stats.rollup_hourly {lookback?}`: recomputes the last `lookback` hourly
/// windows (the current one included) from raw rows and upserts them.
pub struct RollupHourly;
/// `stats.rollup_daily {lookback?}`: the same for daily (UTC) windows.
pub struct RollupDaily;

/// Arguments of the rollup tasks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupArgs {
    /// Windows to recompute, the current one included (hourly: 1-48, daily: 1-3; default 3 and 2).
    #[serde(default)]
    pub lookback: Option<u32>,
}

impl TaskSpec for RollupHourly {
    const NAME: &'static str = "stats.rollup_hourly";
    type Args = RollupArgs;
    fn options() -> TaskOptions {
        stats_options()
    }
}

impl TaskSpec for RollupDaily {
    const NAME: &'static str = "stats.rollup_daily";
    type Args = RollupArgs;
    fn options() -> TaskOptions {
        stats_options()
    }
}

/// `stats.retention {max_age_days?, batch?}`: seals the rollups of old days,
/// then deletes finished job records and webhook rejection counts older than
/// `max_age_days` in batches.
pub struct Retention;

/// Arguments of `stats.retention`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionArgs {
    /// Finished jobs and webhook rejection counts older than this many days are
    /// deleted (at least 7; default 30).
    #[serde(default)]
    pub max_age_days: Option<u32>,
    /// Rows deleted per transaction (default 5000).
    #[serde(default)]
    pub batch: Option<u32>,
}

impl TaskSpec for Retention {
    const NAME: &'static str = "stats.retention";
    type Args = RetentionArgs;
    fn options() -> TaskOptions {
        stats_options()
    }
}
