//! Token buckets: how often one connection may ask the session for work.

use std::time::Instant;

/// A sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// A token bucket that starts full; time comes from the caller (the core reads no clock).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: Rate, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate.burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(
            Rate {
                per_second: 10.0,
                burst: 5.0,
            },
            start,
        );
        assert_eq!((0..8).filter(|_| bucket.take(start)).count(), 5);
        // 0.5 s later: five more tokens, never more than the burst.
        let later = start + Duration::from_millis(500);
        assert_eq!((0..8).filter(|_| bucket.take(later)).count(), 5);
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| bucket.take(much_later)).count(), 5);
        // Time going backwards (a caller's older `now`) grants nothing.
        assert!(!bucket.take(start));
    }
}
