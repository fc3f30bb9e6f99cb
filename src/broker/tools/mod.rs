//! The MCP tool registry: the one place where each tool declares its name, argument schema,
//! annotations, what it needs to be visible, and the code that runs it.
//!
//! What runs here: argument validation and tool bodies on the executor thread; tools that touch
//! the network or the signer await those (later issues add them as entries in [`REGISTRY`]).
//!
//! Every call goes through the same path ([`call`]): the arguments are checked against the
//! declared parameters (unknown, missing, wrongly typed or out-of-range arguments are a tool
//! error naming the argument); `authorize` decides whether the caller may use the tool at all
//! (the task token's `tool` set, the agent being enabled); the tool body then asks `authorize`
//! for its own typed action; the outcome is audited; and a denial or failure is an `isError`
//! result with its reason, never a protocol error.

pub(crate) mod discovery;
pub(crate) mod files;
pub(crate) mod http;
pub(crate) mod ssh;
pub(crate) mod tasks;

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Instant;

use serde_json::{Map, Value, json};

use super::Broker;
use super::audit::{Event, Kind};
use super::auth::Caller;
use super::policy::{Action, ActionKind, Arguments, Decision, Denial, HTTP_METHODS, Policy, Principal, authorize};
use super::ports::{Operations, Ports, Sealer};
use super::proxy::Proxy;
use super::rate::Bounded;
use super::ssh::Ssh;
use super::tasks::TaskStore;
use crate::mcp::types::{Annotations, ToolDescriptor};

/// An argument's type.
#[derive(Clone, Copy, Debug)]
pub enum ParamType {
    /// A string.
    String,
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// An integer in `min..=max`.
    Integer {
        /// Smallest allowed.
        min: i64,
        /// Largest allowed.
        max: i64,
    },
    /// `true` or `false`.
    Boolean,
    /// A list of strings.
    StringList,
    /// An object of string values.
    StringMap,
    /// An object with these members.
    Object(&'static [Param]),
    /// An object whose every member is an object with these members.
    ObjectMap(&'static [Param]),
    /// A finite number, not negative.
    Number,
}

/// One declared argument.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub ty: ParamType,
    /// Whether it must be given.
    pub required: bool,
    /// What it means, for the model.
    pub description: &'static str,
}

/// What a caller needs for a tool to be listed: the tool is shown only if some action of this
/// kind could be allowed for the caller right now (checked with `authorize` itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Nothing beyond being an enabled agent (and the token allowing the tool).
    Nothing,
    /// Some role on some target.
    AnyTarget,
    /// Some role on some target where the file tools may read (`false`) or write (`true`).
    AnyFileTarget(bool),
    /// Some role on some target where a terminal session may be opened.
    AnyTerminalTarget,
    /// Some method and path on some service.
    AnyService,
    /// Some remote MCP server.
    AnyRemote,
}

/// What a tool body returns.
#[derive(Debug)]
pub struct Output {
    /// The text shown to the model (JSON for data, a sentence for errors).
    pub text: String,
    /// A failure (the result is `isError`).
    pub is_error: bool,
    /// A policy denial behind the failure, if that is what it was.
    pub denial: Option<Denial>,
    /// The action waits for an operator's approval (the text names the request).
    pub pending: bool,
    /// What the call acted on, for the audit line (names, never secrets).
    pub action: Map<String, Value>,
    /// What happened, for the audit line.
    pub outcome: Map<String, Value>,
    /// The data behind `text`, for `structuredContent` (protocol 2025-06-18 and later); boxed
    /// to keep `Output` small on the error paths.
    pub value: Option<Box<Value>>,
}

impl Output {
    /// Data, as indented JSON (the Go project's output shape, which agent prompts expect).
    pub fn data<T: serde::Serialize + ?Sized>(value: &T) -> Output {
        let value = serde_json::to_value(value).unwrap_or_default();
        Output {
            text: serde_json::to_string_pretty(&value).unwrap_or_default(),
            is_error: false,
            denial: None,
            pending: false,
            action: Map::new(),
            outcome: Map::new(),
            value: Some(Box::new(value)),
        }
    }

    /// Plain text.
    pub fn text(text: impl Into<String>) -> Output {
        Output {
            text: text.into(),
            is_error: false,
            denial: None,
            pending: false,
            action: Map::new(),
            outcome: Map::new(),
            value: None,
        }
    }

    /// A failure with its reason.
    pub fn error(reason: impl Into<String>) -> Output {
        Output {
            text: reason.into(),
            is_error: true,
            denial: None,
            pending: false,
            action: Map::new(),
            outcome: Map::new(),
            value: None,
        }
    }

    /// A broker error, the one way it becomes a tool result: a denial as `denied (code): reason`
    /// (with the denial kept for the audit record), anything else as `message (code)`.
    pub fn failed(e: super::Error) -> Output {
        match e {
            super::Error::Denied(d) => Output::denied(d),
            p @ super::Error::Pending { .. } => Output { pending: true, ..Output::error(p.to_string()) },
            other => Output::error(format!("{} ({})", other.message(), other.code())),
        }
    }

    /// A policy denial.
    pub fn denied(d: Denial) -> Output {
        Output {
            text: format!("denied ({}): {}", d.code.as_str(), d.reason),
            is_error: true,
            denial: Some(d),
            pending: false,
            action: Map::new(),
            outcome: Map::new(),
            value: None,
        }
    }
}

/// Everything a tool body may use: narrow handles, never the `Broker` (`ports`).
pub struct Ctx<'a> {
    /// Audit, metrics, signer, task liveness, secrets, the blocking pool.
    pub ports: Ports<'a>,
    /// SSH (certificates, sessions).
    pub ssh: &'a Ssh,
    /// The HTTP proxy.
    pub proxy: &'a Proxy,
    /// Task trees.
    pub tasks: &'a TaskStore,
    /// Seals new tasks' root keys.
    pub sealer: &'a dyn Sealer,
    /// Revocations and closes, as operators and agents share them.
    pub ops: &'a dyn Operations,
    /// Remote MCP servers (their health, for `list_remotes`).
    pub federation: &'a super::federation::Federation,
    /// Runs (their budgets, for `http_request`).
    pub runs: &'a super::runs::Runs,
    /// Who calls.
    pub caller: &'a Caller,
    /// The policy snapshot for this request.
    pub policy: &'a Rc<Policy>,
    /// Validated arguments.
    pub args: &'a Map<String, Value>,
    /// Every argument the tool declares.
    pub declared: &'a [&'a str],
}

impl Ctx<'_> {
    /// The call's arguments, as `authorize` evaluates argument constraints against them.
    pub fn arguments(&self) -> Arguments<'_> {
        Arguments::Call { values: self.args, declared: self.declared }
    }
}

/// A tool body.
pub type Run = for<'a> fn(Ctx<'a>) -> Pin<Box<dyn Future<Output = Output> + 'a>>;

/// A tool.
pub struct ToolDef {
    /// Name (Go Ephyr's, so existing prompts keep working).
    pub name: &'static str,
    /// Display title.
    pub title: &'static str,
    /// What it does, for the model.
    pub description: &'static str,
    /// Arguments.
    pub params: &'static [Param],
    /// Behaviour hints.
    pub annotations: Annotations,
    /// What a successful call returns (its `outputSchema` and `structuredContent`).
    pub output: OutputShape,
    /// When it is listed.
    pub needs: Needs,
    /// Its body.
    pub run: Run,
}

/// The shape of a tool's successful result, as `outputSchema` declares it and
/// `structuredContent` carries it (protocol 2025-06-18 and later). Error results carry none.
#[derive(Clone, Copy, Debug)]
pub enum OutputShape {
    /// An object with these keys always present, each with its JSON type (more keys may follow).
    Object(&'static [(&'static str, &'static str)]),
    /// A list, carried as `{key: [...]}` (the text stays the bare list, as Go Ephyr's was).
    List(&'static str),
}

impl OutputShape {
    /// The JSON Schema.
    pub fn schema(self) -> Value {
        match self {
            OutputShape::Object(keys) => {
                let props: Map<String, Value> =
                    keys.iter().map(|(k, t)| ((*k).to_owned(), json!({ "type": t }))).collect();
                let required: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
                json!({ "type": "object", "properties": props, "required": required })
            }
            OutputShape::List(key) => json!({
                "type": "object",
                "properties": { key: { "type": "array", "items": { "type": "object" } } },
                "required": [key],
            }),
        }
    }

    /// The structured form of a successful result's data (`None` when the data does not have
    /// the declared shape, which a unit test rules out for every tool).
    pub fn structured(self, value: Value) -> Option<Value> {
        match (self, value) {
            (OutputShape::Object(_), v @ Value::Object(_)) => Some(v),
            (OutputShape::List(key), v @ Value::Array(_)) => Some(json!({ key: v })),
            _ => None,
        }
    }
}

/// Every tool, in listing order.
pub static REGISTRY: &[&ToolDef] = &[
    &discovery::LIST_TARGETS,
    &ssh::EXEC,
    &ssh::SESSION_CREATE,
    &ssh::SESSION_INPUT,
    &ssh::SESSION_CLOSE,
    &ssh::LIST_SESSIONS,
    &ssh::LIST_CERTS,
    &files::FILE_READ,
    &files::FILE_WRITE,
    &files::FILE_LIST,
    &http::HTTP_REQUEST,
    &discovery::LIST_SERVICES,
    &discovery::LIST_REMOTES,
    &tasks::TASK_CREATE,
    &tasks::TASK_DELEGATE,
    &tasks::TASK_INFO,
    &tasks::TASK_LIST,
    &tasks::TASK_REVOKE,
    &tasks::TASK_BIND,
];

/// The tool named `name`.
pub fn find(name: &str) -> Option<&'static ToolDef> {
    REGISTRY.iter().copied().find(|t| t.name == name)
}

fn type_schema(ty: ParamType, description: &str) -> Value {
    let mut s = match ty {
        ParamType::String => json!({ "type": "string" }),
        ParamType::Enum(values) => json!({ "type": "string", "enum": values }),
        ParamType::Integer { min, max } => json!({ "type": "integer", "minimum": min, "maximum": max }),
        ParamType::Boolean => json!({ "type": "boolean" }),
        ParamType::StringList => json!({ "type": "array", "items": { "type": "string" } }),
        ParamType::StringMap => json!({ "type": "object", "additionalProperties": { "type": "string" } }),
        ParamType::Object(params) => object_schema(params),
        ParamType::ObjectMap(params) => json!({ "type": "object", "additionalProperties": object_schema(params) }),
        ParamType::Number => json!({ "type": "number", "minimum": 0 }),
    };
    if !description.is_empty() {
        s["description"] = Value::from(description);
    }
    s
}

fn object_schema(params: &[Param]) -> Value {
    let mut props = Map::new();
    for p in params {
        props.insert(p.name.into(), type_schema(p.ty, p.description));
    }
    let required: Vec<&str> = params.iter().filter(|p| p.required).map(|p| p.name).collect();
    json!({ "type": "object", "properties": props, "required": required, "additionalProperties": false })
}

/// The JSON Schema (2020-12) of a tool's arguments.
pub fn input_schema(t: &ToolDef) -> Value {
    let mut s = object_schema(t.params);
    s["$schema"] = Value::from("https://json-schema.org/draft/2020-12/schema");
    s
}

fn check_value(path: &str, ty: ParamType, v: &Value) -> Result<(), String> {
    let bad = |what: &str| Err(format!("argument {path:?} must be {what}"));
    match ty {
        ParamType::String => v.as_str().map(|_| ()).ok_or(()).or_else(|()| bad("a string")),
        ParamType::Enum(values) => match v.as_str() {
            Some(s) if values.contains(&s) => Ok(()),
            _ => bad(&format!("one of {}", values.join(", "))),
        },
        ParamType::Integer { min, max } => match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(()),
            Some(_) => bad(&format!("between {min} and {max}")),
            None => bad("an integer"),
        },
        ParamType::Boolean => v.as_bool().map(|_| ()).ok_or(()).or_else(|()| bad("true or false")),
        ParamType::StringList => match v.as_array() {
            Some(a) if a.iter().all(Value::is_string) => Ok(()),
            _ => bad("a list of strings"),
        },
        ParamType::StringMap => match v.as_object() {
            Some(m) if m.values().all(Value::is_string) => Ok(()),
            _ => bad("an object of strings"),
        },
        ParamType::Object(params) => match v.as_object() {
            Some(m) => check_object(path, params, m),
            None => bad("an object"),
        },
        ParamType::ObjectMap(params) => match v.as_object() {
            Some(m) => m.iter().try_for_each(|(k, v)| match v.as_object() {
                Some(inner) => check_object(&format!("{path}.{k}"), params, inner),
                None => Err(format!("argument {:?} must be an object", format!("{path}.{k}"))),
            }),
            None => bad("an object"),
        },
        ParamType::Number => match v.as_f64() {
            Some(n) if n.is_finite() && n >= 0.0 => Ok(()),
            _ => bad("a finite number, not negative"),
        },
    }
}

fn check_object(prefix: &str, params: &[Param], args: &Map<String, Value>) -> Result<(), String> {
    let join = |n: &str| if prefix.is_empty() { n.to_owned() } else { format!("{prefix}.{n}") };
    for k in args.keys() {
        if !params.iter().any(|p| p.name == k) {
            let known: Vec<&str> = params.iter().map(|p| p.name).collect();
            return Err(if known.is_empty() {
                format!("unknown argument {:?} (this takes no arguments)", join(k))
            } else {
                format!("unknown argument {:?} (arguments: {})", join(k), known.join(", "))
            });
        }
    }
    for p in params {
        match args.get(p.name) {
            None | Some(Value::Null) if p.required => {
                return Err(format!("argument {:?} is required", join(p.name)));
            }
            None | Some(Value::Null) => {}
            Some(v) => check_value(&join(p.name), p.ty, v)?,
        }
    }
    Ok(())
}

/// Checks arguments against a tool's declared parameters.
pub fn check_args(t: &ToolDef, args: &Map<String, Value>) -> Result<(), String> {
    check_object("", t.params, args)
}

fn allowed(policy: &Policy, principal: &Principal<'_>, tool: Option<&str>, kind: ActionKind<'_>) -> bool {
    authorize(policy, principal, &Action::reach(tool, kind)).is_allow()
}

/// Whether the caller could use some service (some method on some path the grant and the
/// service both name).
pub fn any_service(policy: &Policy, principal: &Principal<'_>, tool: Option<&str>, service: &str) -> bool {
    let Some(s) = policy.services.get(service) else { return false };
    let mut paths: Vec<&str> = s.paths.iter().flatten().map(|p| p.example()).collect();
    if let Some(g) = policy.agents.get(principal.agent).and_then(|a| a.services.lookup(service)) {
        paths.extend(g.value.paths.iter().flatten().map(|p| p.example()));
    }
    if paths.is_empty() {
        paths.push("/");
    }
    HTTP_METHODS.iter().any(|m| {
        paths.iter().any(|p| allowed(policy, principal, tool, ActionKind::Http { service, method: m, path: p }))
    })
}

/// Whether the caller could use some tool of a remote.
pub fn any_remote_tool(policy: &Policy, principal: &Principal<'_>, tool: Option<&str>, remote: &str) -> bool {
    let Some(r) = policy.remotes.get(remote) else { return false };
    let grant_tools =
        policy.agents.get(principal.agent).and_then(|a| a.remotes.lookup(remote)).and_then(|g| g.value.tools.clone());
    let names: Vec<String> = match (&r.tools, grant_tools) {
        (Some(t), _) => t.iter().cloned().collect(),
        (None, Some(t)) => t.into_iter().collect(),
        (None, None) => vec!["*".into()],
    };
    names.iter().any(|t| allowed(policy, principal, tool, ActionKind::RemoteTool { remote, tool: t }))
}

/// Whether `t` is listed for the caller.
pub fn visible(t: &ToolDef, policy: &Policy, principal: &Principal<'_>) -> bool {
    let tool = Some(t.name);
    if !allowed(policy, principal, tool, ActionKind::Discover) {
        return false;
    }
    match t.needs {
        Needs::Nothing => true,
        Needs::AnyTarget => policy.targets.iter().any(|(name, target)| {
            target
                .allowed_roles
                .iter()
                .any(|role| allowed(policy, principal, tool, ActionKind::Ssh { target: name, role }))
        }),
        Needs::AnyFileTarget(write) => policy.targets.iter().any(|(name, target)| {
            target.allowed_roles.iter().any(|role| {
                let restricted = policy.roles.get(role).is_some_and(|r| r.commands.is_some());
                target.files_possible(restricted, write)
                    && allowed(policy, principal, tool, ActionKind::Ssh { target: name, role })
            })
        }),
        Needs::AnyTerminalTarget => policy.targets.iter().any(|(name, target)| {
            target.allowed_roles.iter().any(|role| {
                crate::broker::ssh::terminal::allowed(policy, principal.agent, name, role, (80, 24)).is_ok()
                    && allowed(policy, principal, tool, ActionKind::Ssh { target: name, role })
            })
        }),
        Needs::AnyService => policy.services.keys().any(|s| any_service(policy, principal, tool, s)),
        Needs::AnyRemote => policy.remotes.keys().any(|r| any_remote_tool(policy, principal, tool, r)),
    }
}

/// The denial for calling a tool that is not listed for the caller: nothing it works on is
/// reachable under the caller's policy and token.
fn unreachable(t: &ToolDef, agent: &str) -> Denial {
    use super::policy::DenyCode;
    let (code, what) = match t.needs {
        Needs::AnyTarget => (DenyCode::PolicyDeniesTarget, "SSH target and role"),
        Needs::AnyTerminalTarget => {
            (DenyCode::PolicyDeniesTarget, "SSH target and role where a terminal is allowed (no command policy)")
        }
        Needs::AnyFileTarget(_) => {
            (DenyCode::FileDenied, "SSH target and role with file access (targets.<name>.files)")
        }
        Needs::AnyService => (DenyCode::PolicyDeniesService, "HTTP service"),
        Needs::AnyRemote | Needs::Nothing => (DenyCode::PolicyDeniesRemote, "remote MCP server"),
    };
    Denial {
        code,
        reason: format!("{} is not available to agent {agent:?}: no {what} is allowed by its policy and token", t.name),
    }
}

/// The tool catalog: what `tools/list` shows each caller. Each tool's `Tool` object is serialised
/// once; which tools a caller sees is computed with `authorize` once per policy digest and
/// credential and kept (bounded, oldest forgotten first), since a list costs one `authorize`
/// per target, service and remote for every tool.
///
/// What runs here: the executor thread only. Federation adds tools discovered at run time here.
pub struct Catalog {
    /// Built at the first `tools/list` (an idle broker does not hold them).
    /// Without and with `outputSchema` (protocols before and since 2025-06-18).
    descriptors: [std::cell::OnceCell<Vec<String>>; 2],
    visible: RefCell<Bounded<[u8; 32], (String, u64)>>,
}

/// Callers whose visible-tool set is kept.
const CATALOG_CALLERS: usize = 1024;

impl Default for Catalog {
    fn default() -> Self {
        Self::new()
    }
}

impl Catalog {
    /// The static tools, serialised.
    pub fn new() -> Catalog {
        debug_assert!(REGISTRY.len() <= 64, "the visible set is a u64 mask");
        Catalog { descriptors: Default::default(), visible: RefCell::new(Bounded::new(CATALOG_CALLERS)) }
    }

    fn mask(&self, policy: &Policy, caller: &Caller) -> u64 {
        if let Some((digest, mask)) = self.visible.borrow_mut().get_mut(&caller.fingerprint)
            && *digest == policy.digest
        {
            return *mask;
        }
        let principal = caller.principal();
        let mask = REGISTRY
            .iter()
            .enumerate()
            .filter(|(_, t)| visible(t, policy, &principal))
            .fold(0u64, |m, (i, _)| m | (1 << i));
        self.visible.borrow_mut().insert(caller.fingerprint, (policy.digest.clone(), mask));
        mask
    }

    /// The caller's `tools` array, as JSON text; `structured`: with output schemas.
    pub fn list_json(&self, policy: &Policy, caller: &Caller, structured: bool) -> String {
        let mask = self.mask(policy, caller);
        let descriptors = self.descriptors[usize::from(structured)]
            .get_or_init(|| REGISTRY.iter().map(|t| descriptor(t, structured).to_string()).collect());
        let mut out = String::with_capacity(descriptors.iter().map(|d| d.len() + 1).sum::<usize>() + 2);
        out.push('[');
        for (_, d) in descriptors.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0) {
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(d);
        }
        out.push(']');
        out
    }
}

fn descriptor(t: &ToolDef, structured: bool) -> Value {
    let schema = input_schema(t);
    let output = structured.then(|| t.output.schema());
    ToolDescriptor {
        name: t.name,
        title: t.title,
        description: t.description,
        input_schema: &schema,
        output_schema: output.as_ref(),
        annotations: t.annotations,
    }
    .to_json()
}

/// What happened to a call: `None` when the tool does not exist (a protocol error, `-32602`).
/// `policy` is the snapshot the request was authenticated under: one request, one policy.
pub async fn call(
    broker: &Rc<Broker>,
    caller: &Caller,
    policy: &Rc<Policy>,
    name: &str,
    args: Map<String, Value>,
    progress: Option<&super::dispatch::Progress>,
) -> Option<Output> {
    let t = find(name)?;
    let started = Instant::now();
    let policy = policy.clone();
    let principal = caller.principal();
    let mut out = match check_args(t, &args) {
        Err(e) => Output::error(format!("invalid arguments: {e}")),
        Ok(()) => match authorize(&policy, &principal, &Action::new(Some(t.name), ActionKind::Discover)) {
            Decision::Deny(d) => Output::denied(d),
            Decision::Allow(_) if !visible(t, &policy, &principal) => Output::denied(unreachable(t, &caller.agent)),
            Decision::Allow(_) => match broker.take_request(&policy, &caller.agent, started) {
                Err(wait) => Output::error(format!(
                    "rate limit exceeded for agent {:?}; retry in {}s",
                    caller.agent,
                    wait.as_secs().max(1)
                )),
                _ => {
                    let declared: Vec<&str> = t.params.iter().map(|p| p.name).collect();
                    (t.run)(Ctx {
                        ports: broker.ports().with_progress(progress),
                        ssh: &broker.ssh,
                        proxy: &broker.proxy,
                        tasks: &broker.tasks,
                        sealer: &broker.signer,
                        ops: &**broker,
                        federation: &broker.federation,
                        runs: &broker.runs,
                        caller,
                        policy: &policy,
                        args: &args,
                        declared: &declared,
                    })
                    .await
                }
            },
        },
    };
    let elapsed = started.elapsed();
    let outcome = if out.denial.is_some() {
        "denied"
    } else if out.pending {
        "pending"
    } else if out.is_error {
        "error"
    } else {
        "ok"
    };
    broker.metrics.inc("ephyr_tool_calls_total", &[("tool", t.name), ("outcome", outcome)]);
    broker.metrics.observe("ephyr_tool_call_duration_seconds", &[("tool", t.name)], elapsed.as_secs_f64());
    let mut action = std::mem::take(&mut out.action);
    action.insert("tool".into(), Value::from(t.name));
    let mut result = std::mem::take(&mut out.outcome);
    result.insert("is_error".into(), Value::Bool(out.is_error));
    result.insert("duration_us".into(), Value::from(elapsed.as_micros() as u64));
    let mut ev = Event::new(Kind::Decision, "tool_call")
        .agent(caller.agent.clone())
        .action(Value::Object(action))
        .outcome(Value::Object(result));
    ev = match &out.denial {
        Some(d) => ev.deny(d.code.as_str(), d.reason.clone()),
        None if out.pending => ev.error("approval_pending", first_line(&out.text)),
        None if out.is_error => ev.error("tool_error", first_line(&out.text)),
        None => ev.allow(),
    };
    if let Some(tok) = caller.token() {
        ev = ev.task(tok.task.clone(), tok.lineage.clone()).initiated_by(tok.initiated_by.clone());
    }
    // Read-only tools do not wait for the line to be durable; tools with effects record their
    // effect themselves, before acting, and wait (fail closed).
    use super::audit::AuditSink as _;
    if let Err(e) = broker.audit.note(ev) {
        log::error!("audit: {e}");
    }
    Some(out)
}

/// A call of a federated tool (`<prefix>.<tool>`): rate limit, `authorize` with the call's
/// arguments, an audit line on disk before the call leaves (fail closed), the forward, and the
/// outcome audited. `None` when no known remote offers `name`; `Ok` is the remote's result,
/// `Err` a tool error (a denial, or a failure naming the remote).
pub async fn call_remote(
    broker: &Rc<Broker>,
    caller: &Caller,
    policy: &Rc<Policy>,
    name: &str,
    args: Map<String, Value>,
    progress: Option<&super::dispatch::Progress>,
) -> Option<Result<Map<String, Value>, Output>> {
    let started = Instant::now();
    let principal = caller.principal();
    let prepared = broker.federation.prepare(policy, &principal, name, &args)?;
    let ev = |e: Event| {
        let e = e.agent(caller.agent.clone());
        match caller.token() {
            Some(t) => e.task(t.task.clone(), t.lineage.clone()).initiated_by(t.initiated_by.clone()),
            None => e,
        }
    };
    let facts = match prepared {
        Ok(f) => f,
        Err(e) => {
            let out = Output::failed(e);
            if let Some(d) = &out.denial {
                use super::audit::AuditSink as _;
                let _ = broker.audit.note(
                    ev(Event::new(Kind::Federation, "remote_call"))
                        .action(json!({ "tool": name }))
                        .deny(d.code.as_str(), d.reason.clone()),
                );
            }
            return Some(Err(out));
        }
    };
    if let Err(wait) = broker.take_request(policy, &caller.agent, started) {
        return Some(Err(Output::error(format!(
            "rate limit exceeded for agent {:?}; retry in {}s",
            caller.agent,
            wait.as_secs().max(1)
        ))));
    }
    // An approval rule may hold the call: nothing leaves before an operator approved exactly it.
    let gated = super::policy::approval::Gated::RemoteTool { remote: &facts.remote, tool: &facts.tool, args: &args };
    let describe = || {
        let exact = serde_json::to_vec(&args).unwrap_or_default();
        let shown = json!({
            "kind": "remote", "remote": facts.remote, "tool": facts.tool,
            "arguments": if exact.len() <= 4096 { Value::Object(args.clone()) } else { Value::String(format!("({} bytes)", exact.len())) },
            "args_sha256": facts.args_digest,
        });
        super::approvals::Subject { shown, exact }
    };
    if let Err(e) =
        super::approvals::clear(broker.ports().with_progress(progress), policy, caller, gated, describe).await
    {
        return Some(Err(Output::failed(e)));
    }
    let action =
        json!({ "tool": name, "remote": facts.remote, "remote_tool": facts.tool, "args_sha256": facts.args_digest });
    use super::audit::AuditSink as _;
    let line = ev(Event::new(Kind::Federation, "remote_call")).action(action.clone()).allow();
    if facts.read_only {
        // A tool whose pinned definition says it only reads: the line is written with the next
        // batch without holding the call (as the proxy's GET requests); nothing it gates.
        if let Err(e) = broker.audit.note(line) {
            return Some(Err(Output::failed(super::Error::audit(e))));
        }
    } else {
        // A call that may change something is on disk before it leaves.
        let synced = match broker.audit.record(line) {
            Ok(t) => t.durable().await,
            Err(e) => Err(e),
        };
        if let Err(e) = synced {
            return Some(Err(Output::failed(super::Error::audit(e))));
        }
    }
    // A call in flight ends when the caller's task is revoked or expires (task events): the
    // answer is not waited for, and the agent is told why.
    let forward = broker.federation.forward(broker.ports(), policy, &facts, args, progress);
    let result = match caller.token() {
        None => forward.await,
        Some(t) => {
            let ended = broker.ports().tasks.ended(t.task.clone(), t.envelope().expires_before);
            futures_lite::future::or(forward, async {
                ended.await;
                Err(super::Error::Refused(format!(
                    "the task was revoked or expired while remote {:?} ran {:?}; its answer was dropped",
                    facts.remote, facts.tool
                )))
            })
            .await
        }
    };
    let elapsed = started.elapsed();
    let us = elapsed.as_micros() as u64;
    let (outcome, label) = match &result {
        Ok((r, size)) => {
            let is_error = r["isError"].as_bool().unwrap_or(false);
            (
                json!({ "is_error": is_error, "duration_us": us, "size": size }),
                if is_error { "tool_error" } else { "ok" },
            )
        }
        Err(e) => (json!({ "error": e.code(), "duration_us": us }), e.code()),
    };
    let remote = crate::broker::metrics::PolicyName::remote(policy, &facts.remote);
    broker.metrics.inc_named("ephyr_federation_calls_total", ("remote", remote), &[("outcome", label)]);
    broker.metrics.observe_named("ephyr_federation_call_duration_seconds", ("remote", remote), elapsed.as_secs_f64());
    let _ = broker.audit.note(ev(Event::new(Kind::Federation, "remote_result")).action(action).outcome(outcome));
    Some(match result.map(|(v, _)| v) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Output::error(format!("remote {:?} sent a result that is not an object", facts.remote))),
        Err(e) => Err(Output::failed(e)),
    })
}

/// A request to a remote other than a tool call.
#[derive(Clone, Copy, Debug)]
pub enum RemoteAsk<'a> {
    /// `resources/read` of a namespaced URI (`ephyr-remote://<remote>/<uri>`).
    Read(&'a str),
    /// `prompts/get` of a namespaced prompt with its arguments.
    Prompt(&'a str, &'a Map<String, Value>),
}

/// A remote's resource read or prompt: `None` when no remote serves it; else the remote's answer
/// (only its `contents`, or `description` and `messages`), or a refusal or failure naming the
/// remote. Rate limited like tool calls, cut by a revocation like them, and audited
/// (`remote_read` / `remote_prompt`: remote, URI or prompt, decision, duration); both only
/// read, so their line does not hold the request for the sync.
pub async fn ask_remote(
    broker: &Rc<Broker>,
    caller: &Caller,
    policy: &Rc<Policy>,
    ask: RemoteAsk<'_>,
) -> Option<Result<Value, super::Error>> {
    use super::audit::AuditSink as _;
    let started = Instant::now();
    let principal = caller.principal();
    let (event, asked) = match ask {
        RemoteAsk::Read(uri) => ("remote_read", uri),
        RemoteAsk::Prompt(name, _) => ("remote_prompt", name),
    };
    let ev = |e: Event| {
        let e = e.agent(caller.agent.clone());
        match caller.token() {
            Some(t) => e.task(t.task.clone(), t.lineage.clone()).initiated_by(t.initiated_by.clone()),
            None => e,
        }
    };
    if let Err(wait) = broker.take_request(policy, &caller.agent, started) {
        return Some(Err(super::Error::Refused(format!(
            "rate limit exceeded for agent {:?}; retry in {}s",
            caller.agent,
            wait.as_secs().max(1)
        ))));
    }
    let ports = broker.ports();
    let asking = async {
        match ask {
            RemoteAsk::Read(uri) => broker.federation.read_resource(ports, policy, &principal, uri).await,
            RemoteAsk::Prompt(name, args) => broker.federation.get_prompt(ports, policy, &principal, name, args).await,
        }
    };
    let answer = match caller.token() {
        None => asking.await,
        Some(t) => {
            let ended = broker.ports().tasks.ended(t.task.clone(), t.envelope().expires_before);
            futures_lite::future::or(asking, async {
                ended.await;
                Some(Err(super::Error::Refused(format!(
                    "the task was revoked or expired while a remote answered {asked:?}; its answer was dropped"
                ))))
            })
            .await
        }
    }?;
    let us = started.elapsed().as_micros() as u64;
    let line = match &answer {
        Ok((facts, _)) => ev(Event::new(Kind::Federation, event))
            .action(json!({ "asked": asked, "remote": facts.remote, "what": facts.what }))
            .allow()
            .outcome(json!({ "duration_us": us })),
        Err(super::Error::Denied(d)) => ev(Event::new(Kind::Federation, event))
            .action(json!({ "asked": asked }))
            .deny(d.code.as_str(), d.reason.clone()),
        Err(e) => ev(Event::new(Kind::Federation, event))
            .action(json!({ "asked": asked }))
            .allow()
            .outcome(json!({ "error": e.code(), "duration_us": us })),
    };
    if let Err(e) = broker.audit.note(line) {
        return Some(Err(super::Error::audit(e)));
    }
    Some(answer.map(|(_, v)| v))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tool list computed afresh, the catalog's reference.
    fn list(policy: &Policy, principal: &Principal<'_>) -> Vec<Value> {
        REGISTRY.iter().filter(|t| visible(t, policy, principal)).map(|t| descriptor(t, true)).collect()
    }

    #[test]
    fn the_catalog_lists_what_visible_allows_and_recomputes_after_a_reload() {
        let text = "roles: {read: {principal: p}}\ntargets: {web: {host: h, allowed_roles: [read]}}\nagents:\n  a: {uid: 1, ssh: {web: {roles: [read]}}}\n  b: {uid: 2}\n";
        let p = Policy::parse(text, "t").unwrap();
        let caller = |agent: &str, n: u8| Caller {
            agent: agent.into(),
            via: crate::broker::auth::Via::ApiKey,
            fingerprint: [n; 32],
            source: None,
        };
        let c = Catalog::new();
        for who in [caller("a", 1), caller("b", 2)] {
            let cached: Value = serde_json::from_str(&c.list_json(&p, &who, true)).unwrap();
            let direct = Value::Array(list(&p, &who.principal()));
            assert_eq!(cached, direct, "{}", who.agent);
            // Served from the cache the second time, identically.
            assert_eq!(c.list_json(&p, &who, true), cached.to_string());
        }
        let names = |v: &str| -> Vec<String> {
            serde_json::from_str::<Value>(v)
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert!(names(&c.list_json(&p, &caller("a", 1), true)).contains(&"exec".to_string()));
        assert!(!names(&c.list_json(&p, &caller("b", 2), true)).contains(&"exec".to_string()));
        // A reload that grants b the target: b's list changes at once.
        let p2 = Policy::parse(&text.replace("b: {uid: 2}", "b: {uid: 2, ssh: {web: {roles: [read]}}}"), "t").unwrap();
        assert!(names(&c.list_json(&p2, &caller("b", 2), true)).contains(&"exec".to_string()));
    }

    #[test]
    fn schemas_are_strict_objects_and_arguments_are_checked_against_them() {
        static NESTED: &[Param] =
            &[Param { name: "targets", ty: ParamType::StringList, required: false, description: "" }];
        static PARAMS: &[Param] = &[
            Param { name: "target", ty: ParamType::String, required: true, description: "the target" },
            Param { name: "timeout", ty: ParamType::Integer { min: 1, max: 300 }, required: false, description: "" },
            Param { name: "method", ty: ParamType::Enum(&["GET", "POST"]), required: false, description: "" },
            Param { name: "headers", ty: ParamType::StringMap, required: false, description: "" },
            Param { name: "envelope", ty: ParamType::Object(NESTED), required: false, description: "" },
        ];
        let t = ToolDef {
            name: "t",
            title: "T",
            description: "",
            params: PARAMS,
            annotations: Annotations { read_only: true, destructive: false, idempotent: true, open_world: false },
            output: OutputShape::List("items"),
            needs: Needs::Nothing,
            run: |_| Box::pin(async { Output::text("") }),
        };
        let s = input_schema(&t);
        assert_eq!(s["type"], "object");
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["required"], json!(["target"]));
        assert_eq!(s["properties"]["timeout"]["maximum"], 300);
        assert_eq!(s["properties"]["envelope"]["properties"]["targets"]["type"], "array");
        let a = |v: Value| v.as_object().cloned().unwrap();
        check_args(&t, &a(json!({"target": "web", "timeout": 30, "method": "GET"}))).unwrap();
        for (args, words) in [
            (json!({}), "\"target\" is required"),
            (json!({"target": 1}), "\"target\" must be a string"),
            (json!({"target": "w", "timeout": 0}), "between 1 and 300"),
            (json!({"target": "w", "timeout": "30"}), "an integer"),
            (json!({"target": "w", "method": "DELETE"}), "one of GET, POST"),
            (json!({"target": "w", "headers": {"a": 1}}), "object of strings"),
            (json!({"target": "w", "envelope": {"targets": [1]}}), "\"envelope.targets\" must be a list"),
            (json!({"target": "w", "envelope": {"x": 1}}), "unknown argument \"envelope.x\""),
            (json!({"target": "w", "extra": 1}), "unknown argument \"extra\""),
        ] {
            let e = check_args(&t, &a(args.clone())).unwrap_err();
            assert!(e.contains(words), "{args}: {e}");
        }
    }

    #[test]
    fn every_registered_tool_has_a_unique_name_and_a_valid_schema() {
        let mut names = std::collections::BTreeSet::new();
        for t in REGISTRY {
            assert!(names.insert(t.name), "duplicate {}", t.name);
            assert!(!t.description.is_empty());
            let s = input_schema(t);
            assert_eq!(s["type"], "object");
        }
    }
}
