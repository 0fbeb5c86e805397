//! Periodic jobs: the `[[schedules]]`, `[scheduler]` and `[stats]` sections of
//! the configuration, and [`Schedule`], a parsed entry that knows its ticks.
//!
//! Both the worker (which fires ticks) and the ingress (which shows the last
//! and next tick) use [`Schedule`], so they always agree on what a cron
//! expression means. A cron has five fields, or six with seconds first; ticks
//! are computed in the schedule's IANA time zone and stored in UTC.
//!
//! Built-in schedules (`stats.rollup_hourly`, `stats.rollup_daily`,
//! `stats.retention`) are added unless `stats.default_schedules = false`, and
//! `webhook.headshot_sweep` unless `webhooks.headshot_sweep = false`, whatever
//! `webhooks.headshots.storage`; a
//! `[[schedules]]` entry with the same name replaces the built-in one.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use conveyor_schema::args::stats::{
    MAX_DAILY_LOOKBACK, MAX_HOURLY_LOOKBACK, MIN_LOOKBACK, MIN_RETENTION_DAYS,
};

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
    /// claimer died between claiming and publishing) is re-published by any
    /// worker. Must exceed `amqp.publish_timeout_ms` plus the pool's checkout
    /// timeout (5 s), the longest a live claimer takes to mark it published.
    pub republish_after_ms: u64,
    /// The longest the loop sleeps between looks at the database.
    pub max_sleep_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            grace_ms: 10_000,
            republish_after_ms: 15_000,
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

/// The shortest `scheduler.grace_ms`. The loop sleeps until 2 ms after the
/// next tick (`conveyor_worker::scheduler`), the timer rounds that up to the
/// next millisecond, and the pass then reads the database clock through the
/// pool, so every tick is first seen a few milliseconds late at best; a pass
/// that fails is tried again 1 s later. A grace shorter than that second
/// counts ticks as missed that the loop was on time for (with 1 or 2 ms,
/// every one: `catch_up = "skip"` schedules never fire). Ticks are whole
/// seconds, so no schedule needs less.
pub const MIN_GRACE_MS: u64 = 1_000;

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
            "17 * * * *",
            json!({"max_age_days": stats.retention_days, "batch": stats.retention_batch}),
        ),
    ]
}

/// The built-in schedule of `webhook.headshot_sweep`, hourly, in both storages
/// (old `headshots` rows no profile names, and files no row names, are
/// removed; see the task).
pub fn headshot_sweep_schedule() -> ScheduleConfig {
    ScheduleConfig {
        name: "webhook.headshot_sweep".into(),
        cron: "41 * * * *".into(),
        task: "webhook.headshot_sweep".into(),
        args: json!({}),
        timezone: utc(),
        catch_up: CatchUp::Skip,
    }
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
    let mut builtins = match config.stats.default_schedules {
        true => builtin_schedules(&config.stats),
        false => Vec::new(),
    };
    if config.webhooks.headshot_sweep {
        builtins.push(headshot_sweep_schedule());
    }
    for entry in builtins {
        if names.insert(entry.name.clone()) {
            let schedule =
                Schedule::parse(entry).map_err(|(field, problem)| ConfigError::InvalidEntry {
                    key: format!("stats (built-in schedule {field})"),
                    problem,
                })?;
            out.push(schedule);
        }
    }
    Ok(out)
}

/// Checks the `[scheduler]` and `[stats]` sections, then every schedule in
/// force (its arguments with the task's own checks).
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    let invalid = |key, problem: String| Err(ConfigError::Invalid { key, problem });
    if config.scheduler.grace_ms < MIN_GRACE_MS {
        return invalid(
            "scheduler.grace_ms",
            format!(
                "must be at least {MIN_GRACE_MS}: the scheduler sees a tick a few ms after it at best (1 s after a failed pass), so a shorter grace counts on-time ticks as missed"
            ),
        );
    }
    // A live claimer marks its tick published after the publish (up to
    // `amqp.publish_timeout_ms`) and a pool checkout (up to CHECKOUT_TIMEOUT);
    // a re-publish sooner than that makes a second copy of a job both of whose
    // copies may find it still `queued`, so the tick runs twice.
    let publish_ms = config.amqp.publish_timeout_ms;
    let checkout_ms = conveyor_schema::pool::CHECKOUT_TIMEOUT.as_millis() as u64;
    let republish_ms = config.scheduler.republish_after_ms;
    if republish_ms <= publish_ms.saturating_add(checkout_ms) {
        return invalid(
            "scheduler.republish_after_ms",
            format!(
                "must be more than amqp.publish_timeout_ms ({publish_ms}) + {checkout_ms} ms, that is at least {}: a tick's claimer may take that long to publish its job and mark it published (a database connection may take {checkout_ms} ms), and re-publishing sooner can run the tick twice",
                publish_ms.saturating_add(checkout_ms).saturating_add(1)
            ),
        );
    }
    if config.scheduler.max_sleep_ms == 0 {
        return invalid("scheduler.max_sleep_ms", "must be at least 1".into());
    }
    let stats = &config.stats;
    for (key, value, max) in [
        (
            "stats.hourly_lookback",
            stats.hourly_lookback,
            MAX_HOURLY_LOOKBACK,
        ),
        (
            "stats.daily_lookback",
            stats.daily_lookback,
            MAX_DAILY_LOOKBACK,
        ),
    ] {
        if value < MIN_LOOKBACK {
            return invalid(
                key,
                format!(
                    "must be at least {MIN_LOOKBACK}: a rollup must recompute the window before the current one, or rows finishing after its last run in that window are never counted"
                ),
            );
        }
        if value > max {
            return invalid(
                key,
                format!("must be at most {max}, to stay clear of the windows retention deletes"),
            );
        }
    }
    if stats.retention_days < MIN_RETENTION_DAYS {
        return invalid(
            "stats.retention_days",
            format!(
                "must be at least {MIN_RETENTION_DAYS}, to stay clear of the rollups' lookbacks"
            ),
        );
    }
    if stats.retention_batch == 0 {
        return invalid("stats.retention_batch", "must be at least 1".into());
    }
    schedules(config).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::one_line_error;
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
    fn a_grace_the_loop_cannot_meet_is_rejected_by_name() {
        let mut config = Config::default();
        for grace in [0, 1, 2, 999] {
            config.scheduler.grace_ms = grace;
            let err = one_line_error(&config);
            assert!(
                err.contains("`scheduler.grace_ms`") && err.contains("at least 1000"),
                "{grace}: {err}"
            );
            assert!(err.contains("missed"), "says why: {err}");
        }
        config.scheduler.grace_ms = MIN_GRACE_MS;
        config.validate().unwrap();
    }

    #[test]
    fn a_republish_delay_a_live_claimer_can_reach_is_rejected_by_name() {
        let mut config = Config::default();
        config.validate().unwrap();
        for (publish_ms, republish_ms) in [(5_000, 1_000), (5_000, 10_000), (20_000, 15_000)] {
            config.amqp.publish_timeout_ms = publish_ms;
            config.scheduler.republish_after_ms = republish_ms;
            let err = one_line_error(&config);
            assert!(
                err.contains("`scheduler.republish_after_ms`")
                    && err.contains("amqp.publish_timeout_ms")
                    && err.contains(&format!("at least {}", publish_ms + 5_001)),
                "{publish_ms} {republish_ms}: {err}"
            );
        }
        config.amqp.publish_timeout_ms = 5_000;
        config.scheduler.republish_after_ms = 10_001;
        config.validate().unwrap();
        config.scheduler.republish_after_ms = 0;
        assert!(one_line_error(&config).contains("`scheduler.republish_after_ms`"));
    }

    #[test]
    fn a_lookback_that_loses_rows_or_reaches_retention_is_rejected_by_name() {
        let mut config = Config::default();
        config.stats.hourly_lookback = 1;
        let err = one_line_error(&config);
        assert!(
            err.contains("`stats.hourly_lookback`") && err.contains("at least 2"),
            "{err}"
        );
        config.stats.hourly_lookback = 49;
        let err = one_line_error(&config);
        assert!(
            err.contains("`stats.hourly_lookback`") && err.contains("at most 48"),
            "{err}"
        );
        config.stats.hourly_lookback = 2;
        config.validate().unwrap();
        config.stats.daily_lookback = 1;
        let err = one_line_error(&config);
        assert!(
            err.contains("`stats.daily_lookback`") && err.contains("at least 2"),
            "{err}"
        );
        config.stats.daily_lookback = 4;
        let err = one_line_error(&config);
        assert!(
            err.contains("`stats.daily_lookback`") && err.contains("at most 3"),
            "{err}"
        );
        config.stats.daily_lookback = 3;
        config.validate().unwrap();
    }

    /// A `[[schedules]]` entry for a stats task is held to the task's own
    /// checks at start-up, whether it replaces a built-in or not.
    #[test]
    fn stats_schedule_args_are_checked_like_the_task_checks_them() {
        let stats_entry = |task: &str, args: Value| ScheduleConfig {
            name: task.into(),
            task: task.into(),
            args,
            ..entry("0 4 * * *", "UTC")
        };
        for default_schedules in [true, false] {
            let mut config = Config::default();
            config.stats.default_schedules = default_schedules;
            for (task, args, pointer) in [
                (
                    "stats.retention",
                    json!({"max_age_days": 6}),
                    "/args/max_age_days",
                ),
                (
                    "stats.rollup_hourly",
                    json!({"lookback": 49}),
                    "/args/lookback",
                ),
                (
                    "stats.rollup_hourly",
                    json!({"lookback": 1}),
                    "/args/lookback",
                ),
                (
                    "stats.rollup_daily",
                    json!({"lookback": 4}),
                    "/args/lookback",
                ),
                (
                    "stats.rollup_daily",
                    json!({"lookback": 1}),
                    "/args/lookback",
                ),
            ] {
                config.schedules = vec![stats_entry(task, args.clone())];
                let err = one_line_error(&config);
                assert!(
                    err.contains("`schedules[0].args`") && err.contains(pointer),
                    "{task} {args}: {err}"
                );
            }
            for (task, args) in [
                ("stats.retention", json!({"max_age_days": 7})),
                ("stats.rollup_hourly", json!({"lookback": 48})),
                ("stats.rollup_daily", json!({"lookback": 2})),
            ] {
                config.schedules = vec![stats_entry(task, args)];
                config.validate().unwrap();
            }
        }
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
                "stats.retention",
                "webhook.headshot_sweep"
            ]
        );
        config.schedules.push(ScheduleConfig {
            name: "stats.retention".into(),
            task: "stats.retention".into(),
            args: json!({"max_age_days": 90, "batch": 100}),
            ..entry("0 4 * * *", "UTC")
        });
        let all = schedules(&config).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].config.cron, "0 4 * * *");
        config.stats.default_schedules = false;
        assert_eq!(schedules(&config).unwrap().len(), 2);
    }

    #[test]
    fn the_headshot_sweep_is_built_in_in_both_storages() {
        let mut config = Config::default();
        let sweep_cron = |config: &Config| {
            schedules(config)
                .unwrap()
                .iter()
                .find(|s| s.name() == "webhook.headshot_sweep")
                .map(|s| s.config.cron.clone())
        };
        config.stats.default_schedules = false;
        assert_eq!(sweep_cron(&config).as_deref(), Some("41 * * * *"));
        config.webhooks.headshots.storage = crate::config::HeadshotStorage::Directory;
        assert_eq!(sweep_cron(&config).as_deref(), Some("41 * * * *"));
        config.webhooks.headshot_sweep = false;
        assert_eq!(sweep_cron(&config), None);
    }
}
