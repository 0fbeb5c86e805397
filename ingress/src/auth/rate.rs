//! Per-key token buckets (`governor`), held in this process.
//!
//! Each key gets `rate / replicas` tokens per second and a bucket of
//! `burst / replicas` (at least 1), where `replicas` is `auth.ingress_replicas`:
//! exact with one ingress, and across several it holds as well as the load
//! balancer spreads a producer's requests (README, "Rate limits").

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, InsufficientCapacity, Quota, RateLimiter};

/// A bucket and the (rate, burst) it was built for, to rebuild when a key's settings change.
type Bucket = (Arc<DefaultDirectRateLimiter>, (u64, u32));

/// Why tokens were not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Short {
    /// The bucket holds too few now: they will be there after this long.
    Wait(Duration),
    /// More than the bucket ever holds (its capacity in this process).
    Exceeds(u32),
}

/// Token buckets by key id.
#[derive(Clone)]
pub struct RateLimits {
    /// Ingress replicas sharing the limit.
    replicas: u32,
    /// key id → bucket.
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

impl RateLimits {
    /// No buckets yet; each key's is made on its first request.
    pub fn new(replicas: u32) -> Self {
        Self {
            replicas: replicas.max(1),
            buckets: Arc::default(),
        }
    }

    /// Takes one token from key `id`'s bucket; `Err(wait)` when it is empty.
    pub fn check(&self, id: &str, rate_per_sec: f64, burst: u32) -> Result<(), Duration> {
        self.check_n(id, rate_per_sec, burst, NonZeroU32::MIN)
            .map_err(|short| match short {
                Short::Wait(wait) => wait,
                // A bucket holds at least one token.
                Short::Exceeds(_) => Duration::from_secs(1),
            })
    }

    /// Takes `n` tokens from key `id`'s bucket at once, or none.
    pub fn check_n(
        &self,
        id: &str,
        rate_per_sec: f64,
        burst: u32,
        n: NonZeroU32,
    ) -> Result<(), Short> {
        let settings = (rate_per_sec.to_bits(), burst);
        let limiter = {
            let mut buckets = self
                .buckets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match buckets.get(id) {
                Some((limiter, built_for)) if *built_for == settings => limiter.clone(),
                _ => {
                    let limiter = Arc::new(RateLimiter::direct(self.quota(rate_per_sec, burst)));
                    buckets.insert(id.to_owned(), (limiter.clone(), settings));
                    limiter
                }
            }
        };
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Short::Wait(
                not_until.wait_time_from(DefaultClock::default().now()),
            )),
            Err(InsufficientCapacity(capacity)) => Err(Short::Exceeds(capacity)),
        }
    }

    /// The most tokens a bucket of `burst` holds in this process (at least 1).
    pub fn capacity(&self, burst: u32) -> u32 {
        (burst / self.replicas).max(1)
    }

    fn quota(&self, rate_per_sec: f64, burst: u32) -> Quota {
        let replicas = f64::from(self.replicas);
        let rate = if rate_per_sec > 0.0 && rate_per_sec.is_finite() {
            rate_per_sec
        } else {
            1.0
        };
        let period = Duration::from_secs_f64(replicas / rate).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(self.capacity(burst)).unwrap_or(NonZeroU32::MIN);
        Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse() {
        let limits = RateLimits::new(1);
        for _ in 0..3 {
            limits.check("k", 1.0, 3).unwrap();
        }
        let wait = limits.check("k", 1.0, 3).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        // Another key has its own bucket.
        limits.check("other", 1.0, 3).unwrap();
    }

    #[test]
    fn replicas_divide_the_bucket() {
        let limits = RateLimits::new(2);
        limits.check("k", 1.0, 4).unwrap();
        limits.check("k", 1.0, 4).unwrap();
        assert!(limits.check("k", 1.0, 4).is_err());
    }

    #[test]
    fn several_tokens_are_taken_together_or_not_at_all() {
        let limits = RateLimits::new(1);
        let n = |n| NonZeroU32::new(n).unwrap();
        limits.check_n("k", 1.0, 10, n(7)).unwrap();
        assert!(matches!(
            limits.check_n("k", 1.0, 10, n(4)),
            Err(Short::Wait(_))
        ));
        // The refused four were not taken: three are left.
        limits.check_n("k", 1.0, 10, n(3)).unwrap();
        assert_eq!(
            limits.check_n("other", 1.0, 10, n(11)),
            Err(Short::Exceeds(10))
        );
    }
}
