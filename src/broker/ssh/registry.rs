//! The issued-certificate registry: every SSH certificate the broker obtained, for `list_certs`,
//! the concurrency limits and the revocation list (KRL).
//!
//! What runs here: in memory on the executor thread; records are appended to
//! `<data-dir>/state/certs.journal` (`broker::journal` framing) so the KRL
//! still lists a revoked task's certificates after a restart. At start the journal is replayed,
//! expired certificates are dropped and the file is rewritten compacted.
//!
//! A certificate is *in use* while the broker holds its private key (a running one-shot command
//! or an open session); keys live only in memory, so after a restart nothing is in use.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use crate::broker::Error;
use crate::broker::journal::{Backend, Durable, Store};

/// One issued certificate (no key material: the certificate itself is public, but it is not
/// kept either).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// Serial chosen by the signer.
    pub serial: u64,
    /// Key id (names agent, task, target/role and a request id).
    pub key_id: String,
    /// The agent (or `operator:uidN`).
    pub agent: String,
    /// The task it was issued under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Root to task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lineage: Vec<String>,
    /// Target name (empty for operator certificates).
    #[serde(default)]
    pub target: String,
    /// Role name.
    #[serde(default)]
    pub role: String,
    /// The principal it names.
    pub principal: String,
    /// Unix seconds.
    pub valid_after: u64,
    /// Unix seconds.
    pub valid_before: u64,
    /// The session holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Issued(Issued),
    Revoked { serial: u64, at: i64 },
}

struct Entry {
    cert: Issued,
    in_use: bool,
    revoked_at: Option<i64>,
}

/// A certificate as listed.
#[derive(Clone, Debug)]
pub struct Listed {
    /// The record.
    pub cert: Issued,
    /// The broker holds its key.
    pub in_use: bool,
    /// Revoked by an operator.
    pub revoked_at: Option<i64>,
}

type Entries = Rc<RefCell<BTreeMap<u64, Entry>>>;

/// A certificate whose private key the broker holds (a running command, an open session): it
/// counts against the concurrency limits until this guard is dropped, however the holder ends
/// (DESIGN.md invariant 13: a dropped future releases its certificate too).
pub struct Held {
    entries: std::rc::Weak<RefCell<BTreeMap<u64, Entry>>>,
    serial: u64,
}

impl Held {
    /// The certificate's serial.
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({:016x})", self.serial)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(entries) = self.entries.upgrade()
            && let Ok(mut e) = entries.try_borrow_mut()
            && let Some(x) = e.get_mut(&self.serial)
        {
            x.in_use = false;
        }
    }
}

/// The durable log of certificate records.
pub const LOG: &str = "certs";

/// The registry.
#[derive(Default)]
pub struct Registry {
    entries: Entries,
    journal: RefCell<Option<Rc<dyn Store>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({} certificates)", self.entries.borrow().len())
    }
}

impl Registry {
    /// Replays log [`LOG`] from `backend`, drops certificates expired at `now` (Unix seconds),
    /// rewrites the log compacted when that changed anything (or it had a torn tail), and opens
    /// it for appending. Returns the registry and the torn bytes.
    pub async fn load(backend: &dyn Backend, now: u64) -> Result<(Registry, usize), Error> {
        let replayed = backend.replay(LOG).await?;
        let reg = Registry::default();
        {
            let mut e = reg.entries.borrow_mut();
            for (i, raw) in replayed.records.iter().enumerate() {
                let r: Record = serde_json::from_slice(raw)
                    .map_err(|err| Error::Unavailable(format!("{LOG} log: record {}: {err}", i + 1)))?;
                match r {
                    Record::Issued(c) => {
                        e.insert(c.serial, Entry { cert: c, in_use: false, revoked_at: None });
                    }
                    Record::Revoked { serial, at } => {
                        if let Some(x) = e.get_mut(&serial) {
                            x.revoked_at.get_or_insert(at);
                        }
                    }
                }
            }
            e.retain(|_, x| x.cert.valid_before > now);
        }
        let snapshot = reg.snapshot();
        let changed =
            replayed.records.is_empty() || replayed.torn_bytes > 0 || snapshot.len() != replayed.records.len();
        let log = backend.open(LOG, changed.then_some(snapshot)).await?;
        *reg.journal.borrow_mut() = Some(log);
        Ok((reg, replayed.torn_bytes))
    }

    fn journal(&self) -> Option<Rc<dyn Store>> {
        self.journal.borrow().clone()
    }

    fn snapshot(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for x in self.entries.borrow().values() {
            out.push(serde_json::to_vec(&Record::Issued(x.cert.clone())).unwrap_or_default());
            if let Some(at) = x.revoked_at {
                out.push(serde_json::to_vec(&Record::Revoked { serial: x.cert.serial, at }).unwrap_or_default());
            }
        }
        out
    }

    fn append(&self, r: &Record) -> Result<Option<Durable>, Error> {
        match self.journal() {
            Some(j) => j.append(&serde_json::to_vec(r).unwrap_or_default()).map(Some),
            None => Ok(None),
        }
    }

    /// Certificates whose keys the broker holds: `(for this agent, in total)`.
    pub fn in_use(&self, agent: &str) -> (u32, u32) {
        let e = self.entries.borrow();
        let total = e.values().filter(|x| x.in_use).count() as u32;
        let mine = e.values().filter(|x| x.in_use && x.cert.agent == agent).count() as u32;
        (mine, total)
    }

    /// Records a new certificate whose key the broker does not hold (an operator's); the
    /// returned [`Durable`] resolves once it is on disk.
    pub fn add(&self, cert: Issued) -> Result<Option<Durable>, Error> {
        let d = self.append(&Record::Issued(cert.clone()))?;
        self.entries.borrow_mut().insert(cert.serial, Entry { cert, in_use: false, revoked_at: None });
        Ok(d)
    }

    /// Records a new certificate whose key the broker holds, in use until the [`Held`] guard is
    /// dropped; the [`Durable`] resolves once the record is on disk.
    pub fn hold(&self, cert: Issued) -> Result<(Held, Option<Durable>), Error> {
        let d = self.append(&Record::Issued(cert.clone()))?;
        let serial = cert.serial;
        self.entries.borrow_mut().insert(serial, Entry { cert, in_use: true, revoked_at: None });
        Ok((Held { entries: Rc::downgrade(&self.entries), serial }, d))
    }

    /// Marks a certificate revoked (operator); `Ok(false)` when there is no such live one.
    pub async fn revoke(&self, serial: u64, at: i64) -> Result<bool, Error> {
        let fresh = match self.entries.borrow_mut().get_mut(&serial) {
            Some(x) if x.revoked_at.is_none() => {
                x.revoked_at = Some(at);
                true
            }
            Some(_) => false,
            None => return Ok(false),
        };
        if fresh && let Some(d) = self.append(&Record::Revoked { serial, at })? {
            d.wait().await?;
        }
        Ok(true)
    }

    /// Certificates valid at `now` (Unix seconds) matching `which`.
    pub fn list(&self, now: u64, which: impl Fn(&Issued) -> bool) -> Vec<Listed> {
        self.entries
            .borrow()
            .values()
            .filter(|x| x.cert.valid_before > now && which(&x.cert))
            .map(|x| Listed { cert: x.cert.clone(), in_use: x.in_use, revoked_at: x.revoked_at })
            .collect()
    }

    /// Serials of certificates valid at `now` that are revoked: by an operator, or because
    /// `task_revoked` says so of their task.
    pub fn revoked_serials(&self, now: u64, task_revoked: impl Fn(&str) -> bool) -> Vec<u64> {
        self.entries
            .borrow()
            .values()
            .filter(|x| x.cert.valid_before > now)
            .filter(|x| x.revoked_at.is_some() || x.cert.task.as_deref().is_some_and(&task_revoked))
            .map(|x| x.cert.serial)
            .collect()
    }

    /// Drops certificates expired at `now`.
    pub fn collect(&self, now: u64) {
        self.entries.borrow_mut().retain(|_, x| x.cert.valid_before > now || x.in_use);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(serial: u64, agent: &str, task: Option<&str>, until: u64) -> Issued {
        Issued {
            serial,
            key_id: format!("k{serial}"),
            agent: agent.into(),
            task: task.map(Into::into),
            lineage: Vec::new(),
            target: "t".into(),
            role: "r".into(),
            principal: "p".into(),
            valid_after: 0,
            valid_before: until,
            session: None,
        }
    }

    #[test]
    fn limits_count_held_keys_and_the_krl_lists_revoked_live_certificates() {
        let r = Registry::default();
        let (_one, _) = r.hold(cert(1, "a", Some("T1"), 100)).unwrap();
        let (two, _) = r.hold(cert(2, "a", Some("T2"), 100)).unwrap();
        r.add(cert(3, "b", None, 100)).unwrap();
        r.add(cert(4, "a", Some("T1"), 10)).unwrap();
        assert_eq!(r.in_use("a"), (2, 2));
        drop(two);
        assert_eq!(r.in_use("a"), (1, 1));
        // T1 revoked: certificate 1 is listed, 4 has expired at 50 and needs no entry.
        let mut s = r.revoked_serials(50, |t| t == "T1");
        s.sort();
        assert_eq!(s, vec![1]);
        assert!(crate::broker::reactor::block_on(r.revoke(3, 5)).unwrap());
        assert!(!crate::broker::reactor::block_on(r.revoke(99, 5)).unwrap());
        let mut s = r.revoked_serials(50, |_| false);
        s.sort();
        assert_eq!(s, vec![3]);
        assert_eq!(r.list(50, |c| c.agent == "a").len(), 2);
        r.collect(50);
        assert_eq!(r.list(0, |_| true).len(), 3);
    }

    /// A future holding a certificate that is dropped at any await releases it.
    #[test]
    fn a_dropped_holder_releases_its_certificate() {
        let r = Registry::default();
        for i in 0..100u64 {
            let fut = async {
                let (held, _) = r.hold(cert(i, "a", None, 1000)).unwrap();
                futures_lite::future::yield_now().await;
                futures_lite::future::pending::<()>().await;
                drop(held);
            };
            let mut fut = Box::pin(fut);
            assert!(crate::broker::reactor::block_on(futures_lite::future::poll_once(&mut fut)).is_none());
            assert_eq!(r.in_use("a"), (1, 1), "held while the future lives");
            drop(fut);
            assert_eq!(r.in_use("a"), (0, 0), "round {i}: released when dropped");
        }
    }

    #[test]
    fn the_journal_survives_a_restart_and_drops_expired_certificates() {
        let dir = std::env::temp_dir().join(format!("ephyr-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("certs.journal");
        let pool = crate::broker::blocking::BlockingPool::new(1, 8);
        let ex = Rc::new(smol::LocalExecutor::new());
        let logs = crate::broker::journal::Files::new(dir.clone(), pool, ex.clone());
        assert_eq!(logs.path(LOG), path);
        crate::broker::reactor::block_on(ex.run(async {
            let (r, _) = Registry::load(&logs, 0).await.unwrap();
            let (_h1, d) = r.hold(cert(1, "a", Some("T"), 100)).unwrap();
            d.unwrap().wait().await.unwrap();
            let (_h2, d) = r.hold(cert(2, "a", Some("T"), 10)).unwrap();
            d.unwrap().wait().await.unwrap();
            assert!(r.revoke(1, 5).await.unwrap());
        }));
        let (r, torn) = crate::broker::reactor::block_on(Registry::load(&logs, 50)).unwrap();
        assert_eq!(torn, 0);
        let l = r.list(50, |_| true);
        assert_eq!(l.len(), 1);
        assert!(!l[0].in_use, "keys do not survive a restart");
        assert_eq!(l[0].revoked_at, Some(5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
