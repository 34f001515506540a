//! Capped exponential backoff with full jitter, for reconnect loops.

use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in `[min, min(max, min * 2^attempt)]`.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .min
            .checked_mul(1u32 << self.attempt.min(20))
            .unwrap_or(self.max)
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        if cap <= self.min {
            return self.min;
        }
        let ms = rand::rng().random_range(self.min.as_millis() as u64..=cap.as_millis() as u64);
        Duration::from_millis(ms)
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_within_bounds_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut seen_max = Duration::ZERO;
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
            seen_max = seen_max.max(d);
        }
        assert!(
            seen_max > Duration::from_millis(500),
            "jitter reaches the cap region"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
