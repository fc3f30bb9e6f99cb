//! MCP resources: `ephyr://overview`, `targets`, `services`, `remotes`, `roles`, `status`, `tools`.
//! Markdown generated from live state, filtered for the caller exactly as the discovery tools
//! are (the same functions build both).
//!
//! What runs here: string formatting on the executor thread; no I/O.

use std::fmt::Write as _;

use serde_json::Value;

use super::Broker;
use super::auth::Caller;
use super::policy::Policy;
use super::tools::{self, discovery};
use crate::mcp::types::ResourceDescriptor;

/// Every resource.
pub const RESOURCES: &[ResourceDescriptor<'static>] = &[
    ResourceDescriptor {
        uri: "ephyr://overview",
        name: "overview",
        title: "What you can do through ephyr",
        description: "Who you are, what you can reach, and how to use the tools.",
        mime_type: "text/markdown",
    },
    ResourceDescriptor {
        uri: "ephyr://targets",
        name: "targets",
        title: "SSH targets",
        description: "SSH targets you may use and your roles on each.",
        mime_type: "text/markdown",
    },
    ResourceDescriptor {
        uri: "ephyr://services",
        name: "services",
        title: "HTTP services",
        description: "HTTP APIs you may call through the broker.",
        mime_type: "text/markdown",
    },
    ResourceDescriptor {
        uri: "ephyr://remotes",
        name: "remotes",
        title: "Remote MCP servers",
        description: "Federated MCP servers whose tools you may use.",
        mime_type: "text/markdown",
    },
    ResourceDescriptor {
        uri: "ephyr://roles",
        name: "roles",
        title: "Roles",
        description: "The roles (remote users) you may use, and what each is for.",
        mime_type: "text/markdown",
    },
    ResourceDescriptor {
        uri: "ephyr://status",
        name: "status",
        title: "Broker status",
        description: "Broker version, health and your identity.",
        mime_type: "text/markdown",
    },
    ResourceDescriptor {
        uri: "ephyr://tools",
        name: "tools",
        title: "Tools",
        description: "The tools you may call.",
        mime_type: "text/markdown",
    },
];

/// Escapes a table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn strs(v: &Value, key: &str) -> String {
    v[key].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default()
}

fn targets_md(out: &mut String, v: &Value) {
    let rows = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        out.push_str("No SSH targets are available to you.\n");
        return;
    }
    out.push_str("| target | host | port | your roles | description |\n|---|---|---|---|---|\n");
    for t in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            cell(t["name"].as_str().unwrap_or("")),
            cell(t["host"].as_str().unwrap_or("")),
            t["port"],
            cell(&strs(t, "roles")),
            cell(t["description"].as_str().unwrap_or(""))
        );
    }
}

fn services_md(out: &mut String, v: &Value) {
    let rows = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        out.push_str("No HTTP services are available to you.\n");
        return;
    }
    out.push_str("| service | URL prefix | methods | credential | description |\n|---|---|---|---|---|\n");
    for s in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            cell(s["name"].as_str().unwrap_or("")),
            cell(s["url_prefix"].as_str().unwrap_or("")),
            cell(&strs(s, "allowed_methods")),
            cell(s["auth_type"].as_str().unwrap_or("")),
            cell(s["description"].as_str().unwrap_or(""))
        );
    }
}

fn remotes_md(out: &mut String, v: &Value) {
    let rows = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        out.push_str("No remote MCP servers are available to you.\n");
        return;
    }
    out.push_str("| remote | tool prefix | health | tools | description |\n|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            cell(r["name"].as_str().unwrap_or("")),
            cell(r["tool_prefix"].as_str().unwrap_or("")),
            cell(r["health"].as_str().unwrap_or("")),
            r["tools"],
            cell(r["description"].as_str().unwrap_or(""))
        );
    }
}

fn roles_md(out: &mut String, policy: &Policy, targets: &Value) {
    let mut used = std::collections::BTreeSet::new();
    for t in targets.as_array().map(Vec::as_slice).unwrap_or_default() {
        for r in t["roles"].as_array().map(Vec::as_slice).unwrap_or_default() {
            if let Some(r) = r.as_str() {
                used.insert(r.to_owned());
            }
        }
    }
    if used.is_empty() {
        out.push_str("No roles are available to you.\n");
        return;
    }
    out.push_str("| role | remote user | description |\n|---|---|---|\n");
    for name in used {
        if let Some(r) = policy.roles.get(&name) {
            let _ = writeln!(out, "| {} | {} | {} |", cell(&name), cell(&r.principal), cell(&r.description));
        }
    }
}

fn tools_md(out: &mut String, policy: &Policy, caller: &Caller) {
    let principal = caller.principal();
    let mut any = false;
    for t in tools::REGISTRY.iter().filter(|t| tools::visible(t, policy, &principal)) {
        if !any {
            out.push_str("| tool | what it does |\n|---|---|\n");
            any = true;
        }
        let _ = writeln!(out, "| {} | {} |", t.name, cell(t.description));
    }
    if !any {
        out.push_str("No tools are available to you.\n");
    }
}

fn identity_md(out: &mut String, caller: &Caller) {
    match caller.token() {
        None => {
            let _ = writeln!(out, "You are agent **{}**, authenticated with an API key.", caller.agent);
        }
        Some(t) => {
            let _ = writeln!(
                out,
                "You are agent **{}**, acting as task `{}` (root `{}`), started by {}. Your task token limits what \
                 the lists below show.",
                caller.agent, t.task, t.root, t.initiated_by
            );
        }
    }
}

/// The text of resource `uri` for the caller, or `None` if there is no such resource.
pub fn read(broker: &Broker, policy: &Policy, caller: &Caller, uri: &str) -> Option<String> {
    let principal = caller.principal();
    let mut out = String::new();
    match uri {
        "ephyr://overview" => {
            out.push_str("# ephyr\n\n");
            identity_md(&mut out, caller);
            out.push_str(
                "\nephyr is an access broker: you reach SSH hosts, HTTP APIs and remote MCP tools through it, \
                 with short-lived credentials it creates per request. You never see a key or a password. Every \
                 request is checked against your policy and recorded in an audit log; a denial tells you why.\n",
            );
            out.push_str("\n## SSH targets\n\n");
            targets_md(&mut out, &discovery::targets(policy, &principal));
            out.push_str("\n## HTTP services\n\n");
            services_md(&mut out, &discovery::services(policy, &principal));
            out.push_str("\n## Remote MCP servers\n\n");
            remotes_md(&mut out, &discovery::remotes(policy, &principal, &broker.federation));
            out.push_str("\n## Tools\n\n");
            tools_md(&mut out, policy, caller);
        }
        "ephyr://targets" => {
            out.push_str("# SSH targets\n\n");
            targets_md(&mut out, &discovery::targets(policy, &principal));
        }
        "ephyr://services" => {
            out.push_str("# HTTP services\n\n");
            services_md(&mut out, &discovery::services(policy, &principal));
        }
        "ephyr://remotes" => {
            out.push_str("# Remote MCP servers\n\n");
            remotes_md(&mut out, &discovery::remotes(policy, &principal, &broker.federation));
        }
        "ephyr://roles" => {
            out.push_str("# Roles\n\n");
            roles_md(&mut out, policy, &discovery::targets(policy, &principal));
        }
        "ephyr://tools" => {
            out.push_str("# Tools\n\n");
            tools_md(&mut out, policy, caller);
        }
        "ephyr://status" => {
            let h = broker.signer.health();
            let sandbox = h.status.as_ref().is_some_and(|s| s.sandbox.enforced);
            out.push_str("# Broker status\n\n");
            let _ = writeln!(out, "- version: {}", env!("CARGO_PKG_VERSION"));
            let _ = writeln!(out, "- uptime: {}s", broker.started.elapsed().as_secs());
            let _ = writeln!(
                out,
                "- signer: {}{}",
                if h.available { "available" } else { "unavailable (SSH certificates cannot be issued)" },
                if sandbox { ", sandboxed" } else { ", NOT fully sandboxed" }
            );
            let _ = writeln!(
                out,
                "- audit log: {}",
                if broker.audit.failure().is_none() { "writable" } else { "failing (actions are refused)" }
            );
            let _ = writeln!(out, "- policy: {}", &policy.digest[..policy.digest.len().min(12)]);
            out.push('\n');
            identity_md(&mut out, caller);
            if let Some(a) = policy.agents.get(&caller.agent) {
                let _ = writeln!(
                    out,
                    "\nYour request limit: {} per {}.",
                    a.rate_limit.count,
                    crate::time::format_duration(a.rate_limit.window)
                );
            }
            let sessions = broker.ssh.sessions_of(policy, caller);
            let _ = writeln!(out, "\nYour open SSH sessions: {}.", sessions.len());
            for s in &sessions {
                let _ = writeln!(out, "- `{}`: {} as {}", s.id, s.target, s.role);
            }
        }
        _ => return None,
    }
    Some(out)
}
