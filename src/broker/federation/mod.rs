//! Federation: MCP servers behind the broker (`remotes:` in the policy). Agents keep their one
//! connection to ephyr; a remote's tools appear as `<tool_prefix>.<tool>` to the callers whose
//! policy and token allow them, and each call is authorized (tool and arguments, `authorize`'s
//! `RemoteTool`), audited before it leaves, and forwarded.
//!
//! What runs here: the executor thread. At start and on every policy reload each enabled remote
//! is connected (`initialize`, then `tools/list` with pagination) and its tools kept in memory;
//! a call on a remote whose session has expired re-initializes once and re-reads its tools.
//! Tools are pinned (`pins`): one whose definition changed is quarantined until approved.
//! Remotes are reached over Streamable HTTP (`client`, both protocol eras) or as a confined
//! command on stdio (`stdio`, started through `confine`; restarted with backoff when it exits,
//! stopped when it leaves the policy or the broker stops). A background job
//! (`broker::maintenance`) calls [`Federation::refresh_due`] every few seconds, so a remote that
//! went down is retried, a stdio remote restarted and a changed tool list re-read without
//! waiting for an agent.

pub mod auth;
pub(crate) mod client;
pub mod confine;
pub mod pins;
pub(crate) mod stdio;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::broker::Error;
use crate::broker::audit::{Event, Kind};
use crate::broker::policy::{
    Action, ActionKind, Arguments, Decision, PinMode, Policy, Principal, Remote, StdioCommand, Transport, authorize,
};
use crate::broker::ports::Ports;
use crate::broker::upstream::conn::Conns;
use client::{Endpoint, Posted, Wire};

/// How the broker talks to a remote: in a session (2025 era), or statelessly (2026-07-28).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Link {
    /// Session era, with the id the server handed out (if any).
    #[default]
    NotOpen,
    /// Session era.
    Session(Option<String>),
    /// Stateless era: every request carries its version in `_meta` and headers.
    Stateless,
}

impl Link {
    /// For status output.
    pub fn era(&self) -> &'static str {
        match self {
            Link::Stateless => "2026-07-28 (stateless)",
            Link::Session(_) => "2025-06-18 (session)",
            Link::NotOpen => "-",
        }
    }
}

/// Pages of `tools/list` read from one remote.
const MAX_PAGES: usize = 20;
/// Tools kept per remote.
const MAX_TOOLS: usize = 1000;
/// A remote that is down is tried again after 1 s, 2, 4, ... at most this long.
pub const RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// A connected remote's tools are read again after this long (a changed tool is caught then),
/// or sooner when a stateless-era remote says so (`ttlMs`), but not more often than `MIN_KEEP`.
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(300);
/// The shortest a tool list is kept.
pub const MIN_KEEP: std::time::Duration = std::time::Duration::from_secs(1);
/// A stdio remote that exits is started again after 1 s, then 2, 4, ... up to this long; the
/// count starts over once a process has run for [`STEADY`].
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a stdio remote must run before its restarts count as a fresh start.
pub const STEADY: Duration = Duration::from_secs(60);

/// The wait before start number `n` (0-based) of a stdio remote that keeps exiting.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.min(6)).min(MAX_BACKOFF)
}

/// How a remote is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Health {
    /// Not tried yet.
    #[default]
    Unknown,
    /// Its tools are known and it answers.
    Connected,
    /// Its tools are known (and served), but the last call or read could not reach it; it is
    /// being retried.
    Degraded,
    /// The last attempt failed: no tools are served.
    Down,
}

impl Health {
    /// For status and `list_remotes`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Connected => "connected",
            Health::Degraded => "degraded",
            Health::Down => "down",
        }
    }
}

/// Every state a remote can be reported in (`ephyr_remote_state`).
const STATES: [&str; 5] = ["connected", "degraded", "quarantined", "down", "unknown"];

/// What the broker knows of one remote.
#[derive(Clone, Debug, Default)]
pub struct RemoteState {
    /// Its tools, as it described them.
    pub tools: Rc<Vec<Value>>,
    /// How it is talked to.
    pub link: Link,
    /// How long its tool list is kept before it is read again.
    keep: Duration,
    /// Health.
    pub health: Health,
    /// Why it is down.
    pub error: Option<String>,
    /// The policy digest it was discovered under.
    digest: String,
    /// When it was last tried.
    tried: Option<Instant>,
    /// Tools whose definition changed since pinned: (pinned, new), not served until approved.
    pub quarantined: BTreeMap<String, (Value, Value)>,
    /// Failed attempts in a row (an HTTP remote is retried after 1 s, 2, 4, ... up to [`RETRY`]).
    failures: u32,
    /// Its resources, as it listed them (`resources/list`).
    pub resources: Rc<Vec<Value>>,
    /// Its resource templates (`resources/templates/list`).
    pub templates: Rc<Vec<Value>>,
    /// Its prompts, as it listed them (`prompts/list`).
    pub prompts: Rc<Vec<Value>>,
}

impl RemoteState {
    /// Its state as reported: `quarantined` when it answers but a tool waits for an operator.
    pub fn state(&self) -> &'static str {
        match self.health {
            Health::Connected if !self.quarantined.is_empty() => "quarantined",
            h => h.as_str(),
        }
    }
}

/// The remotes of one broker.
pub struct Federation {
    ex: Rc<smol::LocalExecutor<'static>>,
    conns: Rc<Conns>,
    pins: pins::Pins,
    remotes: RefCell<BTreeMap<String, RemoteState>>,
    /// The running stdio remotes.
    procs: RefCell<BTreeMap<String, Rc<stdio::Proc>>>,
    /// Per stdio remote: starts since it last ran steadily, and when the next may happen.
    starts: RefCell<BTreeMap<String, (u32, Instant)>>,
    /// Remotes being read now (one refresh at a time per remote).
    refreshing: Rc<RefCell<std::collections::BTreeSet<String>>>,
    /// This executable, started as `__remote-sandbox` for stdio remotes.
    exe: std::path::PathBuf,
    /// HTTP requests whose caller went away or timed out, to be cancelled at the remote.
    cancels: RefCell<Vec<Cancel>>,
    /// See [`Federation::served_generation`].
    served: std::cell::Cell<u64>,
    /// Per HTTP remote, the notification stream read in the background (and the link it was
    /// opened for).
    listeners: RefCell<BTreeMap<String, (Link, smol::Task<()>)>>,
    /// HTTP remotes whose stream said a list changed: read again at the next tick.
    announced: Rc<RefCell<std::collections::BTreeSet<String>>>,
    /// The broker's own directories (data dir), which no stdio remote's sandbox may include.
    private: Vec<std::path::PathBuf>,
    next_id: std::cell::Cell<u64>,
    /// Sign-ins to remotes protected by OAuth.
    pub auth: auth::RemoteAuth,
    /// Per-agent sign-ins: each (remote, agent)'s own link (its session is the agent's).
    agent_links: RefCell<BTreeMap<(String, String), Link>>,
}

/// A request a remote should stop working on (`notifications/cancelled`).
#[derive(Debug)]
struct Cancel {
    remote: String,
    link: Link,
    id: u64,
}

/// Queues its cancellation when dropped with one still in it.
struct PendingCancel<'a> {
    queue: &'a RefCell<Vec<Cancel>>,
    cancel: Option<Cancel>,
}

impl Drop for PendingCancel<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.cancel.take() {
            let mut q = self.queue.borrow_mut();
            // Bounded: a remote that never answers cannot grow it without end.
            if q.len() < 256 {
                q.push(c);
            }
        }
    }
}

/// Marks a remote as being read until dropped.
struct Refreshing {
    set: Rc<RefCell<std::collections::BTreeSet<String>>>,
    name: String,
}

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.set.borrow_mut().remove(&self.name);
    }
}

impl Federation {
    /// Connections are driven on `ex`; tool pins are `pins`.
    pub fn new(ex: Rc<smol::LocalExecutor<'static>>, pins: pins::Pins) -> Self {
        Federation {
            conns: Rc::new(Conns::new(ex.clone())),
            ex,
            pins,
            remotes: RefCell::default(),
            procs: RefCell::default(),
            starts: RefCell::default(),
            refreshing: Rc::default(),
            exe: "/proc/self/exe".into(),
            private: Vec::new(),
            cancels: RefCell::default(),
            served: std::cell::Cell::new(0),
            listeners: RefCell::default(),
            announced: Rc::default(),
            next_id: std::cell::Cell::new(1),
            auth: auth::RemoteAuth::default(),
            agent_links: RefCell::default(),
        }
    }

    /// The connections (TLS, pool) requests to remotes use.
    pub fn conns(&self) -> &Conns {
        &self.conns
    }

    /// Keeps the sign-ins to remotes in `vault` (the broker's: sealed by the signer).
    pub fn with_vault(mut self, vault: Box<dyn auth::Vault>) -> Self {
        self.auth = auth::RemoteAuth::new(vault);
        self
    }

    /// Starts an operator's sign-in to remote `name` (`subject`: the agent, on a remote with a
    /// sign-in per agent): the authorization URL to open.
    pub async fn login(
        &self,
        ports: Ports<'_>,
        policy: &Policy,
        name: &str,
        subject: Option<&str>,
        by: &str,
    ) -> Result<auth::Begun, Error> {
        if !policy.remotes.contains_key(name) {
            return Err(Error::NotFound(format!("no remote {name:?} in the policy")));
        }
        let cx = auth::Cx::of(&self.conns, ports, policy, name).ok_or_else(|| {
            Error::Invalid(format!("remote {name:?} does not sign in with OAuth (its policy entry has no oauth:)"))
        })?;
        if let Some(a) = subject
            && !policy.agents.contains_key(a)
        {
            return Err(Error::NotFound(format!("no agent {a:?}")));
        }
        let challenge = if self.auth.has_challenge(name) { None } else { Some(self.probe(ports, policy, name).await?) };
        self.auth.begin(cx, subject, by, challenge).await
    }

    /// Sends `initialize` without a token: a remote that wants one answers with its challenge.
    async fn probe(&self, ports: Ports<'_>, policy: &Policy, name: &str) -> Result<auth::Challenge, Error> {
        let Some(remote) = policy.remotes.get(name) else { return Ok(auth::Challenge::default()) };
        let ep = Endpoint { name, remote, policy, subject: None };
        let id = self.id();
        let msg = json!({ "jsonrpc": "2.0", "id": id, "method": "initialize", "params": initialize_params() });
        let wire = Wire { session: None, stateless: false, method: "initialize", name: None, bearer: None };
        let posted = client::post(&self.conns, ports, ep, wire, &msg, Some(id)).await?;
        Ok(auth::parse_challenge(posted.challenge.as_deref().unwrap_or("")))
    }

    /// Finishes a sign-in from the query of the redirect that ended it, then reads the remote
    /// again with its token. Returns the remote and the agent (per-agent sign-ins).
    pub async fn finish_login(
        &self,
        ports: Ports<'_>,
        policy: &Policy,
        query: &str,
    ) -> Result<(String, Option<String>), Error> {
        let done = self.auth.complete(&self.conns, ports, policy, query).await?;
        self.agent_links.borrow_mut().retain(|(r, _), _| *r != done.0);
        if self.refreshing.borrow_mut().insert(done.0.clone()) {
            let _guard = Refreshing { set: self.refreshing.clone(), name: done.0.clone() };
            self.refresh(ports, policy, &done.0).await;
        }
        Ok(done)
    }

    /// Forgets the sign-in to `name` (for `subject`); whether there was one.
    pub async fn logout(&self, name: &str, subject: Option<&str>) -> Result<bool, Error> {
        self.agent_links.borrow_mut().retain(|(r, a), _| !(r == name && Some(a.as_str()) == subject));
        self.auth.logout(name, subject).await
    }

    /// The link a request goes on: on a remote with a sign-in per agent, the agent's own
    /// (opened with its token on first use), else the remote's.
    async fn link_for(&self, ports: Ports<'_>, ep: Endpoint<'_>) -> Result<Link, Error> {
        if let Some(a) = ep.subject {
            let k = (ep.name.to_owned(), a.to_owned());
            if let Some(l) = self.agent_links.borrow().get(&k) {
                return Ok(l.clone());
            }
            let (link, _) = self.open(ports, ep).await?;
            self.agent_links.borrow_mut().insert(k, link.clone());
            return Ok(link);
        }
        Ok(self.remotes.borrow().get(ep.name).map(|s| s.link.clone()).unwrap_or_default())
    }

    /// Starts stdio remotes from `exe` instead of this executable (the federation client of the
    /// conformance suite and tests).
    pub fn with_exe(mut self, exe: impl Into<std::path::PathBuf>) -> Self {
        self.exe = exe.into();
        self
    }

    /// Directories no stdio remote's sandbox may include, or lie inside (the data dir).
    pub fn with_private(mut self, dirs: Vec<std::path::PathBuf>) -> Self {
        self.private = dirs;
        self
    }

    /// The running process of stdio remote `name`, started if it is not running (and its
    /// backoff has passed) or its command changed.
    async fn process(
        &self,
        ports: Ports<'_>,
        policy: &Policy,
        name: &str,
        cmd: &StdioCommand,
    ) -> Result<Rc<stdio::Proc>, Error> {
        let old = self.procs.borrow().get(name).cloned();
        if let Some(p) = &old
            && p.dead().is_none()
            && p.command == *cmd
        {
            return Ok(p.clone());
        }
        let now = Instant::now();
        let (n, next) = self.starts.borrow().get(name).copied().unwrap_or((0, now));
        let n = if old.as_ref().is_some_and(|p| p.started.elapsed() >= STEADY) { 0 } else { n };
        if let Some(p) = &old
            && p.command == *cmd
            && now < next
        {
            let why = p.dead().unwrap_or_default();
            return Err(Error::Unavailable(format!(
                "remote {name:?} stopped ({why}); it is started again in {}s",
                (next - now).as_secs().max(1)
            )));
        }
        // Dropping the old process (if any) kills it. Every attempt counts toward the backoff,
        // a refused one too (it is retried, slowly, until the policy changes).
        self.procs.borrow_mut().remove(name);
        drop(old);
        self.starts.borrow_mut().insert(name.to_owned(), (n + 1, now + backoff(n)));
        if crate::os::user_ids().1 == 0 {
            return Err(Error::Refused(format!(
                "remote {name:?}: a broker running as root does not start stdio remotes (it drops to its own account when started as root)"
            )));
        }
        if let Some(p) = cmd.read.iter().chain(&cmd.write).find(|p| self.private.iter().any(|d| overlaps(p, d))) {
            return Err(Error::Refused(format!(
                "remote {name:?}: sandbox path {p:?} would expose the broker's own files ({})",
                self.private.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut env = Vec::new();
        for (k, r) in &cmd.secret_env {
            env.push((k.clone(), ports.secrets.resolve(r).await?));
        }
        let max = policy.remotes.get(name).map_or(client::MAX_ANSWER, |r| r.max_response);
        let p = Rc::new(stdio::Proc::spawn(&self.ex, &self.exe, name, cmd, env, max)?);
        let label = ("remote", crate::broker::metrics::PolicyName::remote(policy, name));
        ports.metrics.inc_named("ephyr_remote_starts_total", label, &[]);
        self.procs.borrow_mut().insert(name.to_owned(), p.clone());
        Ok(p)
    }

    /// The OAuth access token for requests to `ep` (`None`: the remote does not sign in).
    async fn bearer(&self, ports: Ports<'_>, ep: Endpoint<'_>) -> Result<Option<crate::secret::SecretString>, Error> {
        self.auth.bearer(auth::Cx::of(&self.conns, ports, ep.policy, ep.name), ep.subject).await
    }

    fn id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// One request and its answer's `result` (a JSON-RPC error becomes a tool-level error naming
    /// the remote).
    async fn request(
        &self,
        ports: Ports<'_>,
        ep: Endpoint<'_>,
        link: &Link,
        method: &str,
        params: Value,
    ) -> Result<(Posted, Value), Error> {
        self.request_with(ports, ep, link, method, params, None).await
    }

    /// [`Federation::request`], relaying the remote's progress notifications for it to
    /// `progress` (the remote is given our request id as its progress token).
    async fn request_with(
        &self,
        ports: Ports<'_>,
        ep: Endpoint<'_>,
        link: &Link,
        method: &str,
        params: Value,
        progress: Option<&crate::broker::dispatch::Progress>,
    ) -> Result<(Posted, Value), Error> {
        let id = self.id();
        let mut params = params;
        let stateless = *link == Link::Stateless;
        if stateless {
            params["_meta"] = json!({
                "io.modelcontextprotocol/protocolVersion": client::STATELESS,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": { "name": "ephyr", "version": env!("CARGO_PKG_VERSION") },
            });
        }
        if progress.is_some() {
            params["_meta"]["progressToken"] = Value::from(id);
        }
        let relay = progress.map(|p| (p, id));
        let name = params["name"].as_str().map(str::to_owned).filter(|_| method == "tools/call");
        let session = match link {
            Link::Session(s) => s.as_deref(),
            _ => None,
        };
        let msg = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let posted = match &ep.remote.transport {
            Transport::Stdio(_) => {
                let proc = self.procs.borrow().get(ep.name).cloned();
                let proc = proc.ok_or_else(|| Error::upstream(format!("remote {:?} is not running", ep.name)))?;
                let (message, size) = proc.call(&msg, id, ep.remote.timeout, relay).await?;
                Posted { status: 200, session: None, message: Some(message), size, challenge: None }
            }
            Transport::Http(_) => {
                let cx = auth::Cx::of(&self.conns, ports, ep.policy, ep.name);
                let mut token = self.auth.bearer(cx, ep.subject).await?;
                let mut retried = false;
                let posted = loop {
                    let wire = Wire { session, stateless, method, name: name.as_deref(), bearer: token.as_ref() };
                    // If the caller goes away (a revoked task, a closed connection) or the remote
                    // does not answer in time, the remote is told to stop (`flush_cancels`).
                    // (Session era: with `notifications/cancelled`. Stateless era: closing the
                    // response stream is the cancellation, which dropping the request does.)
                    let mut pending = PendingCancel {
                        queue: &self.cancels,
                        cancel: (!stateless).then(|| Cancel { remote: ep.name.to_owned(), link: link.clone(), id }),
                    };
                    let posted = client::post_with(&self.conns, ports, ep, wire, &msg, Some(id), relay).await;
                    if !matches!(posted, Err(Error::Timeout(_))) {
                        pending.cancel = None;
                    }
                    drop(pending);
                    let posted = posted?;
                    // A remote that signs in with OAuth and refuses the token: refreshed and
                    // tried once more, else the operator is told (the agent only that it is).
                    let challenge = auth::parse_challenge(posted.challenge.as_deref().unwrap_or(""));
                    if cx.is_none() && posted.status == 401 {
                        // Kept for when the operator gives the remote an `oauth` entry.
                        self.auth.challenged(ep.name, challenge.clone());
                    }
                    let scope_short = posted.status == 403 && challenge.error.as_deref() == Some("insufficient_scope");
                    // A 403 that calls the token invalid (a suspended account) is a refusal too.
                    let invalid = posted.status == 401
                        || (posted.status == 403 && challenge.error.as_deref() == Some("invalid_token"));
                    if let (Some(cx), Some(sent)) = (cx, &token)
                        && (invalid || scope_short)
                    {
                        let status = if invalid { 401 } else { 403 };
                        if self.auth.refused(cx, ep.subject, status, challenge, sent).await? && !retried {
                            retried = true;
                            token = self.auth.bearer(Some(cx), ep.subject).await?;
                            continue;
                        }
                        return Err(Error::Unavailable(format!(
                            "remote {:?} refused the broker's sign-in; the operator has been told",
                            ep.name
                        )));
                    }
                    break posted;
                };
                // The spec says 404 for a session the server no longer knows; the reference
                // server says 400. Either way, with a session sent, a new one is opened once.
                if matches!(posted.status, 400 | 404) && session.is_some() {
                    return Err(Error::NotFound(format!("remote {:?}: the session expired", ep.name)));
                }
                if !(200..300).contains(&posted.status) {
                    return Err(Error::Upstream {
                        code: "remote_failed",
                        message: format!("remote {:?} answered HTTP {} to {method}", ep.name, posted.status),
                    });
                }
                posted
            }
        };
        let result = match &posted.message {
            Some(m) if m.get("result").is_some() => m["result"].clone(),
            Some(m) => {
                return Err(Error::Upstream {
                    code: "remote_error",
                    message: format!(
                        "remote {:?}: {} ({})",
                        ep.name,
                        m["error"]["message"].as_str().unwrap_or("error"),
                        m["error"]["code"]
                    ),
                });
            }
            None => return Err(Error::upstream(format!("remote {:?} sent no answer to {method}", ep.name))),
        };
        Ok((posted, result))
    }

    /// Opens the link: the stateless era if the remote's `server/discover` offers it, else a
    /// session (`initialize`, `notifications/initialized`).
    async fn open(&self, ports: Ports<'_>, ep: Endpoint<'_>) -> Result<(Link, Value), Error> {
        if let Transport::Stdio(cmd) = &ep.remote.transport {
            // One process, one session (2025-06-18): initialized once, after each start.
            let proc = self.process(ports, ep.policy, ep.name, cmd).await?;
            if !proc.initialized.get() {
                let (_, init) =
                    self.request(ports, ep, &Link::Session(None), "initialize", initialize_params()).await?;
                proc.notify(&json!({ "jsonrpc": "2.0", "method": "notifications/initialized" })).await?;
                *proc.capabilities.borrow_mut() = init["capabilities"].clone();
                proc.initialized.set(true);
            }
            proc.take_list_changed();
            let caps = proc.capabilities.borrow().clone();
            return Ok((Link::Session(None), caps));
        }
        if let Ok((_, found)) = self.request(ports, ep, &Link::Stateless, "server/discover", json!({})).await
            && found["supportedVersions"].as_array().is_some_and(|v| v.iter().any(|x| x == client::STATELESS))
        {
            return Ok((Link::Stateless, found["capabilities"].clone()));
        }
        let (posted, init) = self.request(ports, ep, &Link::Session(None), "initialize", initialize_params()).await?;
        let session = posted.session;
        let note = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        let token = self.bearer(ports, ep).await?;
        let wire = Wire {
            session: session.as_deref(),
            stateless: false,
            method: "notifications/initialized",
            name: None,
            bearer: token.as_ref(),
        };
        client::post(&self.conns, ports, ep, wire, &note, None).await?;
        Ok((Link::Session(session), init["capabilities"].clone()))
    }

    /// Every page of a list (`tools/list`, `resources/list`, `prompts/list`): the items under
    /// `key` that `keep` accepts (at most [`MAX_TOOLS`]), and the shortest `ttlMs` it gave.
    async fn list_all(
        &self,
        ports: Ports<'_>,
        ep: Endpoint<'_>,
        link: &Link,
        method: &str,
        key: &str,
        keep: impl Fn(&Value) -> bool,
    ) -> Result<(Vec<Value>, Option<u64>), Error> {
        let (mut items, mut ttl, mut cursor) = (Vec::new(), None::<u64>, None::<String>);
        for _ in 0..MAX_PAGES {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let (_, result) = self.request(ports, ep, link, method, params).await?;
            // The stateless era says how long the list may be kept (`ttlMs`).
            if let Some(t) = result["ttlMs"].as_u64() {
                ttl = Some(ttl.map_or(t, |x| x.min(t)));
            }
            for t in result[key].as_array().into_iter().flatten() {
                if keep(t) && items.len() < MAX_TOOLS {
                    items.push(t.clone());
                }
            }
            cursor = result["nextCursor"].as_str().map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        Ok((items, ttl))
    }

    /// Connects to remote `name` and reads its tools; the state records the outcome.
    pub async fn refresh(&self, ports: Ports<'_>, policy: &Policy, name: &str) {
        let Some(remote) = policy.remotes.get(name).filter(|r| r.enabled) else {
            self.remotes.borrow_mut().remove(name);
            return;
        };
        let ep = Endpoint { name, remote, policy, subject: None };
        self.announced.borrow_mut().remove(name);
        let discovered = async {
            let (link, caps) = self.open(ports, ep).await?;
            let named = |t: &Value| t["name"].as_str().is_some_and(tool_name_ok);
            let (tools, ttl) = self.list_all(ports, ep, &link, "tools/list", "tools", named).await?;
            // Resources and prompts only from a server that offers them; a failure to list them
            // leaves them out rather than the remote down.
            let (mut resources, mut templates) = (Vec::new(), Vec::new());
            if caps.get("resources").is_some_and(Value::is_object) {
                let plain = |r: &Value| r["uri"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 2048);
                match self.list_all(ports, ep, &link, "resources/list", "resources", plain).await {
                    Ok((r, _)) => resources = r,
                    Err(e) => log::warn!("remote {name:?}: listing its resources: {}", e.message()),
                }
                let template = |t: &Value| t["uriTemplate"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 2048);
                match self.list_all(ports, ep, &link, "resources/templates/list", "resourceTemplates", template).await {
                    Ok((t, _)) => templates = t,
                    Err(e) => log::info!("remote {name:?}: listing its resource templates: {}", e.message()),
                }
            }
            let mut prompts = Vec::new();
            if caps.get("prompts").is_some_and(Value::is_object) {
                match self.list_all(ports, ep, &link, "prompts/list", "prompts", named).await {
                    Ok((p, _)) => prompts = p,
                    Err(e) => log::warn!("remote {name:?}: listing its prompts: {}", e.message()),
                }
            }
            self.listen(ports, ep, &link, &caps).await;
            Ok::<_, Error>((link, tools, ttl, resources, templates, prompts))
        };
        let state = match discovered.await {
            Ok((link, tools, ttl, resources, templates, prompts)) => {
                let (tools, quarantined) = self.pinned(ports, name, remote.pin, tools).await;
                log::info!("remote {name:?}: connected, {} tool(s), {} quarantined", tools.len(), quarantined.len());
                RemoteState {
                    tools: Rc::new(tools),
                    link,
                    keep: ttl.map_or(REFRESH, |t| Duration::from_millis(t).clamp(MIN_KEEP, REFRESH)),
                    health: Health::Connected,
                    error: None,
                    digest: policy.digest.clone(),
                    tried: Some(Instant::now()),
                    quarantined,
                    failures: 0,
                    resources: Rc::new(resources),
                    templates: Rc::new(templates),
                    prompts: Rc::new(prompts),
                }
            }
            Err(e) => {
                log::warn!("remote {name:?}: {}", e.message());
                let failures = self.remotes.borrow().get(name).map_or(0, |s| s.failures).saturating_add(1);
                RemoteState {
                    failures,
                    health: Health::Down,
                    error: Some(e.message()),
                    digest: policy.digest.clone(),
                    tried: Some(Instant::now()),
                    ..Default::default()
                }
            }
        };
        let changed = self.remotes.borrow().get(name).is_none_or(|old| {
            old.tools != state.tools
                || old.resources != state.resources
                || old.templates != state.templates
                || old.prompts != state.prompts
        });
        if changed {
            self.served.set(self.served.get() + 1);
        }
        self.remotes.borrow_mut().insert(name.to_owned(), state);
        self.publish(ports, policy, name);
    }

    /// Keeps a notification stream open to an HTTP remote that announces list changes (its
    /// capabilities say `listChanged`): the session era's GET stream, or the stateless era's
    /// `subscriptions/listen`. A `*/list_changed` notification on it marks the remote for a
    /// re-read at the next tick. Best effort: a remote that offers no stream is re-read on its
    /// schedule; a stream that ends is opened again at the next read.
    async fn listen(&self, ports: Ports<'_>, ep: Endpoint<'_>, link: &Link, caps: &Value) {
        if !matches!(ep.remote.transport, Transport::Http(_))
            || !["tools", "resources", "prompts"].iter().any(|k| caps[*k]["listChanged"] == Value::Bool(true))
        {
            return;
        }
        if let Some((l, task)) = self.listeners.borrow().get(ep.name)
            && l == link
            && !task.is_finished()
        {
            return;
        }
        let Ok(token) = self.bearer(ports, ep).await else { return };
        let bearer = token.as_ref();
        let (wire, msg) = match link {
            Link::Session(session) => {
                (Wire { session: session.as_deref(), stateless: false, method: "GET", name: None, bearer }, None)
            }
            Link::Stateless => {
                let msg = json!({ "jsonrpc": "2.0", "id": self.id(), "method": "subscriptions/listen", "params": {
                    "notifications": { "toolsListChanged": true, "resourcesListChanged": true, "promptsListChanged": true },
                    "_meta": {
                        "io.modelcontextprotocol/protocolVersion": client::STATELESS,
                        "io.modelcontextprotocol/clientCapabilities": {},
                        "io.modelcontextprotocol/clientInfo": { "name": "ephyr", "version": env!("CARGO_PKG_VERSION") },
                    },
                }});
                (Wire { session: None, stateless: true, method: "subscriptions/listen", name: None, bearer }, Some(msg))
            }
            Link::NotOpen => return,
        };
        let body = match client::open_stream(&self.conns, ports, ep, wire, msg.as_ref()).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                log::debug!("remote {:?}: offers no notification stream; re-read on schedule", ep.name);
                return;
            }
            Err(e) => {
                log::info!("remote {:?}: its notification stream: {}", ep.name, e.message());
                return;
            }
        };
        let (name, announced) = (ep.name.to_owned(), self.announced.clone());
        let task = self.ex.spawn(async move {
            use http_body_util::BodyExt as _;
            let mut body = body;
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                buf.extend(data.iter().filter(|b| **b != b'\r'));
                // Complete events only; a stream that sends one without end is cut.
                if let Some(end) = buf.windows(2).rposition(|w| w == b"\n\n") {
                    let events: Vec<u8> = buf.drain(..end + 2).collect();
                    for m in client::events(&events) {
                        if m["method"].as_str().is_some_and(|x| x.ends_with("/list_changed")) {
                            log::info!("remote {name:?}: announced a list change");
                            announced.borrow_mut().insert(name.clone());
                        }
                    }
                }
                if buf.len() > client::MAX_ANSWER {
                    log::warn!("remote {name:?}: its notification stream sent an event over 4 MiB; closed");
                    return;
                }
            }
        });
        self.listeners.borrow_mut().insert(ep.name.to_owned(), (link.clone(), task));
    }

    /// Counts the changes to what the remotes serve (tools, resources, prompts): the broker
    /// announces a list change to agents' streams when it moves (`broker::maintenance`).
    pub fn served_generation(&self) -> u64 {
        self.served.get()
    }

    /// Sets remote `name`'s gauges from its state.
    fn publish(&self, ports: Ports<'_>, policy: &Policy, name: &str) {
        let remotes = self.remotes.borrow();
        let Some(st) = remotes.get(name) else { return };
        let label = ("remote", crate::broker::metrics::PolicyName::remote(policy, name));
        let now = st.state();
        for state in STATES {
            ports.metrics.set_named(
                "ephyr_remote_state",
                label,
                &[("state", state)],
                f64::from(u8::from(state == now)),
            );
        }
        ports.metrics.set_named("ephyr_remote_tools", label, &[], st.tools.len() as f64);
        ports.metrics.set_named("ephyr_remote_quarantined_tools", label, &[], st.quarantined.len() as f64);
    }

    /// Splits discovered tools into served and quarantined by their pins (pinning new ones),
    /// recording each pin and change in the audit trail.
    async fn pinned(
        &self,
        ports: Ports<'_>,
        remote: &str,
        mode: PinMode,
        tools: Vec<Value>,
    ) -> (Vec<Value>, BTreeMap<String, (Value, Value)>) {
        if mode == PinMode::Off {
            return (tools, BTreeMap::new());
        }
        let (mut served, mut quarantined) = (Vec::new(), BTreeMap::new());
        for def in tools {
            let tool = def["name"].as_str().unwrap_or_default().to_owned();
            let ev = |name: &'static str| {
                Event::new(Kind::Federation, name).action(json!({ "remote": remote, "remote_tool": tool }))
            };
            match self.pins.check(remote, &tool, &def) {
                pins::Seen::Same => served.push(def),
                pins::Seen::New => {
                    let pinned = match self.pins.pin(remote, &tool, &def, "first use") {
                        Ok(Some(d)) => d.wait().await,
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = pinned {
                        log::error!("remote {remote:?}: pinning {tool:?}: {}; not served", e.message());
                        continue;
                    }
                    ports.audit_now(ev("tool_pinned").outcome(json!({ "hash": pins::Pins::hash(&def).1 }))).await;
                    served.push(def);
                }
                pins::Seen::Changed(old) => {
                    let flags = pins::flags(&def);
                    // Re-reading a list that still carries the same changed definition is not a
                    // new event: the change is recorded (and logged) once per definition.
                    let known = self.remotes.borrow().get(remote).is_some_and(|s| {
                        s.quarantined.get(&tool).is_some_and(|(_, new)| *new == def)
                            || (mode == PinMode::Warn && s.tools.contains(&def))
                    });
                    if known && mode == PinMode::Warn {
                        served.push(def);
                    } else if known {
                        quarantined.insert(tool, (old, def));
                    } else if mode == PinMode::Warn {
                        log::warn!("remote {remote:?}: tool {tool:?} changed since it was pinned (pin: warn): served");
                        ports.audit_now(ev("tool_changed").outcome(json!({ "served": true, "flags": flags }))).await;
                        served.push(def);
                    } else {
                        log::warn!(
                            "remote {remote:?}: tool {tool:?} changed since it was pinned: quarantined until `ephyr remote review {remote}` and `approve`"
                        );
                        ports.audit_now(ev("tool_quarantined").outcome(json!({ "flags": flags }))).await;
                        quarantined.insert(tool, (old, def));
                    }
                }
            }
        }
        (served, quarantined)
    }

    /// The quarantined tools of `remote`: (tool, pinned definition, new definition).
    pub fn review(&self, remote: &str) -> Vec<(String, Value, Value)> {
        self.remotes
            .borrow()
            .get(remote)
            .map(|s| s.quarantined.iter().map(|(t, (old, new))| (t.clone(), old.clone(), new.clone())).collect())
            .unwrap_or_default()
    }

    /// Approves the quarantined `tool` of `remote` (all of them when `None`): its new definition
    /// is pinned (durably; `by` names the operator) and served. The approved tools' names.
    pub async fn approve(&self, remote: &str, tool: Option<&str>, by: &str) -> Result<Vec<String>, Error> {
        let chosen: Vec<(String, Value)> = self
            .review(remote)
            .into_iter()
            .filter(|(t, _, _)| tool.is_none_or(|x| x == t))
            .map(|(t, _, new)| (t, new))
            .collect();
        if chosen.is_empty() {
            return Err(Error::NotFound(match tool {
                Some(t) => format!("remote {remote:?} has no quarantined tool {t:?}"),
                None => format!("remote {remote:?} has no quarantined tools"),
            }));
        }
        let mut done = Vec::new();
        for (t, def) in chosen {
            if let Some(d) = self.pins.pin(remote, &t, &def, by)? {
                d.wait().await?;
            }
            self.served.set(self.served.get() + 1);
            if let Some(st) = self.remotes.borrow_mut().get_mut(remote) {
                st.quarantined.remove(&t);
                let mut tools = (*st.tools).clone();
                tools.push(def);
                st.tools = Rc::new(tools);
            }
            done.push(t);
        }
        Ok(done)
    }

    /// Reads again every enabled remote of `policy` that is due ([`Federation::stale`]), one
    /// refresh at a time per remote; forgets (and stops) remotes the policy no longer serves.
    pub async fn refresh_due(&self, ports: Ports<'_>, policy: &Policy) {
        self.flush_cancels(ports, policy).await;
        let served = |n: &String| policy.remotes.get(n).is_some_and(|r| r.enabled);
        self.remotes.borrow_mut().retain(|n, _| served(n));
        let gone: Vec<Rc<stdio::Proc>> = {
            let mut procs = self.procs.borrow_mut();
            let names: Vec<String> = procs
                .keys()
                .filter(|n| {
                    !policy.remotes.get(*n).is_some_and(|r| r.enabled && matches!(r.transport, Transport::Stdio(_)))
                })
                .cloned()
                .collect();
            names.iter().filter_map(|n| procs.remove(n)).collect()
        };
        drop(gone);
        self.listeners.borrow_mut().retain(|n, _| served(n));
        for (name, r) in &policy.remotes {
            if !r.enabled || !self.due(policy, name, r) || !self.refreshing.borrow_mut().insert(name.clone()) {
                continue;
            }
            let _guard = Refreshing { set: self.refreshing.clone(), name: name.clone() };
            self.refresh(ports, policy, name).await;
        }
    }

    /// Tells HTTP remotes to stop working on requests whose caller went away or timed out
    /// (`notifications/cancelled`, best effort: a failure is logged, not retried).
    async fn flush_cancels(&self, ports: Ports<'_>, policy: &Policy) {
        let queued = std::mem::take(&mut *self.cancels.borrow_mut());
        for c in queued {
            let Some((name, remote)) = policy.remotes.get_key_value(&c.remote) else { continue };
            let ep = Endpoint { name, remote, policy, subject: None };
            let session = match &c.link {
                Link::Session(s) => s.as_deref(),
                _ => None,
            };
            let stateless = c.link == Link::Stateless;
            let mut params = json!({ "requestId": c.id, "reason": "the caller went away or the call timed out" });
            if stateless {
                params["_meta"] = json!({ "io.modelcontextprotocol/protocolVersion": client::STATELESS });
            }
            let note = json!({ "jsonrpc": "2.0", "method": "notifications/cancelled", "params": params });
            let Ok(token) = self.bearer(ports, ep).await else { continue };
            let wire =
                Wire { session, stateless, method: "notifications/cancelled", name: None, bearer: token.as_ref() };
            if let Err(e) = client::post(&self.conns, ports, ep, wire, &note, None).await {
                log::info!("remote {name:?}: cancelling request {}: {}", c.id, e.message());
            }
        }
    }

    /// Before a call of `full`: if the HTTP remote that would serve it is down, it is tried
    /// again now rather than after its backoff (a call has to reach it anyway), so an agent's
    /// call finds a remote that came back, its tools re-read and checked against their pins.
    pub async fn revive_for_call(&self, ports: Ports<'_>, policy: &Policy, full: &str) {
        let Some((name, _, _)) =
            namespaced(policy, full).find(|(_, r, _)| r.enabled && matches!(r.transport, Transport::Http(_)))
        else {
            return;
        };
        let down = self.remotes.borrow().get(name).is_some_and(|s| matches!(s.health, Health::Down | Health::Degraded));
        if down && self.refreshing.borrow_mut().insert(name.clone()) {
            let _guard = Refreshing { set: self.refreshing.clone(), name: name.clone() };
            self.refresh(ports, policy, name).await;
        }
    }

    /// The remote and tool behind a namespaced name (`<prefix>.<tool>`), if a known remote
    /// offers it: the remote, the tool's own name, and its definition (the remote's shared list
    /// and the index in it: a call does not copy the definition).
    pub fn resolve<'p>(&self, policy: &'p Policy, full: &str) -> Option<(&'p str, String, Rc<Vec<Value>>, usize)> {
        let remotes = self.remotes.borrow();
        namespaced(policy, full).filter(|(_, r, _)| r.enabled).find_map(|(name, r, tool)| {
            if r.tools.as_ref().is_some_and(|allowed| !allowed.contains(tool)) {
                return None;
            }
            let state = remotes.get(name)?;
            let at = state.tools.iter().position(|t| t["name"] == tool)?;
            Some((name.as_str(), tool.to_owned(), state.tools.clone(), at))
        })
    }

    /// The remote `full` is namespaced under, if that remote is down (its tools are not served,
    /// so the name resolves to nothing): a call gets that reason rather than "unknown tool". The
    /// remote's own words are not passed on, only that it is down.
    fn down(&self, policy: &Policy, full: &str) -> Option<String> {
        let remotes = self.remotes.borrow();
        namespaced(policy, full)
            .filter(|(_, r, _)| r.enabled)
            .find_map(|(name, _, _)| (remotes.get(name)?.health == Health::Down).then(|| name.clone()))
    }

    /// The remote and tool behind `full` if that tool is quarantined.
    fn quarantined(&self, policy: &Policy, full: &str) -> Option<(String, String)> {
        let remotes = self.remotes.borrow();
        namespaced(policy, full).find_map(|(name, _, tool)| {
            remotes.get(name)?.quarantined.contains_key(tool).then(|| (name.clone(), tool.to_owned()))
        })
    }

    /// The remote tools `principal` could call, as `tools/list` entries (name namespaced).
    pub fn visible_descriptors(&self, policy: &Policy, principal: &Principal<'_>) -> Vec<String> {
        let remotes = self.remotes.borrow();
        let mut out = Vec::new();
        for (name, r) in policy.remotes.iter().filter(|(_, r)| r.enabled) {
            let Some(state) = remotes.get(name) else { continue };
            for t in state.tools.iter() {
                let Some(tool) = t["name"].as_str() else { continue };
                if r.tools.as_ref().is_some_and(|allowed| !allowed.contains(tool)) {
                    continue;
                }
                let full = format!("{}.{tool}", r.tool_prefix);
                let action = Action::reach(Some(&full), ActionKind::RemoteTool { remote: name, tool });
                if authorize(policy, principal, &action).is_allow() {
                    let mut d = t.clone();
                    d["name"] = Value::from(full);
                    out.push(d.to_string());
                }
            }
        }
        out
    }

    /// Entries of every enabled remote's list (`which`) that `keep` turns into what an agent
    /// sees (`None`: not for this caller).
    fn listed(
        &self,
        policy: &Policy,
        which: fn(&RemoteState) -> &Rc<Vec<Value>>,
        keep: impl Fn(&str, &Remote, &Value) -> Option<Value>,
    ) -> Vec<Value> {
        let remotes = self.remotes.borrow();
        let enabled = policy.remotes.iter().filter(|(_, r)| r.enabled);
        enabled
            .filter_map(|(name, r)| remotes.get(name).map(|st| (name, r, st)))
            .flat_map(|(name, r, st)| which(st).iter().filter_map(|item| keep(name, r, item)).collect::<Vec<_>>())
            .collect()
    }

    /// The remote resources `principal` could read, as `resources/list` entries: the URI
    /// becomes `ephyr-remote://<remote>/<its URI>` (what `resources/read` takes back).
    pub fn visible_resources(&self, policy: &Policy, principal: &Principal<'_>) -> Vec<Value> {
        self.listed(
            policy,
            |st| &st.resources,
            |name, _, r| {
                let uri = r["uri"].as_str()?;
                let action = Action::reach(None, ActionKind::RemoteResource { remote: name, uri });
                authorize(policy, principal, &action).is_allow().then(|| {
                    let mut d = r.clone();
                    d["uri"] = Value::from(format!("{REMOTE_URI}{name}/{uri}"));
                    d
                })
            },
        )
    }

    /// The remote resource templates `principal` could fill in and read: listed when the grant
    /// covers the template's fixed start (the text before its first `{`), with the template
    /// namespaced like a resource URI. A URI made from one is authorized when read, as any.
    pub fn visible_templates(&self, policy: &Policy, principal: &Principal<'_>) -> Vec<Value> {
        self.listed(
            policy,
            |st| &st.templates,
            |name, _, t| {
                let template = t["uriTemplate"].as_str()?;
                let probe = format!("{}x", template.split('{').next().unwrap_or(template));
                let action = Action::reach(None, ActionKind::RemoteResource { remote: name, uri: &probe });
                authorize(policy, principal, &action).is_allow().then(|| {
                    let mut d = t.clone();
                    d["uriTemplate"] = Value::from(format!("{REMOTE_URI}{name}/{template}"));
                    d
                })
            },
        )
    }

    /// The remote prompts `principal` could get, as `prompts/list` entries (name namespaced).
    pub fn visible_prompts(&self, policy: &Policy, principal: &Principal<'_>) -> Vec<Value> {
        self.listed(
            policy,
            |st| &st.prompts,
            |name, r, p| {
                let prompt = p["name"].as_str()?;
                let full = format!("{}.{prompt}", r.tool_prefix);
                let action = Action::reach(Some(&full), ActionKind::RemotePrompt { remote: name, prompt });
                authorize(policy, principal, &action).is_allow().then(|| {
                    let mut d = p.clone();
                    d["name"] = Value::from(full.clone());
                    d
                })
            },
        )
    }

    /// Authorizes and forwards `resources/read` of a namespaced URI (`None`: not a remote's);
    /// the remote's `contents`, their URIs namespaced again.
    pub async fn read_resource(
        &self,
        ports: Ports<'_>,
        policy: &Policy,
        principal: &Principal<'_>,
        full: &str,
    ) -> Option<Result<(Facts, Value), Error>> {
        let rest = full.strip_prefix(REMOTE_URI)?;
        let (remote, uri) = rest.split_once('/')?;
        let (remote, r) = policy.remotes.get_key_value(remote)?;
        let action = Action::reach(None, ActionKind::RemoteResource { remote, uri });
        if let Decision::Deny(d) = authorize(policy, principal, &action) {
            return Some(Err(Error::Denied(d)));
        }
        let facts = Facts { remote: remote.clone(), what: uri.to_owned() };
        let ep = Endpoint { name: remote, remote: r, policy, subject: per_agent(r, principal.agent) };
        let result = async {
            let link = self.link_for(ports, ep).await?;
            let (_, result) = self.request(ports, ep, &link, "resources/read", json!({ "uri": uri })).await?;
            let mut contents = Vec::new();
            for c in result["contents"].as_array().into_iter().flatten() {
                let mut c = c.clone();
                if let Some(u) = c["uri"].as_str() {
                    c["uri"] = Value::from(format!("{REMOTE_URI}{remote}/{u}"));
                }
                contents.push(c);
            }
            self.scrubbed(ports, ep, json!({ "contents": contents })).await
        };
        Some(result.await.map(|v| (facts, v)))
    }

    /// Authorizes and forwards `prompts/get` of a namespaced prompt (`None`: no remote offers
    /// it); the remote's `description` and `messages`.
    pub async fn get_prompt(
        &self,
        ports: Ports<'_>,
        policy: &Policy,
        principal: &Principal<'_>,
        full: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<(Facts, Value), Error>> {
        let (remote, r, prompt) = {
            let remotes = self.remotes.borrow();
            namespaced(policy, full).filter(|(_, r, _)| r.enabled).find_map(|(name, r, prompt)| {
                remotes.get(name)?.prompts.iter().any(|p| p["name"] == prompt).then(|| (name, r, prompt.to_owned()))
            })?
        };
        let action = Action {
            tool: Some(full),
            kind: ActionKind::RemotePrompt { remote, prompt: &prompt },
            arguments: Arguments::Call { values: args, declared: &[] },
        };
        if let Decision::Deny(d) = authorize(policy, principal, &action) {
            return Some(Err(Error::Denied(d)));
        }
        let facts = Facts { remote: remote.clone(), what: prompt.clone() };
        let ep = Endpoint { name: remote, remote: r, policy, subject: per_agent(r, principal.agent) };
        let result = async {
            let link = self.link_for(ports, ep).await?;
            let params = json!({ "name": prompt, "arguments": args });
            let (_, result) = self.request(ports, ep, &link, "prompts/get", params).await?;
            let mut keep = Map::new();
            for k in ["description", "messages"] {
                if let Some(x) = result.get(k) {
                    keep.insert(k.to_owned(), x.clone());
                }
            }
            self.scrubbed(ports, ep, Value::Object(keep)).await
        };
        Some(result.await.map(|v| (facts, v)))
    }

    /// Authorizes one call of a namespaced remote tool: `None` when no known remote offers
    /// `full`; `Err` with the denial's reason.
    pub fn prepare(
        &self,
        policy: &Policy,
        principal: &Principal<'_>,
        full: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<CallFacts, Error>> {
        if let Some((remote, tool)) = self.quarantined(policy, full) {
            return Some(Err(quarantined_error(&remote, &tool)));
        }
        let Some((remote, tool, tools, at)) = self.resolve(policy, full) else {
            return self.down(policy, full).map(|remote| {
                Err(Error::Unavailable(format!(
                    "remote {remote:?} is down: its tools come back when it answers again (`ephyr status` says why)"
                )))
            });
        };
        let def = &tools[at];
        let declared: Vec<&str> = def["inputSchema"]["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let action = Action {
            tool: Some(full),
            kind: ActionKind::RemoteTool { remote, tool: &tool },
            arguments: Arguments::Call { values: args, declared: &declared },
        };
        if let Decision::Deny(d) = authorize(policy, principal, &action) {
            return Some(Err(Error::Denied(d)));
        }
        // The read-only hint is trusted only from a strictly pinned definition: one first seen or
        // approved by an operator, that cannot change without review (`warn` serves changes).
        let pinned = policy.remotes.get(remote).is_some_and(|r| r.pin == PinMode::Strict);
        let read_only = pinned && def["annotations"]["readOnlyHint"] == Value::Bool(true);
        Some(Ok(CallFacts {
            remote: remote.to_owned(),
            tool,
            args_digest: digest(args),
            read_only,
            agent: principal.agent.to_owned(),
        }))
    }

    /// Forwards an authorized call; the remote's `CallToolResult` and the size of its answer in
    /// bytes. A remote that forgot its session (it restarted) is re-initialized once.
    pub async fn forward(
        &self,
        ports: Ports<'_>,
        policy: &Policy,
        facts: &CallFacts,
        args: Map<String, Value>,
        progress: Option<&crate::broker::dispatch::Progress>,
    ) -> Result<(Value, usize), Error> {
        let remote = facts.remote.as_str();
        let r = policy.remotes.get(remote).ok_or_else(|| Error::NotFound(format!("no remote {remote:?}")))?;
        let ep = Endpoint { name: remote, remote: r, policy, subject: per_agent(r, &facts.agent) };
        let params = json!({ "name": facts.tool, "arguments": args });
        let link = self.link_for(ports, ep).await?;
        let first = self.request_with(ports, ep, &link, "tools/call", params.clone(), progress).await;
        let result = match first {
            Err(Error::NotFound(_)) if ep.subject.is_some() => {
                // The agent's own session expired: a new one, then the call once more.
                self.agent_links.borrow_mut().remove(&(remote.to_owned(), facts.agent.clone()));
                let fresh = self.link_for(ports, ep).await?;
                self.request_with(ports, ep, &fresh, "tools/call", params, progress).await
            }
            Err(Error::NotFound(_)) => {
                // The remote restarted: it may serve other tools now. Read them again (pins
                // apply), then call with the new session, unless this tool was quarantined.
                self.refresh(ports, policy, remote).await;
                let (quarantined, fresh) = {
                    let remotes = self.remotes.borrow();
                    let st = remotes.get(remote);
                    (
                        st.is_some_and(|s| s.quarantined.contains_key(&facts.tool)),
                        st.map(|s| s.link.clone()).unwrap_or_default(),
                    )
                };
                if quarantined {
                    return Err(quarantined_error(remote, &facts.tool));
                }
                self.request_with(ports, ep, &fresh, "tools/call", params, progress).await
            }
            other => other,
        };
        let mut moved = false;
        if let Some(st) = self.remotes.borrow_mut().get_mut(remote) {
            let was = st.state();
            match &result {
                Ok(_) => (st.health, st.error) = (Health::Connected, None),
                // The remote answered (with a JSON-RPC error): it is up.
                Err(Error::Upstream { code: "remote_error", .. }) => {}
                // Its tools are still known and served; it is retried (`due`).
                Err(e) => (st.health, st.error) = (Health::Degraded, Some(e.message())),
            }
            moved = st.state() != was;
        }
        // The gauges change only with the state (not on every call).
        if moved {
            self.publish(ports, policy, remote);
        }
        let (posted, value) = result?;
        let size = posted.size;
        let value = self.scrubbed(ports, ep, value).await?;
        Ok((value, size))
    }

    /// `value` with every form of the secrets the broker injected into the remote (an HTTP
    /// remote's credential or OAuth access token, a stdio remote's secret_env) overwritten: they
    /// never reach the agent, even if the remote echoes them (as in the proxy).
    async fn scrubbed(&self, ports: Ports<'_>, ep: Endpoint<'_>, value: Value) -> Result<Value, Error> {
        let r = ep.remote;
        let mut forms = Vec::new();
        if let Ok(Some(t)) = self.bearer(ports, ep).await {
            let t = crate::secret::SecretBytes::new(t.expose().as_bytes().to_vec());
            forms.extend(crate::broker::upstream::plan::secret_forms(
                &crate::broker::policy::CredentialKind::Bearer,
                &t,
            ));
        }
        if let Some(c) = &r.credential {
            let secret = ports.secrets.resolve(&c.secret).await?;
            forms.extend(crate::broker::upstream::plan::secret_forms(&c.kind, &secret));
        }
        if let Transport::Stdio(cmd) = &r.transport {
            for s in cmd.secret_env.values() {
                let secret = ports.secrets.resolve(s).await?;
                forms.extend(crate::broker::upstream::plan::secret_forms(
                    &crate::broker::policy::CredentialKind::Bearer,
                    &secret,
                ));
            }
        }
        if forms.is_empty() {
            return Ok(value);
        }
        let text = serde_json::to_vec(&value).map_err(|e| Error::upstream(e.to_string()))?;
        let mut scrub = crate::broker::upstream::scrub::Scrubber::new(forms);
        let mut out = scrub.push(&text);
        out.extend(scrub.finish());
        serde_json::from_slice(&out).map_err(|e| Error::upstream(format!("a remote's answer after scrubbing: {e}")))
    }

    /// Each remote's state for `ephyr status`: state, tools served, tools quarantined, error.
    pub fn status(&self) -> BTreeMap<String, (&'static str, usize, usize, Option<String>)> {
        self.remotes
            .borrow()
            .iter()
            .map(|(n, s)| (n.clone(), (s.state(), s.tools.len(), s.quarantined.len(), s.error.clone())))
            .collect()
    }

    /// The served tool definitions of `remote` (as it described them).
    pub fn tool_definitions(&self, remote: &str) -> Vec<Value> {
        self.remotes.borrow().get(remote).map(|s| (*s.tools).clone()).unwrap_or_default()
    }

    /// The process id of each running stdio remote.
    pub fn pids(&self) -> BTreeMap<String, u32> {
        self.procs.borrow().iter().filter(|(_, p)| p.dead().is_none()).map(|(n, p)| (n.clone(), p.pid())).collect()
    }

    /// The protocol era each remote is spoken to in.
    pub fn eras(&self) -> BTreeMap<String, &'static str> {
        self.remotes.borrow().iter().map(|(n, s)| (n.clone(), s.link.era())).collect()
    }

    /// Whether remote `name` should be read again: never tried under this policy (start,
    /// reload); down for longer than [`RETRY`] (HTTP) or past its restart backoff (stdio);
    /// connected for longer than its list may be kept; its tools changed (stdio, said by the
    /// server); its process exited.
    fn due(&self, policy: &Policy, name: &str, r: &Remote) -> bool {
        let remotes = self.remotes.borrow();
        let Some(s) = remotes.get(name) else { return true };
        let since = s.tried.map_or(Duration::MAX, |t| t.elapsed());
        if s.digest != policy.digest || (s.health == Health::Connected && since >= s.keep) {
            return true;
        }
        match &r.transport {
            Transport::Http(_) => {
                (s.health == Health::Connected && self.announced.borrow().contains(name))
                    || matches!(s.health, Health::Down | Health::Degraded)
                        && since >= backoff(s.failures.saturating_sub(1)).min(RETRY)
            }
            Transport::Stdio(_) => {
                let proc = self.procs.borrow().get(name).cloned();
                match s.health {
                    Health::Down | Health::Degraded => {
                        self.starts.borrow().get(name).is_none_or(|(_, next)| Instant::now() >= *next)
                    }
                    _ => proc.is_none_or(|p| p.dead().is_some() || p.list_changed()),
                }
            }
        }
    }
}

fn initialize_params() -> Value {
    json!({
        "protocolVersion": client::PROTOCOL,
        "capabilities": {},
        "clientInfo": { "name": "ephyr", "version": env!("CARGO_PKG_VERSION") },
    })
}

/// Whether sandbox path `p` and directory `d` overlap: one contains the other.
fn overlaps(p: &str, d: &std::path::Path) -> bool {
    let (p, d) = (std::path::Path::new(p), d);
    p.starts_with(d) || d.starts_with(p)
}

/// The remotes whose namespace `full` (`<prefix>.<tool>`) is in, each with the tool's own name.
fn namespaced<'p, 'f>(policy: &'p Policy, full: &'f str) -> impl Iterator<Item = (&'p String, &'p Remote, &'f str)> {
    policy
        .remotes
        .iter()
        .filter_map(move |(name, r)| Some((name, r, full.strip_prefix(r.tool_prefix.as_str())?.strip_prefix('.')?)))
}

fn quarantined_error(remote: &str, tool: &str) -> Error {
    Error::Refused(format!(
        "remote {remote:?} changed tool {tool:?} since it was approved: it is quarantined until an operator runs `ephyr remote review {remote}` and `ephyr remote approve {remote} {tool}`"
    ))
}

/// The prefix of a remote resource's URI as agents see it: `ephyr-remote://<remote>/<its URI>`.
pub const REMOTE_URI: &str = "ephyr-remote://";

/// What the audit line of a resource read or prompt names: the remote, and the URI or prompt.
#[derive(Clone, Debug)]
pub struct Facts {
    /// Remote.
    pub remote: String,
    /// The resource's URI or the prompt's name on the remote.
    pub what: String,
}

/// What the audit line of a federated call names.
#[derive(Clone, Debug)]
pub struct CallFacts {
    /// Remote.
    pub remote: String,
    /// Its tool.
    pub tool: String,
    /// SHA-256 of the arguments as sent (hex): the line names the call without its values.
    pub args_digest: String,
    /// Its pinned definition says `readOnlyHint: true`: its audit line is written without
    /// holding the call for the sync (`AuditSink::note`), as the proxy's GET requests.
    pub read_only: bool,
    /// The calling agent (a remote with a sign-in per agent gets its token).
    pub agent: String,
}

/// The agent whose own sign-in a request to `r` uses, if `r` has one per agent.
fn per_agent<'a>(r: &Remote, agent: &'a str) -> Option<&'a str> {
    r.oauth.as_ref().filter(|o| o.per_agent).map(|_| agent)
}

fn digest(args: &Map<String, Value>) -> String {
    let bytes = serde_json::to_vec(args).unwrap_or_default();
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())
}

/// A remote tool's name as ephyr accepts it: what MCP allows (1-128 of `[A-Za-z0-9_.-]`).
fn tool_name_ok(n: &str) -> bool {
    !n.is_empty() && n.len() <= 128 && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}
