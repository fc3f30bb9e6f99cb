//! Token-bucket rate limits, kept per key in the executor thread.
//!
//! Used for failed authentications per source address and for requests per agent. A bucket
//! holds up to `count` tokens and refills at `count` per `window`; an empty bucket says how long
//! until the next token. The map is bounded: when full, buckets that have refilled completely
//! (and so carry no state worth keeping) are dropped first.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::policy::Rate;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: Rate, now: Instant) {
        let per_sec = f64::from(rate.count) / rate.window.as_secs_f64().max(1e-9);
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * per_sec).min(f64::from(rate.count));
        self.at = now;
    }

    fn wait(&self, rate: Rate) -> Duration {
        let per_sec = f64::from(rate.count) / rate.window.as_secs_f64().max(1e-9);
        Duration::from_secs_f64(((1.0 - self.tokens) / per_sec).max(0.0))
    }
}

/// Buckets by key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    buckets: RefCell<HashMap<K, Bucket>>,
    max_keys: usize,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// A limiter tracking at most `max_keys` keys.
    pub fn new(max_keys: usize) -> Self {
        RateLimiter { buckets: RefCell::new(HashMap::new()), max_keys: max_keys.max(1) }
    }

    /// Takes one token for `key`, or says how long to wait.
    pub fn take(&self, key: &K, rate: Rate, now: Instant) -> Result<(), Duration> {
        if rate.count == 0 {
            return Err(rate.window);
        }
        let mut map = self.buckets.borrow_mut();
        if let Some(b) = map.get_mut(key) {
            b.refill(rate, now);
            return if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                Ok(())
            } else {
                Err(b.wait(rate))
            };
        }
        if map.len() >= self.max_keys {
            map.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < f64::from(rate.count)
            });
            if map.len() >= self.max_keys {
                // Still full of active keys: forget them all rather than grow without bound.
                map.clear();
            }
        }
        let b = map.entry(key.clone()).or_insert(Bucket { tokens: f64::from(rate.count), at: now });
        b.refill(rate, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(b.wait(rate))
        }
    }

    /// Whether `key` has a token left, without taking it.
    pub fn check(&self, key: &K, rate: Rate, now: Instant) -> Result<(), Duration> {
        let mut map = self.buckets.borrow_mut();
        match map.get_mut(key) {
            None => Ok(()),
            Some(b) => {
                b.refill(rate, now);
                if b.tokens >= 1.0 { Ok(()) } else { Err(b.wait(rate)) }
            }
        }
    }

    /// Keys tracked (for tests and metrics).
    pub fn len(&self) -> usize {
        self.buckets.borrow().len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_empties_then_refills() {
        let l = RateLimiter::new(10);
        let rate = Rate { count: 3, window: Duration::from_secs(3) };
        let t0 = Instant::now();
        for _ in 0..3 {
            l.take(&"a", rate, t0).unwrap();
        }
        let wait = l.take(&"a", rate, t0).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(l.check(&"a", rate, t0).is_err());
        l.take(&"b", rate, t0).unwrap();
        l.take(&"a", rate, t0 + Duration::from_secs(1)).unwrap();
        assert!(l.take(&"a", rate, t0 + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn the_map_stays_bounded() {
        let l = RateLimiter::new(100);
        let rate = Rate { count: 1, window: Duration::from_secs(60) };
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let _ = l.take(&i, rate, t0);
        }
        assert!(l.len() <= 100, "{}", l.len());
    }
}
