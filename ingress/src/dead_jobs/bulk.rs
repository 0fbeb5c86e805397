//! Acting on every dead job a filter matches: the one loop behind
//! `conveyor dlq replay|discard --all-matching` and the admin API's
//! `POST /v1/admin/dead-jobs/replay-matching` and `…/discard-matching`.
//!
//! Records are taken oldest first, in `(dead_at, id)` order, and handled one
//! at a time through the single-record operations ([`super::replay`],
//! [`super::discard_with`]), so each one is locked, published, committed and
//! audited exactly as a single replay or discard is; its audit row also
//! carries the filter. A rate spaces replays out (a dry run publishes nothing,
//! so it is not paced). A [`Deadline`] bounds each record (see
//! [`super::Deadline`]) and stops the loop at the first record it leaves no
//! time for, for callers that cannot wait for ever.
//!
//! A call takes at most [`MAX_RECORDS`] and says where it stopped with a
//! [`Cursor`]: the next call carries on past the last record handled, so a
//! run cut short by its deadline or its limit never takes a record twice,
//! even with `force` (which takes records already replayed), and never takes
//! one that died after the run began (such as its own replays, dead again).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_platform::amqp::{Publisher, Topology};
use conveyor_schema::find_task;
use conveyor_schema::pool::{DbError, PgPool};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::listing::{self, BadCursor, Position, Target};
use super::{
    Deadline, DiscardError, DiscardOptions, DiscardOutcome, Filter, ReplayError, ReplayOptions,
    ReplayOutcome, discard_with, replay,
};

/// Most records one bulk call takes.
pub const MAX_RECORDS: i64 = listing::MAX_LIMIT;

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
        .filter(|since| conveyor_schema::timestamptz::holds(*since))
        .ok_or_else(|| {
            invalid(format!(
                "`{s}` is too far back: times from {} on are accepted",
                conveyor_schema::timestamptz::EARLIEST
            ))
        })
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

/// Where a bulk run stands, for a later call to carry on from: the bound its
/// first call set (records that died after it, its own replays among them,
/// are not taken) and the last record handled (before any: the first call's
/// `since`, see [`matching`]). Written `<until in µs>` or
/// `<until in µs>.<position>`, and passed back without being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Only records dead at or before this.
    pub until: DateTime<Utc>,
    /// Only records past this position; none: from the oldest.
    pub after: Option<Position>,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.until.timestamp_micros())?;
        match &self.after {
            Some(after) => write!(f, ".{after}"),
            None => Ok(()),
        }
    }
}

impl FromStr for Cursor {
    type Err = BadCursor;

    fn from_str(s: &str) -> Result<Self, BadCursor> {
        let (until, after) = match s.split_once('.') {
            Some((until, after)) => (until, Some(after.parse().map_err(|_| BadCursor(s.into()))?)),
            None => (s, None),
        };
        let until = listing::time_of(until).ok_or_else(|| BadCursor(s.into()))?;
        Ok(Self { until, after })
    }
}

/// One batch of matching records, oldest first.
#[derive(Debug)]
pub struct Matches {
    /// At most the filter's `limit`.
    pub records: Vec<Target>,
    /// More records match past the last of these.
    pub more: bool,
    /// Where this batch began.
    pub from: Cursor,
}

impl Matches {
    /// Where to carry on once the first `handled` records are done; `None`
    /// when no matching record is left past them.
    pub fn next(&self, handled: usize) -> Option<Cursor> {
        if handled >= self.records.len() && !self.more {
            return None;
        }
        let last = handled.min(self.records.len()).checked_sub(1);
        Some(Cursor {
            until: self.from.until,
            after: last.map(|i| self.records[i].position()).or(self.from.after),
        })
    }
}

/// The dead jobs `filter` matches past `from` (none: from the oldest, dead
/// no later than now), oldest first, at most `filter.limit` (1 to
/// [`MAX_RECORDS`]); only the fields a bulk operation uses. Records already
/// replayed or discarded match only with `force`.
///
/// `since` is read once, by the first call: it becomes the position the
/// records are taken past (`since` itself, before any id), so every cursor
/// carries it, that of a run stopped before its first record too. Read again
/// by a later call, an age like `2h` would be later, and skip the records it
/// has aged past since. Past a record, that record's position bounds them.
pub async fn matching(
    db: &PgPool,
    filter: &Filter,
    force: bool,
    from: Option<Cursor>,
) -> Result<Matches, DbError> {
    let since = filter.since.map(|since| Position {
        dead_at: since,
        // The least id: records dead at `since` itself are past it (but
        // for one with the nil id, which no job has).
        id: Uuid::nil(),
    });
    let filter = Filter {
        include_discarded: force,
        include_replayed: force,
        oldest_first: true,
        limit: filter.limit.clamp(1, MAX_RECORDS),
        until: from.map(|c| c.until),
        after: from.and_then(|c| c.after).or(since),
        since: None,
        ..filter.clone()
    };
    let after = filter.after;
    let (records, more, until) = listing::targets(db, filter).await?;
    Ok(Matches {
        records,
        more,
        from: Cursor { until, after },
    })
}

/// How fast and for how long a bulk operation may run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pace {
    /// At most this many records per second (checked with [`check_rate`]); none: as fast as they go.
    pub rate: Option<f64>,
    /// When it must be over (each record is bounded by it, see [`Deadline`]); none: until done.
    pub deadline: Option<Deadline>,
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
    /// `None` when that is after the deadline's `start_by`.
    fn start_of(&self, i: usize, began: Instant, paced: bool) -> Option<Instant> {
        let now = Instant::now();
        let at = match self.rate.filter(|_| paced) {
            Some(_) => began.checked_add(self.least_time(i + 1))?.max(now),
            None => now,
        };
        match self.deadline {
            Some(deadline) if at > deadline.start_by => None,
            _ => Some(at),
        }
    }
}

/// Paces one run at its [`Pace`], across any number of [`replay_each`] calls.
#[derive(Debug)]
pub struct Pacer {
    /// The rate and deadline.
    pace: Pace,
    /// When the run began: record `i` starts no earlier than `i / rate` after it.
    began: Instant,
    /// Records given a start so far.
    started: usize,
    /// Cancelled: the record waiting for its turn is not started (see [`Pacer::stopped_by`]).
    stop: CancellationToken,
}

impl Pacer {
    /// A run beginning now.
    pub fn new(pace: Pace) -> Self {
        Self {
            pace,
            began: Instant::now(),
            started: 0,
            stop: CancellationToken::new(),
        }
    }

    /// This pacer, whose [`replay_each`] stops before its next record once
    /// `stop` is cancelled, while that record waits for its turn too.
    pub fn stopped_by(self, stop: CancellationToken) -> Self {
        Self { stop, ..self }
    }

    /// When the next record may start; `None` when past the deadline.
    fn next_start(&mut self, paced: bool) -> Option<Instant> {
        let at = self.pace.start_of(self.started, self.began, paced)?;
        self.started += 1;
        Some(at)
    }
}

/// Replays `ids` in order with `options`, paced by `pacer` and bounded by its
/// deadline, telling `each` every outcome as it happens. Returns how many
/// were handled: all of them, unless time ran out or the pacer was stopped
/// first. The record that found no time left (before its connection or row
/// lock), or was waiting for its turn when the pacer was stopped, is left as
/// it was and not told to `each`; a publish that the deadline cuts short is
/// told, in doubt.
pub async fn replay_each(
    db: &PgPool,
    publisher: &Publisher,
    topology: &Topology,
    ids: &[Uuid],
    options: &ReplayOptions,
    pacer: &mut Pacer,
    mut each: impl FnMut(Uuid, Result<ReplayOutcome, ReplayError>),
) -> usize {
    for (i, id) in ids.iter().enumerate() {
        let Some(at) = pacer.next_start(!options.dry_run) else {
            return i;
        };
        tokio::select! {
            biased;
            () = pacer.stop.cancelled() => return i,
            () = tokio::time::sleep_until(at.into()) => {}
        }
        let options = ReplayOptions {
            deadline: pacer.pace.deadline,
            ..options.clone()
        };
        match replay(db, publisher, topology, *id, options).await {
            Err(ReplayError::OutOfTime(_)) => return i,
            outcome => each(*id, outcome),
        }
    }
    ids.len()
}

/// Discards `ids` in order with `options` (not paced: nothing is published),
/// telling `each` every outcome. Returns how many were handled before
/// `deadline` (the record that found no time left is left as it was, untold).
pub async fn discard_each(
    db: &PgPool,
    ids: &[Uuid],
    options: &DiscardOptions,
    deadline: Option<Deadline>,
    mut each: impl FnMut(Uuid, Result<DiscardOutcome, DiscardError>),
) -> usize {
    for (i, id) in ids.iter().enumerate() {
        let options = DiscardOptions {
            deadline,
            ..options.clone()
        };
        match discard_with(db, *id, options).await {
            Err(DiscardError::OutOfTime(_)) => return i,
            outcome => each(*id, outcome),
        }
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
        for bad in ["yesterday", "30", "30w", "", "99999999999999d", "3000000d"] {
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
            deadline: Some(Deadline {
                start_by: began + Duration::from_millis(600),
                finish_by: began + Duration::from_secs(1),
            }),
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
        // A pacer counts across calls.
        let mut pacer = Pacer::new(pace);
        for _ in 0..3 {
            assert!(pacer.next_start(true).is_some());
        }
        assert!(pacer.next_start(true).is_none());
    }

    fn target(micros: i64) -> Target {
        Target {
            id: Uuid::now_v7(),
            task: "diag.fail".into(),
            queue: "default".into(),
            dead_at: DateTime::from_timestamp_micros(micros).unwrap(),
        }
    }

    #[test]
    fn a_cursor_reads_back_and_says_where_to_carry_on() {
        let until = DateTime::from_timestamp_micros(1_767_225_600_000_001).unwrap();
        let start = Cursor { until, after: None };
        assert_eq!(start.to_string().parse::<Cursor>().unwrap(), start);
        let records = vec![target(10), target(10), target(20)];
        let on = Cursor {
            until,
            after: Some(records[1].position()),
        };
        assert_eq!(on.to_string().parse::<Cursor>().unwrap(), on);
        for bad in [
            "",
            "x",
            "1.2",
            "1.2.3",
            "1.2.not-a-uuid",
            "-250000000000000000",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }

        let batch = Matches {
            records,
            more: false,
            from: start,
        };
        assert_eq!(
            batch.next(0),
            Some(start),
            "nothing handled: from where it began"
        );
        assert_eq!(batch.next(2), Some(on));
        assert_eq!(batch.next(3), None, "all handled, none left");
        let limited = Matches {
            more: true,
            ..batch
        };
        assert_eq!(
            limited.next(3).and_then(|c| c.after),
            Some(limited.records[2].position())
        );
    }
}
