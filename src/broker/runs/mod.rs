//! Runs: `ephyr run HOST` on the broker's side (docs/runs.md). A run is a root task made from a
//! policy template (`runs:`), a certificate for a key the CLI holds, optional disposable
//! provider keys, a **lease** the CLI renews, a budget the proxy enforces, and the LLM usage
//! the proxy reads from the providers' answers.
//!
//! What runs here: the executor thread. [`Runs`] keeps the runs in memory and their starts and
//! ends in a durable log (`runs`), so a run whose CLI is gone dies even across a restart of the
//! broker (its lease starts again when the broker does). Renewals are not written: a lease is
//! kept in memory only. The lease sweeper (`maintenance`) revokes the task of every run whose
//! lease ran out; revoking the task ends the run, whoever revoked it (task events). `api` is the
//! local API's `/v1/runs` routes; `usage` reads token counts; `keys` mints and revokes
//! disposable keys.

pub(crate) mod api;
pub(crate) mod keys;
pub mod usage;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use ulid::Ulid;

use super::Error;
use super::journal::{Backend, Durable, Store};
use super::policy::Budget;
use super::ssh::registry::Held;

/// The durable log of runs.
pub const LOG: &str = "runs";
/// Ended runs (and revoked keys) are kept for this long, in seconds.
pub(crate) const KEEP_ENDED: i64 = 24 * 3600;
/// Most runs live at once (each holds a task, a certificate and a lease).
pub const MAX_LIVE: usize = 64;

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Start(Started),
    End {
        #[serde(with = "crate::broker::tasks::ulid_text")]
        id: Ulid,
        at: i64,
        reason: String,
    },
}

/// What is written when a run starts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Started {
    /// The run's task (also the run's id).
    #[serde(with = "crate::broker::tasks::ulid_text")]
    pub id: Ulid,
    /// The agent it acts as.
    pub agent: String,
    /// Who started it (uid on the broker host).
    pub uid: u32,
    /// The target.
    pub host: String,
    /// The template.
    pub template: String,
    /// What runs there (an agent's name, or the command's first word).
    pub label: String,
    /// Unix seconds.
    pub started: i64,
    /// Unix seconds.
    pub expires: i64,
    /// Milliseconds.
    pub lease_ms: u64,
    /// Its budget.
    #[serde(default)]
    pub budget_requests: Option<u64>,
    /// Its budget.
    #[serde(default)]
    pub budget_tokens: Option<u64>,
}

/// LLM traffic of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    /// Requests through the proxy.
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Per model: requests, input and output tokens.
    pub models: BTreeMap<String, [u64; 3]>,
    /// MCP tool calls (the broker's and federated tools).
    pub tool_calls: u64,
    /// Of those, commands on SSH targets (`exec`, `session_exec`, `session_input`).
    pub commands: u64,
}

impl Usage {
    /// Input + output.
    pub fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// One run.
pub struct Run {
    /// What was written at its start.
    pub about: Started,
    lease_until: Cell<Instant>,
    usage: RefCell<Usage>,
    ended: RefCell<Option<(i64, String)>>,
    held: RefCell<Option<Held>>,
}

impl Run {
    /// The run's id (its task's).
    pub fn id(&self) -> Ulid {
        self.about.id
    }

    /// Its budget.
    pub fn budget(&self) -> Budget {
        Budget { requests: self.about.budget_requests, tokens: self.about.budget_tokens }
    }

    /// Whether it is over (when and why).
    pub fn ended(&self) -> Option<(i64, String)> {
        self.ended.borrow().clone()
    }

    /// Its traffic so far.
    pub fn usage(&self) -> Usage {
        self.usage.borrow().clone()
    }

    /// A proxied request may go (and is counted), or the budget it would pass.
    pub fn admit(&self) -> Result<(), String> {
        let b = self.budget();
        let mut u = self.usage.borrow_mut();
        if let Some(max) = b.requests
            && u.requests >= max
        {
            return Err(format!("the run's budget of {max} requests is spent"));
        }
        if let Some(max) = b.tokens
            && u.tokens() >= max
        {
            return Err(format!("the run's budget of {max} tokens is spent ({} used)", u.tokens()));
        }
        u.requests += 1;
        Ok(())
    }

    /// Counts an MCP tool call of the run.
    pub fn called(&self, tool: &str) {
        let mut u = self.usage.borrow_mut();
        u.tool_calls += 1;
        if matches!(tool, "exec" | "session_exec" | "session_input") {
            u.commands += 1;
        }
    }

    /// Adds what a response cost.
    pub fn add(&self, model: Option<&str>, input: u64, output: u64) {
        let mut u = self.usage.borrow_mut();
        u.input_tokens = u.input_tokens.saturating_add(input);
        u.output_tokens = u.output_tokens.saturating_add(output);
        if u.models.len() < 64 || model.is_some_and(|m| u.models.contains_key(m)) {
            let e = u.models.entry(model.unwrap_or("unknown").to_owned()).or_default();
            e[0] += 1;
            e[1] = e[1].saturating_add(input);
            e[2] = e[2].saturating_add(output);
        }
    }

    /// As the local API and the audit show it.
    pub fn view(&self, now: Instant) -> serde_json::Value {
        let a = &self.about;
        let ended = self.ended();
        let end = ended.as_ref().map_or(crate::time::now().secs(), |(at, _)| *at);
        json!({
            "id": a.id.to_string(), "task_id": a.id.to_string(), "agent": a.agent, "uid": a.uid, "host": a.host,
            "template": a.template, "label": a.label,
            "started_at": crate::time::UnixMicros::from_secs(a.started).to_rfc3339(),
            "expires_at": crate::time::UnixMicros::from_secs(a.expires).to_rfc3339(),
            "duration_secs": (end - a.started).max(0),
            "lease_secs": a.lease_ms / 1000,
            "lease_left_ms": ended.is_none().then(|| self.lease_until.get().saturating_duration_since(now).as_millis() as u64),
            "live": ended.is_none(),
            "ended_at": ended.as_ref().map(|(at, _)| crate::time::UnixMicros::from_secs(*at).to_rfc3339()),
            "end_reason": ended.as_ref().map(|(_, r)| r.clone()),
            "budget": { "requests": a.budget_requests, "tokens": a.budget_tokens },
            "usage": self.usage(),
        })
    }
}

/// The runs of one broker.
pub struct Runs {
    store: Rc<dyn Store>,
    runs: RefCell<BTreeMap<Ulid, Rc<Run>>>,
    /// Live runs (the proxy's fast path: none, nothing to look up).
    live: Cell<usize>,
    /// A run started (the lease sweeper wakes).
    pub started: event_listener::Event,
}

impl Runs {
    /// Replays log [`LOG`]: runs not ended are live again, their leases starting now.
    pub async fn load(backend: &dyn Backend) -> Result<Runs, Error> {
        let replayed = backend.replay(LOG).await?;
        let now = crate::time::now().secs();
        let mut runs: BTreeMap<Ulid, Rc<Run>> = BTreeMap::new();
        for (i, raw) in replayed.records.iter().enumerate() {
            match serde_json::from_slice(raw)
                .map_err(|e| Error::Unavailable(format!("{LOG} log: record {}: {e}", i + 1)))?
            {
                Record::Start(s) => {
                    runs.insert(s.id, Rc::new(Run::new(s)));
                }
                Record::End { id, at, reason } => {
                    if let Some(r) = runs.get(&id) {
                        *r.ended.borrow_mut() = Some((at, reason));
                    }
                }
            }
        }
        runs.retain(|_, r| r.ended().is_none_or(|(at, _)| now - at < KEEP_ENDED));
        let mut compacted = Vec::new();
        for r in runs.values() {
            compacted.push(serde_json::to_vec(&Record::Start(r.about.clone())).unwrap_or_default());
            if let Some((at, reason)) = r.ended() {
                compacted.push(serde_json::to_vec(&Record::End { id: r.id(), at, reason }).unwrap_or_default());
            }
        }
        let changed = compacted.len() != replayed.records.len() || replayed.torn_bytes > 0;
        let store = backend.open(LOG, changed.then_some(compacted)).await?;
        let live = runs.values().filter(|r| r.ended().is_none()).count();
        Ok(Runs { store, runs: RefCell::new(runs), live: Cell::new(live), started: event_listener::Event::new() })
    }

    /// Records a new run; durable when the returned [`Durable`] resolves.
    pub fn start(&self, about: Started, held: Option<Held>) -> Result<(Rc<Run>, Durable), Error> {
        if self.live.get() >= MAX_LIVE {
            return Err(Error::Refused(format!("{MAX_LIVE} runs are live; end one first")));
        }
        let d = self.append(&Record::Start(about.clone()))?;
        let run = Rc::new(Run::new(about));
        *run.held.borrow_mut() = held;
        self.runs.borrow_mut().insert(run.id(), run.clone());
        self.live.set(self.live.get() + 1);
        self.started.notify(usize::MAX);
        Ok((run, d))
    }

    /// Renews a live run's lease; the lease left, or why the run is over.
    pub fn renew(&self, id: Ulid) -> Result<Duration, Error> {
        let r = self.get(id).ok_or_else(|| Error::NotFound(format!("no run {id}")))?;
        if let Some((_, why)) = r.ended() {
            return Err(Error::Refused(format!("run {id} ended: {why}")));
        }
        let lease = Duration::from_millis(r.about.lease_ms);
        r.lease_until.set(Instant::now() + lease);
        Ok(lease)
    }

    /// Marks a run over (`None`: it was already). The certificate it held is released.
    pub fn end(&self, id: Ulid, reason: &str) -> Option<Result<Durable, Error>> {
        let r = self.get(id)?;
        if r.ended().is_some() {
            return None;
        }
        let at = crate::time::now().secs();
        *r.ended.borrow_mut() = Some((at, reason.to_owned()));
        r.held.borrow_mut().take();
        self.live.set(self.live.get().saturating_sub(1));
        Some(self.append(&Record::End { id, at, reason: reason.to_owned() }))
    }

    /// A run by id.
    pub fn get(&self, id: Ulid) -> Option<Rc<Run>> {
        self.runs.borrow().get(&id).cloned()
    }

    /// The live run a task belongs to (its lineage's root is the run's task), if any.
    pub fn of_lineage(&self, lineage: &[String]) -> Option<Rc<Run>> {
        if self.live.get() == 0 {
            return None;
        }
        let root = Ulid::from_string(lineage.first()?).ok()?;
        self.get(root).filter(|r| r.ended().is_none())
    }

    /// Every run kept (live, and ended within a day), newest first.
    pub fn list(&self) -> Vec<Rc<Run>> {
        self.runs.borrow().values().rev().cloned().collect()
    }

    /// Live runs whose lease ran out by `now`.
    pub fn lapsed(&self, now: Instant) -> Vec<Rc<Run>> {
        self.runs.borrow().values().filter(|r| r.ended().is_none() && r.lease_until.get() <= now).cloned().collect()
    }

    /// How many are live.
    pub fn live(&self) -> usize {
        self.live.get()
    }

    /// Forgets ended runs older than a day.
    pub fn collect(&self) {
        let now = crate::time::now().secs();
        self.runs.borrow_mut().retain(|_, r| r.ended().is_none_or(|(at, _)| now - at < KEEP_ENDED));
    }

    fn append(&self, rec: &Record) -> Result<Durable, Error> {
        self.store.append(&serde_json::to_vec(rec).map_err(|e| Error::Unavailable(e.to_string()))?)
    }
}

impl Run {
    fn new(about: Started) -> Run {
        let lease = Duration::from_millis(about.lease_ms);
        Run {
            about,
            lease_until: Cell::new(Instant::now() + lease),
            usage: RefCell::default(),
            ended: RefCell::default(),
            held: RefCell::default(),
        }
    }
}
