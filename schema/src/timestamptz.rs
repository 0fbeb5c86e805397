//! The times PostgreSQL's `timestamptz` holds: 4714-11-24 BC to 294276 AD.
//!
//! chrono reads years from -262 143 to 262 143, so a message can carry a time
//! (an `enqueued_at` of year -100 000) that PostgreSQL refuses ("timestamp out
//! of range") every time it is written. Such a time is refused where it
//! enters, like U+0000 (see [`crate::nul`]). Only the lower bound can be
//! crossed: chrono's latest time is long before PostgreSQL's.
//!
//! Every time a request carries (a webhook's `occurred_at`, the dead-job
//! listing's `since`, the statistics' `from` and `to`, …) goes through
//! [`check`], so each is refused with the same message, naming its field and
//! this range, instead of failing its statement (a 503, or a job retried
//! until it dies).

use chrono::{DateTime, Utc};

/// 4714-11-24 00:00:00 UTC BC (year -4713 as chrono counts), the earliest
/// `timestamptz`, in seconds since the Unix epoch.
const EARLIEST_SECS: i64 = -210_866_803_200;

/// The earliest time, as PostgreSQL writes it.
pub const EARLIEST: &str = "4714-11-24 00:00:00 UTC BC";

/// The latest time, as PostgreSQL writes it (chrono never gets this far).
pub const LATEST: &str = "294276-12-31 23:59:59.999999 UTC";

/// A time in a request that PostgreSQL's `timestamptz` cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {at} is out of range: times from {EARLIEST} to {LATEST} are accepted")]
pub struct OutOfRange {
    /// The field or query parameter that carried it, e.g. `since`.
    pub field: String,
    /// The time, as RFC 3339.
    pub at: String,
}

/// `at` if PostgreSQL can hold it; otherwise an error naming `field` and the
/// range that is accepted.
pub fn check(field: &str, at: DateTime<Utc>) -> Result<DateTime<Utc>, OutOfRange> {
    if holds(at) {
        Ok(at)
    } else {
        Err(OutOfRange {
            field: field.to_owned(),
            at: at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        })
    }
}

/// The earliest time PostgreSQL's `timestamptz` holds.
pub fn earliest() -> DateTime<Utc> {
    DateTime::from_timestamp(EARLIEST_SECS, 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Whether PostgreSQL's `timestamptz` can hold `at`.
pub fn holds(at: DateTime<Utc>) -> bool {
    // Seconds round down (the nanoseconds are never negative), and the bound
    // is a whole second.
    at.timestamp() >= EARLIEST_SECS
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, NaiveDate, TimeDelta};

    #[test]
    fn the_earliest_time_is_held_and_the_instant_before_is_not() {
        let earliest = NaiveDate::from_ymd_opt(-4713, 11, 24)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        assert_eq!(earliest.timestamp(), EARLIEST_SECS);
        assert!(holds(earliest));
        assert_eq!(super::earliest(), earliest);
        assert!(!holds(earliest - TimeDelta::nanoseconds(1)));
        assert!(!holds(DateTime::<Utc>::MIN_UTC));
        assert!(holds(Utc::now()));
    }

    #[test]
    fn check_names_the_field_and_the_range() {
        let at = "-100000-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let err = check("since", at).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`since` -100000-01-01T00:00:00Z is out of range: times from \
             4714-11-24 00:00:00 UTC BC to 294276-12-31 23:59:59.999999 UTC are accepted"
        );
        let now = Utc::now();
        assert_eq!(check("since", now), Ok(now));
    }

    #[test]
    fn chrono_ends_before_postgres_does() {
        // PostgreSQL's latest time is in 294276 AD.
        assert!(DateTime::<Utc>::MAX_UTC.year() < 294_276);
        assert!(holds(DateTime::<Utc>::MAX_UTC));
    }
}
