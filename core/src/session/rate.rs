//! Token buckets: how often one connection may ask the session for work.
//!
//! Every member carries its buckets, so they are small: the token counts of both kinds and
//! one refill time; the rates are the session's.

use std::time::Instant;

/// A sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// What a message draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    Free,
    /// A change to the document or to awareness.
    Update,
    /// A request for the whole scene or a diff: each costs the document's size.
    Request,
}

/// The rates one session applies to each of its members.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Document changes (commands, uploads, Yjs updates, awareness).
    pub update: Rate,
    /// Requests for the whole scene or a diff (`sync:request`, a Yjs SyncStep1 or awareness
    /// query): each costs the document's size.
    pub request: Rate,
}

/// One member's two token buckets, full at first; time comes from the caller (the core reads
/// no clock).
#[derive(Debug, Clone)]
pub struct Buckets {
    updates: f32,
    requests: f32,
    /// When both were last refilled.
    refilled: Instant,
}

impl Buckets {
    pub fn new(rates: &Rates, now: Instant) -> Buckets {
        Buckets {
            updates: rates.update.burst as f32,
            requests: rates.request.burst as f32,
            refilled: now,
        }
    }

    /// Takes one token of `cost`'s kind if there is one.
    pub fn take(&mut self, cost: Cost, rates: &Rates, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = self.refilled.max(now);
        let refill = |tokens: f32, rate: &Rate| {
            (f64::from(tokens) + elapsed * rate.per_second).min(rate.burst) as f32
        };
        self.updates = refill(self.updates, &rates.update);
        self.requests = refill(self.requests, &rates.request);
        let tokens = match cost {
            Cost::Free => return true,
            Cost::Update => &mut self.updates,
            Cost::Request => &mut self.requests,
        };
        if *tokens >= 1.0 {
            *tokens -= 1.0;
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
    fn a_burst_then_the_sustained_rate_for_each_kind() {
        let start = Instant::now();
        let rates = Rates {
            update: Rate {
                per_second: 10.0,
                burst: 5.0,
            },
            request: Rate {
                per_second: 2.0,
                burst: 1.0,
            },
        };
        let mut buckets = Buckets::new(&rates, start);
        let take = |b: &mut Buckets, cost, at| (0..8).filter(|_| b.take(cost, &rates, at)).count();
        assert_eq!(take(&mut buckets, Cost::Update, start), 5);
        assert_eq!(take(&mut buckets, Cost::Request, start), 1);
        assert_eq!(take(&mut buckets, Cost::Free, start), 8);
        // 0.5 s later: five more updates, one more request, never more than the burst.
        let later = start + Duration::from_millis(500);
        assert_eq!(take(&mut buckets, Cost::Update, later), 5);
        assert_eq!(take(&mut buckets, Cost::Request, later), 1);
        let much_later = later + Duration::from_secs(60);
        assert_eq!(take(&mut buckets, Cost::Update, much_later), 5);
        // Time going backwards (a caller's older `now`) grants nothing.
        assert!(!buckets.take(Cost::Update, &rates, start));
    }
}
