//! Human approval: actions that `authorize` allowed but an `approvals:` rule holds until a person
//! answers. One request per exact action (agent, task lineage, and the action's digest), kept in
//! a durable log (`approvals`) so a restart neither loses nor approves one; decisions come from
//! operators (`ops::decide_approval`: the console, the CLI), never from the agent's own client.
//!
//! What runs here: the executor thread. [`clear`] is the gate every gated path awaits (SSH
//! commands and sessions, the HTTP proxy, federated tools, delegation): it finds an approval that
//! covers the action and uses it up (single use unless a waiver covers it), or opens a request
//! and waits for the answer — while the client shows progress (`_meta.progressToken`), else for
//! `approvals.hold` — then answers with a pending result the agent retries with the same
//! arguments. Expiry is swept each second while a request is open by a background job
//! (`maintenance`); a freeze denies the open requests it covers (`ops::freeze`); new requests are
//! announced by `notify` (a task of its own). Appends go through `journal::Store` and are synced
//! before anything depends on them.

pub(crate) mod notify;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Error;
use super::audit::{Event, Kind};
use super::auth::Caller;
use super::journal::{Backend, Durable, Store};
use super::policy::approval::{Answerer, Gated, Requirement, requirement};
use super::policy::{Denial, DenyCode, Policy};
use super::ports::Ports;

/// The durable log of approval requests.
pub const LOG: &str = "approvals";
/// Longest reason kept with a decision.
pub const MAX_REASON: usize = 500;
/// Most pending requests in all.
pub const MAX_PENDING: usize = 1000;
/// How often a held call tells its client it is still waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a closed request is kept in memory (the queue's recent history, the agent's answer).
const KEEP_CLOSED_SECS: i64 = 24 * 3600;
/// Most closed requests kept (the oldest go first): a busy day stays a bounded amount of memory.
const KEEP_CLOSED: usize = 1000;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Ask {
        id: String,
        digest: String,
        agent: String,
        task: Option<String>,
        lineage: Vec<String>,
        rules: Vec<String>,
        needed: u8,
        action: Value,
        at: i64,
        expires: i64,
    },
    Vote {
        id: String,
        by: String,
        approve: bool,
        reason: String,
        waiver: u64,
        at: i64,
    },
    Expire {
        id: String,
        at: i64,
    },
    Use {
        id: String,
        at: i64,
    },
}

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for (more) approvals.
    Pending,
    /// Approved, not used yet (or covered by a waiver).
    Approved,
    /// Denied by an operator.
    Denied,
    /// Nobody answered in time, or the approval was not used in time.
    Expired,
    /// Approved and used by the action.
    Used,
}

impl State {
    /// Its word.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::Expired => "expired",
            State::Used => "used",
        }
    }
}

/// One operator's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Vote {
    /// `console:<name>` or `operator:uid<N>`.
    pub by: String,
    /// Approve or deny.
    pub approve: bool,
    /// Their reason (may be empty for an approval).
    pub reason: String,
    /// Seconds of waiver granted with an approval (0: single use).
    pub waiver: u64,
    /// Unix seconds.
    pub at: i64,
}

/// One request.
#[derive(Clone, Debug, Serialize)]
pub struct Request {
    /// ULID.
    pub id: String,
    /// SHA-256 (hex) of the exact action, the agent and the task lineage.
    pub digest: String,
    /// The agent that asked.
    pub agent: String,
    /// The task it acted as.
    pub task: Option<String>,
    /// The task's lineage, root first.
    pub lineage: Vec<String>,
    /// The rules that asked for approval.
    pub rules: Vec<String>,
    /// Approvals needed (2: four eyes).
    pub needed: u8,
    /// The action as operators see it (names, the command, digests of bodies and arguments).
    pub action: Value,
    /// Unix seconds it was asked.
    pub at: i64,
    /// Unix seconds it expires unanswered; once approved, by when it must be used.
    pub expires: i64,
    /// The rules' timeout, seconds (also how long an approval may wait to be used).
    #[serde(skip)]
    timeout: i64,
    /// The answers so far.
    pub votes: Vec<Vote>,
    /// Where it stands.
    pub state: State,
    /// With a waiver: until when the same action needs no new approval.
    pub waiver_until: Option<i64>,
    /// Unix seconds of the decision, expiry or use.
    pub closed_at: Option<i64>,
    #[serde(skip)]
    told: bool,
}

impl Request {
    /// Different approvers who approved.
    fn approvals(&self) -> usize {
        distinct(self.votes.iter().filter(|v| v.approve))
    }

    /// The denial's reason, or what expired.
    fn refusal(&self) -> Denial {
        match self.votes.iter().find(|v| !v.approve) {
            Some(v) => Denial {
                code: DenyCode::ApprovalDenied,
                reason: format!(
                    "approval request {} was denied by {}: {}",
                    self.id,
                    v.by,
                    if v.reason.is_empty() { "no reason given" } else { &v.reason }
                ),
            },
            None => Denial {
                code: DenyCode::ApprovalExpired,
                reason: format!(
                    "approval request {} expired at {} without {}; call again to ask anew",
                    self.id,
                    crate::time::format_rfc3339(self.expires, None),
                    if self.state == State::Expired && self.approvals() >= usize::from(self.needed) {
                        "being used"
                    } else {
                        "an operator's approval"
                    }
                ),
            },
        }
    }
}

/// What an operator's answer did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decided {
    /// The request is approved (enough approvals).
    Approved,
    /// One approval of two (four eyes).
    Partly,
    /// Denied.
    Denied,
}

/// The approval requests of one broker.
pub struct Approvals {
    store: Rc<dyn Store>,
    requests: RefCell<BTreeMap<String, Request>>,
    /// Woken on every change (held calls, the console's feed).
    pub changed: event_listener::Event,
    /// New requests for the notifier task.
    notices: async_channel::Sender<Request>,
    notices_rx: async_channel::Receiver<Request>,
    version: Cell<u64>,
}

fn now() -> i64 {
    crate::time::now().secs()
}

impl Approvals {
    /// Replays log [`LOG`] from `backend`, keeping what can still matter (open requests, unused
    /// approvals, waivers, and a day of closed ones); requests past their time are expired here,
    /// with a record — never approved.
    pub async fn load(backend: &dyn Backend) -> Result<Approvals, Error> {
        let replayed = backend.replay(LOG).await?;
        let mut requests: BTreeMap<String, Request> = BTreeMap::new();
        for (i, raw) in replayed.records.iter().enumerate() {
            let rec: Record = serde_json::from_slice(raw)
                .map_err(|e| Error::Unavailable(format!("{LOG} log: record {}: {e}", i + 1)))?;
            apply(&mut requests, rec);
        }
        let t = now();
        let mut expired = false;
        for r in requests.values_mut() {
            let was = r.state;
            expire_if_due(r, t);
            expired |= r.state != was;
        }
        prune(&mut requests, t);
        let compacted: Vec<Vec<u8>> =
            requests.values().flat_map(records_of).filter_map(|r| serde_json::to_vec(&r).ok()).collect();
        // Rewritten only when it would change (a start with nothing to compact writes nothing).
        let changed = expired || compacted.len() != replayed.records.len() || replayed.torn_bytes > 0;
        let store = backend.open(LOG, changed.then_some(compacted)).await?;
        Ok(Approvals::with_store(store, requests))
    }

    /// A store that keeps nothing across a restart (tests, and tools with no rules to gate).
    pub fn in_memory() -> Approvals {
        struct Memory;
        impl Store for Memory {
            fn append(&self, _: &[u8]) -> Result<Durable, Error> {
                Ok(Durable::settled(Ok(())))
            }
        }
        Approvals::with_store(Rc::new(Memory), BTreeMap::new())
    }

    fn with_store(store: Rc<dyn Store>, requests: BTreeMap<String, Request>) -> Approvals {
        let (notices, notices_rx) = async_channel::bounded(64);
        Approvals {
            store,
            requests: RefCell::new(requests),
            changed: event_listener::Event::new(),
            notices,
            notices_rx,
            version: Cell::new(0),
        }
    }

    /// Every request kept (open ones and a day of closed ones), newest first.
    pub fn list(&self) -> Vec<Request> {
        self.requests.borrow().values().rev().cloned().collect()
    }

    /// Request `id`.
    pub fn get(&self, id: &str) -> Option<Request> {
        self.requests.borrow().get(id).cloned()
    }

    /// Pending requests.
    pub fn pending(&self) -> usize {
        self.requests.borrow().values().filter(|r| r.state == State::Pending).count()
    }

    /// Whether some request is waiting or approved and unused (something may expire).
    pub fn any_open(&self) -> bool {
        self.requests.borrow().values().any(|r| matches!(r.state, State::Pending | State::Approved))
    }

    /// Bumped on every change (the console's feed compares it).
    pub fn version(&self) -> u64 {
        self.version.get()
    }

    /// New requests, for the notifier.
    pub fn notices(&self) -> async_channel::Receiver<Request> {
        self.notices_rx.clone()
    }

    fn append(&self, rec: &Record) -> Result<Durable, Error> {
        let bytes = serde_json::to_vec(rec).map_err(|e| Error::Unavailable(e.to_string()))?;
        let d = self.store.append(&bytes)?;
        apply(&mut self.requests.borrow_mut(), rec.clone());
        self.version.set(self.version.get() + 1);
        self.changed.notify(usize::MAX);
        Ok(d)
    }

    /// Records an operator's answer to pending request `id`; `Err` when it is not pending or
    /// `who` may not answer it (checked by the caller against the policy).
    pub fn vote(
        &self,
        id: &str,
        who: &Answerer,
        approve: bool,
        reason: &str,
        waiver: u64,
    ) -> Result<(Decided, Durable), Error> {
        let by = who.name();
        let r = self.get(id).ok_or_else(|| Error::NotFound(format!("no approval request {id:?}")))?;
        if r.state != State::Pending {
            return Err(Error::Refused(format!("approval request {id} is {} already", r.state.as_str())));
        }
        if approve && r.votes.iter().any(|v| person(&v.by) == person(&by)) {
            return Err(Error::Refused(format!(
                "{by} approved request {id} already: four eyes needs another approver (local processes count as one)"
            )));
        }
        let rec = Record::Vote { id: id.to_owned(), by, approve, reason: reason.to_owned(), waiver, at: now() };
        let d = self.append(&rec)?;
        let after = self.get(id).map(|r| r.state);
        let decided = match after {
            Some(State::Approved) => Decided::Approved,
            Some(State::Denied) => Decided::Denied,
            _ => Decided::Partly,
        };
        Ok((decided, d))
    }

    /// Denies every open request (waiting, or approved and unused) that `covered` says a freeze
    /// covers, in `by`'s name with `reason`; the records' durability, one per request.
    pub fn deny_open(&self, by: &str, reason: &str, covered: impl Fn(&Request) -> bool) -> Vec<Durable> {
        let ids: Vec<String> = self
            .requests
            .borrow()
            .values()
            .filter(|r| {
                (matches!(r.state, State::Pending | State::Approved) || r.waiver_until.is_some_and(|w| w > now()))
                    && covered(r)
            })
            .map(|r| r.id.clone())
            .collect();
        let mut out = Vec::new();
        for id in ids {
            // An approved, unused request is closed as expired (its votes stay as they were).
            let rec = match self.get(&id).map(|r| r.state) {
                Some(State::Pending) => Record::Vote {
                    id: id.clone(),
                    by: by.to_owned(),
                    approve: false,
                    reason: reason.to_owned(),
                    waiver: 0,
                    at: now(),
                },
                _ => Record::Expire { id: id.clone(), at: now() },
            };
            match self.append(&rec) {
                Ok(d) => out.push(d),
                Err(e) => log::error!("approvals: {e}"),
            }
        }
        out
    }

    /// Expires what is due: pending requests past their timeout, approvals past their use-by
    /// time. Returns the expired requests (their records are queued).
    pub fn expire_due(&self) -> Vec<(Request, Durable)> {
        let t = now();
        let due: Vec<String> = self
            .requests
            .borrow()
            .values()
            .filter(|r| {
                matches!(r.state, State::Pending | State::Approved)
                    && r.expires <= t
                    && r.waiver_until.is_none_or(|w| w <= t)
            })
            .map(|r| r.id.clone())
            .collect();
        let mut out = Vec::new();
        for id in due {
            match self.append(&Record::Expire { id: id.clone(), at: t }) {
                Ok(d) => out.extend(self.get(&id).map(|r| (r, d))),
                Err(e) => log::error!("approvals: {e}"),
            }
        }
        prune(&mut self.requests.borrow_mut(), t);
        out
    }

    /// An approval of exactly this action that can be used now, by `digest`.
    fn usable(&self, digest: &str, policy: &Policy, req: &Requirement<'_>) -> Option<Request> {
        let t = now();
        self.requests
            .borrow()
            .values()
            .rev()
            .find(|r| {
                r.digest == digest
                    && match r.state {
                        State::Approved => r.expires > t || r.waiver_until.is_some_and(|w| w > t),
                        State::Used => r.waiver_until.is_some_and(|w| w > t),
                        _ => false,
                    }
            })
            .filter(|r| counted(r, policy, req) >= usize::from(req.needed()))
            .cloned()
    }

    /// The latest request for `digest`, if it is open, or closed without the agent having been
    /// told why (a denial or expiry it has not seen).
    fn latest(&self, digest: &str) -> Option<Request> {
        self.requests
            .borrow()
            .values()
            .rev()
            .find(|r| {
                r.digest == digest
                    && (r.state == State::Pending || (matches!(r.state, State::Denied | State::Expired) && !r.told))
            })
            .cloned()
    }

    fn tell(&self, id: &str) {
        if let Some(r) = self.requests.borrow_mut().get_mut(id) {
            r.told = true;
        }
    }
}

/// Approvals of `r` that the current policy still accepts (the operator still exists and is
/// still an approver of every rule that matches now).
fn counted(r: &Request, policy: &Policy, req: &Requirement<'_>) -> usize {
    distinct(r.votes.iter().filter(|v| v.approve && parse_answerer(&v.by).is_some_and(|a| req.accepts(policy, &a))))
}

/// Who a vote counts as for four eyes: each console operator on their own; every local process
/// as one (root can act as the broker's user, so two local uids are not two people).
fn person(by: &str) -> &str {
    if by.starts_with("operator:uid") { "local" } else { by }
}

/// How many different people cast `votes`.
fn distinct<'a>(votes: impl Iterator<Item = &'a Vote>) -> usize {
    let mut seen: Vec<&str> = Vec::new();
    for v in votes {
        let p = person(&v.by);
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen.len()
}

/// `console:<name>` / `operator:uid<N>` back to who answered.
pub fn parse_answerer(s: &str) -> Option<Answerer> {
    if let Some(n) = s.strip_prefix("console:") {
        return Some(Answerer::Console(n.to_owned()));
    }
    s.strip_prefix("operator:uid").and_then(|u| u.parse().ok()).map(Answerer::Local)
}

/// Forgets closed requests older than a day (unless a waiver still runs), and beyond the newest
/// [`KEEP_CLOSED`] of them.
fn prune(requests: &mut BTreeMap<String, Request>, t: i64) {
    let keep = |r: &Request| r.waiver_until.is_some_and(|w| w > t);
    requests.retain(|_, r| r.closed_at.is_none_or(|c| t - c < KEEP_CLOSED_SECS) || keep(r));
    let closed = requests.values().filter(|r| r.closed_at.is_some() && !keep(r)).count();
    if closed > KEEP_CLOSED {
        // Ids are ULIDs: the map's order is the order they were asked in.
        let old: Vec<String> = requests
            .values()
            .filter(|r| r.closed_at.is_some() && !keep(r))
            .take(closed - KEEP_CLOSED)
            .map(|r| r.id.clone())
            .collect();
        for id in old {
            requests.remove(&id);
        }
    }
}

fn expire_if_due(r: &mut Request, t: i64) {
    if matches!(r.state, State::Pending | State::Approved) && r.expires <= t && r.waiver_until.is_none_or(|w| w <= t) {
        r.state = State::Expired;
        r.closed_at = Some(t);
    }
}

fn apply(requests: &mut BTreeMap<String, Request>, rec: Record) {
    match rec {
        Record::Ask { id, digest, agent, task, lineage, rules, needed, action, at, expires } => {
            requests.insert(
                id.clone(),
                Request {
                    id,
                    digest,
                    agent,
                    task,
                    lineage,
                    rules,
                    needed,
                    action,
                    at,
                    expires,
                    timeout: (expires - at).max(1),
                    votes: Vec::new(),
                    state: State::Pending,
                    waiver_until: None,
                    closed_at: None,
                    told: false,
                },
            );
        }
        Record::Vote { id, by, approve, reason, waiver, at } => {
            let Some(r) = requests.get_mut(&id) else { return };
            if r.state != State::Pending {
                return;
            }
            r.votes.push(Vote { by, approve, reason, waiver, at });
            if !approve {
                r.state = State::Denied;
                r.closed_at = Some(at);
            } else if r.approvals() >= usize::from(r.needed) {
                r.state = State::Approved;
                // The use-by time restarts at the decision; a waiver is the shortest granted.
                r.expires = at + r.timeout.max(60);
                let w = r.votes.iter().filter(|v| v.approve).map(|v| v.waiver).min().unwrap_or(0);
                r.waiver_until = (w > 0).then(|| at + w as i64);
            }
        }
        Record::Expire { id, at } => {
            if let Some(r) = requests.get_mut(&id) {
                if matches!(r.state, State::Pending | State::Approved) {
                    r.state = State::Expired;
                    r.closed_at = Some(at);
                }
                // A waiver ends with it (a freeze ends a used request's waiver this way).
                r.waiver_until = r.waiver_until.map(|w| w.min(at));
            }
        }
        Record::Use { id, at } => {
            if let Some(r) = requests.get_mut(&id)
                && r.state == State::Approved
            {
                r.state = State::Used;
                r.closed_at = Some(at);
            }
        }
    }
}

/// The records that rebuild `r` (compaction).
fn records_of(r: &Request) -> Vec<Record> {
    let mut out = vec![Record::Ask {
        id: r.id.clone(),
        digest: r.digest.clone(),
        agent: r.agent.clone(),
        task: r.task.clone(),
        lineage: r.lineage.clone(),
        rules: r.rules.clone(),
        needed: r.needed,
        action: r.action.clone(),
        at: r.at,
        expires: r.at + r.timeout,
    }];
    for v in &r.votes {
        out.push(Record::Vote {
            id: r.id.clone(),
            by: v.by.clone(),
            approve: v.approve,
            reason: v.reason.clone(),
            waiver: v.waiver,
            at: v.at,
        });
    }
    match (r.state, r.closed_at) {
        (State::Expired, Some(at)) => out.push(Record::Expire { id: r.id.clone(), at }),
        (State::Used, Some(at)) => {
            out.push(Record::Use { id: r.id.clone(), at });
            // A waiver that ended (or was ended by a freeze) stays ended.
            if let Some(w) = r.waiver_until.filter(|w| *w <= now()) {
                out.push(Record::Expire { id: r.id.clone(), at: w });
            }
        }
        _ => {}
    }
    out
}

/// A held action as operators see it and as its approval is bound to it. Built only when a rule
/// covers the action (the gate's `describe`), so an unguarded request pays nothing for it.
pub struct Subject {
    /// As operators see it: names, the command as audited, digests and sizes (no secret of the
    /// broker's; what the agent sent, which the operator must see to judge).
    pub shown: Value,
    /// Everything else that makes the action what it is (the full command, the path, host and
    /// body, the arguments), hashed into its digest.
    pub exact: Vec<u8>,
}

/// SHA-256 hex of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The digest that binds an approval: the agent, its task lineage, the action as shown and the
/// exact bytes, each length-prefixed (no two actions share an encoding).
fn digest(caller: &Caller, s: &Subject) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let lineage: Vec<&str> = caller.token().map(|t| t.lineage.iter().map(String::as_str).collect()).unwrap_or_default();
    let shown = s.shown.to_string();
    for part in [caller.agent.as_bytes(), lineage.join("/").as_bytes(), shown.as_bytes(), &s.exact] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    data_encoding::HEXLOWER.encode(ctx.finish().as_ref())
}

fn pending_error(r: &Request, req: &Requirement<'_>) -> Error {
    let needs = if r.needed > 1 {
        format!("{} approvals from different operators ({} so far)", r.needed, r.approvals())
    } else {
        "an operator's approval".to_owned()
    };
    Error::Pending {
        id: r.id.clone(),
        message: format!(
            "this action needs {needs} (rule {}; approvers: {}). Request {} waits until {}. Call again with \
             exactly the same arguments once it is approved; a changed call is a new request",
            req.names().join(", "),
            req.approvers_text(),
            r.id,
            crate::time::format_rfc3339(r.expires, None)
        ),
    }
}

fn event(caller: &Caller, name: &'static str) -> Event {
    let ev = Event::new(Kind::Approval, name).agent(caller.agent.clone());
    match caller.token() {
        Some(t) => ev.task(t.task.clone(), t.lineage.clone()).initiated_by(t.initiated_by.clone()),
        None => ev,
    }
}

/// The gate: `Ok` when no rule holds `gated` for `caller`, or an approval of exactly it was used
/// up (durably) just now; else the request stays open and the error says how it stands
/// (pending, denied with the operator's reason, expired). Waits for the answer while the client
/// shows progress, else at most `approvals.hold`. `describe` is called only when a rule applies.
pub async fn clear(
    ports: Ports<'_>,
    policy: &Policy,
    caller: &Caller,
    gated: Gated<'_>,
    describe: impl FnOnce() -> Subject,
) -> Result<(), Error> {
    let Some(req) = requirement(policy, &caller.agent, &gated) else { return Ok(()) };
    wait(ports, policy, caller, req, describe()).await
}

/// The gate's body for an action a rule holds (one copy, whatever path asks).
async fn wait(
    ports: Ports<'_>,
    policy: &Policy,
    caller: &Caller,
    req: Requirement<'_>,
    subject: Subject,
) -> Result<(), Error> {
    let store = ports.approvals;
    let digest = digest(caller, &subject);
    if let Some(r) = store.usable(&digest, policy, &req) {
        return consume(ports, store, caller, &r).await;
    }
    let r = match store.latest(&digest) {
        Some(r) if r.state == State::Pending => r,
        Some(r) => {
            store.tell(&r.id);
            return Err(Error::Denied(r.refusal()));
        }
        None => ask(ports, policy, caller, &req, digest.clone(), subject.shown).await?,
    };
    let started = std::time::Instant::now();
    let hold = match ports.progress {
        Some(_) => Duration::from_secs((r.expires - now()).max(0) as u64),
        None => policy.approvals.hold,
    };
    if let Some(p) = ports.progress {
        // At once, so the client (and its user) learns which request to answer.
        p.send(0.0, &format!("waiting for an operator to approve request {}", r.id));
    }
    let waiting = async {
        loop {
            let listener = store.changed.listen();
            let current = store.get(&r.id).unwrap_or_else(|| r.clone());
            match current.state {
                State::Pending => {}
                State::Approved | State::Used => return Ok(current),
                State::Denied | State::Expired => {
                    store.tell(&current.id);
                    return Err(Error::Denied(current.refusal()));
                }
            }
            let left = hold.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(pending_error(&current, &req));
            }
            let tick = left.min(PROGRESS_EVERY);
            futures_lite::future::or(listener, async {
                crate::broker::deadline::Deadline::after(tick).await;
            })
            .await;
            if let Some(p) = ports.progress {
                let waited = started.elapsed().as_secs();
                p.send(
                    waited as f64,
                    &format!("waiting for an operator to approve request {} ({waited}s)", current.id),
                );
            }
        }
    };
    // A task revoked or expired while its call waits ends the wait: an approval given later does
    // not bring it back (a frozen agent's, task's or resource's requests are denied by the freeze).
    let gone = || Error::Refused(format!("the task was revoked or expired while request {} waited; nothing ran", r.id));
    let current = match caller.token() {
        None => waiting.await?,
        Some(t) => {
            let ended = ports.tasks.ended(t.task.clone(), t.envelope().expires_before);
            futures_lite::future::or(waiting, async {
                ended.await;
                Err(gone())
            })
            .await?
        }
    };
    if caller.token().is_some_and(|t| ports.tasks.unusable(&t.task)) {
        return Err(gone());
    }
    match store.usable(&digest, policy, &req) {
        Some(u) => consume(ports, store, caller, &u).await,
        None if current.state == State::Used => Err(Error::Refused(format!(
            "approval request {} was used by an identical call that ran first; call again to ask anew",
            current.id
        ))),
        None => Err(pending_error(&current, &req)),
    }
}

/// Opens a request for this exact action (its record on disk, audited, announced).
async fn ask(
    ports: Ports<'_>,
    policy: &Policy,
    caller: &Caller,
    req: &Requirement<'_>,
    digest: String,
    shown: Value,
) -> Result<Request, Error> {
    let store = ports.approvals;
    let (mine, all) = {
        let reqs = store.requests.borrow();
        let open = reqs.values().filter(|r| r.state == State::Pending);
        open.fold((0usize, 0usize), |(m, a), r| (m + usize::from(r.agent == caller.agent), a + 1))
    };
    let cap = policy.approvals.max_pending_per_agent as usize;
    if mine >= cap || all >= MAX_PENDING {
        return Err(Error::Refused(format!(
            "agent {:?} has {mine} approval requests waiting (at most {cap}; {all} in all): wait for answers before asking more",
            caller.agent
        )));
    }
    let t = now();
    let id = crate::ids::new_ulid(crate::time::now()).to_string();
    let token = caller.token();
    let rec = Record::Ask {
        id: id.clone(),
        digest,
        agent: caller.agent.clone(),
        task: token.map(|t| t.task.clone()),
        lineage: token.map(|t| t.lineage.clone()).unwrap_or_default(),
        rules: req.names(),
        needed: req.needed(),
        action: shown.clone(),
        at: t,
        expires: t + req.timeout().as_secs() as i64,
    };
    let ev = event(caller, "approval_requested")
        .action(json!({ "approval": id, "rules": req.names(), "needed": req.needed(), "what": shown }))
        .allow();
    let ticket = ports.audit.record(ev).map_err(Error::audit)?;
    let durable = store.append(&rec)?;
    let (a, b) = futures_lite::future::zip(durable.wait(), ticket.durable()).await;
    a?;
    b.map_err(Error::audit)?;
    ports.metrics.inc("ephyr_approvals_total", &[("outcome", "requested")]);
    ports.metrics.set("ephyr_approvals_pending", &[], store.pending() as f64);
    let r = store.get(&id).ok_or_else(|| Error::Unavailable("approval request lost".into()))?;
    let _ = store.notices.try_send(r.clone());
    log::info!("approval request {id} for agent {:?} ({})", caller.agent, req.names().join(", "));
    Ok(r)
}

/// Uses approval `r` up (a waiver leaves it usable until it ends): its journal record and its
/// audit line are synced together, before the action.
async fn consume(ports: Ports<'_>, store: &Approvals, caller: &Caller, r: &Request) -> Result<(), Error> {
    let first = r.state == State::Approved;
    let waived = r.waiver_until.is_some_and(|w| w > now());
    let ev = event(caller, "approval_used")
        .action(json!({ "approval": r.id, "waiver": waived, "waiver_until": r.waiver_until }))
        .allow();
    // Used up first: if the audit line then fails, the approval is spent and the action refused
    // (fail closed), never run twice.
    let used = if first { Some(store.append(&Record::Use { id: r.id.clone(), at: now() })?) } else { None };
    let ticket = ports.audit.record(ev).map_err(Error::audit)?;
    let (journal, audit) = futures_lite::future::zip(
        async {
            match used {
                Some(d) => d.wait().await,
                None => Ok(()),
            }
        },
        ticket.durable(),
    )
    .await;
    journal?;
    audit.map_err(Error::audit)?;
    ports.metrics.inc("ephyr_approvals_total", &[("outcome", if first { "used" } else { "waived" })]);
    ports.metrics.set("ephyr_approvals_pending", &[], store.pending() as f64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::policy::approval::Gated;

    const POLICY: &str = "operators:\n  alice: {password_hash: \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$J5VYwqUgTn6v0bqvC2EIRk6YBnJ1U1uYYVQEzj3aAcE\", role: admin}\n\
        roles: {op: {principal: op}}\ntargets: {nas: {host: h, allowed_roles: [op]}}\nagents: {a: {uid: 1, ssh: {nas: {roles: [op]}}}}\n\
        approvals:\n  rules:\n    r: {ssh: {targets: [nas]}, four_eyes: true, approvers: [alice, local]}\n";

    /// A request of agent `a` under rule `r`, asked at `at`, expiring at `expires`.
    fn asked(id: &str, digest: &str, at: i64, expires: i64) -> Record {
        Record::Ask {
            id: id.into(),
            digest: digest.into(),
            agent: "a".into(),
            task: None,
            lineage: vec![],
            rules: vec!["r".into()],
            needed: 1,
            action: json!({}),
            at,
            expires,
        }
    }

    fn ask(store: &Approvals, id: &str, digest: &str) {
        store.append(&asked(id, digest, now(), now() + 600)).unwrap();
    }

    fn vote(store: &Approvals, id: &str, by: &str) {
        let rec =
            Record::Vote { id: id.into(), by: by.into(), approve: true, reason: String::new(), waiver: 0, at: now() };
        store.append(&rec).unwrap();
    }

    #[test]
    fn only_votes_the_current_policy_accepts_count_whatever_the_log_says() {
        let p = Policy::parse(POLICY, "t").unwrap();
        let req = requirement(&p, "a", &Gated::Ssh { target: "nas", role: "op", command: Some("x") }).unwrap();
        assert_eq!(req.needed(), 2);
        let store = Approvals::in_memory();
        // A log that says "approved" (needed 1, one vote by someone who is no operator): the gate
        // still wants two approvals by approvers of the current rules.
        ask(&store, "01", "d1");
        vote(&store, "01", "console:mallory");
        assert_eq!(store.get("01").unwrap().state, State::Approved);
        assert!(store.usable("d1", &p, &req).is_none(), "mallory is no approver");
        ask(&store, "02", "d2");
        vote(&store, "02", "console:alice");
        assert!(store.usable("d2", &p, &req).is_none(), "one of two");
        // Two different accepted approvers: usable, for that digest only.
        let store = Approvals::in_memory();
        ask(&store, "03", "d3");
        store.requests.borrow_mut().get_mut("03").unwrap().needed = 2;
        vote(&store, "03", "console:alice");
        assert_eq!(store.get("03").unwrap().state, State::Pending);
        assert!(store.vote("03", &Answerer::Console("alice".into()), true, "", 0).is_err(), "the same approver twice");
        vote(&store, "03", "operator:uid0");
        assert!(store.usable("d3", &p, &req).is_some());
        assert!(store.usable("d1", &p, &req).is_none());
    }

    #[test]
    fn a_used_or_expired_approval_is_not_used_again_and_compaction_keeps_state() {
        let store = Approvals::in_memory();
        ask(&store, "01", "d");
        vote(&store, "01", "operator:uid0");
        store.append(&Record::Use { id: "01".into(), at: now() }).unwrap();
        assert_eq!(store.get("01").unwrap().state, State::Used);
        // A vote after use, an expiry of a used one: no change.
        vote(&store, "01", "operator:uid1");
        store.append(&Record::Expire { id: "01".into(), at: now() }).unwrap();
        let r = store.get("01").unwrap();
        assert_eq!((r.state, r.votes.len()), (State::Used, 1));
        // Replaying the compacted records rebuilds the same request.
        let mut again = BTreeMap::new();
        for rec in records_of(&r) {
            apply(&mut again, rec);
        }
        let back = &again["01"];
        assert_eq!((back.state, back.votes.len(), back.timeout), (State::Used, 1, r.timeout));
        // Past its time, a pending request expires at load, never approved.
        let mut pending = BTreeMap::new();
        let t = now();
        apply(&mut pending, asked("02", "e", t - 100, t - 1));
        let r = pending.get_mut("02").unwrap();
        expire_if_due(r, t);
        assert_eq!(r.state, State::Expired);
    }

    #[test]
    fn closed_requests_are_kept_for_a_day_and_at_most_a_thousand() {
        let t = now();
        let mut m = BTreeMap::new();
        for i in 0..1005 {
            let id = format!("{i:05}");
            apply(&mut m, asked(&id, &id, t, t + 60));
            apply(&mut m, Record::Expire { id, at: if i == 3 { t - KEEP_CLOSED_SECS - 1 } else { t } });
        }
        apply(&mut m, asked("99999", "p", t, t + 60));
        prune(&mut m, t);
        assert_eq!(m.len(), 1001, "1,000 closed and the open one");
        assert!(m.contains_key("99999"), "an open request is never pruned");
        assert!(!m.contains_key("00003"), "older than a day");
        assert!(!m.contains_key("00000") && m.contains_key("01004"), "the oldest go first");
    }

    #[test]
    fn a_waiver_a_freeze_ended_stays_ended_after_compaction() {
        let store = Approvals::in_memory();
        ask(&store, "01", "d");
        let rec = Record::Vote {
            id: "01".into(),
            by: "operator:uid0".into(),
            approve: true,
            reason: String::new(),
            waiver: 600,
            at: now(),
        };
        store.append(&rec).unwrap();
        store.append(&Record::Use { id: "01".into(), at: now() }).unwrap();
        assert!(store.get("01").unwrap().waiver_until.unwrap() > now());
        let d = store.deny_open("operator:uid0", "frozen", |r| r.agent == "a");
        assert_eq!(d.len(), 1);
        let r = store.get("01").unwrap();
        assert!(r.waiver_until.unwrap() <= now(), "the freeze ended the waiver");
        let mut again = BTreeMap::new();
        for rec in records_of(&r) {
            apply(&mut again, rec);
        }
        assert_eq!(again["01"].waiver_until, r.waiver_until, "and it stays ended after a restart");
    }

    #[test]
    fn two_local_processes_are_one_person_for_four_eyes() {
        let store = Approvals::in_memory();
        ask(&store, "01", "d");
        store.requests.borrow_mut().get_mut("01").unwrap().needed = 2;
        store.vote("01", &Answerer::Local(0), true, "", 0).unwrap();
        let Err(e) = store.vote("01", &Answerer::Local(65533), true, "", 0) else { panic!("a second local approval") };
        assert!(e.message().contains("local processes count as one"), "{e:?}");
        // Even a log that holds both votes does not approve it.
        vote(&store, "01", "operator:uid65533");
        assert_eq!(store.get("01").unwrap().state, State::Pending);
        store.vote("01", &Answerer::Console("alice".into()), true, "", 0).unwrap();
        assert_eq!(store.get("01").unwrap().state, State::Approved);
    }
}
