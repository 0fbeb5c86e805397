//! Percentiles of latency samples.

use std::time::Duration;

/// The `q`-quantile (0..=1) of `samples` in milliseconds, nearest-rank; 0 when empty.
pub fn quantile_ms(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile_ms(&mut s, 0.5), 50.0);
        assert_eq!(quantile_ms(&mut s, 0.99), 99.0);
        assert_eq!(quantile_ms(&mut s, 1.0), 100.0);
        assert_eq!(quantile_ms(&mut [], 0.5), 0.0);
    }
}
