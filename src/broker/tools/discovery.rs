//! Discovery tools: what the caller can reach. Each list is filtered by `authorize` with the
//! caller's policy and task token, so an agent sees exactly what it may use.

use serde_json::{Value, json};

use super::{Needs, Output, OutputShape, ToolDef, allowed, any_remote_tool, any_service};
use crate::broker::federation::Federation;
use crate::broker::policy::{ActionKind, CredentialKind, Policy, Principal, Transport};
use crate::mcp::types::Annotations;

const READ_ONLY: Annotations = Annotations { read_only: true, destructive: false, idempotent: true, open_world: false };

/// `list_targets`.
pub static LIST_TARGETS: ToolDef = ToolDef {
    name: "list_targets",
    title: "List SSH targets",
    description: "List the SSH targets you may use, with the roles (remote users) you may use on each. \
                  Use a target's name and one of its roles with exec.",
    params: &[],
    annotations: READ_ONLY,
    output: OutputShape::List("targets"),
    needs: Needs::AnyTarget,
    run: |cx| Box::pin(async move { Output::data(&target_views(cx.policy, &cx.caller.principal())) }),
};

/// `list_services`.
pub static LIST_SERVICES: ToolDef = ToolDef {
    name: "list_services",
    title: "List HTTP services",
    description: "List the HTTP APIs you may call through the broker (which injects their credentials), \
                  with the methods you may use.",
    params: &[],
    annotations: READ_ONLY,
    output: OutputShape::List("services"),
    needs: Needs::AnyService,
    run: |cx| Box::pin(async move { Output::data(&services(cx.policy, &cx.caller.principal())) }),
};

/// `list_remotes`.
pub static LIST_REMOTES: ToolDef = ToolDef {
    name: "list_remotes",
    title: "List remote MCP servers",
    description: "List the remote MCP servers whose tools the broker offers you.",
    params: &[],
    annotations: READ_ONLY,
    output: OutputShape::List("remotes"),
    needs: Needs::AnyRemote,
    run: |cx| {
        Box::pin(async move {
            let r = remotes(cx.policy, &cx.caller.principal(), cx.federation);
            if r.as_array().is_some_and(Vec::is_empty) {
                let mut o = Output::text("No remote MCP servers configured.");
                o.value = Some(Box::new(serde_json::json!([])));
                o
            } else {
                Output::data(&r)
            }
        })
    },
};

/// A target as `list_targets` shows it (fields in the Go project's order).
#[derive(serde::Serialize)]
pub struct TargetView<'p> {
    /// Name.
    pub name: &'p str,
    /// Host.
    pub host: &'p str,
    /// Port.
    pub port: u16,
    /// Roles the caller may use there.
    pub roles: Vec<&'p str>,
    /// Free text.
    pub description: &'p str,
}

/// Targets the caller may use, with the roles it may use on each.
pub fn target_views<'p>(policy: &'p Policy, principal: &Principal<'_>) -> Vec<TargetView<'p>> {
    let mut out = Vec::new();
    for (name, t) in &policy.targets {
        let roles: Vec<&str> = t
            .allowed_roles
            .iter()
            .filter(|role| allowed(policy, principal, None, ActionKind::Ssh { target: name, role }))
            .map(String::as_str)
            .collect();
        if roles.is_empty() {
            continue;
        }
        out.push(TargetView { name, host: &t.host, port: t.port, roles, description: &t.description });
    }
    out
}

/// [`target_views`] as JSON.
pub fn targets(policy: &Policy, principal: &Principal<'_>) -> Value {
    serde_json::to_value(target_views(policy, principal)).unwrap_or_default()
}

/// Services the caller may call, with the methods it may use.
pub fn services(policy: &Policy, principal: &Principal<'_>) -> Value {
    let mut out = Vec::new();
    for (name, s) in &policy.services {
        if !any_service(policy, principal, None, name) {
            continue;
        }
        let auth = match s.credential.as_ref().map(|c| &c.kind) {
            None => "none",
            Some(CredentialKind::Bearer) => "bearer",
            Some(CredentialKind::Basic { .. }) => "basic",
            Some(CredentialKind::Header { .. }) => "header",
            Some(CredentialKind::Query { .. }) => "query",
        };
        let grant = policy.agents.get(principal.agent).and_then(|a| a.services.lookup(name));
        let methods: Vec<&str> = crate::broker::policy::HTTP_METHODS
            .iter()
            .copied()
            .filter(|m| s.methods.as_ref().is_none_or(|set| set.contains(*m)))
            .filter(|m| grant.and_then(|g| g.value.methods.as_ref()).is_none_or(|set| set.contains(*m)))
            .filter(|m| principal.token.is_none_or(|e| e.dim(crate::macaroon::SetKey::Method).allows(m)))
            .collect();
        out.push(json!({
            "name": name,
            "url_prefix": s.url.to_string(),
            "description": s.description,
            "auth_type": auth,
            "allowed_methods": methods,
        }));
    }
    Value::Array(out)
}

/// Remote MCP servers the caller may use.
pub fn remotes(policy: &Policy, principal: &Principal<'_>, federation: &Federation) -> Value {
    let status = federation.status();
    let mut out = Vec::new();
    for (name, r) in &policy.remotes {
        if !any_remote_tool(policy, principal, None, name) {
            continue;
        }
        let (health, tools, quarantined) =
            status.get(name).map_or(("not connected yet", 0, 0), |(h, t, q, _)| (*h, *t, *q));
        out.push(json!({
            "name": name,
            // A stdio remote's command line stays with the operator.
            "url": match &r.transport {
                Transport::Http(u) => Value::from(u.to_string()),
                Transport::Stdio(_) => Value::Null,
            },
            "transport": match r.transport {
                Transport::Http(_) => "http",
                Transport::Stdio(_) => "stdio",
            },
            "description": r.description,
            "tool_prefix": r.tool_prefix,
            "enabled": r.enabled,
            "health": health,
            "tools": tools,
            "quarantined": quarantined,
        }));
    }
    Value::Array(out)
}
