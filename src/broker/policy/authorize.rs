//! `authorize(principal, action) -> Decision`: the one function that decides (DESIGN.md §3).
//!
//! Pure: no I/O, no clock, no state. Authority is `policy(agent) ∩ envelope(token)`; nothing is
//! allowed by the absence of a rule. Evaluation order (docs/policy.md documents it for users):
//!
//! 1. the agent exists and is enabled;
//! 2. if the action comes through an MCP tool, the token's `tool` dimension allows that tool;
//! 3. the resource exists and is enabled (target, service, remote);
//! 4. the agent's policy grants it (most specific grant: exact name, then longest pattern, then
//!    `*`; an exact grant with no roles shadows patterns and grants nothing);
//! 5. resource-level rules (a role allowed on the target, a service's methods and paths, a
//!    remote's tool list);
//! 6. the token's envelope (every dimension it constrains, and its argument constraints);
//! 7. argument constraints of the policy grant.
//!
//! The first failing step gives the `Deny`, with a machine-readable code and a human reason.

use std::time::Duration;

use serde_json::{Map, Value};

use super::{Agent, DashboardLevel, Policy};
use crate::macaroon::SetKey;
use crate::macaroon::envelope::{ArgRule, Envelope};

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub struct Principal<'a> {
    /// The agent (from the API key, uid, or the task token's task).
    pub agent: &'a str,
    /// The task token's envelope, if authenticated with one.
    pub token: Option<&'a Envelope>,
    /// Other agents whose tasks the token passed through (cross-agent delegation): their policies
    /// bound every resource action too, so a hand-off never exceeds the delegator's authority.
    pub delegators: &'a [String],
}

/// What is being done.
#[derive(Clone, Copy, Debug)]
pub struct Action<'a> {
    /// The MCP tool the action comes through, if any (checked against the token's `tool` set).
    pub tool: Option<&'a str>,
    /// The action itself.
    pub kind: ActionKind<'a>,
    /// The arguments the action carries, against which argument constraints are evaluated.
    pub arguments: Arguments<'a>,
}

impl<'a> Action<'a> {
    /// A request with no arguments (an HTTP route, a task operation): an argument constraint of
    /// the token fails closed on a resource action.
    pub fn new(tool: Option<&'a str>, kind: ActionKind<'a>) -> Self {
        Action { tool, kind, arguments: Arguments::None }
    }

    /// A tool call with its arguments.
    pub fn call(
        tool: &'a str,
        kind: ActionKind<'a>,
        arguments: &'a Map<String, Value>,
        declared: &'a [&'a str],
    ) -> Self {
        Action { tool: Some(tool), kind, arguments: Arguments::Call { values: arguments, declared } }
    }

    /// A question of reach, not a request: could some call of this kind be allowed (tool
    /// listing, session visibility, sweeps)? Argument constraints are not evaluated, and nothing
    /// may be done on this answer alone.
    pub fn reach(tool: Option<&'a str>, kind: ActionKind<'a>) -> Self {
        Action { tool, kind, arguments: Arguments::NotEvaluated }
    }
}

/// The arguments of an action.
#[derive(Clone, Copy, Debug)]
pub enum Arguments<'a> {
    /// A request that carries none (the `/v1/proxy/` route, a certificate for the CLI).
    None,
    /// A tool call.
    Call {
        /// The call's arguments.
        values: &'a Map<String, Value>,
        /// Every argument the tool declares (a declared argument the call omits fails a
        /// constraint on it: defaults cannot sneak past).
        declared: &'a [&'a str],
    },
    /// Only for [`Action::reach`].
    NotEvaluated,
}

/// The typed actions.
#[derive(Clone, Copy, Debug)]
pub enum ActionKind<'a> {
    /// Listing and reading what the caller may see (tools/list, resources).
    Discover,
    /// An SSH certificate / connection as `role` on `target`.
    Ssh {
        /// Target name.
        target: &'a str,
        /// Role name.
        role: &'a str,
    },
    /// A command as `role` on `target`: [`ActionKind::Ssh`] plus the command policies of the
    /// target and the role, checked on the command's shell syntax tree (`crate::command`).
    SshCommand {
        /// Target name.
        target: &'a str,
        /// Role name.
        role: &'a str,
        /// The command text.
        command: &'a str,
    },
    /// A file tool (SFTP) as `role` on `target`: [`ActionKind::Ssh`] plus the target's `files:`
    /// rules for `path`, which is absolute, normalised, and once the target resolved it, that
    /// resolved path.
    SshFile {
        /// Target name.
        target: &'a str,
        /// Role name.
        role: &'a str,
        /// The file or directory.
        path: &'a str,
        /// A write (else a read or a listing).
        write: bool,
    },
    /// An HTTP request through a service. `path` is normalised and percent-decoded.
    Http {
        /// Service name.
        service: &'a str,
        /// Method (upper case).
        method: &'a str,
        /// Path relative to the service's base URL.
        path: &'a str,
    },
    /// An HTTP request about to be sent: [`ActionKind::Http`] plus where it goes — the host must
    /// be one the service allows (the credential goes only there) and every address the host
    /// resolved to must pass the network rules (DESIGN.md invariant 6: what is touched is what
    /// is checked).
    HttpUpstream {
        /// Service name.
        service: &'a str,
        /// Method (upper case).
        method: &'a str,
        /// Path relative to the service's base URL.
        path: &'a str,
        /// Destination host (lower case, no brackets).
        host: &'a str,
        /// Every address the host resolved to (the connection goes to one of them).
        addrs: &'a [std::net::IpAddr],
    },
    /// A federated tool call (its arguments are the action's [`Arguments`]).
    RemoteTool {
        /// Remote name.
        remote: &'a str,
        /// Tool name on the remote.
        tool: &'a str,
    },
    /// A read of a remote's resource (`resources/read`).
    RemoteResource {
        /// Remote name.
        remote: &'a str,
        /// The resource's URI on the remote.
        uri: &'a str,
    },
    /// A remote's prompt (`prompts/get`; its arguments are the action's [`Arguments`]).
    RemotePrompt {
        /// Remote name.
        remote: &'a str,
        /// Prompt name on the remote.
        prompt: &'a str,
    },
    /// A task operation.
    Task(TaskOp),
    /// A dashboard operation needing this level.
    Dashboard(DashboardLevel),
}

impl ActionKind<'_> {
    /// Whether the action touches something outside the broker (an SSH host, an HTTP service, a
    /// remote MCP server): such actions are bounded by every delegator's policy and by the token's
    /// argument constraints.
    pub fn reaches_a_resource(&self) -> bool {
        matches!(
            self,
            ActionKind::Ssh { .. }
                | ActionKind::SshCommand { .. }
                | ActionKind::SshFile { .. }
                | ActionKind::Http { .. }
                | ActionKind::HttpUpstream { .. }
                | ActionKind::RemoteTool { .. }
                | ActionKind::RemoteResource { .. }
                | ActionKind::RemotePrompt { .. }
        )
    }
}

/// Task operations (the task store checks the tree; this checks policy and token).
#[derive(Clone, Copy, Debug)]
pub enum TaskOp {
    /// Create a root task living `ttl`.
    Create {
        /// Requested lifetime.
        ttl: Duration,
    },
    /// Delegate a child at `child_depth` (root = 0) living `ttl`.
    Delegate {
        /// Requested lifetime.
        ttl: Duration,
        /// Depth of the new child.
        child_depth: u8,
        /// Depth of the task the token acts as.
        parent_depth: u8,
    },
    /// Read task information.
    Read,
    /// Revoke a task.
    Revoke,
    /// Bind a holder key.
    Bind,
}

/// Deny codes (stable, machine-readable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyCode {
    /// No such agent in the policy.
    UnknownAgent,
    /// The agent is disabled.
    AgentDisabled,
    /// The agent is suspended, revoked or decommissioned (the agent directory).
    AgentInactive,
    /// The token's `tool` set does not include the tool.
    TokenDeniesTool,
    /// No such target.
    UnknownTarget,
    /// The target is disabled.
    TargetDisabled,
    /// No such role.
    UnknownRole,
    /// The role is not in the target's `allowed_roles`.
    RoleNotAllowedOnTarget,
    /// No grant covers the target.
    PolicyDeniesTarget,
    /// The grant does not include the role.
    PolicyDeniesRole,
    /// The token excludes the target.
    TokenDeniesTarget,
    /// The token excludes the role.
    TokenDeniesRole,
    /// The command policy of the target or the role refuses the command (the reason names the
    /// command checker's code and the offending node).
    CommandDenied,
    /// The target's `files:` rules refuse the path (or there are no file tools on the target).
    FileDenied,
    /// No such service.
    UnknownService,
    /// The service is disabled.
    ServiceDisabled,
    /// No grant covers the service.
    PolicyDeniesService,
    /// The method is not allowed (service or grant).
    MethodNotAllowed,
    /// The path is not allowed (service or grant).
    PathNotAllowed,
    /// The token excludes the service.
    TokenDeniesService,
    /// The token excludes the method.
    TokenDeniesMethod,
    /// The destination host is not one the service allows.
    HostNotAllowed,
    /// A destination address is denied by the network rules (SSRF protection).
    NetworkDenied,
    /// No such remote.
    UnknownRemote,
    /// The remote is disabled.
    RemoteDisabled,
    /// No grant covers the remote.
    PolicyDeniesRemote,
    /// The remote or the grant does not offer the tool.
    PolicyDeniesTool,
    /// The token excludes the remote.
    TokenDeniesRemote,
    /// The grant does not cover the resource.
    PolicyDeniesResource,
    /// The grant does not cover the prompt.
    PolicyDeniesPrompt,
    /// An argument constraint (token or policy) is not met.
    ArgumentConstraint,
    /// The agent or the token may not delegate.
    DelegationNotAllowed,
    /// The delegation would be too deep.
    DepthExceeded,
    /// The requested lifetime is too long.
    TtlExceeded,
    /// The dashboard level is too low.
    DashboardLevel,
    /// An operator froze the agent or the resource (the kill switch).
    Frozen,
    /// An operator denied the approval this action waited for.
    ApprovalDenied,
    /// Nobody approved the action in time (or the approval was not used in time).
    ApprovalExpired,
}

impl DenyCode {
    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::UnknownAgent => "unknown_agent",
            DenyCode::AgentDisabled => "agent_disabled",
            DenyCode::AgentInactive => "agent_inactive",
            DenyCode::TokenDeniesTool => "token_denies_tool",
            DenyCode::UnknownTarget => "unknown_target",
            DenyCode::TargetDisabled => "target_disabled",
            DenyCode::UnknownRole => "unknown_role",
            DenyCode::RoleNotAllowedOnTarget => "role_not_allowed_on_target",
            DenyCode::PolicyDeniesTarget => "policy_denies_target",
            DenyCode::PolicyDeniesRole => "policy_denies_role",
            DenyCode::TokenDeniesTarget => "token_denies_target",
            DenyCode::TokenDeniesRole => "token_denies_role",
            DenyCode::CommandDenied => "command_denied",
            DenyCode::FileDenied => "file_denied",
            DenyCode::UnknownService => "unknown_service",
            DenyCode::ServiceDisabled => "service_disabled",
            DenyCode::PolicyDeniesService => "policy_denies_service",
            DenyCode::MethodNotAllowed => "method_not_allowed",
            DenyCode::HostNotAllowed => "host_not_allowed",
            DenyCode::NetworkDenied => "network_denied",
            DenyCode::PathNotAllowed => "path_not_allowed",
            DenyCode::TokenDeniesService => "token_denies_service",
            DenyCode::TokenDeniesMethod => "token_denies_method",
            DenyCode::UnknownRemote => "unknown_remote",
            DenyCode::RemoteDisabled => "remote_disabled",
            DenyCode::PolicyDeniesRemote => "policy_denies_remote",
            DenyCode::PolicyDeniesTool => "policy_denies_tool",
            DenyCode::TokenDeniesRemote => "token_denies_remote",
            DenyCode::PolicyDeniesResource => "policy_denies_resource",
            DenyCode::PolicyDeniesPrompt => "policy_denies_prompt",
            DenyCode::ArgumentConstraint => "argument_constraint",
            DenyCode::DelegationNotAllowed => "delegation_not_allowed",
            DenyCode::DepthExceeded => "depth_exceeded",
            DenyCode::TtlExceeded => "ttl_exceeded",
            DenyCode::DashboardLevel => "dashboard_level",
            DenyCode::Frozen => "frozen",
            DenyCode::ApprovalDenied => "approval_denied",
            DenyCode::ApprovalExpired => "approval_expired",
        }
    }
}

/// A denial: code and reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// What kind.
    pub code: DenyCode,
    /// Why, for humans (and the audit log).
    pub reason: String,
}

/// The policy rule behind an allowance, borrowed from the policy (no allocation on the hot path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule<'p> {
    /// A grant entry: `agents.claude.ssh.web`, `templates.ro.services.*`.
    Source(&'p str),
    /// The agent itself: `agents.<name>`.
    Agent(&'p str),
    /// One of the agent's settings: `agents.<name>.<key>`.
    AgentKey(&'p str, &'static str),
}

impl std::fmt::Display for Rule<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Source(s) => f.write_str(s),
            Rule::Agent(a) => write!(f, "agents.{a}"),
            Rule::AgentKey(a, k) => write!(f, "agents.{a}.{k}"),
        }
    }
}

/// An allowance, with the rule behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant<'p> {
    /// The policy rule that allowed it.
    pub rule: Rule<'p>,
    /// For SSH: the principal to put in the certificate.
    pub principal: Option<&'p str>,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<'p> {
    /// Allowed.
    Allow(Grant<'p>),
    /// Denied.
    Deny(Denial),
}

impl Decision<'_> {
    /// Whether allowed.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

fn deny<'p>(code: DenyCode, reason: impl Into<String>) -> Decision<'p> {
    Decision::Deny(Denial { code, reason: reason.into() })
}

fn allow(rule: Rule<'_>) -> Decision<'_> {
    Decision::Allow(Grant { rule, principal: None })
}

/// Checks the policy grant's argument constraints, failing closed like the token's: a
/// constraint on an argument the call does not give is refused, whether the tool declares it
/// (a default must not dodge it) or not (the constraint cannot be evaluated; scope it to the
/// tools that take the argument with `tool_args`).
fn check_grant_args(
    rules: &std::collections::BTreeMap<String, ArgRule>,
    arguments: Arguments<'_>,
    whose: &str,
    tool: &str,
) -> Result<(), Denial> {
    let Arguments::Call { values, declared } = arguments else { return Ok(()) };
    for (name, rule) in rules {
        let shape = |e: String| Denial { code: DenyCode::ArgumentConstraint, reason: format!("{e} ({whose})") };
        match arg_values(values, name).map_err(shape)? {
            Some(found) => {
                for v in found {
                    rule.check(v).map_err(|e| Denial {
                        code: DenyCode::ArgumentConstraint,
                        reason: format!("argument {name:?}: {e} ({whose})"),
                    })?;
                }
            }
            None if declared.contains(&top_name(name)) => {
                return Err(Denial {
                    code: DenyCode::ArgumentConstraint,
                    reason: format!("argument {name:?} is constrained ({whose}) and must be given explicitly"),
                });
            }
            None => {
                return Err(Denial {
                    code: DenyCode::ArgumentConstraint,
                    reason: format!(
                        "{whose} constrains argument {name:?}, which tool {tool:?} does not take: the constraint cannot be checked, so the call is refused (scope it with tool_args)"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The top-level argument a constraint's name starts at (`/options/path` → `options`).
fn top_name(name: &str) -> &str {
    match name.strip_prefix('/') {
        Some(rest) => rest.split('/').next().unwrap_or(rest),
        None => name,
    }
}

/// The values a constraint's name selects in a call's arguments: the argument itself, or what a
/// JSON pointer reaches, every item of an array (or member of an object) at a `*` segment.
/// `Ok(None)` when something on the way is missing (the constraint's argument was not given);
/// `Err` when the arguments have another shape than the pointer walks (a scalar where it
/// expects a list or an object): the constraint cannot be checked, so the callers refuse.
pub(crate) fn arg_values<'v>(values: &'v Map<String, Value>, name: &str) -> Result<Option<Vec<&'v Value>>, String> {
    let Some(pointer) = name.strip_prefix('/') else { return Ok(values.get(name).map(|v| vec![v])) };
    let mut segs = pointer.split('/');
    let Some(first) = segs.next().and_then(|s| values.get(s)) else { return Ok(None) };
    let mut current = vec![first];
    for seg in segs {
        let mut next = Vec::new();
        for v in current {
            match (seg, v) {
                ("*", Value::Array(items)) => next.extend(items.iter()),
                ("*", Value::Object(m)) => next.extend(m.values()),
                (key, Value::Object(m)) => match m.get(key) {
                    Some(x) => next.push(x),
                    None => return Ok(None),
                },
                (index, Value::Array(items)) => match index.parse::<usize>().ok().and_then(|i| items.get(i)) {
                    Some(x) => next.push(x),
                    None => return Ok(None),
                },
                _ => {
                    return Err(format!(
                        "argument {name:?}: the arguments do not have the shape it names (a list or an object where it goes deeper)"
                    ));
                }
            }
        }
        current = next;
    }
    Ok(Some(current))
}

/// What a resource action itself says, by argument name: the facts a token's argument
/// constraint is checked against first (normalised: the decoded path, the session's own target),
/// whatever the request spelled.
fn facts<'a>(kind: &ActionKind<'a>) -> [Option<(&'static str, &'a str)>; 3] {
    match *kind {
        ActionKind::Ssh { target, role } => [Some(("target", target)), Some(("role", role)), None],
        ActionKind::SshCommand { target, role, command } => {
            [Some(("target", target)), Some(("role", role)), Some(("command", command))]
        }
        ActionKind::SshFile { target, role, path, .. } => {
            [Some(("target", target)), Some(("role", role)), Some(("path", path))]
        }
        ActionKind::Http { service, method, path } | ActionKind::HttpUpstream { service, method, path, .. } => {
            [Some(("service", service)), Some(("method", method)), Some(("path", path))]
        }
        ActionKind::RemoteResource { remote, uri } => [Some(("remote", remote)), Some(("uri", uri)), None],
        _ => [None, None, None],
    }
}

/// Checks the token's argument constraints on a resource action, failing closed: every rule is
/// evaluated against the action's own facts ([`facts`]) or the tool call's arguments. A rule on
/// an argument the action neither has nor the tool declares is refused: a token narrowed by
/// `arg.timeout` cannot reach around the rule through a route or tool without a timeout.
fn check_token_args(env: &Envelope, action: &Action<'_>) -> Result<(), Denial> {
    if env.args.is_empty() || matches!(action.arguments, Arguments::NotEvaluated) {
        return Ok(());
    }
    let facts = facts(&action.kind);
    let denial = |reason: String| Denial { code: DenyCode::ArgumentConstraint, reason };
    for (name, rule) in &env.args {
        let checked = if let Some((_, v)) = facts.iter().flatten().find(|(n, _)| *n == name) {
            if name == "command" && matches!(action.kind, ActionKind::SshCommand { .. }) && !rule.like.is_empty() {
                // Globs over a shell command are checked per simple command, on its syntax tree.
                crate::command::check_token_globs(&rule.like, v)
                    .and_then(|()| ArgRule { like: Vec::new(), ..rule.clone() }.check(&Value::String((*v).to_owned())))
            } else {
                rule.check(&Value::String((*v).to_owned()))
            }
        } else {
            match action.arguments {
                Arguments::Call { values, declared } => match arg_values(values, name).map_err(denial)? {
                    Some(found) => found.into_iter().try_for_each(|v| rule.check(v)),
                    None if declared.contains(&top_name(name)) => {
                        return Err(denial(format!(
                            "argument {name:?} is constrained (task token) and must be given explicitly"
                        )));
                    }
                    None => {
                        return Err(denial(format!(
                            "the task token constrains argument {name:?}, which tool {:?} does not take: the constraint cannot be checked, so the call is refused",
                            action.tool.unwrap_or("?")
                        )));
                    }
                },
                _ => {
                    return Err(denial(format!(
                        "the task token constrains argument {name:?}, which this request does not carry: the constraint cannot be checked, so the request is refused"
                    )));
                }
            }
        };
        checked.map_err(|e| denial(format!("argument {name:?}: {e} (task token)")))?;
    }
    Ok(())
}

/// Decides. Authority is `policy(agent) ∩ envelope(token)`, and for SSH, HTTP and federated
/// actions also `∩ policy(d)` for every delegating agent `d` of a cross-agent hand-off.
pub fn authorize<'p>(policy: &'p Policy, principal: &Principal<'_>, action: &Action<'_>) -> Decision<'p> {
    if action.kind.reaches_a_resource() {
        for d in principal.delegators.iter().filter(|d| d.as_str() != principal.agent) {
            if let Decision::Deny(mut denial) = authorize_one(policy, d, principal.token, action) {
                denial.reason = format!("delegating agent {d:?}: {}", denial.reason);
                return Decision::Deny(denial);
            }
        }
    }
    authorize_one(policy, principal.agent, principal.token, action)
}

/// The kill switch: the agent, or the target, service or remote the action reaches, is frozen.
fn frozen(policy: &Policy, agent: &str, kind: &ActionKind<'_>) -> Option<Denial> {
    use super::FreezeKind as F;
    let f = &policy.frozen;
    if f.is_empty() {
        return None;
    }
    let (what, name) = match *kind {
        _ if f.has(F::Agent, agent) => (F::Agent, agent),
        ActionKind::Ssh { target, .. } | ActionKind::SshCommand { target, .. } | ActionKind::SshFile { target, .. } => {
            (F::Target, target)
        }
        ActionKind::Http { service, .. } | ActionKind::HttpUpstream { service, .. } => (F::Service, service),
        ActionKind::RemoteTool { remote, .. }
        | ActionKind::RemoteResource { remote, .. }
        | ActionKind::RemotePrompt { remote, .. } => (F::Remote, remote),
        _ => return None,
    };
    f.has(what, name).then(|| Denial {
        code: DenyCode::Frozen,
        reason: format!(
            "{} {name:?} is frozen by an operator (`ephyr unfreeze {} {name}`)",
            what.as_str(),
            what.as_str()
        ),
    })
}

fn authorize_one<'p>(policy: &'p Policy, agent: &str, token: Option<&Envelope>, action: &Action<'_>) -> Decision<'p> {
    let Some(agent) = policy.agents.get(agent) else {
        return deny(DenyCode::UnknownAgent, format!("agent {agent:?} is not in the policy"));
    };
    if !agent.enabled {
        return deny(DenyCode::AgentDisabled, format!("agent {:?} is disabled", agent.name));
    }
    if !agent.state.serves() {
        return deny(DenyCode::AgentInactive, format!("agent {:?} is {}", agent.name, agent.state.as_str()));
    }
    if let Some(denial) = frozen(policy, &agent.name, &action.kind) {
        return Decision::Deny(denial);
    }
    if let (Some(tool), Some(env)) = (action.tool, token)
        && !env.dim(SetKey::Tool).allows(tool)
    {
        return deny(DenyCode::TokenDeniesTool, format!("the task token does not allow tool {tool:?}"));
    }
    let decision = match action.kind {
        ActionKind::Discover => allow(Rule::Agent(&agent.name)),
        ActionKind::Ssh { target, role } => ssh(policy, agent, token, target, role),
        ActionKind::SshCommand { target, role, command } => match ssh(policy, agent, token, target, role) {
            Decision::Allow(g) => match command_policies(policy, target, role, command) {
                Err(reason) => deny(DenyCode::CommandDenied, reason),
                Ok(()) => Decision::Allow(g),
            },
            deny => deny,
        },
        ActionKind::SshFile { target, role, path, write } => match ssh(policy, agent, token, target, role) {
            Decision::Allow(g) => {
                let t = &policy.targets[target];
                let role_restricted = policy.roles.get(role).is_some_and(|r| r.commands.is_some());
                match t.file_access(role_restricted, path, write) {
                    Err(reason) => deny(DenyCode::FileDenied, format!("targets.{target}.files: {reason}")),
                    Ok(()) => Decision::Allow(g),
                }
            }
            deny => deny,
        },
        ActionKind::Http { service, method, path } => http(policy, agent, token, service, method, path),
        ActionKind::HttpUpstream { service, method, path, host, addrs } => {
            match http(policy, agent, token, service, method, path) {
                Decision::Allow(g) => match upstream(policy, service, host, addrs) {
                    Some(d) => Decision::Deny(d),
                    None => Decision::Allow(g),
                },
                deny => deny,
            }
        }
        ActionKind::RemoteTool { remote, tool } => remote_tool(policy, agent, token, remote, tool, action.arguments),
        ActionKind::RemoteResource { remote, uri } => remote_resource(policy, agent, token, remote, uri),
        ActionKind::RemotePrompt { remote, prompt } => remote_prompt(policy, agent, token, remote, prompt),
        ActionKind::Task(op) => task(policy, agent, token, op),
        ActionKind::Dashboard(level) => {
            if agent.dashboard >= level {
                allow(Rule::AgentKey(&agent.name, "dashboard"))
            } else {
                deny(
                    DenyCode::DashboardLevel,
                    format!(
                        "dashboard level {} needed, agent {:?} has {}",
                        level.as_str(),
                        agent.name,
                        agent.dashboard.as_str()
                    ),
                )
            }
        }
    };
    // Step 6's argument constraints of the token apply to every action that reaches a resource.
    match (decision, token) {
        (Decision::Allow(g), Some(env)) if action.kind.reaches_a_resource() => match check_token_args(env, action) {
            Ok(()) => Decision::Allow(g),
            Err(d) => Decision::Deny(d),
        },
        (d, _) => d,
    }
}

fn ssh<'p>(policy: &'p Policy, agent: &'p Agent, token: Option<&Envelope>, target: &str, role: &str) -> Decision<'p> {
    let Some(t) = policy.targets.get(target) else {
        return deny(DenyCode::UnknownTarget, format!("no target {target:?}"));
    };
    if !t.enabled {
        return deny(DenyCode::TargetDisabled, format!("target {target:?} is disabled"));
    }
    let Some(r) = policy.roles.get(role) else {
        return deny(DenyCode::UnknownRole, format!("no role {role:?}"));
    };
    let Some(grant) = agent.ssh.lookup(target) else {
        return deny(
            DenyCode::PolicyDeniesTarget,
            format!("agent {:?} has no SSH grant for target {target:?}", agent.name),
        );
    };
    if !grant.value.contains(role) {
        let has: Vec<&str> = grant.value.iter().map(String::as_str).collect();
        return deny(
            DenyCode::PolicyDeniesRole,
            format!("{} grants roles [{}] on {target:?}, not {role:?}", grant.source, has.join(", ")),
        );
    }
    if !t.allowed_roles.contains(role) {
        return deny(
            DenyCode::RoleNotAllowedOnTarget,
            format!("role {role:?} is not in targets.{target}.allowed_roles"),
        );
    }
    if let Some(env) = token {
        if !env.dim(SetKey::Target).allows(target) {
            return deny(DenyCode::TokenDeniesTarget, format!("the task token does not allow target {target:?}"));
        }
        if !env.dim(SetKey::Role).allows(role) {
            return deny(DenyCode::TokenDeniesRole, format!("the task token does not allow role {role:?}"));
        }
    }
    Decision::Allow(Grant { rule: Rule::Source(&grant.source), principal: Some(&r.principal) })
}

/// What the command policies of a target and a role say about a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandVerdict {
    /// Neither has a command policy: the command is not checked.
    Unchecked,
    /// Every policy that applies (`target web`, `role read`) allows it.
    Allowed(Vec<String>),
    /// Refused by the policy named first (or by the parser, before any policy).
    Refused(Vec<String>, crate::command::Refusal),
}

/// The command policies of the target and the role, both applying when both exist.
pub fn command_verdict(policy: &Policy, target: &str, role: &str, command: &str) -> CommandVerdict {
    let t = policy.targets.get(target).and_then(|t| t.commands.as_ref().map(|c| (c, format!("target {target}"))));
    let r = policy.roles.get(role).and_then(|r| r.commands.as_ref().map(|c| (c, format!("role {role}"))));
    let found: Vec<_> = t.into_iter().chain(r).collect();
    if found.is_empty() {
        return CommandVerdict::Unchecked;
    }
    let by: Vec<String> = found.iter().map(|(_, n)| n.clone()).collect();
    let parsed = match crate::command::Parsed::parse(command) {
        Ok(p) => p,
        Err(r) => return CommandVerdict::Refused(by, r),
    };
    for (p, name) in &found {
        if let Err(r) = p.check(&parsed, command) {
            return CommandVerdict::Refused(vec![name.clone()], r);
        }
    }
    CommandVerdict::Allowed(by)
}

fn command_policies(policy: &Policy, target: &str, role: &str, command: &str) -> Result<(), String> {
    match command_verdict(policy, target, role, command) {
        CommandVerdict::Refused(by, r) => Err(format!("command refused by the policy of {}: {r}", by.join(" and "))),
        _ => Ok(()),
    }
}

fn http<'p>(
    policy: &'p Policy,
    agent: &'p Agent,
    token: Option<&Envelope>,
    service: &str,
    method: &str,
    path: &str,
) -> Decision<'p> {
    let Some(s) = policy.services.get(service) else {
        return deny(DenyCode::UnknownService, format!("no service {service:?}"));
    };
    if !s.enabled {
        return deny(DenyCode::ServiceDisabled, format!("service {service:?} is disabled"));
    }
    let Some(grant) = agent.services.lookup(service) else {
        return deny(
            DenyCode::PolicyDeniesService,
            format!("agent {:?} has no grant for service {service:?}", agent.name),
        );
    };
    if s.methods.as_ref().is_some_and(|m| !m.contains(method)) {
        return deny(DenyCode::MethodNotAllowed, format!("service {service:?} does not allow {method}"));
    }
    if grant.value.methods.as_ref().is_some_and(|m| !m.contains(method)) {
        return deny(DenyCode::MethodNotAllowed, format!("{} does not allow {method}", grant.source));
    }
    if s.paths.as_ref().is_some_and(|ps| !ps.iter().any(|p| p.matches(path))) {
        return deny(DenyCode::PathNotAllowed, format!("service {service:?} does not allow path {path:?}"));
    }
    if grant.value.paths.as_ref().is_some_and(|ps| !ps.iter().any(|p| p.matches(path))) {
        return deny(DenyCode::PathNotAllowed, format!("{} does not allow path {path:?}", grant.source));
    }
    if let Some(env) = token {
        if !env.dim(SetKey::Service).allows(service) {
            return deny(DenyCode::TokenDeniesService, format!("the task token does not allow service {service:?}"));
        }
        if !env.dim(SetKey::Method).allows(method) {
            return deny(DenyCode::TokenDeniesMethod, format!("the task token does not allow method {method}"));
        }
    }
    allow(Rule::Source(&grant.source))
}

/// Where a request goes: the host against the service's `allowed_hosts`, every address against
/// the network rules.
fn upstream(policy: &Policy, service: &str, host: &str, addrs: &[std::net::IpAddr]) -> Option<Denial> {
    let s = policy.services.get(service)?;
    if !s.host_allowed(host) {
        return Some(Denial {
            code: DenyCode::HostNotAllowed,
            reason: format!("service {service:?} does not allow host {host:?} (allowed_hosts)"),
        });
    }
    if addrs.is_empty() {
        return Some(Denial { code: DenyCode::NetworkDenied, reason: format!("{host} resolved to no address") });
    }
    addrs.iter().find_map(|ip| {
        policy.network.check(*ip).err().map(|why| Denial {
            code: DenyCode::NetworkDenied,
            reason: if host.parse::<std::net::IpAddr>().is_ok() {
                why
            } else {
                format!("{host} resolves to {ip}; {why}")
            },
        })
    })
}

fn remote_tool<'p>(
    policy: &'p Policy,
    agent: &'p Agent,
    token: Option<&Envelope>,
    remote: &str,
    tool: &str,
    arguments: Arguments<'_>,
) -> Decision<'p> {
    let grant = match remote_grant(policy, agent, token, remote) {
        Ok(g) => g,
        Err(d) => return d,
    };
    if policy.remotes.get(remote).and_then(|r| r.tools.as_ref()).is_some_and(|t| !t.contains(tool)) {
        return deny(DenyCode::PolicyDeniesTool, format!("remote {remote:?} does not offer tool {tool:?}"));
    }
    let matches = |p: &String| crate::macaroon::caveat::glob_match(p, tool);
    if grant.value.tools.as_ref().is_some_and(|t| !t.iter().any(matches)) {
        return deny(DenyCode::PolicyDeniesTool, format!("{} does not include tool {tool:?}", grant.source));
    }
    if let Some(p) = grant.value.deny_tools.iter().find(|p| matches(p)) {
        return deny(DenyCode::PolicyDeniesTool, format!("{} denies tool {tool:?} (deny_tools: {p:?})", grant.source));
    }
    if let Err(d) = check_grant_args(&grant.value.args, arguments, &grant.source, tool) {
        return Decision::Deny(d);
    }
    if let Some(rules) = grant.value.tool_args.get(tool)
        && let Err(d) = check_grant_args(rules, arguments, &format!("{}.tool_args.{tool}", grant.source), tool)
    {
        return Decision::Deny(d);
    }
    allow(Rule::Source(&grant.source))
}

/// The remote, enabled, granted to `agent` and allowed by the token: the grant.
fn remote_grant<'p>(
    policy: &Policy,
    agent: &'p Agent,
    token: Option<&Envelope>,
    remote: &str,
) -> Result<&'p super::GrantEntry<super::RemoteGrant>, Decision<'p>> {
    let Some(r) = policy.remotes.get(remote) else {
        return Err(deny(DenyCode::UnknownRemote, format!("no remote {remote:?}")));
    };
    if !r.enabled {
        return Err(deny(DenyCode::RemoteDisabled, format!("remote {remote:?} is disabled")));
    }
    let Some(grant) = agent.remotes.lookup(remote) else {
        return Err(deny(
            DenyCode::PolicyDeniesRemote,
            format!("agent {:?} has no grant for remote {remote:?}", agent.name),
        ));
    };
    if let Some(env) = token
        && !env.dim(SetKey::Remote).allows(remote)
    {
        return Err(deny(DenyCode::TokenDeniesRemote, format!("the task token does not allow remote {remote:?}")));
    }
    Ok(grant)
}

/// A resource read. Its URI must be plain (no dot segments or encoded separators: the grant's
/// patterns match text, and the server must not read it another way) and match a pattern of the
/// grant; a token narrowed to tools reads no resources.
fn remote_resource<'p>(
    policy: &Policy,
    agent: &'p Agent,
    token: Option<&Envelope>,
    remote: &str,
    uri: &str,
) -> Decision<'p> {
    let grant = match remote_grant(policy, agent, token, remote) {
        Ok(g) => g,
        Err(d) => return d,
    };
    if let Err(why) = plain_uri(uri) {
        return deny(DenyCode::PolicyDeniesResource, format!("resource {uri:?}: {why}"));
    }
    if !grant.value.resources.iter().any(|p| crate::macaroon::caveat::glob_match(p, uri)) {
        return deny(DenyCode::PolicyDeniesResource, format!("{} does not cover resource {uri:?}", grant.source));
    }
    if let Some(env) = token
        && matches!(env.dim(SetKey::Tool), crate::macaroon::Dim::Only(_))
    {
        return deny(DenyCode::TokenDeniesTool, "the task token is narrowed to tools: it reads no remote resources");
    }
    allow(Rule::Source(&grant.source))
}

/// Why a resource URI has more than one reading, if it has.
fn plain_uri(uri: &str) -> Result<(), &'static str> {
    let lower = uri.to_ascii_lowercase();
    if uri.chars().any(char::is_control) || uri.contains('\\') {
        return Err("control characters and backslashes are refused");
    }
    if ["%2e", "%2f", "%5c", "%00"].iter().any(|e| lower.contains(e)) {
        return Err("percent-encoded dots, slashes and backslashes are refused");
    }
    let path = uri.split(['?', '#']).next().unwrap_or(uri);
    if path.split('/').any(|seg| seg == "." || seg == ".." || seg.starts_with("..;")) {
        return Err("dot segments are refused");
    }
    Ok(())
}

/// A prompt: named by the grant (`*` = all); under a token with a tools dimension, its
/// namespaced name must be in it (the generic tool check, before this).
fn remote_prompt<'p>(
    policy: &Policy,
    agent: &'p Agent,
    token: Option<&Envelope>,
    remote: &str,
    prompt: &str,
) -> Decision<'p> {
    let grant = match remote_grant(policy, agent, token, remote) {
        Ok(g) => g,
        Err(d) => return d,
    };
    if !grant.value.prompts.contains("*") && !grant.value.prompts.contains(prompt) {
        return deny(DenyCode::PolicyDeniesPrompt, format!("{} does not include prompt {prompt:?}", grant.source));
    }
    allow(Rule::Source(&grant.source))
}

fn task<'p>(policy: &Policy, agent: &'p Agent, token: Option<&Envelope>, op: TaskOp) -> Decision<'p> {
    let rule = Rule::Agent(&agent.name);
    match op {
        TaskOp::Create { ttl } => {
            if ttl > agent.max_task_ttl || ttl > policy.limits.task_ttl_max {
                return deny(
                    DenyCode::TtlExceeded,
                    format!(
                        "task TTL {}s exceeds the agent's maximum {}s",
                        ttl.as_secs(),
                        agent.max_task_ttl.as_secs()
                    ),
                );
            }
            allow(rule)
        }
        TaskOp::Delegate { ttl, child_depth, parent_depth } => {
            if !agent.can_delegate {
                return deny(
                    DenyCode::DelegationNotAllowed,
                    format!("agent {:?} may not delegate (can_delegate is false)", agent.name),
                );
            }
            if let Some(env) = token {
                if !env.can_delegate {
                    return deny(DenyCode::DelegationNotAllowed, "the task token says can_delegate = false");
                }
                if let Some(n) = env.delegation_depth
                    && child_depth.saturating_sub(parent_depth) > n
                {
                    return deny(
                        DenyCode::DepthExceeded,
                        format!("the task token allows {n} more level(s) of delegation"),
                    );
                }
            }
            if child_depth > agent.max_delegation_depth || child_depth > policy.limits.delegation_depth_max {
                return deny(
                    DenyCode::DepthExceeded,
                    format!(
                        "depth {child_depth} exceeds the limit {}",
                        agent.max_delegation_depth.min(policy.limits.delegation_depth_max)
                    ),
                );
            }
            if ttl > agent.max_task_ttl {
                return deny(
                    DenyCode::TtlExceeded,
                    format!(
                        "task TTL {}s exceeds the agent's maximum {}s",
                        ttl.as_secs(),
                        agent.max_task_ttl.as_secs()
                    ),
                );
            }
            allow(Rule::AgentKey(&agent.name, "can_delegate"))
        }
        TaskOp::Read | TaskOp::Revoke | TaskOp::Bind => allow(rule),
    }
}
