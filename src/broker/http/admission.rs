//! Connection admission on the TCP listeners: how many connections one source, and everyone
//! together, may hold open.
//!
//! What runs here: bookkeeping on the executor thread at `accept` and when a connection ends (a
//! [`Slot`] guard, so a connection task that is dropped still gives its place back); a refused
//! connection gets one non-blocking `write` of a `503` and is closed. No threads, no timers.
//!
//! The header timeout bounds how long each connection may idle before its request, not how many
//! there are: without these caps a few thousand slow connections from one host would starve
//! everyone. Limits (DESIGN.md invariant 14, bounded by [`Source`]):
//! - [`PER_SOURCE`] connections per source (an IPv4 address, or an IPv6 /64);
//! - [`FOR_STRANGERS`] connections in all for sources that have never authenticated;
//! - [`TOTAL`] in all: the difference is headroom that only sources which authenticated before
//!   (an agent's host) can use, so strangers cannot fill the broker to the last place.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, TcpStream};
use std::rc::Rc;

use crate::broker::metrics::Metrics;
use crate::broker::rate::{Bounded, Source};

/// Most open connections from one source.
pub const PER_SOURCE: usize = 128;
/// Most open connections from sources that never authenticated.
pub const FOR_STRANGERS: usize = 512;
/// Most open connections in all (both TCP listeners).
pub const TOTAL: usize = 768;
/// Sources remembered as having authenticated (oldest forgotten first).
const KNOWN_SOURCES: usize = 4096;

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its source holds [`PER_SOURCE`] connections already.
    PerSource,
    /// Strangers hold [`FOR_STRANGERS`] connections already.
    Strangers,
    /// The broker holds [`TOTAL`] connections.
    Total,
}

impl Refusal {
    /// Stable code (metrics, the refusal body).
    pub fn code(self) -> &'static str {
        match self {
            Refusal::PerSource => "too_many_connections_from_source",
            Refusal::Strangers => "too_many_unauthenticated_connections",
            Refusal::Total => "too_many_connections",
        }
    }

    fn message(self) -> String {
        match self {
            Refusal::PerSource => {
                format!("this address already holds {PER_SOURCE} connections to the broker; close some or reuse them")
            }
            Refusal::Strangers => format!(
                "the broker holds {FOR_STRANGERS} connections from addresses that never authenticated; retry shortly"
            ),
            Refusal::Total => format!("the broker holds {TOTAL} connections; retry shortly"),
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    strangers: usize,
    by_source: HashMap<Source, usize>,
}

/// The admission state, shared by the TCP listeners.
pub struct Admission {
    counts: RefCell<Counts>,
    known: RefCell<Bounded<Source, ()>>,
    metrics: Rc<Metrics>,
}

/// A place held by one connection; dropping it gives the place back.
pub struct Slot {
    admission: Rc<Admission>,
    source: Source,
    stranger: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.admission.counts.borrow_mut();
        c.total = c.total.saturating_sub(1);
        if self.stranger {
            c.strangers = c.strangers.saturating_sub(1);
        }
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
        self.admission.metrics.set("ephyr_connections_open", &[], c.total as f64);
    }
}

impl Admission {
    /// Empty state.
    pub fn new(metrics: Rc<Metrics>) -> Rc<Admission> {
        Rc::new(Admission { counts: RefCell::default(), known: RefCell::new(Bounded::new(KNOWN_SOURCES)), metrics })
    }

    /// Remembers that `ip` authenticated successfully: its later connections may use the
    /// headroom above [`FOR_STRANGERS`].
    pub fn vouch(&self, ip: IpAddr) {
        let s = Source::of(ip);
        let mut known = self.known.borrow_mut();
        if !known.contains(&s) {
            known.insert(s, ());
        }
    }

    /// A place for a connection from `ip`, or why not.
    pub fn admit(self: &Rc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let source = Source::of(ip);
        let stranger = !self.known.borrow().contains(&source);
        let mut c = self.counts.borrow_mut();
        let from_source = c.by_source.get(&source).copied().unwrap_or(0);
        let refusal = if from_source >= PER_SOURCE {
            Some(Refusal::PerSource)
        } else if c.total >= TOTAL {
            Some(Refusal::Total)
        } else if stranger && c.strangers >= FOR_STRANGERS {
            Some(Refusal::Strangers)
        } else {
            None
        };
        if let Some(r) = refusal {
            drop(c);
            self.metrics.inc("ephyr_connections_refused_total", &[("reason", r.code())]);
            return Err(r);
        }
        c.total += 1;
        if stranger {
            c.strangers += 1;
        }
        *c.by_source.entry(source).or_insert(0) += 1;
        self.metrics.set("ephyr_connections_open", &[], c.total as f64);
        Ok(Slot { admission: self.clone(), source, stranger })
    }

    /// Open connections (tests, status).
    pub fn open(&self) -> usize {
        self.counts.borrow().total
    }
}

/// Tells a refused client why, in one non-blocking write (a client that does not read in time
/// just sees the connection close), and closes the connection.
pub fn refuse(stream: &TcpStream, r: Refusal) {
    let body = serde_json::json!({ "error": r.code(), "message": r.message() }).to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut s = stream;
    let _ = s.write(format!("{head}{body}").as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_cannot_hold_more_than_its_share_and_strangers_leave_headroom() {
        let a = Admission::new(Rc::new(Metrics::default()));
        let flood: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..PER_SOURCE {
            held.push(a.admit(flood).unwrap());
        }
        assert_eq!(a.admit(flood).err(), Some(Refusal::PerSource));
        // An IPv6 host rotating addresses within its /64 is one source.
        let v6 = |i: u16| -> IpAddr { format!("2001:db8::{i:x}").parse().unwrap() };
        for i in 0..PER_SOURCE as u16 {
            held.push(a.admit(v6(i)).unwrap());
        }
        assert_eq!(a.admit(v6(999)).err(), Some(Refusal::PerSource));
        // Many strangers fill their share; a known agent host still gets in.
        let mut n = 0u32;
        loop {
            let ip: IpAddr = std::net::Ipv4Addr::from(0x0a00_0000 + n).into();
            n += 1;
            match a.admit(ip) {
                Ok(s) => held.push(s),
                Err(r) => {
                    assert_eq!(r, Refusal::Strangers);
                    break;
                }
            }
        }
        assert_eq!(a.open(), FOR_STRANGERS);
        let agent: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(a.admit(agent).err(), Some(Refusal::Strangers), "unknown before it authenticates");
        a.vouch(agent);
        let agent_slot = a.admit(agent).unwrap();
        assert_eq!(a.open(), FOR_STRANGERS + 1);
        // Everything is given back when the connections end (or their tasks are dropped).
        drop(held);
        drop(agent_slot);
        assert_eq!(a.open(), 0);
        assert!(a.counts.borrow().by_source.is_empty());
        assert_eq!(a.counts.borrow().strangers, 0);
        let refused = |r: Refusal| a.metrics.get("ephyr_connections_refused_total", &[("reason", r.code())]);
        assert_eq!(refused(Refusal::PerSource) + refused(Refusal::Strangers), 4.0);
    }

    #[test]
    fn the_total_is_a_hard_cap_even_for_known_sources() {
        let a = Admission::new(Rc::new(Metrics::default()));
        let mut held = Vec::new();
        for n in 0..TOTAL as u32 {
            let ip: IpAddr = std::net::Ipv4Addr::from(0x0a00_0000 + n).into();
            a.vouch(ip);
            held.push(a.admit(ip).unwrap());
        }
        let ip: IpAddr = "198.51.100.8".parse().unwrap();
        a.vouch(ip);
        assert_eq!(a.admit(ip).err(), Some(Refusal::Total));
    }
}
