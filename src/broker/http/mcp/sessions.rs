//! Session-era MCP sessions and the change feed that open notification streams follow.
//!
//! A session is created by `initialize` and named by a random 128-bit id (`Mcp-Session-Id`). It
//! is bound to the credential that created it: a request presenting the id with another
//! credential is answered as if the session did not exist. Sessions end on `DELETE`, after
//! `mcp.session_idle_timeout` without a request, or when `mcp.max_sessions` is reached (the
//! least recently used goes first). They hold no authority of their own: every request is
//! authenticated and authorized afresh.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::mcp::server::ClientInfo;
use crate::mcp::version::Version;

/// One session.
#[derive(Debug)]
pub struct Session {
    /// Negotiated protocol version.
    pub version: Version,
    /// The agent that created it.
    pub agent: String,
    /// SHA-256 of the credential that created it.
    pub fingerprint: [u8; 32],
    /// The client.
    pub client: ClientInfo,
    /// `notifications/initialized` seen.
    pub initialized: Cell<bool>,
    /// Last request.
    pub last_used: Cell<Instant>,
    /// A GET stream is open.
    pub stream_open: Cell<bool>,
    /// `logging/setLevel` (recorded; the broker sends no log notifications).
    pub log_level: RefCell<String>,
}

/// Why a session could not be created.
#[derive(Debug, PartialEq, Eq)]
pub struct SessionsFull;

/// All sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: RefCell<HashMap<String, Rc<Session>>>,
}

impl Sessions {
    /// Creates a session and returns its id. When `max` sessions exist, idle-expired ones are
    /// dropped, then the least recently used.
    pub fn create(&self, s: Session, max: usize, idle: Duration) -> Result<String, SessionsFull> {
        if max == 0 {
            return Err(SessionsFull);
        }
        let mut id_bytes = [0u8; 16];
        crate::secret::random_bytes(&mut id_bytes).map_err(|_| SessionsFull)?;
        let id = data_encoding::BASE64URL_NOPAD.encode(&id_bytes);
        let now = Instant::now();
        let mut map = self.map.borrow_mut();
        if map.len() >= max {
            map.retain(|_, s| now.saturating_duration_since(s.last_used.get()) < idle);
        }
        while map.len() >= max {
            let oldest = map.iter().min_by_key(|(_, s)| s.last_used.get()).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    map.remove(&k);
                }
                None => break,
            }
        }
        map.insert(id.clone(), Rc::new(s));
        Ok(id)
    }

    /// The live session `id` created with the credential `fingerprint`, touched.
    pub fn get(&self, id: &str, fingerprint: &[u8; 32], idle: Duration) -> Option<Rc<Session>> {
        let now = Instant::now();
        let mut map = self.map.borrow_mut();
        let s = map.get(id)?.clone();
        if now.saturating_duration_since(s.last_used.get()) >= idle {
            map.remove(id);
            return None;
        }
        // Constant-time: the fingerprint is derived from a secret.
        if !crate::secret::constant_time_eq(&s.fingerprint, fingerprint) {
            return None;
        }
        s.last_used.set(now);
        Some(s)
    }

    /// The session `id`, without checks or touching it.
    pub fn peek(&self, id: &str) -> Option<Rc<Session>> {
        self.map.borrow().get(id).cloned()
    }

    /// Whether `id` still exists.
    pub fn exists(&self, id: &str) -> bool {
        self.map.borrow().contains_key(id)
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) -> bool {
        self.map.borrow_mut().remove(id).is_some()
    }

    /// Ends every session of `agent` (the kill switch); how many.
    pub fn remove_agent(&self, agent: &str) -> usize {
        let mut map = self.map.borrow_mut();
        let before = map.len();
        map.retain(|_, s| s.agent != agent);
        before - map.len()
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
}

/// What open notification streams follow: a generation bumped on every change that can alter
/// a caller's tool or resource list (policy reloads), and a closed flag for shutdown.
#[derive(Debug, Default)]
pub struct ChangeFeed {
    generation: Cell<u64>,
    closed: Cell<bool>,
    event: event_listener::Event,
    streams: Cell<usize>,
}

impl ChangeFeed {
    /// Announces a change.
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        self.event.notify(usize::MAX);
    }

    /// Wakes every stream without announcing a change (a session ended: its stream notices).
    pub fn wake(&self) {
        self.event.notify(usize::MAX);
    }

    /// Ends every stream (shutdown).
    pub fn close(&self) {
        self.closed.set(true);
        self.event.notify(usize::MAX);
    }

    /// Current generation.
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// Whether closed.
    pub fn closed(&self) -> bool {
        self.closed.get()
    }

    /// A listener for the next change.
    pub fn listen(&self) -> event_listener::EventListener {
        self.event.listen()
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.streams.get()
    }

    pub(super) fn opened(&self) {
        self.streams.set(self.streams.get() + 1);
    }

    pub(super) fn ended(&self) {
        self.streams.set(self.streams.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(fp: u8) -> Session {
        Session {
            version: Version::V2025_11_25,
            agent: "a".into(),
            fingerprint: [fp; 32],
            client: ClientInfo::default(),
            initialized: Cell::new(false),
            last_used: Cell::new(Instant::now()),
            stream_open: Cell::new(false),
            log_level: RefCell::new(String::new()),
        }
    }

    #[test]
    fn sessions_are_bound_to_their_credential_expire_and_stay_bounded() {
        let s = Sessions::default();
        let idle = Duration::from_secs(60);
        let id = s.create(session(1), 10, idle).unwrap();
        assert_eq!(id.len(), 22);
        assert!(s.get(&id, &[1; 32], idle).is_some());
        assert!(s.get(&id, &[2; 32], idle).is_none(), "another credential cannot use it");
        assert!(s.get(&id, &[1; 32], Duration::ZERO).is_none(), "expired");
        assert!(!s.exists(&id));
        for _ in 0..25 {
            s.create(session(1), 10, idle).unwrap();
        }
        assert_eq!(s.len(), 10);
        assert_eq!(s.create(session(1), 0, idle), Err(SessionsFull));
    }
}
