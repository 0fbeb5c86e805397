//! Periodic jobs: the `[[schedules]]`, `[scheduler]` and `[stats]` sections of
//! the configuration, and [`Schedule`], a parsed entry that knows its ticks.
//!
//! Both the worker (which fires ticks) and the ingress (which shows the last
//! and next tick) use [`Schedule`], so they always agree on what a cron
//! expression means. A cron has five fields, or six with seconds first; ticks
//! are computed in the schedule's IANA time zone and stored in UTC.
//!
//! Built-in schedules (`stats.rollup_hourly`, `stats.rollup_daily`,
//! `stats.retention`) are added unless `stats.default_schedules = false`; a
//! `[[schedules]]` entry with the same name replaces the built-in one.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::{Config, ConfigError};

/// One `[[schedules]]` entry as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Unique name; letters, digits, `.`, `_`, `-`. Used in URLs and tick rows.
    pub name: String,
    /// Five cron fields, or six with seconds first.
    pub cron: String,
    /// A task name from the catalogue.
    pub task: String,
    /// The task's arguments, validated against its argument type at start-up.
    #[serde(default = "empty_object")]
    pub args: Value,
    /// IANA time zone the cron is read in, e.g. `Europe/Paris`.
    #[serde(default = "utc")]
    pub timezone: String,
    /// What to do about ticks missed while no worker ran.
    #[serde(default)]
    pub catch_up: CatchUp,
}

fn empty_object() -> Value {
    json!({})
}

fn utc() -> String {
    "UTC".into()
}

/// What happens to ticks missed while no worker was running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Missed ticks are dropped; the schedule resumes at the next tick.
    #[default]
    Skip,
    /// One job is enqueued for the latest missed tick.
    Once,
}

/// The scheduler loop every worker runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Whether this worker takes part in firing ticks.
    pub enabled: bool,
    /// A tick first seen at most this late still fires as usual; older unfired
    /// ticks count as missed and follow the schedule's `catch_up`.
    pub grace_ms: u64,
    /// A claimed tick whose job is still unpublished after this long (its
    /// claimer died between claiming and publishing) is re-published by any worker.
    pub republish_after_ms: u64,
    /// The longest the loop sleeps between looks at the database.
    pub max_sleep_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            grace_ms: 10_000,
            republish_after_ms: 10_000,
            max_sleep_ms: 5_000,
        }
    }
}

/// Statistics rollups and retention of raw job records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsConfig {
    /// Adds the built-in rollup and retention schedules.
    pub default_schedules: bool,
    /// Hourly windows (the current one included) each hourly rollup recomputes.
    pub hourly_lookback: u32,
    /// Daily windows (today included) each daily rollup recomputes.
    pub daily_lookback: u32,
    /// Finished job records older than this many days are deleted (rollups are kept).
    pub retention_days: u32,
    /// Rows deleted per retention transaction.
    pub retention_batch: u32,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self {
            default_schedules: true,
            hourly_lookback: 3,
            daily_lookback: 2,
            retention_days: 30,
            retention_batch: 5_000,
        }
    }
}

/// The largest lookbacks a rollup accepts; retention must stay clear of them
/// so a rollup never recomputes a window whose raw rows are being deleted.
pub const MAX_HOURLY_LOOKBACK: u32 = 48;
/// See [`MAX_HOURLY_LOOKBACK`].
pub const MAX_DAILY_LOOKBACK: u32 = 3;
/// The shortest retention, in days (clear of both lookbacks).
pub const MIN_RETENTION_DAYS: u32 = 7;

/// A validated schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The entry as configured.
    pub config: ScheduleConfig,
    /// Parsed cron.
    cron: Cron,
    /// Parsed time zone.
    tz: Tz,
}

impl Schedule {
    /// Parses and checks `config`; on failure, the field at fault and the problem.
    pub fn parse(config: ScheduleConfig) -> Result<Self, (&'static str, String)> {
        let name_ok = !config.name.is_empty()
            && config.name.len() <= 100
            && config
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !name_ok {
            return Err((
                "name",
                "must be 1-100 ASCII letters, digits, `.`, `_` or `-`".into(),
            ));
        }
        let fields = config.cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err((
                "cron",
                format!(
                    "`{}` has {fields} fields; expected 5, or 6 with seconds first",
                    config.cron
                ),
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(&config.cron)
            .map_err(|err| ("cron", format!("`{}`: {err}", config.cron)))?;
        let tz: Tz = config.timezone.parse().map_err(|_| {
            (
                "timezone",
                format!("`{}` is not an IANA time zone", config.timezone),
            )
        })?;
        let task = conveyor_schema::find_task(&config.task)
            .ok_or_else(|| ("task", format!("unknown task `{}`", config.task)))?;
        task.validate(&config.args)
            .map_err(|err| ("args", format!("{} (at {})", err.message, err.pointer)))?;
        Ok(Self { config, cron, tz })
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The first tick strictly after `t`; `None` when the cron never fires again.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The latest tick at or before `t`; `None` when there is none.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The latest tick strictly before `t`.
    pub fn previous_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// The built-in schedules for `stats`.
pub fn builtin_schedules(stats: &StatsConfig) -> Vec<ScheduleConfig> {
    let entry = |name: &str, cron: &str, args: Value| ScheduleConfig {
        name: name.into(),
        cron: cron.into(),
        task: name.into(),
        args,
        timezone: utc(),
        catch_up: CatchUp::Once,
    };
    vec![
        entry(
            "stats.rollup_hourly",
            "*/5 * * * *",
            json!({"lookback": stats.hourly_lookback}),
        ),
        entry(
            "stats.rollup_daily",
            "2 * * * *",
            json!({"lookback": stats.daily_lookback}),
        ),
        entry(
            "stats.retention",
            "17 3 * * *",
            json!({"max_age_days": stats.retention_days, "batch": stats.retention_batch}),
        ),
    ]
}

/// Every schedule in force: the configured ones, then the built-ins that no
/// configured entry replaces. Errors name the key, e.g. `schedules[1].cron`.
pub fn schedules(config: &Config) -> Result<Vec<Schedule>, ConfigError> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, entry) in config.schedules.iter().enumerate() {
        let schedule = Schedule::parse(entry.clone()).map_err(|(field, problem)| {
            ConfigError::InvalidEntry {
                key: format!("schedules[{i}].{field}"),
                problem,
            }
        })?;
        if !names.insert(entry.name.clone()) {
            return Err(ConfigError::InvalidEntry {
                key: format!("schedules[{i}].name"),
                problem: format!("`{}` is used by another schedule", entry.name),
            });
        }
        out.push(schedule);
    }
    if config.stats.default_schedules {
        for entry in builtin_schedules(&config.stats) {
            if names.insert(entry.name.clone()) {
                let schedule = Schedule::parse(entry).map_err(|(field, problem)| {
                    ConfigError::InvalidEntry {
                        key: format!("stats (built-in schedule {field})"),
                        problem,
                    }
                })?;
                out.push(schedule);
            }
        }
    }
    Ok(out)
}

/// Checks the `[scheduler]` and `[stats]` sections.
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    let invalid = |key, problem: &str| {
        Err(ConfigError::Invalid {
            key,
            problem: problem.into(),
        })
    };
    if config.scheduler.grace_ms == 0 {
        return invalid("scheduler.grace_ms", "must be at least 1");
    }
    if config.scheduler.republish_after_ms == 0 {
        return invalid("scheduler.republish_after_ms", "must be at least 1");
    }
    if config.scheduler.max_sleep_ms == 0 {
        return invalid("scheduler.max_sleep_ms", "must be at least 1");
    }
    let stats = &config.stats;
    if !(1..=MAX_HOURLY_LOOKBACK).contains(&stats.hourly_lookback) {
        return invalid("stats.hourly_lookback", "must be between 1 and 48");
    }
    if !(1..=MAX_DAILY_LOOKBACK).contains(&stats.daily_lookback) {
        return invalid("stats.daily_lookback", "must be between 1 and 3");
    }
    if stats.retention_days < MIN_RETENTION_DAYS {
        return invalid("stats.retention_days", "must be at least 7");
    }
    if stats.retention_batch == 0 {
        return invalid("stats.retention_batch", "must be at least 1");
    }
    schedules(config).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn entry(cron: &str, tz: &str) -> ScheduleConfig {
        ScheduleConfig {
            name: "s".into(),
            cron: cron.into(),
            task: "diag.noop".into(),
            args: json!({}),
            timezone: tz.into(),
            catch_up: CatchUp::Skip,
        }
    }

    #[test]
    fn five_and_six_fields() {
        let at = Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 30).unwrap();
        let minutely = Schedule::parse(entry("* * * * *", "UTC")).unwrap();
        assert_eq!(
            minutely.next_after(at),
            Some(Utc.with_ymd_and_hms(2026, 3, 1, 10, 1, 0).unwrap())
        );
        let every_second = Schedule::parse(entry("* * * * * *", "UTC")).unwrap();
        assert_eq!(
            every_second.next_after(at),
            Some(Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 31).unwrap())
        );
        assert_eq!(every_second.latest_at_or_before(at), Some(at));
        assert!(Schedule::parse(entry("* * * *", "UTC")).is_err());
        assert!(Schedule::parse(entry("0 0 0 * * * 2030", "UTC")).is_err());
    }

    #[test]
    fn time_zone_applies() {
        let daily = Schedule::parse(entry("0 9 * * *", "Europe/Paris")).unwrap();
        let at = Utc.with_ymd_and_hms(2026, 1, 10, 0, 0, 0).unwrap();
        // 09:00 in Paris in winter is 08:00 UTC.
        assert_eq!(
            daily.next_after(at),
            Some(Utc.with_ymd_and_hms(2026, 1, 10, 8, 0, 0).unwrap())
        );
    }

    #[test]
    fn errors_name_the_key() {
        let mut config = Config::default();
        config.schedules.push(entry("* * * * *", "UTC"));
        config.schedules.push(entry("61 * * * *", "UTC"));
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`schedules[1].cron`"), "{err}");
        config.schedules[1] = entry("* * * * *", "Mars/Olympus");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`schedules[1].timezone`"), "{err}");
        config.schedules[1] = ScheduleConfig {
            name: "other".into(),
            task: "diag.sleep".into(),
            args: json!({"ms": "long"}),
            ..entry("* * * * *", "UTC")
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("`schedules[1].args`") && err.contains("/args/ms"),
            "{err}"
        );
        config.schedules[1] = entry("* * * * *", "UTC");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`schedules[1].name`"), "{err}");
        config.schedules[1].name = "t".into();
        config.schedules[1].task = "no.such".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`schedules[1].task`"), "{err}");
    }

    #[test]
    fn builtins_are_added_unless_replaced_or_disabled() {
        let mut config = Config::default();
        let names: Vec<_> = schedules(&config)
            .unwrap()
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "stats.rollup_hourly",
                "stats.rollup_daily",
                "stats.retention"
            ]
        );
        config.schedules.push(ScheduleConfig {
            name: "stats.retention".into(),
            task: "stats.retention".into(),
            args: json!({"max_age_days": 90, "batch": 100}),
            ..entry("0 4 * * *", "UTC")
        });
        let all = schedules(&config).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].config.cron, "0 4 * * *");
        config.stats.default_schedules = false;
        assert_eq!(schedules(&config).unwrap().len(), 1);
    }
}
