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
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A bucket and the (rate, burst) it was built for, to rebuild when a key's settings change.
type Bucket = (Arc<DefaultDirectRateLimiter>, (u64, u32));

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
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    fn quota(&self, rate_per_sec: f64, burst: u32) -> Quota {
        let replicas = f64::from(self.replicas);
        let rate = if rate_per_sec > 0.0 && rate_per_sec.is_finite() {
            rate_per_sec
        } else {
            1.0
        };
        let period = Duration::from_secs_f64(replicas / rate).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new((burst / self.replicas).max(1)).unwrap_or(NonZeroU32::MIN);
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
}
