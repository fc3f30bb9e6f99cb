//! Task tools (Go Ephyr's names and arguments): `task_create`, `task_delegate`, `task_info`,
//! `task_list`, `task_revoke`, `task_bind`.
//!
//! What runs here: argument checks, `authorize` for the task operation, the task store (which
//! journals and waits for `fdatasync`), the signer (sealing a new tree's root key), and a durable
//! audit line with the task's lineage before the answer goes out.

use std::time::Duration;

use serde_json::{Map, Value, json};
use ulid::Ulid;

use super::{Ctx, Needs, Output, OutputShape, Param, ParamType, ToolDef};
use crate::broker::audit::{Event, Kind};
use crate::broker::policy::{Action, ActionKind, Decision, HTTP_METHODS, Policy, Principal, TaskOp, authorize};
use crate::broker::tasks::{Holder, NewTask, Scope, TaskView, parse_holder_key, seal_context};
use crate::macaroon::{Dim, Envelope, RootKey, SetKey};
use crate::mcp::types::Annotations;
use crate::time::UnixMicros;

const WRITES: Annotations = Annotations { read_only: false, destructive: false, idempotent: false, open_world: false };
const READS: Annotations = Annotations { read_only: true, destructive: false, idempotent: true, open_world: false };
const DESTROYS: Annotations = Annotations { read_only: false, destructive: true, idempotent: true, open_world: false };

static ENVELOPE: &[Param] = &[
    Param { name: "targets", ty: ParamType::StringList, required: false, description: "SSH targets" },
    Param { name: "roles", ty: ParamType::StringList, required: false, description: "SSH roles" },
    Param { name: "services", ty: ParamType::StringList, required: false, description: "HTTP services" },
    Param { name: "remotes", ty: ParamType::StringList, required: false, description: "remote MCP servers" },
    Param { name: "methods", ty: ParamType::StringList, required: false, description: "HTTP methods" },
    Param { name: "tools", ty: ParamType::StringList, required: false, description: "MCP tools" },
    Param {
        name: "args",
        ty: ParamType::ObjectMap(ARG_RULE),
        required: false,
        description: "argument constraints by argument name or JSON pointer (/paths/* = every item), e.g. {\"path\": {\"prefix\": \"/srv/shared\"}}",
    },
];

static ARG_RULE: &[Param] = &[
    Param {
        name: "prefix",
        ty: ParamType::String,
        required: false,
        description: "the argument is an absolute path at or under this one",
    },
    Param { name: "max", ty: ParamType::Number, required: false, description: "the argument is a number at most this" },
    Param {
        name: "min",
        ty: ParamType::Number,
        required: false,
        description: "the argument is a number at least this",
    },
    Param {
        name: "one_of",
        ty: ParamType::StringList,
        required: false,
        description: "the argument is one of these strings",
    },
    Param {
        name: "glob",
        ty: ParamType::StringList,
        required: false,
        description: "the argument matches one of these patterns (* any run of characters, ? one)",
    },
];

const DESCRIPTION: Param =
    Param { name: "description", ty: ParamType::String, required: true, description: "what the task is for" };
const TTL: Param = Param {
    name: "ttl",
    ty: ParamType::String,
    required: false,
    description: "lifetime, e.g. \"30m\" (default from policy; at most the agent's max_task_ttl)",
};
const ENVELOPE_PARAM: Param = Param {
    name: "envelope",
    ty: ParamType::Object(ENVELOPE),
    required: false,
    description: "narrow the task to these names (each list is optional; omitted = as the parent / policy allows)",
};
const CAN_DELEGATE: Param = Param {
    name: "can_delegate",
    ty: ParamType::Boolean,
    required: false,
    description: "whether the task's token may delegate further (default false)",
};
const HOLDER: Param = Param {
    name: "holder_pub_key",
    ty: ParamType::String,
    required: false,
    description: "Ed25519 public key (32 bytes, base64url) that must sign every request made with the token",
};
const TASK_ID: Param = Param { name: "task_id", ty: ParamType::String, required: true, description: "the task's ULID" };

/// `task_create`.
pub static TASK_CREATE: ToolDef = ToolDef {
    name: "task_create",
    title: "Create a task",
    description: "Start a task: a token scoped to this piece of work (narrower than your policy, expiring, \
                  revocable). Use the token as Bearer for the task's requests; delegate parts of it with task_delegate.",
    params: &[DESCRIPTION, TTL, ENVELOPE_PARAM, CAN_DELEGATE, HOLDER],
    annotations: WRITES,
    output: OutputShape::Object(&[
        ("task_id", "string"),
        ("token", "string"),
        ("expires_at", "string"),
        ("holder_bound", "boolean"),
    ]),
    needs: Needs::Nothing,
    run: |cx| Box::pin(create(cx)),
};

/// `task_delegate`.
pub static TASK_DELEGATE: ToolDef = ToolDef {
    name: "task_delegate",
    title: "Delegate part of a task",
    description: "Create a child task with a narrower envelope and a shorter life, for a sub-agent or another agent. \
                  The child's token is derived from the parent's; revoking the parent revokes it.",
    params: &[
        Param {
            name: "parent_task_id",
            ty: ParamType::String,
            required: false,
            description: "the task to delegate from (default: the task of the presented token)",
        },
        DESCRIPTION,
        TTL,
        ENVELOPE_PARAM,
        CAN_DELEGATE,
        Param {
            name: "agent",
            ty: ParamType::String,
            required: false,
            description: "hand the child to this agent (its authority is the parent's ∩ that agent's policy)",
        },
        HOLDER,
    ],
    annotations: WRITES,
    output: OutputShape::Object(&[
        ("task_id", "string"),
        ("parent_task_id", "string"),
        ("token", "string"),
        ("depth", "integer"),
    ]),
    needs: Needs::Nothing,
    run: |cx| Box::pin(delegate(cx)),
};

/// `task_info`.
pub static TASK_INFO: ToolDef = ToolDef {
    name: "task_info",
    title: "Show a task",
    description: "Show one task (default: the task of the presented token): envelope, expiry, lineage, binding, revocation.",
    params: &[Param { required: false, ..TASK_ID }],
    annotations: READS,
    output: OutputShape::Object(&[("task", "object"), ("remaining_ttl", "integer"), ("is_revoked", "boolean")]),
    needs: Needs::Nothing,
    run: |cx| Box::pin(async move { info(cx) }),
};

/// `task_list`.
pub static TASK_LIST: ToolDef = ToolDef {
    name: "task_list",
    title: "List tasks",
    description: "List the tasks you can see: your own and those below them (with a task token: its subtree).",
    params: &[],
    annotations: READS,
    output: OutputShape::Object(&[("count", "integer"), ("tasks", "array")]),
    needs: Needs::Nothing,
    run: |cx| Box::pin(async move { list(cx) }),
};

/// `task_revoke`.
pub static TASK_REVOKE: ToolDef = ToolDef {
    name: "task_revoke",
    title: "Revoke a task",
    description: "Revoke a task and everything delegated from it, at once: every token of them stops working.",
    params: &[TASK_ID],
    annotations: DESTROYS,
    output: OutputShape::Object(&[("revoked", "string"), ("cascade_count", "integer")]),
    needs: Needs::Nothing,
    run: |cx| Box::pin(revoke(cx)),
};

/// `task_bind`.
pub static TASK_BIND: ToolDef = ToolDef {
    name: "task_bind",
    title: "Bind a holder key",
    description: "Bind an Ed25519 public key to an unbound task: from then on every request with its token \
                  must be signed by that key (proof of possession).",
    params: &[TASK_ID, Param { required: true, ..HOLDER }],
    annotations: WRITES,
    output: OutputShape::Object(&[("task_id", "string"), ("bound", "boolean")]),
    needs: Needs::Nothing,
    run: |cx| Box::pin(bind(cx)),
};

fn arg_str<'a>(args: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    args.get(name).and_then(Value::as_str)
}

fn task_id(args: &Map<String, Value>, name: &str) -> Result<Option<Ulid>, Output> {
    match arg_str(args, name) {
        None => Ok(None),
        Some(s) => Ulid::from_string(s.trim())
            .map(Some)
            .map_err(|_| Output::error(format!("invalid arguments: {name} {s:?} is not a task id (ULID)"))),
    }
}

fn ttl(args: &Map<String, Value>, default: Duration) -> Result<Duration, Output> {
    match arg_str(args, "ttl") {
        None => Ok(default),
        Some(s) => match crate::time::parse_duration(s) {
            Ok(d) if d >= Duration::from_secs(1) => Ok(d),
            Ok(_) => Err(Output::error("invalid arguments: ttl must be at least 1s")),
            Err(e) => Err(Output::error(format!("invalid arguments: ttl {s:?}: {e}"))),
        },
    }
}

fn holder_key(args: &Map<String, Value>) -> Result<Option<[u8; 32]>, Output> {
    arg_str(args, "holder_pub_key")
        .map(parse_holder_key)
        .transpose()
        .map_err(|e| Output::error(format!("invalid arguments: {e}")))
}

/// Whole seconds (caveat timestamps have second precision).
fn expiry(now: UnixMicros, ttl: Duration) -> UnixMicros {
    UnixMicros::from_secs(now.plus(ttl).secs())
}

/// The requested envelope as caveats, each list checked: names must exist and be within what
/// the caller could use (its policy, and `within` — the parent token's envelope).
fn narrowing(policy: &Policy, cx: &Ctx<'_>, agent: &str, within: Option<&Envelope>) -> Result<Vec<String>, Output> {
    let Some(env) = cx.args.get("envelope").and_then(Value::as_object) else { return Ok(vec![]) };
    let mut caveats = Vec::new();
    let principal = Principal { agent, token: within, delegators: &[] };
    let can = |kind: ActionKind<'_>| authorize(policy, &principal, &Action::reach(None, kind)).is_allow();
    for (field, key) in [
        ("targets", SetKey::Target),
        ("roles", SetKey::Role),
        ("services", SetKey::Service),
        ("remotes", SetKey::Remote),
        ("methods", SetKey::Method),
        ("tools", SetKey::Tool),
    ] {
        let Some(items) = env.get(field).and_then(Value::as_array) else { continue };
        let names: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
        if names.is_empty() {
            return Err(Output::error(format!(
                "invalid arguments: envelope.{field} is empty (omit it to leave the dimension to the parent/policy)"
            )));
        }
        for n in &names {
            if let Some(Dim::Only(set)) = within.map(|e| e.dim(key))
                && !set.contains(*n)
            {
                return Err(Output::error(format!("envelope.{field}: {n:?} is outside the parent task's envelope")));
            }
            let ok = match key {
                SetKey::Target => policy
                    .targets
                    .get(*n)
                    .is_some_and(|t| t.allowed_roles.iter().any(|role| can(ActionKind::Ssh { target: n, role }))),
                SetKey::Role => policy
                    .targets
                    .iter()
                    .any(|(target, t)| t.allowed_roles.contains(*n) && can(ActionKind::Ssh { target, role: n })),
                SetKey::Service => super::any_service(policy, &principal, None, n),
                SetKey::Remote => super::any_remote_tool(policy, &principal, None, n),
                SetKey::Method => HTTP_METHODS.contains(n),
                SetKey::Tool => super::find(n).is_some() || n.contains('.'),
            };
            if !ok {
                return Err(Output::error(format!(
                    "envelope.{field}: {n:?} is not something agent {agent:?} may use under its policy"
                )));
            }
        }
        caveats.push(format!("{} IN [{}]", key.as_str(), names.join(",")));
    }
    // Argument constraints: caveats like any other, so they only ever add to the parent's.
    for (name, rule) in env.get("args").and_then(Value::as_object).into_iter().flatten() {
        let bad = |why: String| Output::error(format!("invalid arguments: envelope.args.{name}: {why}"));
        let mut any = false;
        if let Some(p) = rule.get("prefix").and_then(Value::as_str) {
            let p = crate::macaroon::caveat::NormPath::strict(p).map_err(bad)?;
            caveats.push(format!("arg.{name} prefix {}", p.as_str()));
            any = true;
        }
        if let Some(n) = rule.get("max").and_then(Value::as_f64) {
            caveats.push(format!("arg.{name} <= {n}"));
            any = true;
        }
        if let Some(n) = rule.get("min").and_then(Value::as_f64) {
            caveats.push(format!("arg.{name} >= {n}"));
            any = true;
        }
        for (key, op) in [("one_of", "IN"), ("glob", "LIKE")] {
            if let Some(items) = rule.get(key).and_then(Value::as_array) {
                let items: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
                caveats.push(format!("arg.{name} {op} [{}]", items.join(",")));
                any = true;
            }
        }
        if !any {
            return Err(bad("give prefix, max, min, one_of or glob".into()));
        }
    }
    // Every caveat must parse as the token grammar has it (names, list items, numbers).
    for c in &caveats {
        if let Err(e) = crate::macaroon::caveat::Caveat::parse(c.as_bytes()) {
            return Err(Output::error(format!("invalid arguments: envelope: {}", e.0)));
        }
    }
    Ok(caveats)
}

fn decide(policy: &Policy, principal: &Principal<'_>, op: TaskOp) -> Result<(), Output> {
    match authorize(policy, principal, &Action::new(None, ActionKind::Task(op))) {
        Decision::Allow(_) => Ok(()),
        Decision::Deny(d) => Err(Output::denied(d)),
    }
}

/// Records a task event durably; a failure refuses the answer (fail closed).
async fn audit(cx: &Ctx<'_>, ev: Event) -> Result<(), Output> {
    let ticket = cx.ports.audit.record(ev).map_err(|e| Output::error(e.to_string()))?;
    ticket.durable().await.map_err(|e| Output::error(e.to_string()))
}

fn holder_json(h: Holder) -> (bool, Option<String>) {
    match h {
        Holder::Key(_) => (true, None),
        Holder::Bearer => (false, None),
        Holder::AwaitingBind { deadline } => (false, Some(deadline.to_rfc3339())),
    }
}

/// The caller as the operations layer names it.
pub fn actor(cx: &Ctx<'_>) -> crate::broker::ops::Actor {
    crate::broker::ops::Actor::Agent { name: cx.caller.agent.clone(), task: cx.caller.token().map(|t| t.task.clone()) }
}

fn initiated_by(cx: &Ctx<'_>) -> String {
    match cx.caller.token() {
        Some(t) => t.initiated_by.clone(),
        None => format!("agent:{}", cx.caller.agent),
    }
}

async fn create(cx: Ctx<'_>) -> Output {
    match create_inner(&cx).await {
        Ok(o) | Err(o) => o,
    }
}

async fn create_inner(cx: &Ctx<'_>) -> Result<Output, Output> {
    if cx.caller.token().is_some() {
        return Err(Output::error(
            "a task token cannot start a new task tree (it would shed its own limits); use task_delegate",
        ));
    }
    let policy = cx.policy;
    let agent = policy.agents.get(&cx.caller.agent).ok_or_else(|| Output::error("unknown agent"))?;
    let ttl = ttl(cx.args, policy.limits.task_ttl_default.min(agent.max_task_ttl))?;
    decide(policy, &cx.caller.principal(), TaskOp::Create { ttl })?;
    let key = holder_key(cx.args)?;
    let narrowing = narrowing(policy, cx, &agent.name, None)?;
    let now = crate::time::now();
    let depth_limit = agent.max_delegation_depth.min(policy.limits.delegation_depth_max);
    let can_delegate = cx.args.get("can_delegate").and_then(Value::as_bool).unwrap_or(false) && agent.can_delegate;
    let new = NewTask {
        agent: agent.name.clone(),
        delegated_by: None,
        description: arg_str(cx.args, "description").unwrap_or("").chars().take(500).collect(),
        expires: expiry(now, ttl),
        can_delegate,
        delegation_depth: depth_limit,
        narrowing,
        holder_key: key,
        bind_deadline: (agent.require_pop && key.is_none()).then(|| now.plus(policy.limits.bind_deadline)),
    };
    let id = crate::ids::new_ulid(now);
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    crate::secret::random_bytes(raw.as_mut()).map_err(|e| Output::error(format!("no randomness: {e}")))?;
    let root_key = RootKey::from_bytes(raw.as_ref());
    let sealed = cx
        .sealer
        .seal(seal_context(id), crate::secret::SecretBytes::new(raw.to_vec()))
        .await
        .map_err(|e| Output::error(format!("task state unavailable: sealing the root key failed: {e}")))?;
    let (task, token) =
        cx.tasks.create(id, new, initiated_by(cx), &root_key, sealed, now).await.map_err(Output::failed)?;
    let view = cx.tasks.view(id).ok_or_else(|| Output::error("task vanished"))?;
    let (bound, deadline) = holder_json(view.holder);
    let ev = Event::new(Kind::Task, "task_create")
        .agent(task.agent.clone())
        .task(task.id.to_string(), vec![task.id.to_string()])
        .initiated_by(task.initiated_by.clone())
        .allow()
        .outcome(json!({"expires_at": task.expires_at().to_rfc3339(), "holder_bound": bound,
            "can_delegate": task.can_delegate, "envelope": task.envelope}));
    audit(cx, ev).await?;
    cx.ports.metrics.inc("ephyr_tasks_total", &[("op", "create")]);
    Ok(Output::data(&json!({
        "task_id": task.id.to_string(),
        "token": token,
        "token_type": "macaroon",
        "expires_at": task.expires_at().to_rfc3339(),
        "ttl_seconds": ttl.as_secs(),
        "can_delegate": task.can_delegate,
        "holder_bound": bound,
        "bind_deadline": deadline,
        "envelope": task.envelope,
    })))
}

async fn delegate(cx: Ctx<'_>) -> Output {
    match delegate_inner(&cx).await {
        Ok(o) | Err(o) => o,
    }
}

async fn delegate_inner(cx: &Ctx<'_>) -> Result<Output, Output> {
    let policy = cx.policy;
    let store = &cx.tasks;
    let now = crate::time::now();
    // The parent, and its token: the presented one (token callers, who may delegate only from
    // their own task), or the one the broker minted (API-key callers, from a task they hold).
    let requested = task_id(cx.args, "parent_task_id")?;
    let (parent_id, parent_token, identity) = match cx.caller.token() {
        Some(t) => {
            let own = Ulid::from_string(&t.task).map_err(|_| Output::error("bad task id"))?;
            if requested.is_some_and(|p| p != own) {
                return Err(Output::error(format!(
                    "a task token delegates only from its own task {own}; parent_task_id names another"
                )));
            }
            (own, t.verified.macaroon.clone(), t.clone())
        }
        None => {
            let p = requested
                .ok_or_else(|| Output::error("invalid arguments: parent_task_id is required with an API key"))?;
            let v = store
                .view(p)
                .filter(|v| v.task.agent == cx.caller.agent)
                .ok_or_else(|| Output::error(format!("no live task {p} held by agent {:?}", cx.caller.agent)))?;
            let m = store.minted_token(v.task.id).ok_or_else(|| Output::error(format!("no task tree for {p}")))?;
            let text = m.encode();
            let minted = store
                .verify_token(&text, &crate::broker::auth::fingerprint(&text), now)
                .map_err(|e| Output::error(format!("task {p} cannot delegate: {e}")))?;
            (p, m, minted)
        }
    };
    let parent = store.view(parent_id).ok_or_else(|| Output::error(format!("no live task {parent_id}")))?;
    let env = identity.envelope();
    let remaining = Duration::from_micros(parent.task.expires.saturating_sub(now.0).max(0) as u64);
    let agent = policy.agents.get(&cx.caller.agent).ok_or_else(|| Output::error("unknown agent"))?;
    let ttl = ttl(cx.args, policy.limits.task_ttl_default.min(remaining))?;
    if ttl > remaining {
        return Err(Output::error(format!(
            "the child would outlive its parent: ttl {}s exceeds the parent's remaining {}s",
            ttl.as_secs(),
            remaining.as_secs()
        )));
    }
    let child_depth = parent.task.depth.saturating_add(1);
    let principal = Principal { agent: &agent.name, token: Some(env), delegators: &identity.delegators };
    decide(policy, &principal, TaskOp::Delegate { ttl, child_depth, parent_depth: parent.task.depth })?;
    // Cross-agent: the child agent must exist and be enabled; its policy bounds the child too.
    let child_agent = match arg_str(cx.args, "agent").map(str::trim) {
        None | Some("") => agent,
        Some(name) => match policy.agents.get(name) {
            Some(a) if a.enabled => a,
            Some(_) => return Err(Output::error(format!("agent {name:?} is disabled"))),
            None => return Err(Output::error(format!("no agent {name:?} in the policy"))),
        },
    };
    let handoff = child_agent.name != agent.name;
    // The requested names must lie within the parent's envelope and the delegating agent's
    // policy (and, for a hand-off, the child agent's: authorize intersects both on every use).
    let caveats = narrowing(policy, cx, &agent.name, Some(env))?;
    if handoff {
        narrowing(policy, cx, &child_agent.name, Some(env))?;
    }
    let key = holder_key(cx.args)?;
    // An approval rule may hold the delegation until an operator approved exactly this one.
    let gated = crate::broker::policy::approval::Gated::Delegate { to: &child_agent.name };
    crate::broker::approvals::clear(cx.ports, policy, cx.caller, gated, || crate::broker::approvals::Subject {
        shown: json!({
            "kind": "delegate", "to": child_agent.name, "parent": parent_id.to_string(), "ttl_secs": ttl.as_secs(),
            "envelope": cx.args.get("envelope"),
        }),
        exact: serde_json::to_vec(cx.args).unwrap_or_default(),
    })
    .await
    .map_err(Output::failed)?;
    let inherited = matches!(parent.holder, Holder::Key(_));
    let remaining_depth = env.delegation_depth.unwrap_or(policy.limits.delegation_depth_max).saturating_sub(1);
    let new = NewTask {
        agent: child_agent.name.clone(),
        delegated_by: handoff.then(|| agent.name.clone()),
        description: arg_str(cx.args, "description").unwrap_or("").chars().take(500).collect(),
        expires: expiry(now, ttl),
        can_delegate: cx.args.get("can_delegate").and_then(Value::as_bool).unwrap_or(false) && env.can_delegate,
        delegation_depth: remaining_depth,
        narrowing: caveats,
        holder_key: key,
        bind_deadline: (child_agent.require_pop && key.is_none() && !inherited)
            .then(|| now.plus(policy.limits.bind_deadline)),
    };
    let id = crate::ids::new_ulid(now);
    let (task, token) = store.delegate(parent_id, &parent_token, id, new, now).await.map_err(Output::failed)?;
    let view = store.view(id).ok_or_else(|| Output::error("task vanished"))?;
    let (bound, deadline) = holder_json(view.holder);
    let mut lineage = identity.lineage.clone();
    lineage.push(task.id.to_string());
    let ev = Event::new(Kind::Task, if handoff { "task_handoff" } else { "task_delegate" })
        .agent(cx.caller.agent.clone())
        .task(task.id.to_string(), lineage)
        .initiated_by(task.initiated_by.clone())
        .allow()
        .action(json!({"parent": parent_id.to_string(), "child_agent": task.agent, "depth": task.depth}))
        .outcome(json!({"expires_at": task.expires_at().to_rfc3339(), "holder_bound": bound,
            "rebound": key.is_some(), "envelope": task.envelope}));
    audit(cx, ev).await?;
    cx.ports.metrics.inc("ephyr_tasks_total", &[("op", if handoff { "handoff" } else { "delegate" })]);
    Ok(Output::data(&json!({
        "task_id": task.id.to_string(),
        "parent_task_id": parent_id.to_string(),
        "token": token,
        "token_type": "macaroon",
        "agent": task.agent,
        "expires_at": task.expires_at().to_rfc3339(),
        "depth": task.depth,
        "can_delegate": task.can_delegate,
        "holder_bound": bound,
        "bind_deadline": deadline,
        "envelope": task.envelope,
    })))
}

fn scope<'a>(cx: &'a Ctx<'_>) -> Scope<'a> {
    match cx.caller.token().and_then(|t| Ulid::from_string(&t.task).ok()) {
        Some(id) => Scope::Task(id),
        None => Scope::Agent(&cx.caller.agent),
    }
}

fn remaining(v: &TaskView, now: UnixMicros) -> u64 {
    (v.task.expires.saturating_sub(now.0).max(0) / 1_000_000) as u64
}

/// A task as the task tools (and the local API) show it.
pub(crate) fn view_json(v: &TaskView, now: UnixMicros) -> Value {
    let (bound, deadline) = holder_json(v.holder);
    json!({
        "id": v.task.id.to_string(),
        "root_id": v.task.root.to_string(),
        "parent_id": v.task.parent.map(|p| p.to_string()),
        "agent": v.task.agent,
        "delegated_by": v.task.delegated_by,
        "description": v.task.description,
        "depth": v.task.depth,
        "initiated_by": v.task.initiated_by,
        "created_at": UnixMicros(v.task.created).to_rfc3339(),
        "expires_at": v.task.expires_at().to_rfc3339(),
        "remaining_ttl": remaining(v, now),
        "can_delegate": v.task.can_delegate,
        "holder_bound": bound,
        "bind_deadline": deadline,
        "is_revoked": v.revoked.is_some(),
        "revoked_by_task": v.revoked.map(|(t, _)| t.to_string()),
        "envelope": v.task.envelope,
    })
}

/// A visible task named by `task_id`, or the caller's own task.
fn target(cx: &Ctx<'_>, required: bool) -> Result<TaskView, Output> {
    let id = match (task_id(cx.args, "task_id")?, cx.caller.token()) {
        (Some(id), _) => id,
        (None, Some(t)) if !required => Ulid::from_string(&t.task).map_err(|_| Output::error("bad task id"))?,
        _ => return Err(Output::error("invalid arguments: task_id is required")),
    };
    let store = &cx.tasks;
    match store.view(id) {
        Some(v) if store.in_scope(&scope(cx), id) => Ok(v),
        _ => {
            Err(Output::error(format!("no task {id} visible to you (it may have expired, or belong to another tree)")))
        }
    }
}

fn info(cx: Ctx<'_>) -> Output {
    let now = crate::time::now();
    if cx.args.get("task_id").is_none() && cx.caller.token().is_none() {
        return list(cx);
    }
    match target(&cx, false) {
        Ok(v) => Output::data(&json!({"task": view_json(&v, now), "remaining_ttl": remaining(&v, now),
            "is_revoked": v.revoked.is_some(), "holder_bound": matches!(v.holder, Holder::Key(_))})),
        Err(o) => o,
    }
}

fn list(cx: Ctx<'_>) -> Output {
    let now = crate::time::now();
    let tasks: Vec<Value> = cx.tasks.visible(&scope(&cx)).iter().map(|v| view_json(v, now)).collect();
    Output::data(&json!({"count": tasks.len(), "tasks": tasks}))
}

async fn revoke(cx: Ctx<'_>) -> Output {
    let v = match target(&cx, true) {
        Ok(v) => v,
        Err(o) => return o,
    };
    let policy = cx.policy;
    if let Err(o) = decide(policy, &cx.caller.principal(), TaskOp::Revoke) {
        return o;
    }
    let cascade = match cx.ops.revoke_task(&actor(&cx), &v).await {
        Ok(n) => n,
        Err(e) => return Output::failed(e),
    };
    Output::data(&json!({"revoked": v.task.id.to_string(), "cascade_count": cascade,
        "status": "all tokens invalidated"}))
}

async fn bind(cx: Ctx<'_>) -> Output {
    let v = match target(&cx, true) {
        Ok(v) => v,
        Err(o) => return o,
    };
    let key = match holder_key(cx.args) {
        Ok(Some(k)) => k,
        Ok(None) => return Output::error("invalid arguments: holder_pub_key is required"),
        Err(o) => return o,
    };
    if let Err(o) = decide(cx.policy, &cx.caller.principal(), TaskOp::Bind) {
        return o;
    }
    let now = crate::time::now();
    let at = match cx.tasks.bind(v.task.id, key, now).await {
        Ok(at) => at,
        Err(e) => return Output::failed(e),
    };
    let ev = Event::new(Kind::Task, "task_bind")
        .agent(cx.caller.agent.clone())
        .task(v.task.id.to_string(), cx.tasks.lineage(v.task.id))
        .initiated_by(v.task.initiated_by.clone())
        .allow()
        .outcome(json!({"holder_key": data_encoding::BASE64URL_NOPAD.encode(&key)}));
    if let Err(o) = audit(&cx, ev).await {
        return o;
    }
    cx.ports.metrics.inc("ephyr_tasks_total", &[("op", "bind")]);
    Output::data(&json!({"task_id": v.task.id.to_string(), "bound": true,
        "bound_at": UnixMicros(at).to_rfc3339()}))
}
