//! Token buckets for the command path: one global bucket, taken before a
//! message is read, and one per authenticated operator.

use std::collections::HashMap;

/// A token bucket: `burst` tokens, refilled at `rate_per_s`.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate_per_s: u32, burst: u32, now_ms: u64) -> Self {
        Bucket {
            rate_per_s: f64::from(rate_per_s),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last_ms: now_ms,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now_ms: u64) -> bool {
        let elapsed_s = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed_s * self.rate_per_s).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely by `now_ms` (it can then
    /// be forgotten: a new bucket would be the same).
    fn full_at(&self, now_ms: u64) -> bool {
        let elapsed_s = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens + elapsed_s * self.rate_per_s >= self.burst
    }
}

/// Most operators tracked at once; full buckets are forgotten first.
const MAX_OPERATORS: usize = 10_000;

/// One bucket per operator.
#[derive(Debug)]
pub struct PerOperator {
    rate_per_s: u32,
    burst: u32,
    buckets: HashMap<String, Bucket>,
}

impl PerOperator {
    pub fn new(rate_per_s: u32, burst: u32) -> Self {
        PerOperator {
            rate_per_s,
            burst,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token from `operator`'s bucket.
    pub fn take(&mut self, operator: &str, now_ms: u64) -> bool {
        if self.buckets.len() >= MAX_OPERATORS && !self.buckets.contains_key(operator) {
            self.buckets.retain(|_, b| !b.full_at(now_ms));
            if self.buckets.len() >= MAX_OPERATORS {
                // Every tracked operator is mid-burst: refuse newcomers
                // rather than forget a limit.
                return false;
            }
        }
        let (rate, burst) = (self.rate_per_s, self.burst);
        self.buckets
            .entry(operator.to_owned())
            .or_insert_with(|| Bucket::new(rate, burst, now_ms))
            .take(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket::new(10, 3, 0);
        assert!((0..3).all(|_| b.take(0)));
        assert!(!b.take(0));
        assert!(!b.take(50), "half a token after 50 ms");
        assert!(b.take(100));
        assert!(!b.take(100));
        // Never more than the burst, however long it rested.
        let allowed = (0..10).filter(|_| b.take(1_000_000)).count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn operators_have_their_own_buckets() {
        let mut p = PerOperator::new(1, 2);
        assert!(p.take("alice", 0) && p.take("alice", 0));
        assert!(!p.take("alice", 0));
        assert!(p.take("bob", 0));
        assert!(p.take("alice", 1000));
    }
}
