//! Federation: MCP servers behind the broker (`remotes:` in the policy). Agents keep their one
//! connection to ephyr; a remote's tools appear as `<tool_prefix>.<tool>` to the callers whose
//! policy and token allow them, and each call is authorized (tool and arguments, `authorize`'s
//! `RemoteTool`), audited before it leaves, and forwarded.
//!
//! What runs here: the executor thread. At start and on every policy reload each enabled remote
//! is connected (`initialize`, then `tools/list` with pagination) and its tools kept in memory;
//! a call on a remote whose session has expired re-initializes once and re-reads its tools.
//! Tools are pinned (`pins`): one whose definition changed is quarantined until approved. This
//! slice speaks Streamable HTTP in the session era (`client`); stdio remotes, resources and
//! prompts of remotes are not built yet (docs/federation.md).

pub(crate) mod client;
pub mod pins;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::broker::Error;
use crate::broker::audit::{Event, Kind};
use crate::broker::policy::{Action, ActionKind, Arguments, Decision, PinMode, Policy, Principal, authorize};
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
/// A remote that is down is tried again after this long (at the next listing or call).
pub const RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// A connected remote's tools are read again after this long (a changed tool is caught then),
/// or sooner when a stateless-era remote says so (`ttlMs`), but not more often than `MIN_KEEP`.
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(300);
/// The shortest a tool list is kept.
pub const MIN_KEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// How a remote is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Health {
    /// Not tried yet.
    #[default]
    Unknown,
    /// Its tools are known and it answers.
    Connected,
    /// The last attempt failed.
    Down,
}

impl Health {
    /// For status and `list_remotes`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Connected => "connected",
            Health::Down => "down",
        }
    }
}

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
}

/// The remotes of one broker.
pub struct Federation {
    conns: Rc<Conns>,
    pins: pins::Pins,
    remotes: RefCell<BTreeMap<String, RemoteState>>,
    next_id: std::cell::Cell<u64>,
}

impl Federation {
    /// Connections are driven on `ex`; tool pins are `pins`.
    pub fn new(ex: Rc<smol::LocalExecutor<'static>>, pins: pins::Pins) -> Self {
        Federation {
            conns: Rc::new(Conns::new(ex)),
            pins,
            remotes: RefCell::default(),
            next_id: std::cell::Cell::new(1),
        }
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
        let name = params["name"].as_str().map(str::to_owned).filter(|_| method == "tools/call");
        let session = match link {
            Link::Session(s) => s.as_deref(),
            _ => None,
        };
        let wire = Wire { session, stateless, method, name: name.as_deref() };
        let msg = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let posted = client::post(&self.conns, ports, ep, wire, &msg, Some(id)).await?;
        // The spec says 404 for a session the server no longer knows; the reference server
        // says 400. Either way, with a session sent, a new one is opened once.
        if matches!(posted.status, 400 | 404) && session.is_some() {
            return Err(Error::NotFound(format!("remote {:?}: the session expired", ep.name)));
        }
        if !(200..300).contains(&posted.status) {
            return Err(Error::Upstream {
                code: "remote_failed",
                message: format!("remote {:?} answered HTTP {} to {method}", ep.name, posted.status),
            });
        }
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
    async fn open(&self, ports: Ports<'_>, ep: Endpoint<'_>) -> Result<Link, Error> {
        if let Ok((_, found)) = self.request(ports, ep, &Link::Stateless, "server/discover", json!({})).await
            && found["supportedVersions"].as_array().is_some_and(|v| v.iter().any(|x| x == client::STATELESS))
        {
            return Ok(Link::Stateless);
        }
        let params = json!({
            "protocolVersion": client::PROTOCOL,
            "capabilities": {},
            "clientInfo": { "name": "ephyr", "version": env!("CARGO_PKG_VERSION") },
        });
        let (posted, _) = self.request(ports, ep, &Link::Session(None), "initialize", params).await?;
        let session = posted.session;
        let note = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        let wire =
            Wire { session: session.as_deref(), stateless: false, method: "notifications/initialized", name: None };
        client::post(&self.conns, ports, ep, wire, &note, None).await?;
        Ok(Link::Session(session))
    }

    /// Connects to remote `name` and reads its tools; the state records the outcome.
    pub async fn refresh(&self, ports: Ports<'_>, policy: &Policy, name: &str) {
        let Some(remote) = policy.remotes.get(name).filter(|r| r.enabled) else {
            self.remotes.borrow_mut().remove(name);
            return;
        };
        let ep = Endpoint { name, remote, policy };
        let discovered = async {
            let link = self.open(ports, ep).await?;
            let mut tools = Vec::new();
            let mut ttl: Option<u64> = None;
            let mut cursor: Option<String> = None;
            for _ in 0..MAX_PAGES {
                let params = match &cursor {
                    Some(c) => json!({ "cursor": c }),
                    None => json!({}),
                };
                let (_, result) = self.request(ports, ep, &link, "tools/list", params).await?;
                // The stateless era says how long the list may be kept (`ttlMs`).
                if let Some(t) = result["ttlMs"].as_u64() {
                    ttl = Some(ttl.map_or(t, |x: u64| x.min(t)));
                }
                for t in result["tools"].as_array().into_iter().flatten() {
                    if t["name"].as_str().is_some_and(tool_name_ok) && tools.len() < MAX_TOOLS {
                        tools.push(t.clone());
                    }
                }
                cursor = result["nextCursor"].as_str().map(str::to_owned);
                if cursor.is_none() {
                    break;
                }
            }
            Ok::<_, Error>((link, tools, ttl))
        };
        let state = match discovered.await {
            Ok((link, tools, ttl)) => {
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
                }
            }
            Err(e) => {
                log::warn!("remote {name:?}: {}", e.message());
                RemoteState {
                    health: Health::Down,
                    error: Some(e.message()),
                    digest: policy.digest.clone(),
                    tried: Some(Instant::now()),
                    ..Default::default()
                }
            }
        };
        self.remotes.borrow_mut().insert(name.to_owned(), state);
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
                    if mode == PinMode::Warn {
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

    /// Every enabled remote of `policy` (and forgets the others).
    pub async fn refresh_all(&self, ports: Ports<'_>, policy: &Policy) {
        self.remotes.borrow_mut().retain(|n, _| policy.remotes.contains_key(n));
        for name in policy.remotes.keys() {
            self.refresh(ports, policy, name).await;
        }
    }

    /// The remote and tool behind a namespaced name (`<prefix>.<tool>`), if a known remote
    /// offers it.
    pub fn resolve<'p>(&self, policy: &'p Policy, full: &str) -> Option<(&'p str, String, Value)> {
        let remotes = self.remotes.borrow();
        policy.remotes.iter().filter(|(_, r)| r.enabled).find_map(|(name, r)| {
            let tool = full.strip_prefix(r.tool_prefix.as_str())?.strip_prefix('.')?;
            if r.tools.as_ref().is_some_and(|allowed| !allowed.contains(tool)) {
                return None;
            }
            let state = remotes.get(name)?;
            let def = state.tools.iter().find(|t| t["name"] == tool)?.clone();
            Some((name.as_str(), tool.to_owned(), def))
        })
    }

    /// The remote and tool behind `full` if that tool is quarantined.
    fn quarantined(&self, policy: &Policy, full: &str) -> Option<(String, String)> {
        let remotes = self.remotes.borrow();
        policy.remotes.iter().find_map(|(name, r)| {
            let tool = full.strip_prefix(r.tool_prefix.as_str())?.strip_prefix('.')?;
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
        let (remote, tool, def) = self.resolve(policy, full)?;
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
        Some(Ok(CallFacts { remote: remote.to_owned(), tool, args_digest: digest(args) }))
    }

    /// Forwards an authorized call; the remote's `CallToolResult`. A remote that forgot its
    /// session (it restarted) is re-initialized once.
    pub async fn forward(
        &self,
        ports: Ports<'_>,
        policy: &Policy,
        facts: &CallFacts,
        args: Map<String, Value>,
    ) -> Result<Value, Error> {
        let remote = facts.remote.as_str();
        let r = policy.remotes.get(remote).ok_or_else(|| Error::NotFound(format!("no remote {remote:?}")))?;
        let ep = Endpoint { name: remote, remote: r, policy };
        let params = json!({ "name": facts.tool, "arguments": args });
        let link = self.remotes.borrow().get(remote).map(|s| s.link.clone()).unwrap_or_default();
        let first = self.request(ports, ep, &link, "tools/call", params.clone()).await;
        let result = match first {
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
                self.request(ports, ep, &fresh, "tools/call", params).await
            }
            other => other,
        };
        if let Some(st) = self.remotes.borrow_mut().get_mut(remote) {
            st.health = if result.is_ok() { Health::Connected } else { Health::Down };
            st.error = result.as_ref().err().map(Error::message);
        }
        let (_, value) = result?;
        // The credential the broker injected never reaches the agent, even if the remote echoes
        // it: every form of it is overwritten, as in the proxy.
        match &r.credential {
            None => Ok(value),
            Some(c) => {
                let secret = ports.secrets.resolve(&c.secret).await?;
                let forms = crate::broker::upstream::plan::secret_forms(&c.kind, &secret);
                let text = serde_json::to_vec(&value).map_err(|e| Error::upstream(e.to_string()))?;
                let mut scrub = crate::broker::upstream::scrub::Scrubber::new(forms);
                let mut out = scrub.push(&text);
                out.extend(scrub.finish());
                serde_json::from_slice(&out).map_err(|e| Error::upstream(format!("remote {remote:?}: {e}")))
            }
        }
    }

    /// Each remote's state for `ephyr status`: health, tools served, tools quarantined, error.
    pub fn status(&self) -> BTreeMap<String, (Health, usize, usize, Option<String>)> {
        self.remotes
            .borrow()
            .iter()
            .map(|(n, s)| (n.clone(), (s.health, s.tools.len(), s.quarantined.len(), s.error.clone())))
            .collect()
    }

    /// The served tool definitions of `remote` (as it described them).
    pub fn tool_definitions(&self, remote: &str) -> Vec<Value> {
        self.remotes.borrow().get(remote).map(|s| (*s.tools).clone()).unwrap_or_default()
    }

    /// The protocol era each remote is spoken to in.
    pub fn eras(&self) -> BTreeMap<String, &'static str> {
        self.remotes.borrow().iter().map(|(n, s)| (n.clone(), s.link.era())).collect()
    }

    /// Whether some remote of `policy` should be (re)discovered: never tried under this policy
    /// (start, reload), or down for longer than [`RETRY`].
    pub fn stale(&self, policy: &Policy) -> bool {
        let remotes = self.remotes.borrow();
        policy.remotes.iter().any(|(n, r)| {
            r.enabled
                && remotes.get(n).is_none_or(|s| {
                    let since = s.tried.map_or(Duration::MAX, |t| t.elapsed());
                    s.digest != policy.digest
                        || (s.health == Health::Down && since >= RETRY)
                        || (s.health == Health::Connected && since >= s.keep)
                })
        })
    }
}

fn quarantined_error(remote: &str, tool: &str) -> Error {
    Error::Refused(format!(
        "remote {remote:?} changed tool {tool:?} since it was approved: it is quarantined until an operator runs `ephyr remote review {remote}` and `ephyr remote approve {remote} {tool}`"
    ))
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
}

fn digest(args: &Map<String, Value>) -> String {
    let bytes = serde_json::to_vec(args).unwrap_or_default();
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())
}

/// A remote tool's name as ephyr accepts it: what MCP allows (1-128 of `[A-Za-z0-9_.-]`).
fn tool_name_ok(n: &str) -> bool {
    !n.is_empty() && n.len() <= 128 && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}
