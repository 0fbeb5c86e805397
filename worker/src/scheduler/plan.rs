//! Which ticks of a schedule are due, given the last claimed tick and the time.
//!
//! Pure and clock-free so the rules are tested here. Every worker computes the
//! same answer from the same database state and database clock; claiming in
//! Postgres then picks one winner per tick.
//!
//! - No tick claimed yet (a new schedule): only the latest tick, if it is on time.
//! - A tick is *on time* when `now - tick <= grace`: every on-time tick after
//!   the last claimed one is due (normally one; more if this pass ran late).
//! - Older unclaimed ticks were *missed* (no worker ran): `skip` drops them;
//!   `once` fires the latest of them, marked as a catch-up.

use chrono::{DateTime, Duration, Utc};
use conveyor_platform::schedule::{CatchUp, Schedule};

/// Most on-time ticks fired in one pass (a guard against a tiny cron with a huge grace).
const MAX_DUE: usize = 1000;

/// One tick to claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// The tick's time.
    pub tick_at: DateTime<Utc>,
    /// Fired late for ticks missed during downtime (`catch_up = "once"`).
    pub catch_up: bool,
}

/// The ticks of `schedule` to claim now, oldest first.
pub fn due_ticks(
    schedule: &Schedule,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    grace: Duration,
) -> Vec<Due> {
    let Some(latest) = schedule.latest_at_or_before(now) else {
        return Vec::new();
    };
    if last.is_some_and(|last| last >= latest) {
        return Vec::new();
    }
    let on_time_after = now - grace;
    let mut due = Vec::new();
    let Some(last) = last else {
        if latest > on_time_after {
            due.push(Due {
                tick_at: latest,
                catch_up: false,
            });
        }
        return due;
    };
    let bound = last.max(on_time_after);
    let mut tick = Some(latest);
    while let Some(t) = tick.filter(|t| *t > bound) {
        if due.len() == MAX_DUE {
            break;
        }
        due.push(Due {
            tick_at: t,
            catch_up: false,
        });
        tick = schedule.previous_before(t);
    }
    if schedule.config.catch_up == CatchUp::Once
        && let Some(missed) = schedule.latest_at_or_before(on_time_after)
        && missed > last
    {
        due.push(Due {
            tick_at: missed,
            catch_up: true,
        });
    }
    due.reverse();
    due
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use conveyor_platform::schedule::ScheduleConfig;

    fn every_second(catch_up: CatchUp) -> Schedule {
        Schedule::parse(ScheduleConfig {
            name: "s".into(),
            cron: "* * * * * *".into(),
            task: "diag.noop".into(),
            args: serde_json::json!({}),
            timezone: "UTC".into(),
            catch_up,
        })
        .unwrap()
    }

    fn at(s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap() + Duration::seconds(s.into())
    }

    fn ticks(due: &[Due]) -> Vec<(DateTime<Utc>, bool)> {
        due.iter().map(|d| (d.tick_at, d.catch_up)).collect()
    }

    #[test]
    fn steady_state_fires_the_next_tick_once() {
        let s = every_second(CatchUp::Skip);
        let grace = Duration::seconds(3);
        let now = at(10) + Duration::milliseconds(4);
        assert_eq!(
            ticks(&due_ticks(&s, Some(at(9)), now, grace)),
            [(at(10), false)]
        );
        assert!(due_ticks(&s, Some(at(10)), now, grace).is_empty());
    }

    #[test]
    fn a_late_pass_fires_every_on_time_tick() {
        let s = every_second(CatchUp::Skip);
        let due = due_ticks(&s, Some(at(7)), at(10), Duration::seconds(3));
        assert_eq!(
            ticks(&due),
            [(at(8), false), (at(9), false), (at(10), false)]
        );
    }

    #[test]
    fn a_new_schedule_starts_at_the_latest_tick() {
        let s = every_second(CatchUp::Once);
        let due = due_ticks(&s, None, at(10), Duration::seconds(3));
        assert_eq!(ticks(&due), [(at(10), false)]);
    }

    #[test]
    fn downtime_skip_drops_missed_ticks() {
        let s = every_second(CatchUp::Skip);
        // Last tick at 0, back at 20 with 2 s grace: 1..=17 missed, 18..=20 on time.
        let due = due_ticks(&s, Some(at(0)), at(20), Duration::seconds(2));
        assert_eq!(ticks(&due), [(at(19), false), (at(20), false)]);
    }

    #[test]
    fn downtime_once_fires_the_latest_missed_tick() {
        let s = every_second(CatchUp::Once);
        let due = due_ticks(&s, Some(at(0)), at(20), Duration::seconds(2));
        assert_eq!(
            ticks(&due),
            [(at(18), true), (at(19), false), (at(20), false)]
        );
        // Once it is claimed, nothing older is fired again.
        let due = due_ticks(&s, Some(at(20)), at(21), Duration::seconds(2));
        assert_eq!(ticks(&due), [(at(21), false)]);
    }
}
