//! The agent directory: every agent's place in its lifecycle, the agents enrolled without a
//! policy edit, their join tokens, and when each agent and each of its grants was last used.
//!
//! Agents come from two places: the policy file (as before: name, key hash or uid, grants) and
//! enrollment (`ephyr agent enroll --template T --owner O`: a single-use, short-lived join token
//! the agent exchanges at `POST /v1/agents/join` for its API key; its grants are template `T`'s,
//! read again at every policy load). Both kinds move through one lifecycle:
//!
//! ```text
//! provisioned → active ⇄ idle → decommissioned
//!        │        │  ↘   ↓ ↑      ↑
//!        │        └→ suspended → revoked
//!        └──────────────────────────┘
//! ```
//!
//! ([`AgentState::can_become`] is the table.) The directory overlays the policy snapshot
//! ([`Directory::overlay`]): enrolled agents are added to `policy.agents` with their template's
//! grants and their key's hash, and every agent carries its state, which `auth::authenticate`
//! checks on every use of every credential (API key, task token, and so every MCP session and
//! run lease, which re-authenticate per request). Suspension and revocation also end what the
//! agent holds (`ops::end_covered`: tasks, certificates, SSH and MCP sessions, approvals).
//!
//! What runs here: the executor thread. State changes are appended to the `agents` log of the
//! one durable-state interface and awaited before they are acknowledged; use is remembered in
//! memory and journaled at most once an hour per agent and grant (the reaper counts in days). A
//! log that does not parse stops start-up, naming the record. Join tokens are kept as SHA-256
//! digests only.

pub mod api;
pub mod reaper;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use super::Error;
use super::journal::{Backend, Durable, Store};
use super::policy::Policy;
use crate::secret::SecretString;

/// The durable log of the directory.
pub const LOG: &str = "agents";
/// Prefix of join tokens.
pub const JOIN_PREFIX: &str = "ephyr_jt_";
/// Longest reason kept with a transition.
pub const MAX_REASON: usize = 500;
/// Use is journaled at most this often per agent and grant (seconds).
const USE_GRAIN: i64 = 3600;

/// Where an agent stands. Only the transitions of [`AgentState::can_become`] happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Enrolled; its join token not yet used. It has no credential.
    Provisioned,
    /// In use.
    #[default]
    Active,
    /// Unused for `lifecycle.idle_after`; still served (a use makes it active again).
    Idle,
    /// Refused until an operator resumes it.
    Suspended,
    /// Refused for good.
    Revoked,
    /// Gone: refused, and no longer listed in the policy snapshot (its record is kept).
    Decommissioned,
}

impl AgentState {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Provisioned => "provisioned",
            AgentState::Active => "active",
            AgentState::Idle => "idle",
            AgentState::Suspended => "suspended",
            AgentState::Revoked => "revoked",
            AgentState::Decommissioned => "decommissioned",
        }
    }

    /// Whether its credentials are honoured.
    pub fn serves(self) -> bool {
        matches!(self, AgentState::Active | AgentState::Idle)
    }

    /// The lifecycle's transitions: whether `self → to` is legal.
    pub fn can_become(self, to: AgentState) -> bool {
        use AgentState::*;
        matches!(
            (self, to),
            (Provisioned, Active | Revoked | Decommissioned)
                | (Active, Idle | Suspended | Revoked)
                | (Idle, Active | Suspended | Revoked | Decommissioned)
                | (Suspended, Active | Revoked)
                | (Revoked, Decommissioned)
        )
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    /// An agent enrolled: its join token's digest and expiry.
    Enrolled { name: String, owner: String, template: String, by: String, at: i64, join: String, expires: i64 },
    /// Its join token was used: the hash of the API key it got (the fast stored form), or the
    /// public key (JWK) it authenticates with from then on.
    Joined {
        name: String,
        at: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_hash: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jwk: Option<String>,
    },
    /// It proved what its template's `attest:` asks (`subject`: who the proof named).
    Attested { name: String, at: i64, subject: String },
    /// A transition.
    State { name: String, to: AgentState, by: String, at: i64, reason: String },
    /// Used (the agent, and the grants named) at `at`.
    Used { name: String, at: i64, grants: Vec<String> },
    /// A policy agent first seen (the reaper's clock starts here for an agent never used).
    Seen { name: String, at: i64 },
}

/// An enrolled agent's enrollment.
#[derive(Clone, Debug, Serialize)]
pub struct Enrollment {
    /// The operator who owns it.
    pub owner: String,
    /// Its template.
    pub template: String,
    /// Who enrolled it.
    pub by: String,
    /// When (Unix seconds).
    pub at: i64,
    /// When its join token expires(d).
    pub join_expires: i64,
    /// When it joined.
    pub joined: Option<i64>,
    /// Its key's stored hash (not secret).
    #[serde(skip)]
    pub key_hash: Option<String>,
    /// Its public key (JWK JSON), for a key-bound agent.
    pub jwk: Option<String>,
    /// Its last attestation (Unix seconds) and whom it named.
    pub attested: Option<(i64, String)>,
    #[serde(skip)]
    join: String,
}

/// One agent's lifecycle.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// Its state.
    pub state: AgentState,
    /// Since when (Unix seconds; 0: never changed).
    pub since: i64,
    /// Who made the last transition.
    pub by: String,
    /// Why.
    pub reason: String,
    /// Enrolled agents: how.
    pub enrollment: Option<Enrollment>,
    /// When the directory first knew of it (Unix seconds; enrolled agents: their enrolment).
    pub first_seen: i64,
    /// Last authenticated use (Unix seconds).
    pub last_used: Option<i64>,
    /// Grants (`ssh:web`, `service:github`, `remote:fs`) and when each was last exercised.
    pub exercised: BTreeMap<String, i64>,
    /// When last journaled, per grant ("" for the agent itself).
    #[serde(skip)]
    journaled: BTreeMap<String, i64>,
}

impl Entry {
    fn new(state: AgentState) -> Entry {
        Entry {
            state,
            since: 0,
            by: String::new(),
            reason: String::new(),
            enrollment: None,
            first_seen: 0,
            last_used: None,
            exercised: BTreeMap::new(),
            journaled: BTreeMap::new(),
        }
    }
}

/// What `enroll` made: the agent's name and its join token (shown once).
pub struct Enrolled {
    /// The agent.
    pub name: String,
    /// The join token.
    pub token: SecretString,
    /// Its expiry (Unix seconds).
    pub expires: i64,
    /// Durable once the enrollment is journaled.
    pub durable: Durable,
}

/// Why a join token was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinError {
    /// Not a join token, or none we issued.
    Unknown,
    /// Used before.
    Used(String),
    /// Past its expiry.
    Expired(String),
    /// The agent is no longer waiting for it (revoked, decommissioned).
    NotWaiting(String, AgentState),
}

impl JoinError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            JoinError::Unknown => "invalid_join_token",
            JoinError::Used(_) => "join_token_used",
            JoinError::Expired(_) => "join_token_expired",
            JoinError::NotWaiting(..) => "agent_not_provisioned",
        }
    }

    /// Human text (never the token).
    pub fn message(&self) -> String {
        match self {
            JoinError::Unknown => "not a join token this broker issued".into(),
            JoinError::Used(a) => format!("the join token of agent {a:?} was used already (each works once)"),
            JoinError::Expired(a) => format!("the join token of agent {a:?} expired; enroll it again"),
            JoinError::NotWaiting(a, s) => format!("agent {a:?} is {}, not waiting to join", s.as_str()),
        }
    }
}

/// The directory of one broker.
pub struct Directory {
    store: Rc<dyn Store>,
    entries: RefCell<BTreeMap<String, Entry>>,
    /// Join token digest (hex) → agent.
    joins: RefCell<HashMap<String, String>>,
    generation: Cell<u64>,
}

fn sha256_hex(s: &str) -> String {
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

/// Whether `reason` is acceptable (bounded, no control characters).
pub fn check_reason(reason: &str) -> Result<(), Error> {
    if reason.chars().count() > MAX_REASON || reason.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "the reason must be at most {MAX_REASON} characters, without control characters"
        )));
    }
    Ok(())
}

impl Directory {
    /// Replays log [`LOG`] from `backend` and compacts it to one record set per agent.
    pub async fn load(backend: &dyn Backend) -> Result<Directory, Error> {
        let replayed = backend.replay(LOG).await?;
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut joins = HashMap::new();
        for (i, raw) in replayed.records.iter().enumerate() {
            let bad = |m: String| Error::Unavailable(format!("{LOG} log: record {}: {m}", i + 1));
            let rec: Record = serde_json::from_slice(raw).map_err(|e| bad(e.to_string()))?;
            apply(&mut entries, &mut joins, rec).map_err(bad)?;
        }
        let compacted = compact(&entries);
        let changed = compacted.len() != replayed.records.len() || replayed.torn_bytes > 0;
        let store = backend.open(LOG, changed.then_some(compacted)).await?;
        Ok(Directory { store, entries: RefCell::new(entries), joins: RefCell::new(joins), generation: Cell::new(1) })
    }

    /// Adds enrolled agents to `p.agents` (their template's grants, their key's hash) and sets
    /// every agent's state. Idempotent: enrolled agents of an earlier overlay are replaced. An
    /// enrolled agent whose name the file now uses is left out. Returns what is wrong (for the
    /// log at start-up and reload).
    pub fn overlay(&self, p: &mut Policy) -> Vec<String> {
        let mut warnings = Vec::new();
        p.agents.retain(|_, a| a.owner.is_none());
        for a in p.agents.values_mut() {
            a.state = AgentState::Active;
        }
        let unseen: Vec<String> = {
            let entries = self.entries.borrow();
            p.agents.keys().filter(|n| entries.get(*n).is_none_or(|e| e.first_seen == 0)).cloned().collect()
        };
        let now = crate::time::now().secs();
        for name in unseen {
            let rec = Record::Seen { name, at: now };
            if let Err(e) = self.append(&rec) {
                warnings.push(format!("agent directory: {}", e.message()));
            }
            self.apply(rec);
        }
        for (name, e) in self.entries.borrow().iter() {
            if let Some(a) = p.agents.get_mut(name) {
                if e.enrollment.is_none() {
                    a.state = e.state;
                } else {
                    warnings.push(format!(
                        "agents.{name}: the policy file defines an agent with the name of an enrolled agent; the enrolled one is not served"
                    ));
                }
                continue;
            }
            let Some(en) = &e.enrollment else { continue };
            if e.state == AgentState::Decommissioned {
                continue;
            }
            let mut agent = match p.templates.get(&en.template) {
                Some(t) => t.clone(),
                None => {
                    warnings.push(format!(
                        "enrolled agent {name:?}: its template {:?} is not in the policy; it has no grants",
                        en.template
                    ));
                    empty_agent(p)
                }
            };
            agent.name = name.clone();
            agent.description = format!("enrolled from template {} by {}", en.template, en.by);
            agent.api_key_hash = en.key_hash.clone();
            agent.uid = None;
            agent.owner = Some(en.owner.clone());
            agent.template = Some(en.template.clone());
            agent.state = e.state;
            p.agents.insert(name.clone(), agent);
        }
        p.directory = self.generation.get();
        warnings
    }

    /// The entry of `name` (a policy agent nobody changed has none).
    pub fn get(&self, name: &str) -> Option<Entry> {
        self.entries.borrow().get(name).cloned()
    }

    /// Every entry.
    pub fn list(&self) -> Vec<(String, Entry)> {
        self.entries.borrow().iter().map(|(n, e)| (n.clone(), e.clone())).collect()
    }

    /// Enrolls agent `name` (checked by the caller: a free, valid name; a known template and
    /// owner): a join token valid until `expires`.
    pub fn enroll(
        &self,
        name: &str,
        template: &str,
        owner: &str,
        by: &str,
        now: i64,
        expires: i64,
    ) -> Result<Enrolled, Error> {
        if self.entries.borrow().contains_key(name) {
            return Err(Error::Refused(format!("an agent named {name:?} exists (or existed) already")));
        }
        let mut raw = zeroize::Zeroizing::new([0u8; 32]);
        crate::secret::random_bytes(&mut raw[..]).map_err(|e| Error::Unavailable(e.to_string()))?;
        let token = SecretString::new(format!("{JOIN_PREFIX}{}", data_encoding::BASE64URL_NOPAD.encode(&raw[..])));
        let digest = sha256_hex(token.expose());
        let rec = Record::Enrolled {
            name: name.into(),
            owner: owner.into(),
            template: template.into(),
            by: by.into(),
            at: now,
            join: digest,
            expires,
        };
        let durable = self.append(&rec)?;
        self.apply(rec);
        Ok(Enrolled { name: name.into(), token, expires, durable })
    }

    /// Checks a join token: the agent waiting for it.
    pub fn check_join(&self, token: &str, now: i64) -> Result<String, JoinError> {
        if !token.starts_with(JOIN_PREFIX) || token.len() > 128 {
            return Err(JoinError::Unknown);
        }
        let digest = sha256_hex(token);
        let name = self.joins.borrow().get(&digest).cloned().ok_or(JoinError::Unknown)?;
        let entries = self.entries.borrow();
        let e = entries.get(&name).ok_or(JoinError::Unknown)?;
        let en = e.enrollment.as_ref().ok_or(JoinError::Unknown)?;
        // The digest matched by lookup; compared once more in constant time (belt and braces).
        if !crate::secret::constant_time_eq(en.join.as_bytes(), digest.as_bytes()) {
            return Err(JoinError::Unknown);
        }
        if en.joined.is_some() {
            return Err(JoinError::Used(name));
        }
        if e.state != AgentState::Provisioned {
            return Err(JoinError::NotWaiting(name, e.state));
        }
        if now >= en.join_expires {
            return Err(JoinError::Expired(name));
        }
        Ok(name)
    }

    /// Records that `name` joined with an API key whose stored hash is `key_hash`, or with the
    /// public key `jwk`, having proved `attested` (a subject) if its template asks: its token is
    /// spent and it is active. The caller awaits the durable before handing the key out.
    pub fn join(
        &self,
        name: &str,
        key_hash: Option<&str>,
        jwk: Option<&str>,
        attested: Option<&str>,
        now: i64,
    ) -> Result<Durable, Error> {
        if let Some(subject) = attested {
            let a = Record::Attested { name: name.into(), at: now, subject: subject.into() };
            let _ = self.append(&a)?;
            self.apply(a);
        }
        let rec = Record::Joined {
            name: name.into(),
            at: now,
            key_hash: key_hash.map(str::to_owned),
            jwk: jwk.map(str::to_owned),
        };
        let state = Record::State {
            name: name.into(),
            to: AgentState::Active,
            by: format!("agent:{name}"),
            at: now,
            reason: "joined".into(),
        };
        let _ = self.append(&rec)?;
        let d = self.append(&state)?;
        self.apply(rec);
        self.apply(state);
        Ok(d)
    }

    /// Moves `name` from `from` to `to` (the caller checked legality against the current state).
    pub fn transition(&self, name: &str, to: AgentState, by: &str, reason: &str, now: i64) -> Result<Durable, Error> {
        let rec = Record::State { name: name.into(), to, by: by.into(), at: now, reason: reason.into() };
        let d = self.append(&rec)?;
        self.apply(rec);
        Ok(d)
    }

    /// The current state of `name` in `p` terms (policy agents without an entry: active).
    pub fn state(&self, name: &str) -> AgentState {
        self.entries.borrow().get(name).map_or(AgentState::Active, |e| e.state)
    }

    /// Notes a use of `name` (and of `grant`, if any) at `now`: in memory always, journaled at
    /// most once per [`USE_GRAIN`] per agent and grant (not awaited: use is advisory).
    pub fn touch(&self, name: &str, grant: Option<&str>, now: i64) {
        let mut entries = self.entries.borrow_mut();
        if !entries.contains_key(name) {
            entries.insert(name.to_owned(), Entry::new(AgentState::Active));
        }
        let Some(e) = entries.get_mut(name) else { return };
        e.last_used = Some(e.last_used.map_or(now, |t| t.max(now)));
        let key = grant.unwrap_or("");
        if let Some(g) = grant {
            match e.exercised.get_mut(g) {
                Some(t) => *t = (*t).max(now),
                None => {
                    e.exercised.insert(g.to_owned(), now);
                }
            }
        }
        let due = e.journaled.get(key).is_none_or(|&t| now - t >= USE_GRAIN || now < t);
        if due {
            e.journaled.insert(key.to_owned(), now);
            let rec =
                Record::Used { name: name.into(), at: now, grants: grant.into_iter().map(str::to_owned).collect() };
            drop(entries);
            if let Err(err) = self.append(&rec) {
                log::warn!("agents: use of {name:?} not journaled: {}", err.message());
            }
        }
    }

    /// Records a fresh attestation of `name`.
    pub fn attested(&self, name: &str, subject: &str, now: i64) -> Result<Durable, Error> {
        let rec = Record::Attested { name: name.into(), at: now, subject: subject.into() };
        let d = self.append(&rec)?;
        self.apply(rec);
        Ok(d)
    }

    /// When `name` last attested (cheap: on the request path of agents whose template asks).
    pub fn attested_at(&self, name: &str) -> Option<i64> {
        self.entries.borrow().get(name)?.enrollment.as_ref()?.attested.as_ref().map(|a| a.0)
    }

    /// The public key of a key-bound agent.
    pub fn jwk(&self, name: &str) -> Option<String> {
        self.entries.borrow().get(name)?.enrollment.as_ref()?.jwk.clone()
    }

    /// Changes with every enrollment, join and transition (names the overlay).
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    fn apply(&self, rec: Record) {
        let mut entries = self.entries.borrow_mut();
        let mut joins = self.joins.borrow_mut();
        if let Err(e) = apply(&mut entries, &mut joins, rec) {
            log::error!("agents: {e}");
        }
        self.generation.set(self.generation.get() + 1);
    }

    fn append(&self, rec: &Record) -> Result<Durable, Error> {
        self.store.append(&serde_json::to_vec(rec).map_err(|e| Error::Unavailable(e.to_string()))?)
    }
}

fn empty_agent(p: &Policy) -> super::policy::Agent {
    super::policy::Agent {
        name: String::new(),
        description: String::new(),
        api_key_hash: None,
        uid: None,
        ssh: Default::default(),
        services: Default::default(),
        remotes: Default::default(),
        dashboard: super::policy::DashboardLevel::None,
        can_delegate: false,
        max_delegation_depth: p.limits.delegation_depth_max,
        max_task_ttl: p.limits.task_ttl_max,
        require_pop: false,
        max_concurrent_certs: p.limits.max_certs_per_agent,
        rate_limit: p.limits.requests_per_agent,
        enabled: true,
        state: AgentState::Active,
        owner: None,
        template: None,
    }
}

/// Applies one record to the replayed state; `Err` for a record that contradicts it (a
/// transition the lifecycle does not have, a join of an agent never enrolled): start-up stops.
fn apply(
    entries: &mut BTreeMap<String, Entry>,
    joins: &mut HashMap<String, String>,
    rec: Record,
) -> Result<(), String> {
    match rec {
        Record::Enrolled { name, owner, template, by, at, join, expires } => {
            if !super::policy::name_ok(&name) {
                return Err(format!("enrolled agent name {name:?} is not a valid agent name"));
            }
            if entries.contains_key(&name) {
                return Err(format!("agent {name:?} enrolled twice"));
            }
            if join.len() != 64 || !join.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("agent {name:?}: the join token digest is not SHA-256 hex"));
            }
            joins.insert(join.clone(), name.clone());
            let mut e = Entry::new(AgentState::Provisioned);
            e.since = at;
            e.first_seen = at;
            e.by = by.clone();
            e.reason = "enrolled".into();
            e.enrollment = Some(Enrollment {
                owner,
                template,
                by,
                at,
                join_expires: expires,
                joined: None,
                key_hash: None,
                jwk: None,
                attested: None,
                join,
            });
            entries.insert(name, e);
        }
        Record::Joined { name, at, key_hash, jwk } => {
            let e = entries.get_mut(&name).ok_or_else(|| format!("agent {name:?} joined but was never enrolled"))?;
            let en = e.enrollment.as_mut().ok_or_else(|| format!("agent {name:?} joined but was never enrolled"))?;
            if en.joined.is_some() {
                return Err(format!("agent {name:?} joined twice"));
            }
            match (&key_hash, &jwk) {
                (Some(h), None) if super::auth::api_key::parse_fast(h).is_ok() => {}
                (None, Some(k)) if super::jose::key(k).is_ok() => {}
                _ => {
                    return Err(format!(
                        "agent {name:?}: a join needs one valid credential (an ephyr key hash or a public JWK)"
                    ));
                }
            }
            en.joined = Some(at);
            en.key_hash = key_hash;
            en.jwk = jwk;
        }
        Record::Attested { name, at, subject } => {
            let e = entries.get_mut(&name).ok_or_else(|| format!("agent {name:?} attested but was never enrolled"))?;
            let en = e.enrollment.as_mut().ok_or_else(|| format!("agent {name:?} attested but was never enrolled"))?;
            en.attested = Some((at, subject));
        }
        Record::State { name, to, by, at, reason } => {
            let e = entries.entry(name.clone()).or_insert_with(|| Entry::new(AgentState::Active));
            if !e.state.can_become(to) {
                return Err(format!("agent {name:?}: {} → {} is not a transition", e.state.as_str(), to.as_str()));
            }
            e.state = to;
            e.since = at;
            e.by = by;
            e.reason = reason;
        }
        Record::Seen { name, at } => {
            let e = entries.entry(name).or_insert_with(|| Entry::new(AgentState::Active));
            if e.first_seen == 0 || at < e.first_seen {
                e.first_seen = at;
            }
        }
        Record::Used { name, at, grants } => {
            let e = entries.entry(name).or_insert_with(|| Entry::new(AgentState::Active));
            e.last_used = Some(e.last_used.map_or(at, |t| t.max(at)));
            if grants.is_empty() {
                e.journaled.insert(String::new(), at);
            }
            for g in grants {
                e.journaled.insert(g.clone(), at);
                let t = e.exercised.entry(g).or_insert(at);
                *t = (*t).max(at);
            }
        }
    }
    Ok(())
}

/// One record set per agent, in an order that replays to the same state.
fn compact(entries: &BTreeMap<String, Entry>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut push = |r: &Record| {
        if let Ok(v) = serde_json::to_vec(r) {
            out.push(v);
        }
    };
    for (name, e) in entries {
        if let Some(en) = &e.enrollment {
            push(&Record::Enrolled {
                name: name.clone(),
                owner: en.owner.clone(),
                template: en.template.clone(),
                by: en.by.clone(),
                at: en.at,
                join: en.join.clone(),
                expires: en.join_expires,
            });
            if let Some(at) = en.joined {
                push(&Record::Joined { name: name.clone(), at, key_hash: en.key_hash.clone(), jwk: en.jwk.clone() });
            }
            if let Some((at, subject)) = &en.attested {
                push(&Record::Attested { name: name.clone(), at: *at, subject: subject.clone() });
            }
        }
        if e.enrollment.is_none() && e.first_seen != 0 {
            push(&Record::Seen { name: name.clone(), at: e.first_seen });
        }
        // The last state, reached through legal steps from where replay starts.
        let start = if e.enrollment.is_some() { AgentState::Provisioned } else { AgentState::Active };
        for step in path(start, e.state) {
            let last = step == e.state;
            push(&Record::State {
                name: name.clone(),
                to: step,
                by: if last { e.by.clone() } else { "compaction".into() },
                at: e.since,
                reason: if last { e.reason.clone() } else { String::new() },
            });
        }
        if let Some(at) = e.last_used {
            push(&Record::Used { name: name.clone(), at, grants: Vec::new() });
        }
        for (g, at) in &e.exercised {
            push(&Record::Used { name: name.clone(), at: *at, grants: vec![g.clone()] });
        }
    }
    out
}

/// Legal steps from `from` to `to` (empty when equal): the shortest, by breadth-first search.
fn path(from: AgentState, to: AgentState) -> Vec<AgentState> {
    use AgentState::*;
    const ALL: [AgentState; 6] = [Provisioned, Active, Idle, Suspended, Revoked, Decommissioned];
    let mut prev: BTreeMap<AgentState, AgentState> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from]);
    while let Some(s) = queue.pop_front() {
        if s == to {
            break;
        }
        for n in ALL {
            if s.can_become(n) && n != from && !prev.contains_key(&n) {
                prev.insert(n, s);
                queue.push_back(n);
            }
        }
    }
    let mut out = Vec::new();
    let mut cur = to;
    while cur != from {
        out.push(cur);
        match prev.get(&cur) {
            Some(&p) => cur = p,
            None => return Vec::new(),
        }
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests;
