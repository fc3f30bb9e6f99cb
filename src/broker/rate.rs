//! Token-bucket rate limits, kept per key in the executor thread.
//!
//! Used for failed authentications per source ([`Source`]) and for requests per agent. A bucket
//! holds up to `count` tokens and refills at `count` per `window`; an empty bucket says how long
//! until the next token. The map is bounded ([`Bounded`]): when full, the oldest bucket is
//! forgotten, never the whole map, so a flood of new sources forgets only what is oldest.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::policy::Rate;

/// Where a request comes from, as limits count it: an IPv4 address, or the /64 prefix of an IPv6
/// address (one host usually holds a whole /64, so rotating addresses within it is one source).
/// IPv4-mapped IPv6 addresses count as their IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source of a peer address.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(_) => Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// A map with at most `cap` keys; inserting a new key into a full map forgets the oldest key.
#[derive(Debug)]
pub struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Eq + Hash + Clone, V> Bounded<K, V> {
    /// An empty map holding at most `cap` keys.
    pub fn new(cap: usize) -> Self {
        Bounded { map: HashMap::new(), order: VecDeque::new(), cap: cap.max(1) }
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// The value of `key`, to change it.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.map.get_mut(key)
    }

    /// Whether `key` is held.
    pub fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Inserts (or replaces) `key`, forgetting the oldest keys while full.
    pub fn insert(&mut self, key: K, value: V) -> &mut V {
        if !self.map.contains_key(&key) {
            while self.map.len() >= self.cap {
                match self.order.pop_front() {
                    Some(old) => {
                        self.map.remove(&old);
                    }
                    None => break,
                }
            }
            self.order.push_back(key.clone());
        }
        self.map.insert(key.clone(), value);
        self.map.get_mut(&key).expect("inserted above")
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

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
    buckets: RefCell<Bounded<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// A limiter tracking at most `max_keys` keys.
    pub fn new(max_keys: usize) -> Self {
        RateLimiter { buckets: RefCell::new(Bounded::new(max_keys)) }
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
        let b = map.insert(key.clone(), Bucket { tokens: f64::from(rate.count), at: now });
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
    fn a_flood_of_new_keys_forgets_the_oldest_not_everyone() {
        let l = RateLimiter::new(100);
        let rate = Rate { count: 1, window: Duration::from_secs(600) };
        let t0 = Instant::now();
        // 50 sources used their one attempt; then 49 more arrive: all 50 stay limited.
        for i in 0..50u32 {
            l.take(&i, rate, t0).unwrap();
        }
        for i in 1000..1049u32 {
            let _ = l.take(&i, rate, t0);
        }
        assert!((0..50u32).all(|i| l.check(&i, rate, t0).is_err()), "nobody was reset");
        // Past the bound only the oldest are forgotten.
        for i in 2000..2010u32 {
            let _ = l.take(&i, rate, t0);
        }
        assert!(l.check(&0, rate, t0).is_ok(), "the oldest was forgotten");
        assert!((10..50u32).all(|i| l.check(&i, rate, t0).is_err()), "the rest are still limited");
    }

    #[test]
    fn sources_group_ipv6_by_64_and_unmap_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        assert_eq!(Source::of(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(Source::of(mapped), Source::of("192.0.2.7".parse().unwrap()));
        assert_ne!(Source::of("192.0.2.7".parse().unwrap()), Source::of("192.0.2.8".parse().unwrap()));
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
