//! Durable counts of rejected webhook requests, for the webhook statistics
//! ("rejected by reason", issue 5).
//!
//! A rejected webhook must have no side effect on jobs, and anyone can send
//! them as fast as the network allows. So a rejection only increments an
//! in-memory counter keyed by (UTC minute, source, reason); a background task
//! adds the counters to `webhook_rejections` about once a second in one
//! upsert. The database cost is bounded by the number of distinct keys, not by
//! the request rate: the reasons are a fixed set and the source is a
//! configured name or [`UNKNOWN_SOURCE`] (a name an attacker invents is never
//! stored). Keys are written in sorted order, so concurrent ingress replicas
//! adding to the same rows cannot deadlock.
//!
//! A failed write keeps its counts for the next flush (at most
//! [`MAX_PENDING_KEYS`] keys are kept, the oldest minutes are dropped first and
//! logged); stopping the ingress runs one last flush after the last request.
//! A flush whose commit succeeded but whose answer was lost would be retried
//! and counted twice: statistics, not accounting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_schema::pool::{DbError, PgPool};
use diesel::sql_types::{Array, BigInt, Text, Timestamptz};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The `source` recorded for a request to a source that is not configured.
pub const UNKNOWN_SOURCE: &str = "(unknown)";

/// How often pending counts are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Most keys kept while the database cannot be written (a day of one source
/// and every reason is about 11 500).
pub const MAX_PENDING_KEYS: usize = 50_000;

/// (start of the UTC minute, source, reason).
type Key = (DateTime<Utc>, String, &'static str);

/// Rejection counts not yet written. Cheap to clone; clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct Rejections {
    /// Counts by key; taken whole by each flush.
    pending: Arc<Mutex<BTreeMap<Key, i64>>>,
}

impl Rejections {
    /// Counts one rejected request to `source` (`None`: not a configured
    /// source) for `reason`, at the current minute.
    pub fn record(&self, source: Option<&str>, reason: &'static str) {
        self.record_at(Utc::now(), source, reason);
    }

    fn record_at(&self, at: DateTime<Utc>, source: Option<&str>, reason: &'static str) {
        let key = (
            minute_of(at),
            source.unwrap_or(UNKNOWN_SOURCE).to_owned(),
            reason,
        );
        *self.lock().entry(key).or_insert(0) += 1;
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Key, i64>> {
        // A panic while holding the lock leaves at worst a count off by one.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> BTreeMap<Key, i64> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts back counts a flush could not write, dropping the oldest minutes
    /// beyond [`MAX_PENDING_KEYS`]; returns how many requests were dropped.
    fn restore(&self, unwritten: BTreeMap<Key, i64>) -> i64 {
        let mut pending = self.lock();
        for (key, n) in unwritten {
            *pending.entry(key).or_insert(0) += n;
        }
        let mut dropped = 0;
        while pending.len() > MAX_PENDING_KEYS {
            dropped += pending.pop_first().map_or(0, |(_, n)| n);
        }
        dropped
    }

    /// Adds the pending counts to `webhook_rejections`; returns how many
    /// requests were written. On failure the counts stay pending.
    pub async fn flush(&self, db: &PgPool) -> Result<i64, DbError> {
        let batch = self.take();
        if batch.is_empty() {
            return Ok(0);
        }
        let total = batch.values().sum();
        let (mut minutes, mut sources, mut reasons, mut counts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((minute, source, reason), n) in &batch {
            minutes.push(*minute);
            sources.push(source.clone());
            reasons.push(*reason);
            counts.push(*n);
        }
        let written = conveyor_schema::pool::run(db, move |conn| {
            use diesel::RunQueryDsl;
            diesel::sql_query(
                "INSERT INTO webhook_rejections AS r (minute, source, reason, requests) \
                 SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::bigint[]) \
                 ON CONFLICT (minute, source, reason) \
                 DO UPDATE SET requests = r.requests + EXCLUDED.requests",
            )
            .bind::<Array<Timestamptz>, _>(minutes)
            .bind::<Array<Text>, _>(sources)
            .bind::<Array<Text>, _>(reasons)
            .bind::<Array<BigInt>, _>(counts)
            .execute(conn)
        })
        .await;
        match written {
            Ok(_) => Ok(total),
            Err(err) => {
                let dropped = self.restore(batch);
                if dropped > 0 {
                    tracing::warn!(
                        requests.dropped = dropped,
                        "too many unwritten webhook rejection counts; dropped the oldest"
                    );
                }
                Err(err)
            }
        }
    }

    /// Flushes every [`FLUSH_EVERY`] until `stop`, then once more. The handle
    /// resolves after that last flush.
    pub fn spawn_flusher(self, db: PgPool, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(FLUSH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    () = stop.cancelled() => true,
                    _ = every.tick() => false,
                };
                if let Err(err) = self.flush(&db).await {
                    tracing::warn!(error = %err, "could not write webhook rejection counts; kept for the next try");
                }
                if stopping {
                    return;
                }
            }
        })
    }
}

fn minute_of(at: DateTime<Utc>) -> DateTime<Utc> {
    let secs = at.timestamp();
    DateTime::from_timestamp(secs - secs.rem_euclid(60), 0).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(min: u32, sec: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 12, min, sec).unwrap()
    }

    #[test]
    fn counts_by_minute_source_and_reason_with_unknown_sources_folded() {
        let r = Rejections::default();
        for _ in 0..1000 {
            r.record_at(at(0, 7), Some("members"), "bad_signature");
        }
        r.record_at(at(0, 59), Some("members"), "bad_signature");
        r.record_at(at(1, 0), Some("members"), "bad_signature");
        r.record_at(at(0, 1), None, "unknown_source");
        r.record_at(at(0, 2), None, "unknown_source");
        let taken = r.take();
        assert_eq!(
            taken.into_iter().collect::<Vec<_>>(),
            [
                ((at(0, 0), "(unknown)".to_owned(), "unknown_source"), 2),
                ((at(0, 0), "members".to_owned(), "bad_signature"), 1001),
                ((at(1, 0), "members".to_owned(), "bad_signature"), 1),
            ]
        );
        assert!(r.take().is_empty());
    }

    #[test]
    fn unwritten_counts_are_merged_back_and_bounded() {
        let r = Rejections::default();
        r.record_at(at(0, 0), Some("a"), "too_large");
        let batch = r.take();
        r.record_at(at(0, 30), Some("a"), "too_large");
        assert_eq!(r.restore(batch), 0);
        assert_eq!(r.lock().values().copied().collect::<Vec<_>>(), [2]);

        let mut many = BTreeMap::new();
        for i in 0..MAX_PENDING_KEYS + 5 {
            let minute = at(0, 0) + chrono::Duration::minutes(i as i64 + 1);
            many.insert((minute, "a".to_owned(), "bad_headers"), 3);
        }
        // The oldest minutes go first: the merged-back one, then five more.
        assert_eq!(r.restore(many), 2 + 5 * 3);
        assert_eq!(r.lock().len(), MAX_PENDING_KEYS);
        assert_eq!(
            r.lock().keys().next().unwrap().0,
            at(0, 0) + chrono::Duration::minutes(6)
        );
    }
}
