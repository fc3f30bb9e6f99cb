//! One audit event and its line format.
//!
//! A line is one JSON object followed by `\n`, with keys in a fixed order:
//!
//! ```text
//! {"v":1,"seq":N,"id":ULID,"ts":MICROS,"kind":..,"event":..,"agent":..,"initiated_by":..,
//!  "task":..,"root":..,"lineage":[..],"action":{..},"decision":"allow|deny","code":..,
//!  "reason":..,"outcome":{..},"prev":"<hex SHA-256 of the previous line's bytes>"}
//! ```
//!
//! Absent fields are omitted. `prev` chains each line to the one before it (across files); the
//! first line ever has 64 zeros. The hash of a line is SHA-256 of its exact bytes without the
//! newline, so any tool can recompute the chain (docs/audit.md).

use serde::Serialize;
use serde_json::Value;

/// What area an event belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Broker lifecycle (start, stop).
    Broker,
    /// Signer lifecycle, sandbox state.
    Signer,
    /// Policy loads and reloads.
    Policy,
    /// Authentication.
    Auth,
    /// An `authorize` decision.
    Decision,
    /// Task lifecycle.
    Task,
    /// Certificates.
    Cert,
    /// SSH commands and sessions.
    Ssh,
    /// Proxied HTTP requests.
    Http,
    /// Federated MCP calls.
    Federation,
    /// A signed checkpoint of the chain.
    Checkpoint,
    /// Operators: console sign-in and sign-out, freezes.
    Operator,
    /// Human approval: requests, decisions, expiries, uses.
    Approval,
    /// Agent lifecycle: enrollments, joins, transitions, reaper runs.
    Agent,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
}

/// An event, as the rest of the broker reports it. Build with [`Event::new`] and the setters.
/// Never put a secret in any field: callers pass names, ids, codes and sizes, not values.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Area.
    pub kind: Kind,
    /// Event name (`policy_reload`, `authorize`, `cert_issued`, ...).
    pub name: &'static str,
    /// Agent.
    pub agent: Option<String>,
    /// Who started the task tree.
    pub initiated_by: Option<String>,
    /// The task acted as.
    pub task: Option<String>,
    /// The root task of its tree.
    pub root: Option<String>,
    /// Tasks from the root to `task`.
    pub lineage: Vec<String>,
    /// What was attempted.
    pub action: Option<Value>,
    /// The decision, if this is one.
    pub decision: Option<Verdict>,
    /// Deny or error code.
    pub code: Option<String>,
    /// Human reason.
    pub reason: Option<String>,
    /// What happened (exit code, status, byte counts, durations, serials, digests...).
    pub outcome: Option<Value>,
}

impl Event {
    /// A new event of `kind` named `name`.
    pub fn new(kind: Kind, name: &'static str) -> Event {
        Event {
            kind,
            name,
            agent: None,
            initiated_by: None,
            task: None,
            root: None,
            lineage: Vec::new(),
            action: None,
            decision: None,
            code: None,
            reason: None,
            outcome: None,
        }
    }

    /// Sets the agent.
    pub fn agent(mut self, a: impl Into<String>) -> Self {
        self.agent = Some(a.into());
        self
    }

    /// Sets the action description.
    pub fn action(mut self, a: Value) -> Self {
        self.action = Some(a);
        self
    }

    /// Sets the outcome.
    pub fn outcome(mut self, o: Value) -> Self {
        self.outcome = Some(o);
        self
    }

    /// Marks an allow.
    pub fn allow(mut self) -> Self {
        self.decision = Some(Verdict::Allow);
        self
    }

    /// Marks a deny with its code and reason.
    pub fn deny(mut self, code: impl Into<String>, reason: impl Into<String>) -> Self {
        self.decision = Some(Verdict::Deny);
        self.code = Some(code.into());
        self.reason = Some(reason.into());
        self
    }

    /// Sets an error code and reason without a decision (a failed effect).
    pub fn error(mut self, code: impl Into<String>, reason: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self.reason = Some(reason.into());
        self
    }

    /// Sets task, root and lineage.
    pub fn task(mut self, task: impl Into<String>, lineage: Vec<String>) -> Self {
        self.task = Some(task.into());
        self.root = lineage.first().cloned();
        self.lineage = lineage;
        self
    }

    /// Sets who started the task tree.
    pub fn initiated_by(mut self, who: impl Into<String>) -> Self {
        self.initiated_by = Some(who.into());
        self
    }
}

#[derive(Serialize)]
struct Line<'a> {
    v: u8,
    seq: u64,
    id: &'a str,
    ts: i64,
    kind: Kind,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initiated_by: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    root: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    lineage: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decision: Option<Verdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a Value>,
    prev: &'a str,
}

/// Encodes `e` as one line (with its trailing newline).
pub fn encode(e: &Event, seq: u64, id: &str, ts: i64, prev: &[u8; 32]) -> Vec<u8> {
    let prev_hex = data_encoding::HEXLOWER.encode(prev);
    let line = Line {
        v: 1,
        seq,
        id,
        ts,
        kind: e.kind,
        event: e.name,
        agent: e.agent.as_deref(),
        initiated_by: e.initiated_by.as_deref(),
        task: e.task.as_deref(),
        root: e.root.as_deref(),
        lineage: &e.lineage,
        action: e.action.as_ref(),
        decision: e.decision,
        code: e.code.as_deref(),
        reason: e.reason.as_deref(),
        outcome: e.outcome.as_ref(),
        prev: &prev_hex,
    };
    let mut out = serde_json::to_vec(&line).expect("serializing an audit line cannot fail");
    out.push(b'\n');
    out
}

/// SHA-256 of a line's bytes (without its newline).
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    let l = line.strip_suffix(b"\n").unwrap_or(line);
    ring::digest::digest(&ring::digest::SHA256, l).as_ref().try_into().expect("32 bytes")
}

/// The digest a checkpoint signs: it covers line `seq`, whose hash is `hash` (and through the
/// chain every line before it), and, when `from` is given, says that the broker process that
/// signs it wrote lines `from..=seq` itself. Checkpoints without `from` (earlier versions)
/// use the v1 digest.
pub fn checkpoint_digest(from: Option<u64>, seq: u64, hash: &[u8; 32]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    match from {
        None => ctx.update(b"ephyr-audit-chain-v1\0"),
        Some(f) => {
            ctx.update(b"ephyr-audit-chain-v2\0");
            ctx.update(&f.to_be_bytes());
        }
    }
    ctx.update(&seq.to_be_bytes());
    ctx.update(hash);
    ctx.finish().as_ref().try_into().expect("32 bytes")
}
