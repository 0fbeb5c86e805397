//! The times PostgreSQL's `timestamptz` holds: 4714-11-24 BC to 294276 AD.
//!
//! chrono reads years from -262 143 to 262 143, so a message can carry a time
//! (an `enqueued_at` of year -100 000) that PostgreSQL refuses ("timestamp out
//! of range") every time it is written. Such a time is refused where it
//! enters, like U+0000 (see [`crate::nul`]). Only the lower bound can be
//! crossed: chrono's latest time is long before PostgreSQL's.

use chrono::{DateTime, Utc};

/// 4714-11-24 00:00:00 UTC BC (year -4713 as chrono counts), the earliest
/// `timestamptz`, in seconds since the Unix epoch.
const EARLIEST_SECS: i64 = -210_866_803_200;

/// The earliest time, as PostgreSQL writes it.
pub const EARLIEST: &str = "4714-11-24 00:00:00 UTC BC";

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
        assert!(!holds(earliest - TimeDelta::nanoseconds(1)));
        assert!(!holds(DateTime::<Utc>::MIN_UTC));
        assert!(holds(Utc::now()));
    }

    #[test]
    fn chrono_ends_before_postgres_does() {
        // PostgreSQL's latest time is in 294276 AD.
        assert!(DateTime::<Utc>::MAX_UTC.year() < 294_276);
        assert!(holds(DateTime::<Utc>::MAX_UTC));
    }
}
