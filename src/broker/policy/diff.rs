//! `ephyr policy diff OLD NEW`: what each agent gains or loses, and which approval rules come and go.
//!
//! Pure. SSH access is computed with [`authorize`] itself over every (target, role) pair both
//! policies know, so the diff shows what the decision function will actually do; the other
//! dimensions are compared on the agent's resolved grants.

use std::collections::BTreeSet;

use super::authorize::{Action, ActionKind, Principal, authorize};
use super::{Agent, Policy};

/// One change for one agent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// New access.
    Gain(String),
    /// Access removed.
    Loss(String),
    /// A setting changed: (what, old, new).
    Changed(String, String, String),
}

/// Changes per agent (agents with no change are omitted).
pub type Diff = Vec<(String, Vec<Change>)>;

fn ssh_pairs(p: &Policy, agent: &str, targets: &BTreeSet<String>, roles: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in targets {
        for r in roles {
            let d = authorize(
                p,
                &Principal { agent, token: None, delegators: &[] },
                &Action::reach(None, ActionKind::Ssh { target: t, role: r }),
            );
            if d.is_allow() {
                out.insert(format!("ssh {t} as {r}"));
            }
        }
    }
    out
}

fn describe_methods(m: &Option<BTreeSet<String>>) -> String {
    m.as_ref().map_or("all methods".into(), |s| s.iter().cloned().collect::<Vec<_>>().join(","))
}

fn service_lines(p: &Policy, a: Option<&Agent>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(a) = a else { return out };
    for (name, svc) in &p.services {
        if let Some(g) = a.services.lookup(name) {
            let methods: Option<BTreeSet<String>> = match (&svc.methods, &g.value.methods) {
                (Some(x), Some(y)) => Some(x.intersection(y).cloned().collect()),
                (Some(x), None) | (None, Some(x)) => Some(x.clone()),
                (None, None) => None,
            };
            let paths = |ps: &Option<Vec<super::pattern::PathPattern>>| {
                ps.as_ref().map(|v| v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","))
            };
            let path_desc = match (paths(&svc.paths), paths(&g.value.paths)) {
                (None, None) => "all paths".to_string(),
                (Some(s), None) => s,
                (None, Some(g)) => g,
                (Some(s), Some(g)) => format!("{g} within {s}"),
            };
            out.insert(format!("service {name}: {} on {path_desc}", describe_methods(&methods)));
        }
    }
    out
}

fn remote_lines(p: &Policy, a: Option<&Agent>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(a) = a else { return out };
    for (name, r) in &p.remotes {
        if let Some(g) = a.remotes.lookup(name) {
            let tools: Option<BTreeSet<String>> = match (&r.tools, &g.value.tools) {
                (Some(x), Some(y)) => Some(x.intersection(y).cloned().collect()),
                (Some(x), None) | (None, Some(x)) => Some(x.clone()),
                (None, None) => None,
            };
            let t = tools.map_or("all tools".into(), |s| s.into_iter().collect::<Vec<_>>().join(","));
            let args: Vec<String> = g.value.args.keys().map(|k| format!("arg.{k} constrained")).collect();
            let suffix = if args.is_empty() { String::new() } else { format!(" ({})", args.join(", ")) };
            out.insert(format!("remote {name}: {t}{suffix}"));
        }
    }
    out
}

fn settings(a: Option<&Agent>) -> Vec<(&'static str, String)> {
    let Some(a) = a else { return vec![] };
    vec![
        ("enabled", a.enabled.to_string()),
        ("can_delegate", a.can_delegate.to_string()),
        ("max_delegation_depth", a.max_delegation_depth.to_string()),
        ("max_task_ttl", crate::time::format_duration(a.max_task_ttl)),
        ("require_pop", a.require_pop.to_string()),
        ("dashboard", a.dashboard.as_str().into()),
        ("max_concurrent_certs", a.max_concurrent_certs.to_string()),
        ("rate_limit", format!("{}/{}", a.rate_limit.count, crate::time::format_duration(a.rate_limit.window))),
        ("api_key", if a.api_key_hash.is_some() { "set".into() } else { "none".into() }),
        ("uid", a.uid.map_or("none".into(), |u| u.to_string())),
    ]
}

/// Computes the diff.
pub fn diff(old: &Policy, new: &Policy) -> Diff {
    let agents: BTreeSet<&String> = old.agents.keys().chain(new.agents.keys()).collect();
    let targets: BTreeSet<String> = old.targets.keys().chain(new.targets.keys()).cloned().collect();
    let roles: BTreeSet<String> = old.roles.keys().chain(new.roles.keys()).cloned().collect();
    let mut out = Vec::new();
    for name in agents {
        let (oa, na) = (old.agents.get(name), new.agents.get(name));
        let mut changes = Vec::new();
        let before: BTreeSet<String> = ssh_pairs(old, name, &targets, &roles)
            .into_iter()
            .chain(service_lines(old, oa))
            .chain(remote_lines(old, oa))
            .collect();
        let after: BTreeSet<String> = ssh_pairs(new, name, &targets, &roles)
            .into_iter()
            .chain(service_lines(new, na))
            .chain(remote_lines(new, na))
            .collect();
        changes.extend(after.difference(&before).map(|s| Change::Gain(s.clone())));
        changes.extend(before.difference(&after).map(|s| Change::Loss(s.clone())));
        match (oa, na) {
            (None, Some(_)) => changes.insert(0, Change::Changed("agent".into(), "absent".into(), "added".into())),
            (Some(_), None) => changes.insert(0, Change::Changed("agent".into(), "present".into(), "removed".into())),
            _ => {
                for ((k, o), (_, n)) in settings(oa).into_iter().zip(settings(na)) {
                    if o != n {
                        changes.push(Change::Changed(k.into(), o, n));
                    }
                }
                if let (Some(o), Some(n)) = (oa, na)
                    && o.api_key_hash != n.api_key_hash
                    && o.api_key_hash.is_some()
                    && n.api_key_hash.is_some()
                {
                    changes.push(Change::Changed(
                        "api_key".into(),
                        "old key".into(),
                        "new key (old one stops working)".into(),
                    ));
                }
            }
        }
        if !changes.is_empty() {
            out.push((name.clone(), changes));
        }
    }
    out
}

/// One approval rule on one line: what it covers and what it asks.
fn approval_line(r: &super::approval::ApprovalRule) -> String {
    use super::approval::Covers;
    let list = |v: &[String]| if v.is_empty() { "*".to_owned() } else { v.join(",") };
    let covers = match &r.on {
        Covers::Ssh { targets, roles, commands } => {
            format!("ssh {} as {} running {}", list(targets), list(roles), list(commands))
        }
        Covers::Http { services, methods, paths } => format!(
            "http {} {} on {}",
            list(services),
            describe_methods(methods),
            paths.as_ref().map_or("all paths".into(), |p| p
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(","))
        ),
        Covers::Remote { remotes, tools, when } => format!(
            "remote {} tools {}{}",
            list(remotes),
            list(tools),
            if when.is_empty() {
                String::new()
            } else {
                format!(" when {}", when.keys().cloned().collect::<Vec<_>>().join(","))
            }
        ),
        Covers::Delegate { to } => format!("delegation to {}", list(to)),
    };
    let approvers: Vec<String> = r.approvers.iter().map(|a| a.to_text()).collect();
    format!(
        "rule {}: {covers}{}; approvers {}{}; timeout {}{}",
        r.name,
        if r.agents.is_empty() { String::new() } else { format!(" (agents {})", r.agents.join(",")) },
        approvers.join(","),
        if r.four_eyes { ", four eyes" } else { "" },
        crate::time::format_duration(r.timeout),
        r.waiver.map(|w| format!("; waiver up to {}", crate::time::format_duration(w))).unwrap_or_default()
    )
}

/// Approval rules that appear (`Gain`: more actions wait) or go (`Loss`: actions that waited
/// for a person run on policy alone); a changed rule is both.
pub fn approval_changes(old: &Policy, new: &Policy) -> Vec<Change> {
    let lines = |p: &Policy| -> BTreeSet<String> { p.approvals.rules.values().map(approval_line).collect() };
    let (before, after) = (lines(old), lines(new));
    let mut out: Vec<Change> = after.difference(&before).map(|s| Change::Gain(s.clone())).collect();
    out.extend(before.difference(&after).map(|s| Change::Loss(s.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gains_losses_and_settings() {
        let old = Policy::parse(
            "roles: {read: {principal: r}, op: {principal: o}}\ntargets: {web: {host: a, allowed_roles: [read, op]}, db: {host: b, allowed_roles: [read]}}\nservices: {gh: {url: 'https://api.github.com'}}\nagents:\n  a: {uid: 1, ssh: {web: {roles: [read, op]}}, services: {gh: {methods: [GET]}}}\n  gone: {uid: 2}\n",
            "old",
        )
        .unwrap();
        let new = Policy::parse(
            "roles: {read: {principal: r}, op: {principal: o}}\ntargets: {web: {host: a, allowed_roles: [read, op]}, db: {host: b, allowed_roles: [read]}}\nservices: {gh: {url: 'https://api.github.com'}}\nagents:\n  a: {uid: 1, ssh: {web: {roles: [read]}, db: {roles: [read]}}, services: {gh: {methods: [GET, POST]}}, can_delegate: true}\n  fresh: {uid: 3, ssh: {'*': {roles: [read]}}}\n",
            "new",
        )
        .unwrap();
        let d = diff(&old, &new);
        let a = &d.iter().find(|(n, _)| n == "a").unwrap().1;
        assert!(a.contains(&Change::Gain("ssh db as read".into())), "{a:?}");
        assert!(a.contains(&Change::Loss("ssh web as op".into())));
        assert!(a.contains(&Change::Gain("service gh: GET,POST on all paths".into())));
        assert!(a.contains(&Change::Loss("service gh: GET on all paths".into())));
        assert!(a.contains(&Change::Changed("can_delegate".into(), "false".into(), "true".into())));
        let fresh = &d.iter().find(|(n, _)| n == "fresh").unwrap().1;
        assert_eq!(fresh[0], Change::Changed("agent".into(), "absent".into(), "added".into()));
        assert!(
            fresh.contains(&Change::Gain("ssh db as read".into()))
                && fresh.contains(&Change::Gain("ssh web as read".into()))
        );
        assert!(
            d.iter().any(
                |(n, c)| n == "gone" && c[0] == Change::Changed("agent".into(), "present".into(), "removed".into())
            )
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn approval_rules_that_come_and_go() {
        let base =
            "roles: {op: {principal: o}}\ntargets: {nas: {host: a, allowed_roles: [op]}}\nagents: {a: {uid: 1}}\n";
        let old = Policy::parse(
            &format!("{base}approvals: {{rules: {{ops: {{ssh: {{targets: [nas], roles: [op]}}}}}}}}\n"),
            "o",
        )
        .unwrap();
        let new = Policy::parse(
            &format!(
                "{base}approvals: {{rules: {{ops: {{ssh: {{targets: [nas], roles: [op]}}, four_eyes: true}}}}}}\n"
            ),
            "n",
        )
        .unwrap();
        let c = approval_changes(&old, &new);
        assert_eq!(
            c,
            [
                Change::Gain(
                    "rule ops: ssh nas as op running *; approvers role:admin,local, four eyes; timeout 15m".into()
                ),
                Change::Loss("rule ops: ssh nas as op running *; approvers role:admin,local; timeout 15m".into()),
            ]
        );
        assert!(approval_changes(&new, &new).is_empty());
    }
}
