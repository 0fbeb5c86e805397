//! Acting on every dead job a filter matches: the one loop behind
//! `conveyor dlq replay|discard --all-matching` and the admin API's
//! `POST /v1/admin/dead-jobs/replay-matching` and `…/discard-matching`.
//!
//! Records are taken oldest first and handled one at a time through the
//! single-record operations ([`super::replay`], [`super::discard_with`]), so
//! each one is locked, published, committed and audited exactly as a single
//! replay or discard is; its audit row also carries the filter. A rate spaces
//! replays out (a dry run publishes nothing, so it is not paced); a deadline
//! stops the loop between records, for callers that cannot wait for ever.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_platform::amqp::{Publisher, Topology};
use conveyor_schema::find_task;
use conveyor_schema::models::DeadJob;
use conveyor_schema::pool::{DbError, PgPool};
use serde_json::Value;
use uuid::Uuid;

use super::{
    DiscardOptions, DiscardOutcome, Filter, ReplayError, ReplayOptions, ReplayOutcome,
    discard_with, list, replay,
};

/// Most records one bulk operation takes.
pub const MAX_RECORDS: i64 = 10_000;

/// Input a bulk operation refuses before touching anything.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InvalidInput {
    /// JSON pointer of the offending request field (`/rate`, `/args/until_attempt`).
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

impl InvalidInput {
    fn at(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            message: message.into(),
        }
    }
}

/// Parses a `since`: an RFC 3339 time, or an age like `30s`, `30m`, `2h`, `7d`.
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, InvalidInput> {
    if let Ok(time) = DateTime::parse_from_rfc3339(s) {
        return Ok(time.with_timezone(&Utc));
    }
    let invalid = |message: String| InvalidInput::at("/since", message);
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = number.parse().map_err(|_| {
        invalid(format!(
            "`{s}` is neither RFC 3339 nor an age like 30m, 2h, 7d"
        ))
    })?;
    let age = match unit {
        "s" => chrono::Duration::try_seconds(n),
        "m" => chrono::Duration::try_minutes(n),
        "h" => chrono::Duration::try_hours(n),
        "d" => chrono::Duration::try_days(n),
        _ => return Err(invalid(format!("`{s}`: the unit must be s, m, h or d"))),
    };
    age.and_then(|age| Utc::now().checked_sub_signed(age))
        .ok_or_else(|| invalid(format!("`{s}` is too far back")))
}

/// Checks a rate in records per second: finite and above 0.
pub fn check_rate(rate: f64) -> Result<f64, InvalidInput> {
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(InvalidInput::at("/rate", "the rate must be above 0"))
    }
}

/// Checks replacement `args` for a bulk replay: arguments belong to one task, so
/// the filter must name it, and they are validated like a new job's.
pub fn check_args(task: Option<&str>, args: &Value) -> Result<(), InvalidInput> {
    let Some(name) = task else {
        return Err(InvalidInput::at(
            "/args",
            "replacement args belong to one task: filter by task",
        ));
    };
    let task = find_task(name).ok_or_else(|| {
        InvalidInput::at(
            "/filter/task",
            format!("task `{name}` is not in the catalogue"),
        )
    })?;
    task.validate(args)
        .map_err(|err| InvalidInput::at(err.pointer, err.message))
}

/// The dead jobs `filter` matches, oldest first, at most `filter.limit` (1 to
/// [`MAX_RECORDS`]). Records already replayed or discarded match only with `force`.
pub async fn matching(db: &PgPool, filter: &Filter, force: bool) -> Result<Vec<DeadJob>, DbError> {
    let filter = Filter {
        include_discarded: force,
        include_replayed: force,
        oldest_first: true,
        limit: filter.limit.clamp(1, MAX_RECORDS),
        ..filter.clone()
    };
    list(db, filter).await
}

/// How fast and for how long a bulk operation may run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pace {
    /// At most this many records per second (checked with [`check_rate`]); none: as fast as they go.
    pub rate: Option<f64>,
    /// Start no record after this instant; none: until done.
    pub deadline: Option<Instant>,
}

impl Pace {
    /// The least time `records` take at this rate (the first starts at once).
    pub fn least_time(&self, records: usize) -> Duration {
        self.rate.map_or(Duration::ZERO, |rate| {
            Duration::try_from_secs_f64(records.saturating_sub(1) as f64 / rate)
                .unwrap_or(Duration::MAX)
        })
    }

    /// When record number `i` (from 0) of a run that began at `began` may start;
    /// `None` when that is after the deadline.
    fn start_of(&self, i: usize, began: Instant, paced: bool) -> Option<Instant> {
        let now = Instant::now();
        let at = match self.rate.filter(|_| paced) {
            Some(_) => began.checked_add(self.least_time(i + 1))?.max(now),
            None => now,
        };
        match self.deadline {
            Some(deadline) if at > deadline => None,
            _ => Some(at),
        }
    }
}

/// Replays `ids` in order with `options`, at `pace`, telling `each` every
/// outcome as it happens. Returns how many were handled: all of them, unless
/// the deadline came first.
pub async fn replay_each(
    db: &PgPool,
    publisher: &Publisher,
    topology: &Topology,
    ids: &[Uuid],
    options: &ReplayOptions,
    pace: Pace,
    mut each: impl FnMut(Uuid, Result<ReplayOutcome, ReplayError>),
) -> usize {
    let began = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let Some(at) = pace.start_of(i, began, !options.dry_run) else {
            return i;
        };
        tokio::time::sleep_until(at.into()).await;
        each(
            *id,
            replay(db, publisher, topology, *id, options.clone()).await,
        );
    }
    ids.len()
}

/// Discards `ids` in order with `options` (not paced: nothing is published),
/// telling `each` every outcome. Returns how many were handled before `deadline`.
pub async fn discard_each(
    db: &PgPool,
    ids: &[Uuid],
    options: &DiscardOptions,
    deadline: Option<Instant>,
    mut each: impl FnMut(Uuid, Result<DiscardOutcome, DbError>),
) -> usize {
    for (i, id) in ids.iter().enumerate() {
        if deadline.is_some_and(|d| Instant::now() > d) {
            return i;
        }
        each(*id, discard_with(db, *id, options.clone()).await);
    }
    ids.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn since_takes_rfc3339_or_an_age() {
        let at = parse_since("2026-01-02T03:04:05Z").unwrap();
        assert_eq!(at.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let age = Utc::now() - parse_since("30m").unwrap();
        assert!((29..=31).contains(&age.num_minutes()), "{age}");
        for bad in ["yesterday", "30", "30w", "", "99999999999999d"] {
            assert_eq!(parse_since(bad).unwrap_err().pointer, "/since", "{bad}");
        }
    }

    #[test]
    fn rate_must_be_positive_and_finite() {
        assert_eq!(check_rate(2.5).unwrap(), 2.5);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(check_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn args_need_a_task_and_must_fit_it() {
        let args = json!({"until_attempt": 1});
        assert_eq!(check_args(None, &args).unwrap_err().pointer, "/args");
        assert_eq!(
            check_args(Some("no.such"), &args).unwrap_err().pointer,
            "/filter/task"
        );
        assert!(check_args(Some("diag.fail"), &args).is_ok());
        let bad = check_args(Some("diag.fail"), &json!({"until_attempt": "soon"})).unwrap_err();
        assert_eq!(bad.pointer, "/args/until_attempt");
    }

    #[test]
    fn a_rate_spaces_records_and_a_deadline_stops_them() {
        let began = Instant::now();
        let pace = Pace {
            rate: Some(4.0),
            deadline: Some(began + Duration::from_millis(600)),
        };
        assert_eq!(pace.least_time(5), Duration::from_secs(1));
        assert_eq!(pace.least_time(0), Duration::ZERO);
        let third = pace.start_of(2, began, true).unwrap();
        assert!(third >= began + Duration::from_millis(500));
        assert!(
            pace.start_of(3, began, true).is_none(),
            "750 ms is past the deadline"
        );
        // Unpaced (a dry run): every record may start now.
        assert!(pace.start_of(3, began, false).is_some());
    }
}
