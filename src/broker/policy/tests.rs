//! Table-driven tests of policy loading and of `authorize`.

#![allow(clippy::type_complexity)] // table-driven tests list tuples

use std::time::Duration;

use super::*;
use crate::macaroon::{Envelope, reduce};

const ARGON: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQxMjM0NTY3OA$Vg6mXS4CYp5R4u+8s9GF1DvJ2Kq3yEa4TuaOI2p1y5c";

fn policy_text() -> String {
    format!(
        r#"version: 1
limits:
  cert_ttl_max: 30m
  task_ttl_max: 2h
  delegation_depth_max: 4
roles:
  read: {{ principal: agent-read }}
  op: {{ principal: agent-op }}
  admin: {{ principal: agent-admin }}
targets:
  web: {{ host: 10.0.0.5, allowed_roles: [read, op] }}
  db: {{ host: 10.0.0.6, allowed_roles: [read, op, admin] }}
  web-2: {{ host: 10.0.0.7, allowed_roles: [read, op] }}
  off: {{ host: 10.0.0.8, allowed_roles: [read], enabled: false }}
services:
  openai:
    url: https://api.openai.com/v1
    credential: {{ type: bearer, secret: env:OPENAI_API_KEY }}
    methods: [GET, POST]
    paths: ["/chat/*", /models]
  github:
    url: https://api.github.com
    credential: {{ type: header, header: Authorization, prefix: "token ", secret: store:github }}
remotes:
  fs:
    url: http://127.0.0.1:3001/mcp
    tools: [read_file, write_file, list_directory]
templates:
  readonly:
    ssh: {{ "*": {{ roles: [read] }} }}
    services: {{ github: {{ methods: [GET] }} }}
    dashboard: viewer
  ops:
    ssh: {{ "web*": {{ roles: [read, op] }} }}
    dashboard: operator
agents:
  claude:
    api_key_hash: "{ARGON}"
    inherits: [readonly, ops]
    ssh:
      db: {{ roles: [admin] }}
      web-2: {{ roles: [] }}
    services:
      openai: {{ methods: [POST], paths: ["/chat/*"] }}
    remotes:
      fs: {{ tools: [read_file, list_directory], args: {{ path: {{ prefix: /data }} }} }}
    can_delegate: true
    max_delegation_depth: 3
    max_task_ttl: 1h
  nobody:
    uid: 1234
    ssh: {{ web: {{ roles: [] }} }}
  disabled:
    uid: 1235
    enabled: false
    ssh: {{ "*": {{ roles: [read] }} }}
"#
    )
}

fn policy() -> Policy {
    Policy::parse(&policy_text(), "p.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn env(caveats: &[&str]) -> Envelope {
    reduce(caveats.iter().map(|c| c.as_bytes())).unwrap().envelope
}

fn decide<'p>(
    p: &'p Policy,
    agent: &str,
    token: Option<&Envelope>,
    tool: Option<&str>,
    kind: ActionKind<'_>,
) -> Decision<'p> {
    authorize(p, &Principal { agent, token, delegators: &[] }, &Action::new(tool, kind))
}

fn decide_call<'p>(
    p: &'p Policy,
    agent: &str,
    token: Option<&Envelope>,
    tool: &str,
    kind: ActionKind<'_>,
    values: &serde_json::Map<String, serde_json::Value>,
    declared: &[&str],
) -> Decision<'p> {
    authorize(p, &Principal { agent, token, delegators: &[] }, &Action::call(tool, kind, values, declared))
}

fn code(d: &Decision) -> Option<&'static str> {
    match d {
        Decision::Deny(x) => Some(x.code.as_str()),
        Decision::Allow(_) => None,
    }
}

/// Hardening issue, defect 2: a token's `arg.*` constraints bind every resource action, and a
/// constraint an action cannot evaluate refuses it (fail closed).
#[test]
fn token_argument_constraints_bind_every_resource_action() {
    let p = policy();
    let obj = |v: serde_json::Value| v.as_object().cloned().unwrap();
    let exec_params = ["target", "command", "role", "session_id", "timeout"];
    let only_uptime = env(&["arg.command IN [uptime]"]);
    let short = env(&["arg.timeout <= 10"]);
    let exec = |token: &Envelope, command: &str, args: serde_json::Value| {
        let a = obj(args);
        code(&decide_call(
            &p,
            "claude",
            Some(token),
            "exec",
            ActionKind::SshCommand { target: "web", role: "read", command },
            &a,
            &exec_params,
        ))
    };
    // The command is the action's own fact: checked whatever the arguments spell.
    assert_eq!(exec(&only_uptime, "uptime", serde_json::json!({"target": "web", "command": "uptime"})), None);
    assert_eq!(
        exec(&only_uptime, "rm -rf /", serde_json::json!({"target": "web", "command": "rm -rf /"})),
        Some("argument_constraint")
    );
    assert_eq!(
        exec(&only_uptime, "rm -rf /", serde_json::json!({"target": "web", "command": "uptime"})),
        Some("argument_constraint"),
        "the action's command, not a claimed argument"
    );
    // A call argument that is not a fact of the action (the timeout).
    assert_eq!(exec(&short, "uptime", serde_json::json!({"command": "uptime", "timeout": 5})), None);
    assert_eq!(
        exec(&short, "uptime", serde_json::json!({"command": "uptime", "timeout": 60})),
        Some("argument_constraint")
    );
    let d = decide_call(
        &p,
        "claude",
        Some(&short),
        "exec",
        ActionKind::SshCommand { target: "web", role: "read", command: "uptime" },
        &obj(serde_json::json!({"command": "uptime"})),
        &exec_params,
    );
    assert!(matches!(&d, Decision::Deny(x) if x.reason.contains("must be given explicitly")), "{d:?}");
    // Opening a session takes no command: the constraint cannot be checked there, so it refuses.
    let d = decide_call(
        &p,
        "claude",
        Some(&only_uptime),
        "session_create",
        ActionKind::Ssh { target: "web", role: "read" },
        &obj(serde_json::json!({"target": "web", "role": "read"})),
        &["target", "role"],
    );
    assert!(
        matches!(&d, Decision::Deny(x) if x.code.as_str() == "argument_constraint" && x.reason.contains("does not take")),
        "{d:?}"
    );
    // A request without arguments (the /v1/proxy route): facts still apply, others fail closed.
    let under_chat = env(&["arg.path prefix /chat"]);
    let route = |token: &Envelope, path: &str| {
        code(&decide(&p, "claude", Some(token), None, ActionKind::Http { service: "openai", method: "POST", path }))
    };
    assert_eq!(route(&under_chat, "/chat/completions"), None);
    assert_eq!(route(&env(&["arg.path prefix /chat/x"]), "/chat/completions"), Some("argument_constraint"));
    assert_eq!(route(&short, "/chat/completions"), Some("argument_constraint"));
    assert_eq!(route(&only_uptime, "/chat/completions"), Some("argument_constraint"));
    // Non-resource actions and reachability questions are not argument-checked.
    assert_eq!(code(&decide(&p, "claude", Some(&only_uptime), None, ActionKind::Task(TaskOp::Read))), None);
    let reach = authorize(
        &p,
        &Principal { agent: "claude", token: Some(&only_uptime), delegators: &[] },
        &Action::reach(Some("exec"), ActionKind::Ssh { target: "web", role: "read" }),
    );
    assert!(reach.is_allow());
}

#[test]
fn ssh_table() {
    let p = policy();
    let t_web = env(&["target IN [web]"]);
    let r_read = env(&["role IN [read]"]);
    let cases: Vec<(&str, &str, &str, Option<&Envelope>, Option<&str>)> = vec![
        // agent, target, role, token, expected deny code (None = allow)
        ("claude", "web", "read", None, None), // template ops (web*) more specific than readonly (*)
        ("claude", "web", "op", None, None),
        ("claude", "db", "admin", None, None), // exact grant beats templates
        ("claude", "db", "read", None, Some("policy_denies_role")), // exact db grant shadows the * template
        ("claude", "web-2", "read", None, Some("policy_denies_role")), // roles: [] grants nothing and shadows web*
        ("claude", "nowhere", "read", None, Some("unknown_target")),
        ("claude", "web", "sudo", None, Some("unknown_role")),
        ("claude", "off", "read", None, Some("target_disabled")),
        ("claude", "web", "read", Some(&t_web), None),
        ("claude", "db", "admin", Some(&t_web), Some("token_denies_target")),
        ("claude", "web", "op", Some(&r_read), Some("token_denies_role")),
        ("nobody", "web", "read", None, Some("policy_denies_role")),
        ("nobody", "db", "read", None, Some("policy_denies_target")),
        ("disabled", "web", "read", None, Some("agent_disabled")),
        ("ghost", "web", "read", None, Some("unknown_agent")),
    ];
    for (agent, target, role, token, want) in cases {
        let d = decide(&p, agent, token, Some("exec"), ActionKind::Ssh { target, role });
        assert_eq!(code(&d), want, "{agent} {target} {role} {token:?}: {d:?}");
        if let Decision::Deny(x) = &d {
            assert!(!x.reason.is_empty());
        }
    }
    // The rule behind an allow, and the principal.
    match decide(&p, "claude", None, None, ActionKind::Ssh { target: "web", role: "op" }) {
        Decision::Allow(g) => {
            assert_eq!(g.rule.to_string(), "templates.ops.ssh.web*");
            assert_eq!(g.principal, Some("agent-op"));
        }
        d => panic!("{d:?}"),
    }
    match decide(&p, "claude", None, None, ActionKind::Ssh { target: "db", role: "admin" }) {
        Decision::Allow(g) => assert_eq!(g.rule.to_string(), "agents.claude.ssh.db"),
        d => panic!("{d:?}"),
    }
    // A role granted by a wildcard but not allowed on the target.
    let admin_everywhere = Policy::parse(
        "roles: {read: {principal: r}, admin: {principal: a}}\ntargets: {web: {host: h, allowed_roles: [read]}}\nagents: {x: {uid: 1, ssh: {'*': {roles: [admin]}}}}\n",
        "q.yaml",
    )
    .unwrap();
    let d = decide(&admin_everywhere, "x", None, None, ActionKind::Ssh { target: "web", role: "admin" });
    assert_eq!(code(&d), Some("role_not_allowed_on_target"));
}

#[test]
fn tool_dimension_of_the_token() {
    let p = policy();
    let only_list = env(&["tool IN [list_targets]"]);
    let d = decide(&p, "claude", Some(&only_list), Some("exec"), ActionKind::Ssh { target: "web", role: "read" });
    assert_eq!(code(&d), Some("token_denies_tool"));
    let d = decide(&p, "claude", Some(&only_list), Some("list_targets"), ActionKind::Discover);
    assert_eq!(code(&d), None);
    // API-key callers have no token: the tool dimension does not apply.
    assert_eq!(code(&decide(&p, "claude", None, Some("exec"), ActionKind::Ssh { target: "web", role: "read" })), None);
}

#[test]
fn http_table() {
    let p = policy();
    let svc_gh = env(&["service IN [github]"]);
    let get_only = env(&["method IN [GET]"]);
    let under_chat = env(&["arg.path prefix /chat/completions"]);
    let cases: Vec<(&str, &str, &str, Option<&Envelope>, Option<&str>)> = vec![
        ("openai", "POST", "/chat/completions", None, None),
        ("openai", "GET", "/chat/completions", None, Some("method_not_allowed")), // grant: POST only
        ("openai", "DELETE", "/chat/x", None, Some("method_not_allowed")),        // service: GET, POST
        ("openai", "POST", "/models", None, Some("path_not_allowed")),            // grant: /chat/* only
        ("openai", "POST", "/files", None, Some("path_not_allowed")),             // service paths
        ("openai", "POST", "/chatty", None, Some("path_not_allowed")),            // segment boundary
        ("github", "GET", "/repos/x", None, None),
        ("github", "POST", "/repos/x", None, Some("method_not_allowed")),
        ("stripe", "GET", "/", None, Some("unknown_service")),
        ("openai", "POST", "/chat/completions", Some(&svc_gh), Some("token_denies_service")),
        ("github", "GET", "/user", Some(&get_only), None),
        ("openai", "POST", "/chat/completions", Some(&get_only), Some("token_denies_method")),
        ("openai", "POST", "/chat/completions", Some(&under_chat), None),
        ("openai", "POST", "/chat/other", Some(&under_chat), Some("argument_constraint")),
    ];
    for (service, method, path, token, want) in cases {
        let d = decide(&p, "claude", token, Some("http_request"), ActionKind::Http { service, method, path });
        assert_eq!(code(&d), want, "{service} {method} {path} {token:?}: {d:?}");
    }
    assert_eq!(
        code(&decide(&p, "nobody", None, None, ActionKind::Http { service: "github", method: "GET", path: "/" })),
        Some("policy_denies_service")
    );
}

#[test]
fn remote_tool_table_with_argument_constraints() {
    let p = policy();
    let declared = ["path"];
    let args = |path: Option<&str>| {
        let mut m = serde_json::Map::new();
        if let Some(x) = path {
            m.insert("path".into(), serde_json::json!(x));
        }
        m
    };
    let narrow = env(&["arg.path prefix /data/reports"]);
    let no_fs = env(&["remote IN [other]"]);
    let cases: Vec<(&str, Option<&str>, Option<&Envelope>, Option<&str>)> = vec![
        ("read_file", Some("/data/x.txt"), None, None),
        ("read_file", Some("/data/../etc/passwd"), None, Some("argument_constraint")),
        ("read_file", Some("/database/x"), None, Some("argument_constraint")),
        ("read_file", None, None, Some("argument_constraint")), // declared but omitted: no default sneaks past
        ("write_file", Some("/data/x"), None, Some("policy_denies_tool")), // grant lists read_file, list_directory
        ("delete_everything", Some("/data/x"), None, Some("policy_denies_tool")), // remote does not offer it
        ("read_file", Some("/data/reports/q3"), Some(&narrow), None),
        ("read_file", Some("/data/other"), Some(&narrow), Some("argument_constraint")),
        ("read_file", Some("/data/x"), Some(&no_fs), Some("token_denies_remote")),
    ];
    for (tool, path, token, want) in cases {
        let a = args(path);
        let d = decide_call(
            &p,
            "claude",
            token,
            "fs.read_file",
            ActionKind::RemoteTool { remote: "fs", tool },
            &a,
            &declared,
        );
        assert_eq!(code(&d), want, "{tool} {path:?} {token:?}: {d:?}");
    }
    // A tool without a `path` argument cannot be checked against a `path` constraint: refused
    // (fail closed; `tool_args` scopes a constraint to the tools that take the argument).
    let a = args(None);
    let d =
        decide_call(&p, "claude", None, "fs", ActionKind::RemoteTool { remote: "fs", tool: "list_directory" }, &a, &[]);
    assert_eq!(code(&d), Some("argument_constraint"));
    assert!(format!("{d:?}").contains("does not take"), "{d:?}");
    assert_eq!(
        code(&decide(&p, "nobody", None, None, ActionKind::RemoteTool { remote: "fs", tool: "read_file" })),
        Some("policy_denies_remote")
    );
    assert_eq!(
        code(&decide(&p, "claude", None, None, ActionKind::RemoteTool { remote: "nope", tool: "x" })),
        Some("unknown_remote")
    );
}

#[test]
fn tool_args_scope_a_constraint_to_one_tool() {
    let p = Policy::parse(
        "remotes: { ev: { url: 'http://127.0.0.1:1/mcp' } }\nagents: { a: { uid: 4323, remotes: { ev: { tools: [echo, get-sum], tool_args: { get-sum: { a: { max: 100 } } } } } } }",
        "p.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let call = |tool: &str, v: serde_json::Value, declared: &[&str]| {
        let m = v.as_object().unwrap().clone();
        code(&decide_call(&p, "a", None, "ev.x", ActionKind::RemoteTool { remote: "ev", tool }, &m, declared))
    };
    assert_eq!(call("echo", serde_json::json!({"message": "hi"}), &["message"]), None, "echo is not constrained");
    assert_eq!(call("get-sum", serde_json::json!({"a": 5, "b": 1}), &["a", "b"]), None);
    assert_eq!(call("get-sum", serde_json::json!({"a": 500, "b": 1}), &["a", "b"]), Some("argument_constraint"));
    assert_eq!(call("get-sum", serde_json::json!({"b": 1}), &["a", "b"]), Some("argument_constraint"));
    assert!(
        problems("remotes: { ev: { url: 'http://x' } }\nagents: { a: { remotes: { ev: { tools: [echo], tool_args: { get-sum: { a: { max: 1 } } } } } } }")
            .iter()
            .any(|e| e.contains("is not among the grant's tools")),
        "a constraint for a tool the grant does not cover"
    );
}

#[test]
fn remote_tool_patterns_and_deny_patterns() {
    let p = Policy::parse(
        "remotes: { fs: { url: 'http://127.0.0.1:1/mcp' } }\nagents: { a: { uid: 4322, remotes: { fs: { tools: ['read_*', list_directory], deny_tools: ['*secret*'] } } } }",
        "p.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for (tool, want) in [
        ("read_file", None),
        ("read_multiple_files", None),
        ("list_directory", None),
        ("write_file", Some("policy_denies_tool")),
        ("read_secret_file", Some("policy_denies_tool")),
        ("list_directory_x", Some("policy_denies_tool")),
    ] {
        let d = decide(&p, "a", None, None, ActionKind::RemoteTool { remote: "fs", tool });
        assert_eq!(code(&d), want, "{tool}: {d:?}");
    }
    let d = decide(&p, "a", None, None, ActionKind::RemoteTool { remote: "fs", tool: "read_secret_file" });
    assert!(format!("{d:?}").contains("deny_tools"), "the reason names the rule: {d:?}");
}

#[test]
fn nested_numeric_and_pattern_constraints_by_json_pointer() {
    let p = Policy::parse(
        r#"
remotes:
  fs: { url: "http://127.0.0.1:3001/mcp" }
agents:
  a:
    uid: 4321
    remotes:
      fs:
        args:
          "/paths/*": { prefix: /data }
          "/options/depth": { min: 1, max: 5 }
          branch: { glob: ["feature/*", "fix-?"] }
"#,
        "p.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let declared = ["paths", "options", "branch"];
    let good = serde_json::json!({"paths": ["/data/a", "/data/b/c"], "options": {"depth": 3}, "branch": "feature/x"});
    let with = |patch: serde_json::Value| {
        let mut v = good.clone();
        for (k, x) in patch.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        v.as_object().unwrap().clone()
    };
    let narrow = env(&["arg./paths/* prefix /data/reports", "arg.branch LIKE [feature/a*]", "arg./options/depth >= 2"]);
    let cases: Vec<(serde_json::Value, Option<&Envelope>, Option<&str>)> = vec![
        (serde_json::json!({}), None, None),
        (serde_json::json!({"paths": []}), None, None),
        (serde_json::json!({"paths": ["/data/a", "/etc/passwd"]}), None, Some("argument_constraint")),
        (serde_json::json!({"paths": ["/data/../etc"]}), None, Some("argument_constraint")),
        (serde_json::json!({"paths": "/data/a"}), None, Some("argument_constraint")), // not a list
        (serde_json::json!({"paths": [7]}), None, Some("argument_constraint")),
        (serde_json::json!({"options": {}}), None, Some("argument_constraint")), // nested one left out
        (serde_json::json!({"options": {"depth": 0}}), None, Some("argument_constraint")),
        (serde_json::json!({"options": {"depth": 6}}), None, Some("argument_constraint")),
        (serde_json::json!({"options": {"depth": "3"}}), None, Some("argument_constraint")),
        (serde_json::json!({"options": [3]}), None, Some("argument_constraint")),
        (serde_json::json!({"branch": "main"}), None, Some("argument_constraint")),
        (serde_json::json!({"branch": "fix-12"}), None, Some("argument_constraint")),
        (serde_json::json!({"branch": "fix-1"}), None, None),
        (serde_json::json!({"branch": null}), None, Some("argument_constraint")),
        (
            serde_json::json!({"paths": ["/data/reports/q3"], "branch": "feature/abc", "options": {"depth": 2}}),
            Some(&narrow),
            None,
        ),
        (
            serde_json::json!({"paths": ["/data/reports/q3", "/data/x"], "branch": "feature/abc", "options": {"depth": 2}}),
            Some(&narrow),
            Some("argument_constraint"),
        ),
        (
            serde_json::json!({"paths": ["/data/reports/q3"], "branch": "feature/b", "options": {"depth": 2}}),
            Some(&narrow),
            Some("argument_constraint"),
        ),
        (
            serde_json::json!({"paths": ["/data/reports/q3"], "branch": "feature/abc", "options": {"depth": 1}}),
            Some(&narrow),
            Some("argument_constraint"),
        ),
    ];
    for (patch, token, want) in cases {
        let a = with(patch.clone());
        let d = decide_call(&p, "a", token, "fs.t", ActionKind::RemoteTool { remote: "fs", tool: "t" }, &a, &declared);
        assert_eq!(code(&d), want, "{patch} {token:?}: {d:?}");
    }
    // The narrowing guarantee holds for the new forms: a rule accepts a subset of another's.
    use crate::macaroon::envelope::ArgRule;
    let set = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<std::collections::BTreeSet<_>>();
    let like = |xs: &[&str]| ArgRule { like: vec![set(xs)], ..Default::default() };
    assert!(like(&["feature/a*"]).is_subset_of(&like(&["feature/a*", "fix-?"])));
    assert!(!like(&["feature/*"]).is_subset_of(&like(&["feature/a*"])), "not provable: refused");
    let values = ArgRule { one_of: Some(set(&["feature/x", "fix-1"])), ..Default::default() };
    assert!(values.is_subset_of(&like(&["feature/*", "fix-?"])));
    assert!(!ArgRule::default().is_subset_of(&like(&["*"])));
    let min = |n: f64| ArgRule { at_least: Some(n), ..Default::default() };
    assert!(min(2.0).is_subset_of(&min(1.0)) && !min(1.0).is_subset_of(&min(2.0)));
}

#[test]
fn task_and_dashboard_table() {
    let p = policy();
    let h = Duration::from_secs(3600);
    let no_deleg = env(&["can_delegate = false"]);
    let one_more = env(&["delegation_depth <= 1"]);
    let cases: Vec<(&str, Option<&Envelope>, TaskOp, Option<&str>)> = vec![
        ("claude", None, TaskOp::Create { ttl: h }, None),
        ("claude", None, TaskOp::Create { ttl: 2 * h }, Some("ttl_exceeded")),
        ("claude", None, TaskOp::Delegate { ttl: h, child_depth: 3, parent_depth: 2 }, None),
        ("claude", None, TaskOp::Delegate { ttl: h, child_depth: 4, parent_depth: 3 }, Some("depth_exceeded")),
        ("claude", None, TaskOp::Delegate { ttl: 2 * h, child_depth: 1, parent_depth: 0 }, Some("ttl_exceeded")),
        (
            "claude",
            Some(&no_deleg),
            TaskOp::Delegate { ttl: h, child_depth: 1, parent_depth: 0 },
            Some("delegation_not_allowed"),
        ),
        ("claude", Some(&one_more), TaskOp::Delegate { ttl: h, child_depth: 1, parent_depth: 0 }, None),
        (
            "claude",
            Some(&one_more),
            TaskOp::Delegate { ttl: h, child_depth: 2, parent_depth: 0 },
            Some("depth_exceeded"),
        ),
        ("nobody", None, TaskOp::Delegate { ttl: h, child_depth: 1, parent_depth: 0 }, Some("delegation_not_allowed")),
        ("nobody", None, TaskOp::Read, None),
    ];
    for (agent, token, op, want) in cases {
        let d = decide(&p, agent, token, Some("task_delegate"), ActionKind::Task(op));
        assert_eq!(code(&d), want, "{agent} {op:?} {token:?}: {d:?}");
    }
    // readonly (viewer) comes before ops (operator) in inherits: viewer.
    assert_eq!(code(&decide(&p, "claude", None, None, ActionKind::Dashboard(DashboardLevel::Viewer))), None);
    assert_eq!(
        code(&decide(&p, "claude", None, None, ActionKind::Dashboard(DashboardLevel::Operator))),
        Some("dashboard_level")
    );
    assert_eq!(
        code(&decide(&p, "nobody", None, None, ActionKind::Dashboard(DashboardLevel::Viewer))),
        Some("dashboard_level")
    );
}

#[test]
fn templates_first_definition_wins_and_agent_overrides() {
    let p = policy();
    let a = &p.agents["claude"];
    // readonly is listed first: its dashboard level wins over ops'.
    assert_eq!(a.dashboard, DashboardLevel::Viewer, "first template that sets dashboard wins");
    let sources: Vec<&str> = a.ssh.entries().iter().map(|e| e.source.as_str()).collect();
    assert_eq!(
        sources,
        ["agents.claude.ssh.db", "agents.claude.ssh.web-2", "templates.ops.ssh.web*", "templates.readonly.ssh.*"],
        "most specific first"
    );
    assert_eq!(p.signer_principals().into_iter().collect::<Vec<_>>(), ["agent-admin", "agent-op", "agent-read"]);
    assert_eq!(p.agent_for_uid(1234).unwrap().name, "nobody");
    assert_eq!(p.digest.len(), 64);
}

fn problems(text: &str) -> Vec<String> {
    Policy::parse(text, "p.yaml").map(|_| vec![]).unwrap_or_else(|e| e.problems.iter().map(|p| p.to_string()).collect())
}

#[test]
fn every_problem_is_listed_with_its_location_key_and_hint() {
    let text = "version: 1\nroles:\n  read: {principal: agent-read}\ntargets:\n  web:\n    host: 10.0.0.5\n    allowed_roles: [read, admin]\n  typo:\n    host: 10.0.0.9\n    rolez: [x]\n  db:\n    host: 10.0.0.6\n    port: 99999\nagents:\n  claude:\n    ssh:\n      web: {roles: [op]}\n    api_key_hash: \"$2b$10$abcdefghijklmnopqrstuv\"\n  other:\n    dashbord: admin\ntargetz: {}\n";
    let ps = problems(text);
    let find = |needle: &str| {
        ps.iter()
            .find(|p| p.contains(needle))
            .unwrap_or_else(|| panic!("no problem containing {needle:?} in {ps:#?}"))
            .clone()
    };
    assert!(find("unknown field `rolez`").starts_with("p.yaml:10:5: targets.typo.rolez: unknown field"), "{ps:#?}");
    assert!(find("unknown role \"admin\"").starts_with("p.yaml:7:5: targets.web.allowed_roles:"));
    assert!(find("port 99999").starts_with("p.yaml:13:5: targets.db.port:"));
    assert!(find("unknown role \"op\"").starts_with("p.yaml:17:7: agents.claude.ssh.web.roles:"));
    assert!(find("bcrypt hashes").contains("hint: run `ephyr keygen agent claude`"));
    assert!(find("unknown field `dashbord`").starts_with("p.yaml:20:5: agents.other.dashbord:"));
    assert!(find("unknown section \"targetz\"").starts_with("p.yaml:21:1:"));
    // All problems are listed, not just the first.
    assert_eq!(ps.len(), 7, "{ps:#?}");
}

#[test]
fn a_typo_in_a_value_gets_a_line_and_column() {
    let ps =
        problems("roles:\n  read: {principal: agent-read}\ntargets:\n  web:\n    host: x\n    allowed_roles: [raed]\n");
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert!(ps[0].starts_with("p.yaml:6:5: targets.web.allowed_roles: unknown role \"raed\" (hint: define it under roles: (roles defined: read))"), "{}", ps[0]);
    let syntax = problems("agents:\n  a: [1,\n  b: 2\n");
    assert!(syntax[0].starts_with("p.yaml:4:1:") && syntax[0].contains("YAML syntax"), "{syntax:?}");
}

#[test]
fn semantic_checks() {
    let cases = [
        ("limits: {cert_ttl_max: 48h}", "limits.cert_ttl_max: is 2d, outside 1s..1d (the signer's hard cap)"),
        ("limits: {cert_ttl_max: soon}", "durations look like"),
        ("limits: {signer_rate: '5'}", "is not a rate"),
        ("limits: {signer_rate: 5}", "limits.signer_rate: invalid type: integer `5`, expected a string"),
        ("roles: {r: {principal: '-rf'}}", "is not a valid user name"),
        ("roles: {r: {principal: x, shell: bash}}", "absolute path"),
        ("targets: {a: {host: h1}, b: {host: h1}}", "is already target"),
        ("targets: {a: {host: h, host_key: 'ssh-ed25519 nope'}}", "not an OpenSSH public key"),
        ("targets: {a: {host: h, host_key_fingerprint: 'MD5:aa'}}", "is not a SHA256"),
        ("limits: {host_key_strict: true}\ntargets: {a: {host: h}}", "requires a host_key"),
        ("targets: {a: {host: h, max_ttl: 2h}}", "is 2h, above limits.cert_ttl_max (30m)"),
        ("targets: {a: {host: h, auto_approve: false}}", "pending approvals are not supported"),
        ("targets: {a: {host: h, extensions: [permit-everything]}}", "unknown extension"),
        ("targets: {a: {host: h, source_address: 'not-an-ip'}}", "is not an IP or CIDR"),
        ("targets: {a: {host: h, verify_on_target: true, force_command: id}}", "remove force_command"),
        (
            "targets: {a: {host: h, verify_on_target: true, shim_path: 'ephyr'}}",
            "targets.a.shim_path: an absolute path",
        ),
        ("targets: {a: {host: h, verify_on_target: true, shim_ca: '/x; rm -rf /'}}", "without spaces or shell"),
        ("targets: {a: {host: h, shim_path: /usr/bin/ephyr}}", "only with verify_on_target: true"),
        ("targets: {a: {host: h, commands: {allow: ['ls a... b']}}}", "targets.a.commands.allow"),
        ("targets: {a: {host: h, commands: {deny: ['/bin/rm']}}}", "a denied program is a base name"),
        ("targets: {a: {host: h, commands: {pipes: true}}}", "unknown field `pipes`"),
        ("roles: {r: {principal: x, commands: {allow: ['']}}}", "roles.r.commands.allow"),
        ("limits: {recordings_max_size: 1KiB}", "at least 1MiB"),
        ("limits: {recordings_max_files: 0}", "limits.recordings_max_files: at least 1"),
        ("limits: {file_max_size: 65MiB}", "limits.file_max_size: a size from 1 byte to 64MiB"),
        ("limits: {session_idle: 1s}", "limits.session_idle: from 10s to 24h"),
        ("limits: {session_max: 30d}", "limits.session_max: from 10s to 7d"),
        ("limits: {output_max: 10B}", "limits.output_max: a size from 1KiB to 64MiB"),
        ("targets: {a: {host: h, files: {read: ['etc/*']}}}", "targets.a.files.read"),
        ("targets: {a: {host: h, files: {write: ['/srv/../etc/*']}}}", "targets.a.files.write"),
        ("targets: {a: {host: h, files: {append: ['/srv/*']}}}", "unknown field `append`"),
        ("targets: {a: {host: h, verify_on_target: true, files: {read: ['/srv/*']}}}", "which a forced command"),
        ("targets: {a: {host: h, force_command: id, files: {read: ['/srv/*']}}}", "which a forced command"),
        ("services: {s: {url: 'ftp://x'}}", "only http and https"),
        ("services: {s: {url: 'https://u:p@x'}}", "credentials in the URL are not allowed"),
        ("services: {s: {url: 'https://x', credential: {type: bearer, secret: hunter2}}}", "is not a secret reference"),
        ("services: {s: {url: 'https://x', credential: {type: magic, secret: 'env:X'}}}", "unknown credential type"),
        (
            "services: {s: {url: 'https://x', credential: {type: bearer, secret: 'env:X'}, allowed_hosts: ['*']}}",
            "cannot be used with a credential",
        ),
        ("services: {s: {url: 'https://x', allowed_hosts: ['0x7f.1']}}", "is not a host name"),
        ("services: {s: {url: 'http://2130706433'}}", "dotted-decimal"),
        ("services: {s: {url: 'http://x/a/../b'}}", "normalised"),
        ("services: {s: {url: 'http://x', read_timeout: 0s}}", "longer than 0s"),
        ("services: {s: {url: 'https://x', methods: [get]}}", "upper case"),
        ("services: {s: {url: 'https://x', paths: ['/a/../b']}}", "path pattern"),
        ("services: {s: {url: 'https://x', headers: {Authorization: x}}}", "cannot be a static header"),
        ("services: {s: {url: 'https://x', max_response: 10MB}}", "a size looks like"),
        ("remotes: {r.x: {url: 'http://x'}}", "no dots"),
        ("remotes: {a: {url: 'http://x', tool_prefix: fs}, fs: {url: 'http://y'}}", "would collide"),
        ("remotes: {r: {description: x}}", "needs a url (Streamable HTTP) or a command (stdio)"),
        ("remotes: {r: {url: 'http://x', command: [node]}}", "either url (HTTP) or command (stdio)"),
        ("remotes: {r: {command: []}}", "the command needs a program"),
        ("remotes: {r: {command: ['']}}", "the command needs a program"),
        ("remotes: {r: {url: 'http://x', sandbox: {read: [/x]}}}", "remotes.r.sandbox: sandbox applies to a command"),
        ("remotes: {r: {url: 'http://x', env: {A: b}}}", "env applies to a command"),
        ("remotes: {r: {command: [x], credential: {type: bearer, secret: 'env:X'}}}", "credential applies to a url"),
        ("remotes: {r: {command: [x], tls: {ca_file: /ca.pem}}}", "tls applies to a url"),
        ("remotes: {r: {command: [x], env: {1BAD: x}}}", "\"1BAD\" is not a variable name"),
        ("remotes: {r: {command: [x], env: {A: x}, secret_env: {A: 'env:B'}}}", "A is set in env too"),
        ("remotes: {r: {command: [x], secret_env: {A: hunter2}}}", "is not a secret reference"),
        ("remotes: {r: {command: [x], cwd: tmp}}", "remotes.r.cwd: \"tmp\": use an absolute path"),
        (
            "remotes: {r: {command: [x], sandbox: {read: [relative]}}}",
            "remotes.r.sandbox.read: \"relative\": use an absolute path",
        ),
        ("remotes: {r: {command: [x], sandbox: {write: [/srv/../etc]}}}", "without . or .. segments"),
        ("remotes: {r: {command: [x], sandbox: {memory: 1MiB}}}", "at least 16MiB"),
        ("remotes: {r: {command: [x], sandbox: {open_files: 3}}}", "out of range"),
        ("remotes: {r: {command: [x], sandbox: {nework: false}}}", "unknown field `nework`"),
        (
            "remotes: {r: {url: 'https://x', tls: {fingerprint: 'SHA256:abc'}}}",
            "is not a SHA-256 certificate fingerprint",
        ),
        ("remotes: {r: {url: 'https://x', tls: {ca_file: /ca.pem, fingerprint: 'SHA256:abab'}}}", "is not a SHA-256"),
        ("remotes: {r: {url: 'http://x', headers: {Mcp-Session-Id: s}}}", "cannot be a static header"),
        ("remotes: {r: {url: 'http://x', headers: {Authorization: s}}}", "cannot be a static header"),
        ("remotes: {r: {command: [x], headers: {X-A: b}}}", "headers apply to a url"),
        ("remotes: {r: {url: 'http://x', max_response: 1TiB}}", "between 1KiB and 64MiB"),
        ("remotes: {r: {command: [x], oauth: {}}}", "oauth applies to a url"),
        (
            "remotes: {r: {url: 'https://x', oauth: {}, credential: {type: bearer, secret: 'env:T'}}}",
            "either credential (a fixed secret) or oauth",
        ),
        ("remotes: {r: {url: 'https://x', oauth: {client_secret: 'env:S'}}}", "belongs to a pre-registered client_id"),
        ("remotes: {r: {url: 'https://x', oauth: {client_id_url: 'http://x/c.json'}}}", "not an https URL with a path"),
        ("remotes: {r: {url: 'https://x', oauth: {client_id_url: 'https://x'}}}", "not an https URL with a path"),
        ("remotes: {r: {url: 'https://x', oauth: {redirect_uri: 'http://evil.example/cb'}}}", "redirect URI"),
        ("remotes: {r: {url: 'https://x', oauth: {scopes: ['a b']}}}", "is not a scope"),
        ("remotes: {r: {url: 'https://x', oauth: {per_agnt: true}}}", "unknown field `per_agnt`"),
        ("network: {allow: [10.0.0.0/33]}", "prefix length"),
        ("agents: {a: {inherits: [nope]}}", "unknown template"),
        ("agents: {a: {ssh: {nowhere: {roles: []}}}}", "unknown target"),
        ("agents: {a: {api_key_hash: plain}}", "neither ephyr-sha256$<id>$<digest> nor an Argon2id PHC string"),
        ("agents: {a: {api_key_hash: 'ephyr-sha256$AAAAAAAAAAA$short'}}", "not a valid ephyr-sha256 hash: the digest"),
        (
            "agents: {a: {api_key_hash: '$argon2id$v=19$m=4000000,t=2,p=1$c29tZXNhbHQxMjM0NTY3OA$Vg6mXS4CYp5R4u+8s9GF1DvJ2Kq3yEa4TuaOI2p1y5c'}}",
            "exceeds m=65536",
        ),
        ("mcp: {allowed_origins: ['https://x/path']}", "is not an origin"),
        ("mcp: {max_request_size: 1TiB}", "between 1KiB and 64MiB"),
        ("mcp: {session_idle_timeout: 0s}", "longer than 0s"),
        ("mcp: {nope: 1}", "unknown field"),
        ("agents: {a: {uid: 5}, b: {uid: 5}}", "uid 5 is already agent"),
        ("agents: {a: {dashboard: god}}", "unknown dashboard level"),
        ("agents: {a: {max_task_ttl: 3h}}", "is 3h, above limits.task_ttl_max (1h)"),
        ("agents: {a: {remotes: {'*': {args: {p: {}}}}}}", "needs prefix, max, min, one_of or glob"),
        ("agents: {a: {remotes: {'*': {args: {'/a//b': {max: 1}}}}}}", "is not an argument name"),
        ("agents: {a: {remotes: {'*': {args: {'a.b': {max: 1}}}}}}", "is not an argument name"),
        ("agents: {a: {remotes: {'*': {args: {n: {min: 5, max: 1}}}}}}", "at most max"),
        ("agents: {a: {remotes: {'*': {args: {b: {glob: []}}}}}}", "glob must list"),
        (
            "operators: {o: {password_hash: '$argon2id$v=19$m=4000000,t=2,p=1$c29tZXNhbHQxMjM0NTY3OA$Vg6mXS4CYp5R4u+8s9GF1DvJ2Kq3yEa4TuaOI2p1y5c'}}",
            "exceeds m=65536",
        ),
        ("operators: {o: {password_hash: 'hunter2'}}", "not an Argon2id PHC hash"),
        (
            "operators: {o: {role: root, password_hash: '$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQxMjM0NTY3OA$Vg6mXS4CYp5R4u+8s9GF1DvJ2Kq3yEa4TuaOI2p1y5c'}}",
            "unknown role \"root\"",
        ),
        ("operators: {'bad name': {password_hash: x}}", "operator names are"),
        ("operators: {o: {password: x}}", "unknown field"),
        ("runs: {r: {lease: 3s}}", "names the SSH role its runs connect as"),
        ("runs: {r: {role: nope}}", "runs.r.role: no role \"nope\""),
        ("roles: {x: {principal: u}}\nruns: {r: {role: x, lease: 1s}}", "a lease is 3s to 10m"),
        ("roles: {x: {principal: u}}\nruns: {r: {role: x, ttl: 2h}}", "longer than limits.task_ttl_max"),
        ("roles: {x: {principal: u}}\nruns: {r: {role: x, agents: [ghost]}}", "no agent \"ghost\""),
        ("roles: {x: {principal: u}}\nruns: {r: {role: x, envelope: {targets: []}}}", "non-empty list of names"),
        (
            "roles: {x: {principal: u}}\nruns: {r: {role: x, envelope: {hosts: [a]}}}",
            "\"hosts\" is not an envelope field",
        ),
        ("roles: {x: {principal: u}}\nruns: {r: {role: x, budget: {tokens: 0}}}", "a budget of 0 allows nothing"),
        ("roles: {x: {principal: u}}\nruns: {r: {role: x, keys: [s]}}", "no service \"s\""),
        (
            "roles: {x: {principal: u}}\nservices: {s: {url: 'https://x'}}\nruns: {r: {role: x, keys: [s]}}",
            "has no mint: section",
        ),
        ("roles: {x: {principal: u}}\nruns: {r: {role: x, broker_url: 'http://b:1/mcp'}}", "has no path"),
        (
            "services: {s: {url: 'https://x', mint: {provider: azure, admin_key: 'env:K', project: proj_a}}}",
            "\"azure\" cannot mint keys",
        ),
        (
            "services: {s: {url: 'https://x', mint: {provider: openai, admin_key: sk-1, project: proj_a}}}",
            "is not a secret reference",
        ),
        (
            "services: {s: {url: 'https://x', mint: {provider: openai, admin_key: 'env:K', project: p1}}}",
            "looks like proj_abc123",
        ),
        ("version: 2", "unsupported policy version"),
        ("- a\n- b", "must be a YAML mapping"),
        ("limits: {}\nglobal: {}", "not both"),
    ];
    for (text, want) in cases {
        let ps = problems(text);
        assert!(ps.iter().any(|p| p.contains(want)), "{text:?}: want {want:?} in {ps:#?}");
    }
    assert!(problems("").is_empty(), "an empty policy loads (and grants nothing)");
    let ok = Policy::parse(
        "remotes: {fs: {command: [node, /opt/fs.js, /srv], env: {HOME: /srv}, secret_env: {TOKEN: 'store:fs'}, sandbox: {read: [/opt/], write: [/srv], memory: 256MiB}}}",
        "p.yaml",
    )
    .unwrap();
    let Transport::Stdio(c) = &ok.remotes["fs"].transport else { panic!("a stdio remote") };
    let missing = Policy::parse(
        "remotes: {fs: {command: [/nonexistent/bin/x], sandbox: {read: [/nonexistent/ephyr-test]}}}",
        "p.yaml",
    )
    .unwrap();
    assert!(
        missing
            .warnings
            .iter()
            .any(|w| w.contains("remotes.fs.sandbox.read") && w.contains("does not exist on this machine"))
            && missing.warnings.iter().any(|w| w.contains("remotes.fs.command")),
        "a program or sandbox path missing here is a warning, not an error: {:?}",
        missing.warnings
    );
    let pinned = Policy::parse(
        &format!("remotes: {{r: {{url: 'https://x', tls: {{fingerprint: 'SHA256:{}'}}}}}}", "AB:".repeat(31) + "AB"),
        "p.yaml",
    )
    .unwrap();
    assert_eq!(pinned.remotes["r"].tls.fingerprint, Some([0xab; 32]), "openssl's form, colons and all");
    assert!(
        problems(&format!(
            "remotes: {{r: {{url: 'https://x', tls: {{ca_file: /ca.pem, fingerprint: 'SHA256:{}'}}}}}}",
            "ab".repeat(32)
        ))
        .iter()
        .any(|p| p.contains("not both")),
        "a pin and a CA at once"
    );
    assert_eq!((c.read.as_slice(), c.write.as_slice()), (&["/opt".to_owned()][..], &["/srv".to_owned()][..]));
    assert_eq!((c.memory, c.open_files, c.processes, c.network), (256 << 20, 256, 256, false));
    assert_eq!(ok.store_refs().get("fs").map(Vec::len), Some(1), "secret_env store references are known");
}

#[test]
fn go_ephyr_policy_loads_or_gets_precise_messages() {
    // Every key of the Go Ephyr schema (reference/ephyr-features.md §5.1).
    let go = include_str!("../../../tests/fixtures/ephyr-go-policy.yaml");
    let ps = problems(go);
    let want = [
        "targets.legacy-box.auto_approve: pending approvals are not supported",
        "targets.dockerhost.auto_revoke_on_deny: not supported",
        "agents.claude.api_key_hash: bcrypt hashes (Go Ephyr) are not accepted",
        "agents.ops-bot.ssh.dockerhost.auto_approve: pending approvals are not supported",
    ];
    for w in want {
        assert!(ps.iter().any(|p| p.contains(w)), "missing {w:?} in {ps:#?}");
    }
    assert_eq!(ps.len(), want.len(), "only the unsupported keys are reported: {ps:#?}");
    // With those four lines fixed, the same file loads, global: is read as limits:.
    let fixed = go
        .replace("auto_approve: false", "auto_approve: true")
        .replace("auto_revoke_on_deny: true", "auto_revoke_on_deny: false")
        .replace("\"$2a$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy\"", &format!("\"{ARGON}\""));
    let p = Policy::parse(&fixed, "go.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.limits.max_certs_total, 20);
    assert_eq!(p.limits.cert_ttl_max, Duration::from_secs(3600));
    assert_eq!(p.limits.requests_per_agent.count, 30);
    assert!(p.warnings.iter().any(|w| w.contains("Go Ephyr section read as limits")), "{:?}", p.warnings);
    assert!(p.warnings.iter().any(|w| w.contains("agents.legacy") && w.contains("full access")), "{:?}", p.warnings);
    assert!(decide(&p, "claude", None, None, ActionKind::Ssh { target: "dockerhost", role: "agent-op" }).is_allow());
}

#[test]
fn command_globs_match_whole_commands() {
    use crate::command::glob;
    assert!(glob("rm *", "rm -rf /"));
    assert!(!glob("rm *", "echo rm -rf"));
    assert!(glob("*reboot*", "sudo reboot now"));
    assert!(glob("uptime", "uptime"));
    assert!(!glob("uptime", "uptime; id"));
    assert!(glob("*", ""));
    assert!(glob("a*b*c", "axxbyyc"));
    assert!(!glob("a*b*c", "axxbyy"));
}

/// `files:` decides where the file tools go on the path the target resolved; without it they go
/// anywhere the role can, unless commands are restricted or forced (SFTP would bypass that).
#[test]
fn file_access_follows_files_rules_and_command_restrictions() {
    let p = Policy::parse(
        "roles: {r: {principal: p}}\ntargets:\n  a: {host: h, allowed_roles: [r], files: {read: ['/var/log/*', /etc/hosts], write: ['/srv/www/*']}}\n  open: {host: h2, allowed_roles: [r]}\n  cmds: {host: h3, allowed_roles: [r], commands: {allow: [uptime]}}\n  forced: {host: h4, allowed_roles: [r], force_command: id}\n",
        "t",
    )
    .unwrap();
    let a = &p.targets["a"];
    a.file_access(false, "/var/log/syslog", false).unwrap();
    a.file_access(false, "/etc/hosts", false).unwrap();
    a.file_access(false, "/srv/www/index.html", false).unwrap();
    a.file_access(false, "/srv/www/index.html", true).unwrap();
    assert!(a.file_access(false, "/var/log/syslog", true).unwrap_err().contains("files.write allows (/srv/www/*)"));
    assert!(a.file_access(false, "/etc/hostsx", false).is_err());
    assert!(a.file_access(false, "/var/logx/y", false).is_err());
    assert!(a.file_access(false, "/etc/shadow", false).unwrap_err().contains("files.read allows"));
    p.targets["open"].file_access(false, "/etc/shadow", true).unwrap();
    assert!(p.targets["open"].file_access(true, "/etc/shadow", false).unwrap_err().contains("no `files:` section"));
    for t in ["cmds", "forced"] {
        assert!(p.targets[t].file_access(false, "/tmp/x", false).unwrap_err().contains("no `files:` section"), "{t}");
    }
}

#[test]
fn a_remote_signing_in_with_oauth_gets_the_brokers_callback_or_a_loopback_redirect() {
    let p = Policy::parse("version: 1\nremotes: {r: {url: 'https://x/mcp', oauth: {per_agent: true}}}\n", "t").unwrap();
    let o = p.remotes["r"].oauth.clone().unwrap();
    assert_eq!((o.redirect_uri.as_str(), o.per_agent), (LOOPBACK_REDIRECT, true));
    let p = Policy::parse(
        "version: 1\noauth: {issuer: 'https://pi.lan:8554'}\nremotes: {r: {url: 'https://x/mcp', oauth: {client_id: c, client_secret: 'store:c', scopes: [read]}}}\n",
        "t",
    )
    .unwrap();
    let o = p.remotes["r"].oauth.clone().unwrap();
    assert_eq!(o.redirect_uri, "https://pi.lan:8554/oauth/remote-callback");
    assert_eq!((o.client_id.as_deref(), o.scopes), (Some("c"), Some(vec!["read".to_owned()])));
}
