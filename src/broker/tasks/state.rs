//! The task store's state in memory: tasks, the tree, root keys (as chain starts), the replay
//! cache and memoised verifications. Pure: no I/O, no clock (callers pass `now`).

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use ulid::Ulid;

use super::*;
use crate::macaroon::{ChainStart, Macaroon, Reduced};

pub(super) struct Tree {
    pub(super) start: ChainStart,
    pub(super) sealed: Vec<u8>,
    pub(super) expires: i64,
}

/// A verified token (memoised by the SHA-256 of its text).
pub struct Verified {
    /// The decoded token.
    pub macaroon: Macaroon,
    /// Its reduction.
    pub reduced: Reduced,
}

impl fmt::Debug for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verified(task {:?}, [token redacted])", self.reduced.task())
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) tasks: HashMap<Ulid, Task>,
    pub(super) children: HashMap<Ulid, Vec<Ulid>>,
    pub(super) trees: HashMap<Ulid, Tree>,
    pub(super) replay: pop::ReplayCache,
    pub(super) memo: HashMap<[u8; 32], Rc<Verified>>,
}

impl State {
    pub(super) fn insert(&mut self, t: Task) {
        if let Some(p) = t.parent {
            self.children.entry(p).or_default().push(t.id);
        }
        self.tasks.insert(t.id, t);
    }

    pub(super) fn apply(&mut self, r: Record, trees: &mut Vec<(Ulid, Vec<u8>, i64)>) -> Result<(), String> {
        match r {
            Record::Tree { root, sealed, expires } => {
                let s =
                    BASE64.decode(sealed.as_bytes()).map_err(|_| format!("tree {root}: sealed key is not base64"))?;
                trees.push((root, s, expires));
            }
            Record::Task(t) => self.insert(*t),
            Record::Bind { task, key, at } => {
                if let Some(t) = self.tasks.get_mut(&task) {
                    t.holder_key = Some(parse_holder_key(&key)?);
                    t.bind_deadline = None;
                    t.bound_at = Some(at);
                }
            }
            Record::Revoke { task, at } => {
                if let Some(t) = self.tasks.get_mut(&task) {
                    t.revoked_at.get_or_insert(at);
                }
            }
            Record::Nonce { key, until } => {
                let k: [u8; 16] = HEXLOWER
                    .decode(key.as_bytes())
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or("nonce record: bad key")?;
                self.replay.restore(k, UnixMicros(until));
            }
            Record::NonceForgotten { first, last } => {
                self.replay.restore_forgotten(UnixMicros(first), UnixMicros(last))
            }
        }
        Ok(())
    }

    /// Drops expired tasks (children first never matters: a child expires no later than its
    /// parent), trees whose root expired, and stale nonces. Returns how many tasks went.
    pub(super) fn collect(&mut self, now: UnixMicros) -> usize {
        let before = self.tasks.len();
        self.tasks.retain(|_, t| t.expires > now.0);
        let tasks = &self.tasks;
        self.children.retain(|p, kids| {
            kids.retain(|k| tasks.contains_key(k));
            tasks.contains_key(p) && !kids.is_empty()
        });
        self.trees.retain(|_, t| t.expires > now.0);
        self.replay.prune(now);
        if before != self.tasks.len() {
            self.memo.clear();
        }
        before - self.tasks.len()
    }

    /// The live state as journal records (for compaction).
    pub(super) fn snapshot(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut roots: Vec<(&Ulid, &Tree)> = self.trees.iter().collect();
        roots.sort_by_key(|(id, _)| **id);
        for (root, t) in roots {
            out.push(Record::Tree { root: *root, sealed: BASE64.encode(&t.sealed), expires: t.expires }.encode());
        }
        let mut tasks: Vec<&Task> = self.tasks.values().collect();
        tasks.sort_by_key(|t| (t.depth, t.id));
        for t in tasks {
            out.push(Record::Task(Box::new(t.clone())).encode());
        }
        for (k, until) in self.replay.entries() {
            out.push(Record::Nonce { key: HEXLOWER.encode(k), until: until.0 }.encode());
        }
        for (first, last) in self.replay.forgotten() {
            out.push(Record::NonceForgotten { first: first.0, last: last.0 }.encode());
        }
        out
    }

    /// Root to `id`, or the first missing link.
    pub(super) fn chain(&self, id: Ulid) -> Vec<&Task> {
        let mut out = Vec::new();
        let mut cur = self.tasks.get(&id);
        while let Some(t) = cur {
            out.push(t);
            cur = t.parent.and_then(|p| self.tasks.get(&p));
        }
        out.reverse();
        out
    }

    pub(super) fn holder_of(&self, id: Ulid) -> Holder {
        let chain = self.chain(id);
        let key = chain.iter().rev().find_map(|t| t.holder_key);
        holder(key, chain.last().and_then(|t| t.bind_deadline))
    }

    pub(super) fn revoked_ancestor(&self, id: Ulid) -> Option<(Ulid, i64)> {
        self.chain(id).iter().find_map(|t| t.revoked_at.map(|at| (t.id, at)))
    }

    pub(super) fn descendants(&self, id: Ulid) -> Vec<Ulid> {
        let mut out = Vec::new();
        let mut stack = vec![id];
        while let Some(x) = stack.pop() {
            if let Some(kids) = self.children.get(&x) {
                for k in kids {
                    out.push(*k);
                    stack.push(*k);
                }
            }
        }
        out
    }
}

/// A task's holder from the nearest key on its lineage and its own bind deadline.
pub(super) fn holder(key: Option<[u8; 32]>, bind_deadline: Option<i64>) -> Holder {
    match (key, bind_deadline) {
        (Some(k), _) => Holder::Key(k),
        (None, Some(d)) => Holder::AwaitingBind { deadline: UnixMicros(d) },
        (None, None) => Holder::Bearer,
    }
}
