//! Tasks: the trees that task tokens name, with delegation, holder binding and revocation.
//!
//! What runs here: in-memory state on the executor thread; [`journal`] persists every change to
//! `<data-dir>/state/tasks.journal` (group-committed `fdatasync` on the blocking pool) and the
//! caller awaits durability before acknowledging. Root keys are random 32-byte secrets sealed by
//! the signer (AES-256-GCM under the data dir's sealing key, context `ephyr-task-root:<ULID>`);
//! only the sealed blobs are written, and at start-up each live tree's key is unsealed into
//! memory (the derived chain start, never the raw key, is kept).
//!
//! Model (DESIGN.md §4):
//! - A token names its tasks with MACed `task =` caveats; the engine records the digest of the
//!   chain signature right after each, and a task stores the digest of its own minting. So a
//!   token acts as a task only if it carries exactly the prefix the broker minted for it, and each
//!   task of the lineage must be the previous one's child here.
//! - Revocation sets a watermark (`revoked_at`) on one task. Every use checks the watermark of
//!   each task on the token's lineage (O(depth)), so revoking an ancestor kills every descendant
//!   token, including ones attenuated offline afterwards, without enumerating anything.
//! - A task's holder key is its own binding or the nearest bound ancestor's; attenuation cannot
//!   shed it, and only the broker re-binds (a child key given at delegation).
//! - Expired tasks, their watermarks and their trees' keys are dropped by [`TaskStore::collect`];
//!   a child never outlives its parent, so no live task loses an ancestor.
//!
//! Files: `record` (a task and the journal's records), `state` (the pure in-memory state),
//! `verify` (token verification), `events` (revocations and expiries pushed to subscribers),
//! `pop` (proof of possession), and here the store that ties them to the journal.

pub(crate) mod events;
pub mod pop;
mod record;
mod state;
mod verify;

pub use record::*;
pub use state::Verified;
use state::{State, Tree, holder};

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::rc::Rc;

use data_encoding::{BASE64, BASE64URL_NOPAD, HEXLOWER};
use ulid::Ulid;

use super::journal;
use crate::broker::Error;

/// The journal could not take a change: nothing was acknowledged.
fn state_unavailable(e: Error) -> Error {
    Error::Unavailable(format!("task state unavailable: {}", e.message()))
}
use crate::macaroon::{ChainStart, Envelope, LOCATION, Macaroon, RootKey, attenuate};
use crate::time::UnixMicros;

/// Most memoised token verifications.
const MEMO_CAPACITY: usize = 4096;

/// A task view for tools and the dashboard.
#[derive(Clone, Debug)]
pub struct TaskView {
    /// The record.
    pub task: Task,
    /// Its effective holder.
    pub holder: Holder,
    /// The task whose watermark kills it (itself or an ancestor) and when.
    pub revoked: Option<(Ulid, i64)>,
}

/// What a new task needs.
pub struct NewTask {
    /// The holding agent.
    pub agent: String,
    /// The delegating agent, when another.
    pub delegated_by: Option<String>,
    /// Description.
    pub description: String,
    /// Expiry (whole seconds).
    pub expires: UnixMicros,
    /// May delegate further.
    pub can_delegate: bool,
    /// Levels of delegation allowed below it.
    pub delegation_depth: u8,
    /// Envelope caveats (`target IN [..]`, …) beyond the fixed ones.
    pub narrowing: Vec<String>,
    /// Holder key given now.
    pub holder_key: Option<[u8; 32]>,
    /// A key must be bound before this (when the agent requires one and none was given).
    pub bind_deadline: Option<UnixMicros>,
}

/// What a verified task token says: made by [`TaskStore::verify_token`], carried in the caller.
#[derive(Clone, Debug)]
pub struct TokenIdentity {
    /// The agent that holds the task (delegation can hand a task to another agent).
    pub agent: String,
    /// The task the token acts as.
    pub task: String,
    /// Its tree's root task.
    pub root: String,
    /// Root to task.
    pub lineage: Vec<String>,
    /// Who started the tree.
    pub initiated_by: String,
    /// Agents above `agent` in the lineage (cross-agent hand-offs): their policies bound it too.
    pub delegators: Vec<String>,
    /// The task's depth (root = 0).
    pub depth: u8,
    /// Who must prove possession.
    pub holder: Holder,
    /// The verified token (memoised; shared).
    pub verified: Rc<Verified>,
}

impl TokenIdentity {
    /// The reduced authority.
    pub fn envelope(&self) -> &Envelope {
        &self.verified.reduced.envelope
    }
}

/// The durable log of task records.
pub const LOG: &str = "tasks";

/// The task store.
#[derive(Default)]
pub struct TaskStore {
    state: RefCell<State>,
    journal: RefCell<Option<Rc<dyn journal::Store>>>,
    /// Revocations and expiries, for those who hold something of a task.
    pub events: events::TaskEvents,
}

impl fmt::Debug for TaskStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskStore({} tasks)", self.state.borrow().tasks.len())
    }
}

/// What loading found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Live tasks.
    pub tasks: usize,
    /// Live trees.
    pub trees: usize,
    /// Trees whose root key could not be unsealed (another data dir's journal?): dropped.
    pub unsealable: Vec<String>,
    /// Bytes of a torn last record that were cut off.
    pub torn_bytes: usize,
}

impl TaskStore {
    /// An empty in-memory store (tests; nothing is persisted until [`TaskStore::attach`]).
    pub fn new() -> Self {
        TaskStore::default()
    }

    /// Loads log [`LOG`] from `backend`: replays it, drops what expired, unseals each live
    /// tree's root key with `unseal`, rewrites the log compacted, and opens it for appending.
    pub async fn load<F, Fut>(
        backend: &dyn journal::Backend,
        now: UnixMicros,
        unseal: F,
    ) -> Result<(TaskStore, Loaded), Error>
    where
        F: Fn(String, Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = Result<RootKey, String>>,
    {
        let replayed = backend.replay(LOG).await?;
        let mut st = State::default();
        let mut trees = Vec::new();
        let bad = |i: usize, e: &dyn fmt::Display| Error::Unavailable(format!("{LOG} log: record {i}: {e}"));
        for (i, bytes) in replayed.records.iter().enumerate() {
            let r: Record = serde_json::from_slice(bytes).map_err(|e| bad(i, &format!("does not parse: {e}")))?;
            st.apply(r, &mut trees).map_err(|e| bad(i, &e))?;
        }
        let mut loaded = Loaded { torn_bytes: replayed.torn_bytes, ..Loaded::default() };
        for (root, sealed, expires) in trees {
            if expires <= now.0 {
                continue;
            }
            match unseal(seal_context(root), sealed.clone()).await {
                Ok(key) => {
                    st.trees.insert(root, Tree { start: key.start(root.to_string().as_bytes()), sealed, expires });
                }
                Err(e) => loaded.unsealable.push(format!("tree {root}: {e}")),
            }
        }
        // Tasks of trees without a key can never verify: drop them too.
        let keyed: BTreeSet<Ulid> = st.trees.keys().copied().collect();
        st.tasks.retain(|_, t| keyed.contains(&t.root));
        st.collect(now);
        loaded.tasks = st.tasks.len();
        loaded.trees = st.trees.len();
        let log = backend.open(LOG, Some(st.snapshot())).await?;
        let store = TaskStore { state: RefCell::new(st), journal: RefCell::new(Some(log)), events: Default::default() };
        Ok((store, loaded))
    }

    fn journal(&self) -> Option<Rc<dyn journal::Store>> {
        self.journal.borrow().clone()
    }

    /// Appends records and waits until they are durable (no journal: in-memory store).
    async fn persist(&self, records: Vec<Record>) -> Result<(), Error> {
        let Some(j) = self.journal() else { return Ok(()) };
        let mut last = None;
        for r in &records {
            last = Some(j.append(&r.encode()).map_err(state_unavailable)?);
        }
        match last {
            Some(d) => d.wait().await.map_err(state_unavailable),
            None => Ok(()),
        }
    }

    /// Live tasks.
    pub fn len(&self) -> usize {
        self.state.borrow().tasks.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live trees.
    pub fn trees(&self) -> usize {
        self.state.borrow().trees.len()
    }

    /// Drops expired tasks, trees and nonces; returns how many tasks went.
    pub fn collect(&self, now: UnixMicros) -> usize {
        let gone = self.state.borrow_mut().collect(now);
        if gone > 0 {
            self.events.publish(events::TaskEvent::Expired { tasks: gone });
        }
        gone
    }

    /// When `id` stops being usable by itself (its expiry; `None` when it is not live now).
    pub fn ends_at(&self, id: &str) -> Option<UnixMicros> {
        let id = id.parse::<Ulid>().ok()?;
        let v = self.view(id)?;
        (v.revoked.is_none()).then_some(UnixMicros(v.task.expires))
    }

    /// Returns once task `id` is revoked (it or an ancestor) or expired, or `also` (a token's own
    /// expiry) passes. Woken by [`events`], and by a timer at the expiry: nothing polls.
    pub async fn until_unusable(&self, id: &str, also: Option<UnixMicros>) {
        loop {
            let listener = self.events.listen();
            let now = crate::time::now();
            if self.unusable(id) || also.is_some_and(|e| now >= e) {
                return;
            }
            let deadline = [self.ends_at(id), also].into_iter().flatten().min();
            match deadline {
                Some(d) => {
                    let wait = std::time::Duration::from_micros(d.0.saturating_sub(now.0).max(0) as u64);
                    futures_lite::future::or(listener, async {
                        crate::broker::deadline::Deadline::after(wait).await;
                    })
                    .await;
                }
                None => listener.await,
            }
        }
    }

    /// Whether the task `id` (text) can no longer act: unknown, expired or removed, or it or an
    /// ancestor revoked. Checked by things that outlive a request (SSH sessions, proxied streams).
    pub fn unusable(&self, id: &str) -> bool {
        match id.parse::<Ulid>() {
            Ok(id) => {
                let now = crate::time::now().0;
                self.view(id).is_none_or(|v| v.revoked.is_some() || v.task.expires <= now)
            }
            Err(_) => true,
        }
    }

    /// Consumes a checked proof's nonce (journaled; await the returned future before serving).
    pub fn consume_nonce(&self, c: &pop::Checked, now: UnixMicros) -> Result<Option<journal::Durable>, pop::PopError> {
        self.state.borrow_mut().replay.consume(c, now)?;
        let Some(j) = self.journal() else { return Ok(None) };
        let rec = Record::Nonce { key: HEXLOWER.encode(&c.replay_key), until: c.until.0 };
        // A journal failure fails the request (closed), never silently forgets the nonce.
        j.append(&rec.encode()).map(Some).map_err(|_| pop::PopError::CacheFull)
    }

    /// A task and its effective state.
    pub fn view(&self, id: Ulid) -> Option<TaskView> {
        let st = self.state.borrow();
        let t = st.tasks.get(&id)?.clone();
        Some(TaskView { holder: st.holder_of(id), revoked: st.revoked_ancestor(id), task: t })
    }

    /// Tasks visible from `scope`: a token caller sees its own task's subtree; an API-key caller
    /// sees the tasks its agent holds and everything below them.
    pub fn visible(&self, scope: &Scope<'_>) -> Vec<TaskView> {
        let st = self.state.borrow();
        let roots: Vec<Ulid> = match scope {
            Scope::Task(id) => vec![*id],
            Scope::Agent(a) => st.tasks.values().filter(|t| t.agent == *a).map(|t| t.id).collect(),
            Scope::All => st.tasks.keys().copied().collect(),
        };
        let mut ids = BTreeSet::new();
        for r in roots {
            if st.tasks.contains_key(&r) {
                ids.insert(r);
                ids.extend(st.descendants(r));
            }
        }
        ids.into_iter()
            .filter_map(|id| {
                let t = st.tasks.get(&id)?.clone();
                Some(TaskView { holder: st.holder_of(id), revoked: st.revoked_ancestor(id), task: t })
            })
            .collect()
    }

    /// Root to `id`, as ids (audit lines).
    pub fn lineage(&self, id: Ulid) -> Vec<String> {
        self.state.borrow().chain(id).iter().map(|t| t.id.to_string()).collect()
    }

    /// Whether `id` is visible from `scope`.
    pub fn in_scope(&self, scope: &Scope<'_>, id: Ulid) -> bool {
        let st = self.state.borrow();
        st.chain(id).iter().any(|t| match scope {
            Scope::Task(s) => t.id == *s,
            Scope::Agent(a) => t.agent == *a,
            Scope::All => true,
        })
    }

    /// The token the broker minted for `id` (rebuilt from the root key and the stored caveats),
    /// for API-key callers who delegate from a task without presenting its token.
    pub fn minted_token(&self, id: Ulid) -> Option<Macaroon> {
        let st = self.state.borrow();
        let chain = st.chain(id);
        let root = chain.first()?;
        let tree = st.trees.get(&root.id)?;
        let first: Vec<&str> = root.caveats.iter().map(String::as_str).collect();
        let mut m = tree.start.mint(LOCATION, &first);
        for t in &chain[1..] {
            for c in &t.caveats {
                m = attenuate(&m, c);
            }
        }
        Some(m)
    }

    /// Creates a root task with a fresh tree. `root_key` is the new tree's key and `sealed` the
    /// signer's sealing of it under [`seal_context`]`(id)`; `id` comes from [`crate::ids::new_ulid`].
    pub async fn create(
        &self,
        id: Ulid,
        new: NewTask,
        initiated_by: String,
        root_key: &RootKey,
        sealed: Vec<u8>,
        now: UnixMicros,
    ) -> Result<(Task, String), Error> {
        let start = root_key.start(id.to_string().as_bytes());
        let caveats = fixed_caveats(id, &new, Some((&new.agent, &initiated_by)));
        let refs: Vec<&str> = caveats.iter().map(String::as_str).collect();
        let m = start.mint(LOCATION, &refs);
        let task = self.task_from(&start, &m, id, None, 0, new, initiated_by, caveats, now)?;
        let records = vec![
            Record::Tree { root: id, sealed: BASE64.encode(&sealed), expires: task.expires },
            Record::Task(Box::new(task.clone())),
        ];
        {
            let mut st = self.state.borrow_mut();
            st.trees.insert(id, Tree { start, sealed, expires: task.expires });
            st.insert(task.clone());
        }
        if let Err(e) = self.persist(records).await {
            self.forget(id);
            return Err(e);
        }
        Ok((task, m.encode()))
    }

    /// Delegates a child of `parent` from `parent_token` (the presented token, or the minted one
    /// for API-key callers): the child's caveats are appended, so the chain proves accumulation
    /// and the reducer proves narrowing; the tree's root key is not touched.
    pub async fn delegate(
        &self,
        parent: Ulid,
        parent_token: &Macaroon,
        id: Ulid,
        new: NewTask,
        now: UnixMicros,
    ) -> Result<(Task, String), Error> {
        let (root, depth, initiated_by) = {
            let st = self.state.borrow();
            let p = st
                .tasks
                .get(&parent)
                .filter(|p| p.expires > now.0)
                .ok_or_else(|| Error::NotFound(format!("no live task {parent}")))?;
            if let Some((x, _)) = st.revoked_ancestor(parent) {
                return Err(Error::Refused(format!("task {parent} is revoked (watermark on {x})")));
            }
            if new.expires.0 > p.expires {
                return Err(Error::Refused(format!(
                    "the child would outlive its parent (parent expires {})",
                    p.expires_at().to_rfc3339()
                )));
            }
            (p.root, p.depth.saturating_add(1), p.initiated_by.clone())
        };
        let caveats = fixed_caveats(id, &new, None);
        let mut m = parent_token.clone();
        for c in &caveats {
            m = attenuate(&m, c);
        }
        let task = {
            let st = self.state.borrow();
            let tree = st.trees.get(&root).ok_or_else(|| Error::NotFound(format!("no task tree {root}")))?;
            self.task_from(&tree.start, &m, id, Some(parent), depth, new, initiated_by, caveats, now)?
        };
        self.state.borrow_mut().insert(task.clone());
        if let Err(e) = self.persist(vec![Record::Task(Box::new(task.clone()))]).await {
            self.forget(id);
            return Err(e);
        }
        Ok((task, m.encode()))
    }

    #[allow(clippy::too_many_arguments)]
    fn task_from(
        &self,
        start: &ChainStart,
        m: &Macaroon,
        id: Ulid,
        parent: Option<Ulid>,
        depth: u8,
        new: NewTask,
        initiated_by: String,
        caveats: Vec<String>,
        now: UnixMicros,
    ) -> Result<Task, Error> {
        // Verify what we minted: it must reduce, act as `id`, and give us the lineage binding.
        let reduced =
            start.verify_and_reduce(m).map_err(|e| Error::Refused(format!("the new token does not verify: {e}")))?;
        let entry = reduced
            .lineage
            .last()
            .filter(|l| l.task == id)
            .ok_or_else(|| Error::Refused("the parent token acts as another task (offline task caveat?)".into()))?;
        Ok(Task {
            id,
            root: reduced.lineage.first().map(|l| l.task).unwrap_or(id),
            parent,
            agent: new.agent,
            delegated_by: new.delegated_by,
            description: new.description,
            depth,
            initiated_by,
            created: now.0,
            expires: new.expires.0,
            can_delegate: new.can_delegate && reduced.envelope.can_delegate,
            caveats,
            binding: entry.binding,
            holder_key: new.holder_key,
            bind_deadline: if new.holder_key.is_some() { None } else { new.bind_deadline.map(|d| d.0) },
            bound_at: new.holder_key.map(|_| now.0),
            revoked_at: None,
            envelope: reduced.envelope.to_json(),
        })
    }

    fn forget(&self, id: Ulid) {
        let mut st = self.state.borrow_mut();
        if let Some(t) = st.tasks.remove(&id)
            && let Some(p) = t.parent
            && let Some(kids) = st.children.get_mut(&p)
        {
            kids.retain(|k| *k != id);
        }
        st.trees.remove(&id);
    }

    /// Binds `key` to the unbound task `id` (idempotent for the same key). A task bound through
    /// an ancestor cannot be re-bound: only the broker re-binds, at delegation.
    pub async fn bind(&self, id: Ulid, key: [u8; 32], now: UnixMicros) -> Result<i64, Error> {
        {
            let st = self.state.borrow();
            let t = st
                .tasks
                .get(&id)
                .filter(|t| t.expires > now.0)
                .ok_or_else(|| Error::NotFound(format!("no live task {id}")))?;
            if let Some((x, _)) = st.revoked_ancestor(id) {
                return Err(Error::Refused(format!("task {id} is revoked (watermark on {x})")));
            }
            match (t.holder_key, st.holder_of(id)) {
                (Some(k), _) if k == key => return Ok(t.bound_at.unwrap_or(now.0)),
                (Some(_), _) => return Err(Error::Refused(format!("task {id} is already bound to another key"))),
                (None, Holder::Key(_)) => {
                    return Err(Error::Refused(format!(
                        "task {id} is bound through an ancestor's holder key; bindings are inherited and cannot be replaced"
                    )));
                }
                (None, Holder::AwaitingBind { deadline }) if deadline <= now => {
                    return Err(Error::Refused(format!(
                        "the bind deadline of task {id} passed at {}",
                        deadline.to_rfc3339()
                    )));
                }
                _ => {}
            }
        }
        {
            let mut st = self.state.borrow_mut();
            if let Some(t) = st.tasks.get_mut(&id) {
                t.holder_key = Some(key);
                t.bind_deadline = None;
                t.bound_at = Some(now.0);
            }
        }
        self.persist(vec![Record::Bind { task: id, key: BASE64URL_NOPAD.encode(&key), at: now.0 }]).await?;
        Ok(now.0)
    }

    /// Sets the revocation watermark on `id`; returns how many live descendants it takes along.
    /// The watermark applies in memory at once; the caller acknowledges after it is durable.
    pub async fn revoke(&self, id: Ulid, now: UnixMicros) -> Result<usize, Error> {
        let cascade = {
            let mut st = self.state.borrow_mut();
            let t = st.tasks.get_mut(&id).ok_or_else(|| Error::NotFound(format!("no live task {id}")))?;
            if t.revoked_at.is_some() {
                return Err(Error::Refused(format!("task {id} is already revoked")));
            }
            t.revoked_at = Some(now.0);
            st.descendants(id).len()
        };
        // In force in memory now: tell those who hold something of these tasks.
        self.events.publish(events::TaskEvent::Revoked { task: id, descendants: cascade });
        self.persist(vec![Record::Revoke { task: id, at: now.0 }]).await?;
        Ok(cascade)
    }
}

/// Whose tasks a caller may see and act on.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// The subtree of this task (token callers).
    Task(Ulid),
    /// Everything this agent holds, and below (API-key callers).
    Agent(&'a str),
    /// Every live task (operators on the local socket).
    All,
}

/// The caveats a new task's token gets, its `task =` caveat **last**: the lineage binding is the
/// digest of the chain right after it, so it covers every caveat minted for the task. (With the
/// task caveat first, the holder of a parent token could append just `task = <child>` and act as
/// the child without the child's narrowing caveats; a unit test keeps this closed.)
fn fixed_caveats(id: Ulid, new: &NewTask, root_meta: Option<(&str, &str)>) -> Vec<String> {
    let mut c = Vec::new();
    if let Some((agent, initiated_by)) = root_meta {
        if is_meta_value(agent) {
            c.push(format!("agent = {agent}"));
        }
        if is_meta_value(initiated_by) {
            c.push(format!("initiated_by = {initiated_by}"));
        }
    }
    c.push(format!("expires_before = {}", new.expires.to_rfc3339()));
    if !new.can_delegate {
        c.push("can_delegate = false".into());
    }
    c.push(format!("delegation_depth <= {}", new.delegation_depth));
    c.extend(new.narrowing.iter().cloned());
    c.push(format!("task = {id}"));
    c
}

/// Metadata the caveat grammar accepts as written (otherwise it is left out: it is never authority).
fn is_meta_value(s: &str) -> bool {
    !s.is_empty() && s.trim() == s && crate::macaroon::caveat::metadata_value_ok(s)
}

#[cfg(test)]
mod tests;
