//! Console sign-in: operator sessions, CSRF tokens, and the login limiter.
//!
//! What runs here: the executor thread (password checks run on the blocking pool, in
//! `console::actions`). A session id is 32 random bytes, given to the browser once as the
//! `ephyr_console` cookie (HttpOnly, SameSite=Strict, Secure under TLS) and kept here only as its
//! SHA-256, so a memory read of this map does not yield usable cookies. Each session carries its
//! own CSRF token (compared in constant time), an idle expiry and an absolute one; it ends at
//! logout, at either expiry, or when the operator's entry in the policy changes or disappears.
//! The map and the limiter are bounded (DESIGN.md invariant 14).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::broker::policy::{OperatorRole, Policy};
use crate::secret::{SecretString, constant_time_eq, random_bytes};

/// The cookie's name.
pub const COOKIE: &str = "ephyr_console";
/// A session ends after this long without a request.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after sign-in, however active.
pub const ABSOLUTE: Duration = Duration::from_secs(12 * 3600);
/// Most sessions at once (the least recently used goes first).
pub const MAX_SESSIONS: usize = 64;
/// Failed sign-ins (per source address, and per operator name) before each further attempt
/// must wait.
pub const FREE_FAILURES: u32 = 5;
/// Longest wait imposed after repeated failures.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(15 * 60);
/// Sources and names the limiter remembers.
const MAX_TRACKED: usize = 4096;

/// A signed-in operator, as a request sees it.
#[derive(Clone, Debug)]
pub struct Operator {
    /// The operator's name.
    pub name: String,
    /// Its role (from the current policy).
    pub role: OperatorRole,
    /// The session's CSRF token (for forms).
    pub csrf: String,
}

struct Session {
    operator: String,
    /// SHA-256 of the password hash at sign-in: a changed password ends the session.
    entry: [u8; 32],
    csrf: SecretString,
    created: Instant,
    last: Instant,
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn token() -> Option<String> {
    let mut b = zeroize::Zeroizing::new([0u8; 32]);
    random_bytes(&mut b[..]).ok()?;
    Some(data_encoding::BASE64URL_NOPAD.encode(&b[..]))
}

/// Every console session.
#[derive(Default)]
pub struct Sessions {
    map: RefCell<HashMap<[u8; 32], Session>>,
}

impl Sessions {
    /// Starts a session for `operator` (whose entry is in `policy`); returns the cookie value.
    pub fn create(&self, policy: &Policy, operator: &str, now: Instant) -> Option<SecretString> {
        let entry = sha256(policy.operators.get(operator)?.password_hash.as_bytes());
        let id = SecretString::new(token()?);
        let csrf = SecretString::new(token()?);
        let mut map = self.map.borrow_mut();
        map.retain(|_, s| live(s, now));
        while map.len() >= MAX_SESSIONS {
            let oldest = map.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k)?;
            map.remove(&oldest);
        }
        map.insert(
            sha256(id.expose().as_bytes()),
            Session { operator: operator.to_owned(), entry, csrf, created: now, last: now },
        );
        Some(id)
    }

    /// The operator behind a cookie value, if its session is live and its policy entry unchanged;
    /// touches the session.
    pub fn get(&self, policy: &Policy, cookie: &str, now: Instant) -> Option<Operator> {
        let key = sha256(cookie.as_bytes());
        let mut map = self.map.borrow_mut();
        let s = map.get_mut(&key)?;
        let current = policy.operators.get(&s.operator);
        let same = current.is_some_and(|o| constant_time_eq(&sha256(o.password_hash.as_bytes()), &s.entry));
        if !live(s, now) || !same {
            map.remove(&key);
            return None;
        }
        s.last = now;
        let role = current.map(|o| o.role)?;
        Some(Operator { name: s.operator.clone(), role, csrf: s.csrf.expose().to_owned() })
    }

    /// Ends the session behind a cookie value.
    pub fn remove(&self, cookie: &str) -> bool {
        self.map.borrow_mut().remove(&sha256(cookie.as_bytes())).is_some()
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.saturating_duration_since(s.last) < IDLE && now.saturating_duration_since(s.created) < ABSOLUTE
}

/// Whether a presented CSRF token is the session's.
pub fn csrf_ok(op: &Operator, presented: Option<&str>) -> bool {
    presented.is_some_and(|p| constant_time_eq(p.as_bytes(), op.csrf.as_bytes()))
}

/// The session cookie value in a `Cookie` header, if any.
pub fn cookie(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// `Set-Cookie` for a new session (`secure` under TLS).
pub fn set_cookie(value: &str, secure: bool) -> String {
    let s = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{s}", ABSOLUTE.as_secs())
}

/// `Set-Cookie` that clears it.
pub fn clear_cookie(secure: bool) -> String {
    let s = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{s}")
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Slows password guessing: after [`FREE_FAILURES`] failures from one address or for one name,
/// each further attempt must wait twice as long as the last (up to [`MAX_LOCKOUT`]); a success
/// clears both, and an hour without failures forgets them.
#[derive(Default)]
pub struct Limiter {
    by_source: RefCell<HashMap<IpAddr, Failures>>,
    by_name: RefCell<HashMap<String, Failures>>,
}

fn wait_for(f: Option<&Failures>, now: Instant) -> Option<Duration> {
    let f = f?;
    if f.count < FREE_FAILURES {
        return None;
    }
    let shift = (f.count - FREE_FAILURES).min(12);
    let wait = Duration::from_secs(1u64 << shift).min(MAX_LOCKOUT);
    let until = f.last + wait;
    (until > now).then(|| until - now)
}

impl Limiter {
    /// How long this source or name must still wait, if at all.
    pub fn check(&self, source: IpAddr, name: &str, now: Instant) -> Option<Duration> {
        let a = wait_for(self.by_source.borrow().get(&source), now);
        let b = wait_for(self.by_name.borrow().get(name), now);
        a.max(b)
    }

    /// Counts a failure (`name` only when it is an operator's: unknown names are not kept).
    pub fn failed(&self, source: IpAddr, name: Option<&str>, now: Instant) {
        fn bump<K: std::hash::Hash + Eq + Clone>(m: &mut HashMap<K, Failures>, k: K, now: Instant) {
            if m.len() >= MAX_TRACKED && !m.contains_key(&k) {
                m.retain(|_, f| now.saturating_duration_since(f.last) < Duration::from_secs(3600));
                if m.len() >= MAX_TRACKED {
                    return;
                }
            }
            let f = m.entry(k).or_insert(Failures { count: 0, last: now });
            f.count = f.count.saturating_add(1);
            f.last = now;
        }
        bump(&mut self.by_source.borrow_mut(), source, now);
        if let Some(n) = name {
            bump(&mut self.by_name.borrow_mut(), n.to_owned(), now);
        }
    }

    /// Clears both counters after a successful sign-in.
    pub fn succeeded(&self, source: IpAddr, name: &str) {
        self.by_source.borrow_mut().remove(&source);
        self.by_name.borrow_mut().remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_waits_after_free_failures_and_doubles() {
        let l = Limiter::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES - 1 {
            l.failed(ip, Some("alice"), t0);
        }
        assert_eq!(l.check(ip, "alice", t0), None, "the first failures are free");
        l.failed(ip, Some("alice"), t0);
        assert_eq!(l.check(ip, "alice", t0), Some(Duration::from_secs(1)));
        l.failed(ip, Some("alice"), t0);
        assert_eq!(l.check(ip, "alice", t0), Some(Duration::from_secs(2)), "doubles");
        // Another address guessing the same name waits too; the name is what is attacked.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(l.check(other, "alice", t0).is_some());
        l.succeeded(ip, "alice");
        assert_eq!(l.check(ip, "alice", t0), None);
    }

    #[test]
    fn cookie_is_found_among_others() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, "a=1; ephyr_console=xyz; b=2".parse().unwrap());
        assert_eq!(cookie(&h).as_deref(), Some("xyz"));
        h.insert(http::header::COOKIE, "ephyr_consolex=1".parse().unwrap());
        assert_eq!(cookie(&h), None);
    }
}
