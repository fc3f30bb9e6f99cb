//! The reaper's plan: which agents should move in their lifecycle because of time or a removed
//! owner, and which grants each agent has not exercised (privilege drift), with a narrower
//! template to suggest. Pure: the caller passes the policy snapshot, the directory's entries and
//! the time; carrying out the plan is `api::reap` (dry run unless asked, or unless
//! `lifecycle.reaper: apply` for the background job).
//!
//! Rules (docs/agents.md):
//! - an enrolled agent whose join token expired unused → decommissioned;
//! - an enrolled agent whose owner is no longer an operator in the policy → revoked;
//! - an active agent unused for `idle_after` → idle (policy agents too: idle agents are served);
//! - an enrolled agent idle or revoked for `decommission_after` → decommissioned.

use serde::Serialize;

use super::{AgentState, Entry};
use crate::broker::policy::Policy;

/// One transition the reaper would make.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The agent.
    pub agent: String,
    /// Its state now.
    pub from: AgentState,
    /// The state it would get.
    pub to: AgentState,
    /// Why.
    pub why: String,
}

/// Grants an agent holds but has not used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// The agent.
    pub agent: String,
    /// Grants (`ssh:web`, `service:github`, `remote:fs`) not exercised within `drift_after`.
    pub unused: Vec<String>,
    /// Grants it did exercise.
    pub used: Vec<String>,
    /// A narrower grant set to give it (a template body), or what to do instead.
    pub suggestion: String,
}

/// What the reaper would do.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Plan {
    /// Transitions.
    pub steps: Vec<Step>,
    /// Privilege drift per agent.
    pub drift: Vec<Drift>,
}

fn date(secs: i64) -> String {
    crate::time::UnixMicros::from_secs(secs).to_rfc3339()
}

/// The plan at `now` (Unix seconds).
pub fn plan(policy: &Policy, entry: impl Fn(&str) -> Option<Entry>, now: i64) -> Plan {
    let l = &policy.lifecycle;
    let secs = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let mut out = Plan::default();
    for (name, agent) in &policy.agents {
        let Some(e) = entry(name) else { continue };
        let enrolled = e.enrollment.as_ref();
        // The last sign of life: a use, the last transition (enrolment, join, resume), or when
        // the directory first saw it.
        let seen = e.last_used.unwrap_or(0).max(e.since).max(first_seen(&e));
        let step = |to: AgentState, why: String| Step { agent: name.clone(), from: e.state, to, why };
        let next = match (e.state, enrolled) {
            (AgentState::Provisioned, Some(en)) if now >= en.join_expires => Some(step(
                AgentState::Decommissioned,
                format!("its join token expired unused at {}", date(en.join_expires)),
            )),
            (s, Some(en))
                if !matches!(s, AgentState::Revoked | AgentState::Decommissioned)
                    && !policy.operators.contains_key(&en.owner) =>
            {
                Some(step(AgentState::Revoked, format!("its owner {:?} is no longer an operator", en.owner)))
            }
            (AgentState::Active, _) if seen > 0 && now.saturating_sub(seen) >= secs(l.idle_after) => {
                Some(step(AgentState::Idle, format!("unused since {}", date(seen))))
            }
            (AgentState::Idle, Some(_)) if now.saturating_sub(e.since) >= secs(l.decommission_after) => {
                Some(step(AgentState::Decommissioned, format!("idle since {}", date(e.since))))
            }
            (AgentState::Revoked, Some(_)) if now.saturating_sub(e.since) >= secs(l.decommission_after) => {
                Some(step(AgentState::Decommissioned, format!("revoked since {}", date(e.since))))
            }
            _ => None,
        };
        out.steps.extend(next);
        if !agent.state.serves() || seen == 0 || now.saturating_sub(first_seen(&e)) < secs(l.drift_after) {
            continue;
        }
        let fresh = |kind: &str, pattern: &crate::broker::policy::pattern::NamePattern| {
            e.exercised.iter().any(|(g, &at)| {
                now.saturating_sub(at) < secs(l.drift_after)
                    && g.split_once(':').is_some_and(|(k, n)| k == kind && pattern.matches(n))
            })
        };
        let mut used = Vec::new();
        let mut unused = Vec::new();
        let grants = agent
            .ssh
            .entries()
            .iter()
            .map(|g| ("ssh", &g.pattern))
            .chain(agent.services.entries().iter().map(|g| ("service", &g.pattern)))
            .chain(agent.remotes.entries().iter().map(|g| ("remote", &g.pattern)));
        for (kind, pattern) in grants {
            let label = format!("{kind}:{pattern}");
            if fresh(kind, pattern) { used.push(label) } else { unused.push(label) }
        }
        if unused.is_empty() {
            continue;
        }
        let days = l.drift_after.as_secs() / 86_400;
        let suggestion = if used.is_empty() {
            format!("it used none of its grants in {days} days: suspend or revoke it")
        } else {
            let pick = |kind: &str| -> Vec<&str> {
                used.iter().filter_map(|g| g.strip_prefix(kind).and_then(|r| r.strip_prefix(':'))).collect()
            };
            let mut t = String::from("a template with only what it used: {");
            let mut parts = Vec::new();
            for (kind, key) in [("ssh", "ssh"), ("service", "services"), ("remote", "remotes")] {
                let names = pick(kind);
                if !names.is_empty() {
                    parts.push(format!("{key}: [{}]", names.join(", ")));
                }
            }
            t.push_str(&parts.join(", "));
            t.push('}');
            t
        };
        out.drift.push(Drift { agent: name.clone(), unused, used, suggestion });
    }
    out
}

/// When the directory first knew of the agent.
fn first_seen(e: &Entry) -> i64 {
    e.enrollment.as_ref().map_or(e.first_seen, |en| en.at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_follows_the_rules() {
        let text = "operators:\n  alice: {password_hash: '$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQxMjM0NTY3OA$Vg6mXS4CYp5R4u+8s9GF1DvJ2Kq3yEa4TuaOI2p1y5c', role: admin}\n\
roles: {op: {principal: op}}\n\
targets: {web: {host: 10.0.0.5, allowed_roles: [op]}, db: {host: 10.0.0.6, allowed_roles: [op]}}\n\
agents:\n  old: {uid: 4000, ssh: {web: {roles: [op]}, db: {roles: [op]}}}\n  fresh: {uid: 4001, ssh: {web: {roles: [op]}}}\n";
        let policy = crate::broker::policy::Policy::parse(text, "t").unwrap();
        let day = 86_400;
        let now = 1_000 * day;
        let mut old = Entry::new(AgentState::Active);
        old.first_seen = now - 200 * day;
        old.last_used = Some(now - 40 * day);
        old.exercised.insert("ssh:web".into(), now - 40 * day);
        let mut fresh = Entry::new(AgentState::Active);
        fresh.first_seen = now - 200 * day;
        fresh.last_used = Some(now - day);
        fresh.exercised.insert("ssh:web".into(), now - day);
        let p = plan(
            &policy,
            |n| match n {
                "old" => Some(old.clone()),
                "fresh" => Some(fresh.clone()),
                _ => None,
            },
            now,
        );
        assert_eq!(p.steps.len(), 1, "{p:?}");
        assert_eq!((p.steps[0].agent.as_str(), p.steps[0].to), ("old", AgentState::Idle));
        assert!(p.steps[0].why.contains("unused since"), "{p:?}");
        // old used nothing within 30 days: all its grants drifted; fresh used all it has.
        assert_eq!(p.drift.len(), 1, "{p:?}");
        assert_eq!(p.drift[0].unused, ["ssh:db", "ssh:web"]);
        assert!(p.drift[0].suggestion.contains("suspend or revoke"), "{p:?}");
    }
}
