//! The kill switch's memory: what operators froze (`ephyr freeze agent|task|target|service|remote
//! NAME`, or the console), kept as a durable log (`freezes`) of the one durable-state interface so
//! a freeze survives a restart. The set itself lives in the policy snapshot ([`Frozen`]), where
//! `authorize` refuses whatever it covers before any grant counts; this module keeps who froze
//! what, when and why, and replays it at start-up. The effects (revoking tasks and certificates,
//! closing sessions and streams) are carried out once, in `ops::freeze`.
//!
//! What runs here: the executor thread; appends through `journal::Store` (synced before a change
//! is acknowledged). A log that does not parse stops start-up (a freeze is never dropped
//! silently).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use super::Error;
use super::journal::{Backend, Durable, Store};
use super::policy::{FreezeKind, Frozen};

/// The durable log of freezes.
pub const LOG: &str = "freezes";

/// Longest reason kept with a freeze.
pub const MAX_REASON: usize = 500;

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Freeze { kind: FreezeKind, name: String, by: String, at: i64, reason: String },
    Thaw { kind: FreezeKind, name: String, by: String, at: i64 },
}

/// One freeze: who, when (Unix seconds), why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The operator who froze it.
    pub by: String,
    /// Unix seconds.
    pub at: i64,
    /// Their reason (may be empty).
    pub reason: String,
}

/// The freezes of one broker.
pub struct Freezes {
    store: Rc<dyn Store>,
    entries: RefCell<BTreeMap<(FreezeKind, String), Entry>>,
}

impl Freezes {
    /// Replays log [`LOG`] from `backend`, compacted to the freezes in force.
    pub async fn load(backend: &dyn Backend) -> Result<Freezes, Error> {
        let replayed = backend.replay(LOG).await?;
        let mut entries = BTreeMap::new();
        for (i, raw) in replayed.records.iter().enumerate() {
            match serde_json::from_slice(raw)
                .map_err(|e| Error::Unavailable(format!("{LOG} log: record {}: {e}", i + 1)))?
            {
                Record::Freeze { kind, name, by, at, reason } => {
                    entries.insert((kind, name), Entry { by, at, reason });
                }
                Record::Thaw { kind, name, .. } => {
                    entries.remove(&(kind, name));
                }
            }
        }
        let compacted: Vec<Vec<u8>> = entries
            .iter()
            .filter_map(|((kind, name), e)| {
                serde_json::to_vec(&Record::Freeze {
                    kind: *kind,
                    name: name.clone(),
                    by: e.by.clone(),
                    at: e.at,
                    reason: e.reason.clone(),
                })
                .ok()
            })
            .collect();
        let changed = compacted.len() != replayed.records.len() || replayed.torn_bytes > 0;
        let store = backend.open(LOG, changed.then_some(compacted)).await?;
        Ok(Freezes { store, entries: RefCell::new(entries) })
    }

    /// The set `authorize` reads.
    pub fn frozen(&self) -> Frozen {
        let mut f = Frozen::default();
        for (kind, name) in self.entries.borrow().keys() {
            f.set(*kind, name, true);
        }
        f
    }

    /// Every freeze in force.
    pub fn list(&self) -> Vec<(FreezeKind, String, Entry)> {
        self.entries.borrow().iter().map(|((k, n), e)| (*k, n.clone(), e.clone())).collect()
    }

    /// The freeze of `kind`/`name`, if any.
    pub fn get(&self, kind: FreezeKind, name: &str) -> Option<Entry> {
        self.entries.borrow().get(&(kind, name.to_owned())).cloned()
    }

    /// Records a freeze (`Ok(None)`: it was frozen already, nothing written).
    pub fn freeze(&self, kind: FreezeKind, name: &str, by: &str, reason: &str) -> Result<Option<Durable>, Error> {
        if self.entries.borrow().contains_key(&(kind, name.to_owned())) {
            return Ok(None);
        }
        let at = crate::time::now().secs();
        let e = Entry { by: by.to_owned(), at, reason: reason.to_owned() };
        let rec = Record::Freeze { kind, name: name.to_owned(), by: e.by.clone(), at, reason: e.reason.clone() };
        let d = Some(self.append(&rec)?);
        self.entries.borrow_mut().insert((kind, name.to_owned()), e);
        Ok(d)
    }

    /// Queues a thaw record (`Ok(None)`: it was not frozen, nothing written). The freeze stays
    /// in force until [`Freezes::forget`], which the caller does once the record is durable.
    pub fn thaw(&self, kind: FreezeKind, name: &str, by: &str) -> Result<Option<Durable>, Error> {
        if !self.entries.borrow().contains_key(&(kind, name.to_owned())) {
            return Ok(None);
        }
        let rec = Record::Thaw { kind, name: name.to_owned(), by: by.to_owned(), at: crate::time::now().secs() };
        self.append(&rec).map(Some)
    }

    /// Drops a freeze whose thaw is durable.
    pub fn forget(&self, kind: FreezeKind, name: &str) {
        self.entries.borrow_mut().remove(&(kind, name.to_owned()));
    }

    fn append(&self, rec: &Record) -> Result<Durable, Error> {
        self.store.append(&serde_json::to_vec(rec).map_err(|e| Error::Unavailable(e.to_string()))?)
    }
}
