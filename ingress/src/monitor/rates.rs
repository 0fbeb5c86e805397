//! The last minute's events of each queue (published, started, succeeded,
//! retried, dead), carried from one poll to the next.
//!
//! Counting the whole minute again on every poll read every job row changed in
//! the last 90 s: about half a second per poll at 10 000 jobs/s, in every
//! ingress, and more as the job rate grows. Instead each poll counts only the
//! events of the seconds since the previous one, per second, and the minute is
//! the sum of its last 60 seconds. A poll reads the rows changed since the
//! previous poll's seconds began (less [`CLOCK_SKEW_SECS`]), about 22 s of rows with
//! the default 5 s poll and 13 s lag; only the first poll reads a whole minute.
//!
//! An event is counted with its second (by the time its writer stamped on it),
//! once that second is [`lag_secs`] old by the database's clock, so the
//! commit that records it has landed. That commit may come well after the
//! stamp: the ingress records a job only once the broker confirmed its
//! publish, and a worker commits a retry or a dead job only once the retry or
//! dead letter is confirmed, each waiting up to `amqp.publish_timeout_ms`; a
//! worker then lingers up to 1 s (`worker.state_linger_ms`) before its
//! commit; and a writer's clock may run behind the database's by up to
//! [`CLOCK_SKEW_SECS`]. So the lag is the publish timeout + 8 s: 13 s by
//! default, and the last minute shown is the minute that ended 13 s ago. A
//! row changed again later still shows the event, but its second has been
//! counted, so no event counts twice. An event committed more than the lag
//! after its stamp (the database was down, say, and the ingress wrote the
//! record again later) is not counted.
//!
//! One event a row does not keep: a job's next attempt replaces its
//! `started_at`, so of two starts within the lag only the later is counted.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

/// How far a worker's or enqueuer's clock may run ahead of the database's or
/// behind it: a row's `updated_at` (the database's clock) may be this much
/// earlier than the event times (the writer's clock) it records, and a commit
/// may land this much later than they say.
const CLOCK_SKEW_SECS: i64 = 5;
/// From a confirmed publish to the commit that records it: the worker's state
/// linger (at most 1 s) and the commit itself.
const COMMIT_SECS: i64 = 2;
/// The window the counts cover.
const WINDOW_SECS: i64 = 60;

/// One queue's events in some span of time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Jobs recorded (new, scheduled and replayed ones).
    pub published: i64,
    /// Attempts started.
    pub started: i64,
    /// Jobs that succeeded.
    pub succeeded: i64,
    /// Failed attempts rescheduled for a retry.
    pub retried: i64,
    /// Jobs that died.
    pub dead: i64,
}

impl Counts {
    /// Adds `n` events of `kind`, one of the kinds [`EVENTS`] yields.
    fn add(&mut self, kind: &str, n: i64) {
        match kind {
            "published" => self.published += n,
            "started" => self.started += n,
            "succeeded" => self.succeeded += n,
            "retried" => self.retried += n,
            "dead" => self.dead += n,
            _ => {}
        }
    }

    fn sum(self, other: Self) -> Self {
        Self {
            published: self.published + other.published,
            started: self.started + other.started,
            succeeded: self.succeeded + other.succeeded,
            retried: self.retried + other.retried,
            dead: self.dead + other.dead,
        }
    }
}

/// Seconds a second waits before it is counted: long enough for every commit
/// recording one of its events to have landed (see the module's header). The
/// extra second is the second itself: its events are stamped anywhere in it.
pub fn lag_secs(publish_timeout: Duration) -> i64 {
    let publish = publish_timeout.as_millis().div_ceil(1000) as i64;
    publish + COMMIT_SECS + CLOCK_SKEW_SECS + 1
}

/// Per queue, the events of each counted second (Unix time) of the window.
#[derive(Debug)]
pub struct MinuteRates {
    seconds: HashMap<String, BTreeMap<i64, Counts>>,
    /// The last second counted; `None` before the first poll.
    counted_to: Option<i64>,
    /// A second is counted once it is this old ([`lag_secs`]).
    lag_secs: i64,
}

/// The events of the seconds after `$1` up to `$2` (Unix seconds), per queue,
/// kind and second, from the rows changed since those seconds began (less the
/// skew; the BRIN index on `updated_at` keeps this to the table's last pages).
/// `retried` counts failed attempts that were not a job's last: every error of
/// a job that is not dead, all but the final one of a dead job.
const EVENTS: &str = "
SELECT j.queue, e.kind, floor(extract(epoch FROM e.at))::int8 AS second, count(*)::int8 AS n
FROM jobs j
CROSS JOIN LATERAL (
    VALUES ('published', j.enqueued_at),
           ('started', j.started_at),
           ('succeeded', CASE WHEN j.state = 'succeeded' THEN j.finished_at END),
           ('dead', CASE WHEN j.state = 'dead' THEN j.finished_at END)
    UNION ALL
    SELECT 'retried', (x->>'at')::timestamptz FROM jsonb_array_elements(j.errors) x
    WHERE NOT (j.state = 'dead' AND (x->>'attempt')::int >= j.attempts)
) AS e(kind, at)
WHERE j.updated_at > to_timestamp($1 + 1 - $3)
  AND e.at >= to_timestamp($1 + 1) AND e.at < to_timestamp($2 + 1)
GROUP BY 1, 2, 3";

#[derive(QueryableByName)]
struct Event {
    #[diesel(sql_type = Text)]
    queue: String,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = BigInt)]
    second: i64,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Now {
    #[diesel(sql_type = BigInt)]
    second: i64,
}

impl MinuteRates {
    /// Nothing counted yet, for publishes that wait up to `publish_timeout`
    /// for their confirms.
    pub fn new(publish_timeout: Duration) -> Self {
        Self {
            seconds: HashMap::new(),
            counted_to: None,
            lag_secs: lag_secs(publish_timeout),
        }
    }

    /// Counts the seconds that became [`lag_secs`] old since the last poll.
    /// On an error nothing changes, and the next poll counts those seconds too.
    pub fn poll(&mut self, conn: &mut PgConnection) -> QueryResult<()> {
        let now: Now = diesel::sql_query("SELECT floor(extract(epoch FROM now()))::int8 AS second")
            .get_result(conn)?;
        let upto = now.second - self.lag_secs;
        let from = self.counted_to.unwrap_or(i64::MIN).max(upto - WINDOW_SECS);
        if from >= upto {
            return Ok(());
        }
        let events: Vec<Event> = diesel::sql_query(EVENTS)
            .bind::<BigInt, _>(from)
            .bind::<BigInt, _>(upto)
            .bind::<BigInt, _>(CLOCK_SKEW_SECS)
            .load(conn)?;
        self.count(upto, events);
        Ok(())
    }

    /// Adds the events of the seconds up to `upto` and forgets the seconds
    /// that left the window.
    fn count(&mut self, upto: i64, events: Vec<Event>) {
        for event in events {
            self.seconds
                .entry(event.queue)
                .or_default()
                .entry(event.second)
                .or_default()
                .add(&event.kind, event.n);
        }
        self.counted_to = Some(upto);
        for seconds in self.seconds.values_mut() {
            *seconds = seconds.split_off(&(upto - WINDOW_SECS + 1));
        }
        self.seconds.retain(|_, seconds| !seconds.is_empty());
    }

    /// `queue`'s events in the last 60 counted seconds.
    pub fn last_minute(&self, queue: &str) -> Counts {
        self.seconds
            .get(queue)
            .map_or_else(Counts::default, |seconds| {
                seconds.values().fold(Counts::default(), |a, b| a.sum(*b))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(queue: &str, kind: &str, second: i64, n: i64) -> Event {
        Event {
            queue: queue.into(),
            kind: kind.into(),
            second,
            n,
        }
    }

    #[test]
    fn the_lag_covers_a_publish_confirm_a_commit_and_clock_skew() {
        assert_eq!(lag_secs(Duration::from_secs(5)), 13);
        assert_eq!(lag_secs(Duration::from_millis(4_001)), 13);
        assert_eq!(lag_secs(Duration::from_millis(1)), 9);
    }

    #[test]
    fn a_minute_is_the_sum_of_its_last_sixty_counted_seconds() {
        let mut rates = MinuteRates::new(Duration::from_secs(5));
        rates.count(
            1_005,
            vec![
                event("default", "published", 1_000, 3),
                event("default", "succeeded", 1_004, 2),
                event("default", "retried", 1_005, 1),
                event("mail", "dead", 1_001, 1),
            ],
        );
        rates.count(1_010, vec![event("default", "started", 1_009, 4)]);
        let expected = Counts {
            published: 3,
            started: 4,
            succeeded: 2,
            retried: 1,
            dead: 0,
        };
        assert_eq!(rates.last_minute("default"), expected);
        assert_eq!(rates.last_minute("mail").dead, 1);
        assert_eq!(rates.last_minute("none"), Counts::default());

        // Up to 1 060 the window is 1 001..=1 060: second 1 000 has left it.
        rates.count(1_060, Vec::new());
        assert_eq!(rates.last_minute("default").published, 0);
        assert_eq!(rates.last_minute("default").started, 4);
        assert_eq!(rates.last_minute("mail").dead, 1);
        rates.count(1_061, Vec::new());
        assert_eq!(rates.last_minute("mail"), Counts::default());
        assert!(
            !rates.seconds.contains_key("mail"),
            "emptied queues are forgotten"
        );
    }
}
