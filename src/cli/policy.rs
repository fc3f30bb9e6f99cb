//! `ephyr policy check|diff|explain|reload`, `ephyr keygen agent` and `ephyr operator add`.
//!
//! What runs here: reads policy files; `explain` calls the same `authorize` the broker uses;
//! `reload` asks the running broker over the local socket; `keygen` reads the CSPRNG and runs one
//! Argon2id hash (about 25 ms).

use crate::broker::policy::approval::Gated;
use std::path::Path;

use crate::broker::policy::{
    self, Action, ActionKind, Arguments, DashboardLevel, Decision, Policy, Principal, TaskOp, authorize,
};
use crate::macaroon::Macaroon;

/// `policy check FILE`: prints problems and warnings; returns the exit code (0 ok, 3 invalid).
pub fn check(file: &Path, json: bool) -> i32 {
    match policy::load_file(file) {
        Ok(p) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": true, "warnings": p.warnings, "digest": p.digest, "agents": p.agents.len(), "targets": p.targets.len(), "services": p.services.len(), "remotes": p.remotes.len() })
                );
            } else {
                for w in &p.warnings {
                    println!("warning: {w}");
                }
                println!(
                    "{}: OK ({} agent(s), {} target(s), {} service(s), {} remote(s); {} warning(s))",
                    file.display(),
                    p.agents.len(),
                    p.targets.len(),
                    p.services.len(),
                    p.remotes.len(),
                    p.warnings.len()
                );
            }
            0
        }
        Err(e) => {
            if json {
                let list: Vec<serde_json::Value> = e
                    .problems
                    .iter()
                    .map(|p| serde_json::json!({ "at": p.at, "path": p.path, "message": p.message, "hint": p.hint }))
                    .collect();
                println!("{}", serde_json::json!({ "ok": false, "problems": list, "warnings": e.warnings }));
            } else {
                for p in &e.problems {
                    println!("error: {p}");
                }
                for w in &e.warnings {
                    println!("warning: {w}");
                }
                println!("{}: {} problem(s), {} warning(s)", file.display(), e.problems.len(), e.warnings.len());
            }
            3
        }
    }
}

/// `policy diff OLD NEW`.
pub fn diff(old: &Path, new: &Path) -> Result<i32, String> {
    let o = policy::load_file(old).map_err(|e| format!("{}:\n{e}", old.display()))?;
    let n = policy::load_file(new).map_err(|e| format!("{}:\n{e}", new.display()))?;
    let d = policy::diff::diff(&o, &n);
    let approvals = policy::diff::approval_changes(&o, &n);
    if d.is_empty() {
        println!("no change in what any agent may do");
    }
    let sections = d.into_iter().map(|(agent, c)| (format!("agent {agent}:"), c));
    let approvals =
        (!approvals.is_empty()).then(|| ("approval rules (+ more waits for a person, - less):".to_owned(), approvals));
    for (heading, changes) in sections.chain(approvals) {
        println!("{heading}");
        for c in changes {
            match c {
                policy::diff::Change::Gain(s) => println!("  + {s}"),
                policy::diff::Change::Loss(s) => println!("  - {s}"),
                policy::diff::Change::Changed(k, a, b) => println!("  ~ {k}: {a} -> {b}"),
            }
        }
    }
    Ok(0)
}

/// What to explain.
#[derive(Debug, Default)]
pub struct ExplainOptions {
    /// Policy file.
    pub config: std::path::PathBuf,
    /// Agent.
    pub agent: String,
    /// Action spec (see [`parse_action`]).
    pub action: String,
    /// Tool it comes through (checked against a token's tool set).
    pub tool: Option<String>,
    /// A task token whose caveats (not verified here) narrow the decision.
    pub token: Option<String>,
    /// The command of an `ssh:TARGET:ROLE` action (instead of `ssh:TARGET:ROLE:COMMAND`, which
    /// cannot hold every command).
    pub command: Option<String>,
    /// JSON output.
    pub json: bool,
}

enum Owned {
    Discover,
    Ssh(String, String, Option<String>),
    Http(String, String, String),
    Tool(String, String, serde_json::Map<String, serde_json::Value>),
    Task(TaskOp),
    Dashboard(DashboardLevel),
}

/// Parses `ssh:TARGET:ROLE[:COMMAND]`, `http:SERVICE:METHOD:/PATH`, `tool:REMOTE:TOOL[:{json args}]`,
/// `task:create:TTL`, `task:delegate:TTL:CHILD_DEPTH`, `task:read|revoke|bind`,
/// `dashboard:LEVEL` or `discover`.
fn parse_action(s: &str) -> Result<Owned, String> {
    let parts: Vec<&str> = s.splitn(4, ':').collect();
    let dur = |x: &str| crate::time::parse_duration(x).map_err(|e| e.to_string());
    Ok(match parts.as_slice() {
        ["discover"] => Owned::Discover,
        ["ssh", t, r] => Owned::Ssh(t.to_string(), r.to_string(), None),
        ["ssh", t, r, cmd] => Owned::Ssh(t.to_string(), r.to_string(), Some(cmd.to_string())),
        ["http", svc, m, p] => {
            let path = crate::macaroon::caveat::NormPath::normalise(p)
                .ok_or_else(|| format!("{p:?} is not an absolute path"))?;
            Owned::Http(svc.to_string(), m.to_ascii_uppercase(), path.as_str().to_owned())
        }
        ["tool", r, t] => Owned::Tool(r.to_string(), t.to_string(), serde_json::Map::new()),
        ["tool", r, t, args] => {
            let v: serde_json::Value = serde_json::from_str(args).map_err(|e| format!("tool arguments: {e}"))?;
            let serde_json::Value::Object(m) = v else { return Err("tool arguments must be a JSON object".into()) };
            Owned::Tool(r.to_string(), t.to_string(), m)
        }
        ["task", "create", ttl] => Owned::Task(TaskOp::Create { ttl: dur(ttl)? }),
        ["task", "delegate", ttl, depth] => {
            let d: u8 = depth.parse().map_err(|_| "CHILD_DEPTH must be a number".to_string())?;
            Owned::Task(TaskOp::Delegate { ttl: dur(ttl)?, child_depth: d, parent_depth: d.saturating_sub(1) })
        }
        ["task", "read"] => Owned::Task(TaskOp::Read),
        ["task", "revoke"] => Owned::Task(TaskOp::Revoke),
        ["task", "bind"] => Owned::Task(TaskOp::Bind),
        ["dashboard", l] => {
            Owned::Dashboard(DashboardLevel::parse(l).ok_or("levels are none, viewer, operator, admin")?)
        }
        _ => {
            return Err(format!(
                "cannot read action {s:?}; try ssh:TARGET:ROLE[:COMMAND], http:SERVICE:METHOD:/PATH, tool:REMOTE:TOOL[:{{json}}], task:create:30m, task:delegate:10m:1, dashboard:viewer, discover"
            ));
        }
    })
}

/// `policy explain`: the decision and the rule behind it. Exit 0 allowed, 1 denied.
pub fn explain(o: &ExplainOptions) -> Result<i32, String> {
    let p: Policy = policy::load_file(&o.config).map_err(|e| e.to_string())?;
    let action = match (parse_action(&o.action)?, &o.command) {
        (Owned::Ssh(t, r, None), Some(c)) => Owned::Ssh(t, r, Some(c.clone())),
        (_, Some(_)) => return Err("--command goes with an action ssh:TARGET:ROLE (without a command)".into()),
        (a, None) => a,
    };
    let envelope = match &o.token {
        Some(t) => {
            let m = Macaroon::decode(t).map_err(|e| format!("--token: {e}"))?;
            Some(crate::macaroon::reduce(m.caveats()).map_err(|e| format!("--token: {e}"))?.envelope)
        }
        None => None,
    };
    let declared: Vec<&str> = match &action {
        Owned::Tool(_, _, a) => a.keys().map(String::as_str).collect(),
        _ => vec![],
    };
    let empty = serde_json::Map::new();
    let kind = match &action {
        Owned::Discover => ActionKind::Discover,
        Owned::Ssh(t, r, None) => ActionKind::Ssh { target: t, role: r },
        Owned::Ssh(t, r, Some(c)) => ActionKind::SshCommand { target: t, role: r, command: c },
        Owned::Http(s, m, path) => ActionKind::Http { service: s, method: m, path },
        Owned::Tool(r, t, _) => ActionKind::RemoteTool { remote: r, tool: t },
        Owned::Task(op) => ActionKind::Task(*op),
        Owned::Dashboard(l) => ActionKind::Dashboard(*l),
    };
    let d = authorize(
        &p,
        &Principal { agent: &o.agent, token: envelope.as_ref(), delegators: &[] },
        &Action {
            tool: o.tool.as_deref(),
            kind,
            arguments: match &action {
                Owned::Tool(_, _, a) => Arguments::Call { values: a, declared: &declared },
                _ => Arguments::Call { values: &empty, declared: &[] },
            },
        },
    );
    // An allowed action may still wait for an operator (`approvals:`).
    let gated = match &action {
        Owned::Ssh(t, r, c) => Some(Gated::Ssh { target: t, role: r, command: c.as_deref() }),
        Owned::Http(s, m, path) => Some(Gated::Http { service: s, method: m, path }),
        Owned::Tool(r, t, a) => Some(Gated::RemoteTool { remote: r, tool: t, args: a }),
        _ => None,
    };
    let approval = match (&d, gated) {
        (Decision::Allow(_), Some(g)) => crate::broker::policy::approval::requirement(&p, &o.agent, &g),
        _ => None,
    };
    let approval_json = approval.as_ref().map(|r| {
        serde_json::json!({
            "rules": r.names(), "approvers": r.approvers_text(), "needed": r.needed(),
            "timeout": crate::time::format_duration(r.timeout()),
            "waiver": r.waiver().map(crate::time::format_duration),
        })
    });
    let (code, v) = match &d {
        Decision::Allow(g) => (
            0,
            serde_json::json!({ "decision": "allow", "rule": g.rule.to_string(), "principal": g.principal, "approval": approval_json }),
        ),
        Decision::Deny(x) => {
            (1, serde_json::json!({ "decision": "deny", "code": x.code.as_str(), "reason": x.reason }))
        }
    };
    // For a command: what the command checker says, with its reason code and node.
    let command = match &action {
        Owned::Ssh(t, r, Some(c)) => Some(policy::authorize::command_verdict(&p, t, r, c)),
        _ => None,
    };
    let mut v = v;
    if let Some(verdict) = &command {
        v["command"] = match verdict {
            policy::authorize::CommandVerdict::Unchecked => serde_json::json!({ "checked": false }),
            policy::authorize::CommandVerdict::Allowed(by) => serde_json::json!({ "checked": true, "by": by }),
            policy::authorize::CommandVerdict::Refused(by, r) => serde_json::json!({
                "checked": true, "by": by, "reason_code": r.reason.as_str(), "node": r.node, "detail": r.detail,
            }),
        };
    }
    if o.json {
        println!("{v}");
    } else {
        match &d {
            Decision::Allow(g) => {
                print!("ALLOW  by rule {}", g.rule);
                if let Some(pr) = &g.principal {
                    print!(" (certificate principal {pr})");
                }
                println!();
                if let Some(r) = &approval {
                    println!(
                        "       but it waits for approval: rule {} (approvers: {}; {} approval(s); timeout {}{})",
                        r.names().join(", "),
                        r.approvers_text(),
                        r.needed(),
                        crate::time::format_duration(r.timeout()),
                        r.waiver()
                            .map(|w| format!("; waiver up to {}", crate::time::format_duration(w)))
                            .unwrap_or_default()
                    );
                }
            }
            Decision::Deny(x) => println!("DENY   {}: {}", x.code.as_str(), x.reason),
        }
        match &command {
            Some(policy::authorize::CommandVerdict::Unchecked) => {
                println!("       command: no command policy applies (the role's shell is the limit)")
            }
            Some(policy::authorize::CommandVerdict::Allowed(by)) => {
                println!("       command: every simple command passes the policy of {}", by.join(" and "))
            }
            Some(policy::authorize::CommandVerdict::Refused(by, r)) => {
                println!("       command: {} at {:?} ({}: {})", r.reason.as_str(), r.node, by.join(", "), r.detail)
            }
            None => {}
        }
        if envelope.is_some() {
            println!("(the token's caveats were applied but its signature was not checked)");
        }
    }
    Ok(code)
}

/// `keygen agent NAME`.
pub fn keygen_agent(name: &str, json: bool) -> Result<i32, String> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) {
        return Err(format!("{name:?} is not an agent name (1-64 of A-Za-z0-9_.-)"));
    }
    // The fast stored form: the key is 256 random bits (docs/policy.md, "API keys").
    let (key, hash) = crate::broker::auth::api_key::generate()?;
    if json {
        println!("{}", serde_json::json!({ "agent": name, "api_key": key.expose(), "api_key_hash": hash }));
    } else {
        println!(
            "API key for agent {name:?} (shown once; give it to the agent, it is not stored anywhere):\n\n  {}\n",
            key.expose()
        );
        println!(
            "Add this line under agents.{name} in policy.yaml, then `ephyr policy reload`:\n\n  api_key_hash: \"{hash}\""
        );
    }
    Ok(0)
}

/// Shortest operator password accepted.
pub const MIN_PASSWORD: usize = 12;
/// Longest operator password accepted (Argon2 hashes any length; this bounds the console's form).
pub const MAX_PASSWORD: usize = 1024;

/// `operator add NAME [--role R] [--generate]`: the `operators.NAME` lines to paste. The password
/// is read from stdin (never the command line) or, with `generate`, made here and shown once.
pub fn operator_add(name: &str, role: &str, generate: bool) -> Result<i32, String> {
    use std::io::{IsTerminal as _, Read as _};
    if !crate::broker::policy::name_ok(name) {
        return Err(format!("{name:?} is not an operator name (1-64 of A-Za-z0-9_.-)"));
    }
    if !matches!(role, "viewer" | "admin") {
        return Err(format!("unknown role {role:?}: viewer or admin"));
    }
    let password = if generate {
        let mut raw = zeroize::Zeroizing::new([0u8; 15]);
        crate::secret::random_bytes(&mut raw[..]).map_err(|e| e.to_string())?;
        crate::secret::SecretString::new(data_encoding::BASE64URL_NOPAD.encode(&raw[..]))
    } else {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            return Err(format!(
                "the password is read from stdin, not typed here: `read -rs P && printf %s \"$P\" | ephyr operator add {name}`, \
                 or let ephyr make one: `ephyr operator add {name} --generate`"
            ));
        }
        let mut raw = zeroize::Zeroizing::new(Vec::new());
        stdin.lock().take(MAX_PASSWORD as u64 + 2).read_to_end(&mut raw).map_err(|e| format!("reading stdin: {e}"))?;
        while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            raw.pop();
        }
        let text = std::str::from_utf8(&raw).map_err(|_| "the password is not UTF-8".to_owned())?;
        crate::secret::SecretString::new(text.to_owned())
    };
    let n = password.expose().chars().count();
    if n < MIN_PASSWORD {
        return Err(format!("the password has {n} characters; at least {MIN_PASSWORD} are needed"));
    }
    if password.expose().len() > MAX_PASSWORD {
        return Err(format!("the password is longer than {MAX_PASSWORD} bytes"));
    }
    let hash = crate::broker::auth::api_key::argon2_hash(password.expose(), argon2::Params::default())?;
    if generate {
        println!(
            "Password for operator {name:?} (shown once; it is not stored anywhere):\n\n  {}\n",
            password.expose()
        );
    }
    println!(
        "Add these lines to policy.yaml, then `ephyr policy reload`:\n\noperators:\n  {name}:\n    role: {role}\n    password_hash: \"{hash}\""
    );
    Ok(0)
}

/// `policy reload`: asks the running broker.
pub fn reload(socket: &Path) -> Result<i32, String> {
    let (status, v) = super::client::request(socket, http::Method::POST, "/v1/policy/reload", None)?;
    for w in v["warnings"].as_array().into_iter().flatten() {
        println!("warning: {}", w.as_str().unwrap_or_default());
    }
    if status.is_success() {
        println!("reloaded: policy {}", v["digest"].as_str().unwrap_or("?"));
        Ok(0)
    } else {
        for p in v["problems"].as_array().into_iter().flatten() {
            println!("error: {}", p.as_str().unwrap_or_default());
        }
        println!("{}", v["message"].as_str().unwrap_or("reload failed; the previous policy stays in force"));
        Ok(3)
    }
}
