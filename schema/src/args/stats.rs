//! Statistics tasks: rollups of raw rows into hourly and daily tables, and the
//! retention of raw job records. Normally fired by the built-in schedules;
//! operators may also enqueue them by hand (they are idempotent).
//!
//! Lookbacks are bounded so a rollup can never reach back into windows whose
//! raw rows retention is deleting (see `conveyor_platform::schedule`). The
//! bounds live here, with the argument types, because the ingress, the
//! configuration check at start-up and the tasks all apply them
//! ([`TaskSpec::check_args`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ArgsError, TaskOptions, TaskSpec};

/// Fewest windows a rollup recomputes: the current one and the one before.
/// A row that finishes after the last run inside its window is counted only
/// by the first run of the next window, so that run must reach back one
/// window; recomputing the current window alone would never count it.
pub const MIN_LOOKBACK: u32 = 2;
/// The most hourly windows a rollup recomputes, its catch-up of a gap between
/// runs included; retention must stay clear of it, so a rollup never
/// recomputes (replaces) a window whose raw rows are being deleted.
pub const MAX_HOURLY_LOOKBACK: u32 = 48;
/// The most daily windows a rollup recomputes; see [`MAX_HOURLY_LOOKBACK`].
pub const MAX_DAILY_LOOKBACK: u32 = 3;
/// The shortest retention, in days (clear of both lookbacks).
pub const MIN_RETENTION_DAYS: u32 = 7;
/// The longest, and default, time in seconds one `stats.retention` run spends
/// sealing and deleting before it leaves the rest to the next run: four fifths
/// of its attempt's timeout, so its last statement ends well inside it.
pub const MAX_RETENTION_SECONDS: u32 = 480;

const _: () = assert!(
    (MAX_RETENTION_SECONDS as u64) * 5 <= STATS_TIMEOUT.as_secs() * 4,
    "a retention run must stop well inside its attempt's timeout"
);

/// Each stats task's attempt timeout.
const STATS_TIMEOUT: Duration = Duration::from_secs(600);

const _: () = assert!(
    MIN_RETENTION_DAYS > MAX_DAILY_LOOKBACK && MIN_RETENTION_DAYS * 24 > MAX_HOURLY_LOOKBACK,
    "retention must stay clear of every rollup's lookback"
);

fn stats_options() -> TaskOptions {
    TaskOptions {
        max_attempts: 5,
        backoff_base: Duration::from_secs(5),
        backoff_cap: Duration::from_secs(60),
        timeout: STATS_TIMEOUT,
        concurrency: 1,
        ..TaskOptions::on_queue("default")
    }
}

/// `stats.rollup_hourly {lookback?}`: recomputes the last `lookback` hourly
/// windows (the current one included) from raw rows and replaces their rows,
/// and first the earlier windows since the last completed run, at most
/// [`MAX_HOURLY_LOOKBACK`] back (see `conveyor_tasks`' `rollup_tasks`).
pub struct RollupHourly;
/// `stats.rollup_daily {lookback?}`: the same for daily (UTC) windows.
pub struct RollupDaily;

/// Arguments of the rollup tasks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupArgs {
    /// Windows to recompute, the current one included (hourly: 2-48, daily: 2-3; default 3 and 2).
    #[serde(default)]
    pub lookback: Option<u32>,
}

impl RollupArgs {
    /// Checks `lookback`, when given, against [`MIN_LOOKBACK`] and `max`.
    fn check_lookback(&self, max: u32) -> Result<(), ArgsError> {
        match self.lookback {
            Some(lookback) if !(MIN_LOOKBACK..=max).contains(&lookback) => Err(ArgsError {
                pointer: "/args/lookback".into(),
                message: format!("must be between {MIN_LOOKBACK} and {max}, not {lookback}"),
            }),
            _ => Ok(()),
        }
    }
}

impl TaskSpec for RollupHourly {
    const NAME: &'static str = "stats.rollup_hourly";
    type Args = RollupArgs;
    fn options() -> TaskOptions {
        stats_options()
    }
    fn check_args(args: &RollupArgs) -> Result<(), ArgsError> {
        args.check_lookback(MAX_HOURLY_LOOKBACK)
    }
}

impl TaskSpec for RollupDaily {
    const NAME: &'static str = "stats.rollup_daily";
    type Args = RollupArgs;
    fn options() -> TaskOptions {
        stats_options()
    }
    fn check_args(args: &RollupArgs) -> Result<(), ArgsError> {
        args.check_lookback(MAX_DAILY_LOOKBACK)
    }
}

/// `stats.retention {max_age_days?, batch?, max_seconds?}`: seals the rollups
/// of old days, then deletes finished job records, webhook events and webhook
/// rejection counts older than `max_age_days` in batches, for at most
/// `max_seconds`.
pub struct Retention;

/// Arguments of `stats.retention`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionArgs {
    /// Finished jobs and webhook rejection counts older than this many days are
    /// deleted (at least 7; default 30).
    #[serde(default)]
    pub max_age_days: Option<u32>,
    /// Rows deleted per transaction (at least 1; default 5000).
    #[serde(default)]
    pub batch: Option<u32>,
    /// Seconds this run may spend sealing and deleting; what is left when they
    /// are up waits for the next run (1 to 480; default 480).
    #[serde(default)]
    pub max_seconds: Option<u32>,
}

impl TaskSpec for Retention {
    const NAME: &'static str = "stats.retention";
    type Args = RetentionArgs;
    fn options() -> TaskOptions {
        stats_options()
    }
    fn check_args(args: &RetentionArgs) -> Result<(), ArgsError> {
        match (args.max_age_days, args.batch) {
            (Some(days), _) if days < MIN_RETENTION_DAYS => Err(ArgsError {
                pointer: "/args/max_age_days".into(),
                message: format!(
                    "must be at least {MIN_RETENTION_DAYS}, not {days}, to stay clear of the rollups' lookbacks"
                ),
            }),
            (_, Some(0)) => Err(ArgsError {
                pointer: "/args/batch".into(),
                message: "must be at least 1 (rows deleted per transaction)".into(),
            }),
            _ => match args.max_seconds {
                Some(seconds) if !(1..=MAX_RETENTION_SECONDS).contains(&seconds) => {
                    Err(ArgsError {
                        pointer: "/args/max_seconds".into(),
                        message: format!(
                            "must be between 1 and {MAX_RETENTION_SECONDS}, not {seconds}, to end inside the attempt's 600 s timeout"
                        ),
                    })
                }
                _ => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::find_task;

    #[test]
    fn lookbacks_and_retention_are_checked_where_args_are_validated() {
        let check = |task: &str, args| find_task(task).unwrap().validate(&args);
        for (task, max) in [("stats.rollup_hourly", 48), ("stats.rollup_daily", 3)] {
            check(task, json!({})).unwrap();
            check(task, json!({"lookback": 2})).unwrap();
            check(task, json!({"lookback": max})).unwrap();
            for bad in [0, 1, max + 1] {
                let err = check(task, json!({"lookback": bad})).unwrap_err();
                assert_eq!(err.pointer, "/args/lookback", "{task} {bad}");
                assert!(
                    err.message.contains(&format!("between 2 and {max}")),
                    "{task} {bad}: {err}"
                );
            }
        }
        check("stats.retention", json!({})).unwrap();
        check("stats.retention", json!({"max_age_days": 7})).unwrap();
        let err = check("stats.retention", json!({"max_age_days": 6})).unwrap_err();
        assert_eq!(err.pointer, "/args/max_age_days");
        assert!(err.message.contains("at least 7"), "{err}");
        check("stats.retention", json!({"batch": 1})).unwrap();
        let err = check("stats.retention", json!({"batch": 0})).unwrap_err();
        assert_eq!(err.pointer, "/args/batch");
        check("stats.retention", json!({"max_seconds": 1})).unwrap();
        check("stats.retention", json!({"max_seconds": 480})).unwrap();
        for bad in [0, 481] {
            let err = check("stats.retention", json!({"max_seconds": bad})).unwrap_err();
            assert_eq!(err.pointer, "/args/max_seconds");
            assert!(err.message.contains("between 1 and 480"), "{err}");
        }
    }
}
