//! `approvals:` — which allowed actions must still wait for a person, and who that person may be.
//!
//! Pure, like `authorize`: [`requirement`] says whether an action `authorize` allowed needs an
//! operator's approval, under which rules. The waiting, the decisions and their journal are
//! `broker::approvals`; this module only reads the policy.
//!
//! Matching leans towards asking: a rule's command patterns are tried at every word start of the
//! command (so `systemctl *` also catches `sudo systemctl stop x` and `ls; systemctl stop x`), and
//! an argument condition whose argument is absent or unreadable counts as met. When several rules
//! match, all of them hold: every one must accept each approver, four eyes if any asks it, the
//! shortest timeout and waiver.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Map, Value};

use super::pattern::PathPattern;
use super::{OperatorRole, Policy, SecretRef, UpstreamUrl};
use crate::macaroon::caveat::glob_match;
use crate::macaroon::envelope::ArgRule;

/// The `approvals:` section.
#[derive(Clone, Debug, PartialEq)]
pub struct Approvals {
    /// Rules by name.
    pub rules: BTreeMap<String, ApprovalRule>,
    /// Where new requests are announced, by name.
    pub notify: BTreeMap<String, Notifier>,
    /// The console's base URL, for links (no trailing slash).
    pub console_url: Option<String>,
    /// How long a call without a progress token is held open waiting for the decision.
    pub hold: Duration,
    /// Most pending requests one agent may have.
    pub max_pending_per_agent: u32,
}

impl Default for Approvals {
    fn default() -> Self {
        Approvals {
            rules: BTreeMap::new(),
            notify: BTreeMap::new(),
            console_url: None,
            hold: Duration::from_secs(20),
            max_pending_per_agent: 20,
        }
    }
}

/// One rule.
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalRule {
    /// Its name (`approvals.rules.<name>`).
    pub name: String,
    /// Agent patterns it applies to (empty: every agent).
    pub agents: Vec<String>,
    /// What it covers.
    pub on: Covers,
    /// Who may approve.
    pub approvers: Vec<Approver>,
    /// How long a request waits.
    pub timeout: Duration,
    /// Two different approvers.
    pub four_eyes: bool,
    /// Longest waiver an approval may carry.
    pub waiver: Option<Duration>,
}

/// What a rule covers.
#[derive(Clone, Debug, PartialEq)]
pub enum Covers {
    /// SSH commands and sessions.
    Ssh {
        /// Target patterns.
        targets: Vec<String>,
        /// Role patterns (empty: every role).
        roles: Vec<String>,
        /// Command patterns (empty: every command, and opening a session).
        commands: Vec<String>,
    },
    /// HTTP requests through a service.
    Http {
        /// Service patterns.
        services: Vec<String>,
        /// Methods (`None`: every method).
        methods: Option<BTreeSet<String>>,
        /// Paths (`None`: every path).
        paths: Option<Vec<PathPattern>>,
    },
    /// Federated tool calls.
    Remote {
        /// Remote patterns.
        remotes: Vec<String>,
        /// Tool patterns (empty: every tool).
        tools: Vec<String>,
        /// Argument conditions (all must hold; an absent argument holds).
        when: BTreeMap<String, ArgRule>,
    },
    /// Handing a task to another agent.
    Delegate {
        /// Agent patterns.
        to: Vec<String>,
    },
}

/// Who may approve, as a rule names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Approver {
    /// This console operator.
    Operator(String),
    /// Any console operator with this role.
    Role(OperatorRole),
    /// A local process on the broker's socket (root or the broker's user: `ephyr approve`).
    Local,
}

impl Approver {
    /// The policy's word for it.
    pub fn to_text(&self) -> String {
        match self {
            Approver::Operator(n) => n.clone(),
            Approver::Role(r) => format!("role:{}", r.as_str()),
            Approver::Local => "local".into(),
        }
    }
}

/// Who answered: a console operator or a local process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answerer {
    /// `operators.<name>`, signed in to the console.
    Console(String),
    /// A local process on the socket, by uid.
    Local(u32),
}

impl Answerer {
    /// As audit records and the queue name it (`console:alice`, `operator:uid0`).
    pub fn name(&self) -> String {
        match self {
            Answerer::Console(n) => format!("console:{n}"),
            Answerer::Local(uid) => format!("operator:uid{uid}"),
        }
    }
}

/// A notification target.
#[derive(Clone, Debug, PartialEq)]
pub struct Notifier {
    /// Its name.
    pub name: String,
    /// The shape of the message.
    pub kind: NotifyKind,
    /// Where it is POSTed.
    pub url: UpstreamUrl,
    /// A bearer token for the receiver.
    pub token: Option<SecretRef>,
}

/// The shape of a notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyKind {
    /// A JSON object.
    Webhook,
    /// ntfy's headers and a plain-text body.
    Ntfy,
}

/// An action `authorize` allowed, as approval rules see it.
#[derive(Clone, Copy, Debug)]
pub enum Gated<'a> {
    /// A command (`Some`) or a session (`None`) as `role` on `target`.
    Ssh {
        /// Target.
        target: &'a str,
        /// Role.
        role: &'a str,
        /// The command.
        command: Option<&'a str>,
    },
    /// An HTTP request (`path` normalised and decoded).
    Http {
        /// Service.
        service: &'a str,
        /// Method.
        method: &'a str,
        /// Path.
        path: &'a str,
    },
    /// A federated tool call.
    RemoteTool {
        /// Remote.
        remote: &'a str,
        /// Its tool.
        tool: &'a str,
        /// The call's arguments.
        args: &'a Map<String, Value>,
    },
    /// A task handed to agent `to`.
    Delegate {
        /// The receiving agent.
        to: &'a str,
    },
}

/// The rules an action falls under (at least one).
#[derive(Clone, Debug)]
pub struct Requirement<'p> {
    /// The matching rules, in name order.
    pub rules: Vec<&'p ApprovalRule>,
}

impl<'p> Requirement<'p> {
    /// The rules of `policy` named `names` (a request's, as it was opened): those still in the
    /// policy; none when all are gone.
    pub fn named(policy: &'p Policy, names: &[String]) -> Requirement<'p> {
        Requirement { rules: names.iter().filter_map(|n| policy.approvals.rules.get(n)).collect() }
    }

    /// The rules' names.
    pub fn names(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.name.clone()).collect()
    }

    /// Approvals needed (2 with four eyes).
    pub fn needed(&self) -> u8 {
        if self.rules.iter().any(|r| r.four_eyes) { 2 } else { 1 }
    }

    /// How long a request waits: the shortest timeout.
    pub fn timeout(&self) -> Duration {
        self.rules.iter().map(|r| r.timeout).min().unwrap_or(Duration::from_secs(900))
    }

    /// The longest waiver an approval may carry: the shortest of the rules', none if any has none.
    pub fn waiver(&self) -> Option<Duration> {
        self.rules.iter().map(|r| r.waiver).try_fold(Duration::MAX, |m, w| w.map(|w| m.min(w)))
    }

    /// Whether every rule accepts `who` as an approver under `policy`'s operators.
    pub fn accepts(&self, policy: &Policy, who: &Answerer) -> bool {
        self.rules.iter().all(|r| accepts(r, policy, who))
    }

    /// Who may approve, as text (each rule's list, joined with "and").
    pub fn approvers_text(&self) -> String {
        let lists: Vec<String> = self
            .rules
            .iter()
            .map(|r| r.approvers.iter().map(Approver::to_text).collect::<Vec<_>>().join(", "))
            .collect();
        lists.join(" and ")
    }
}

/// Whether rule `r` accepts `who`.
fn accepts(r: &ApprovalRule, policy: &Policy, who: &Answerer) -> bool {
    r.approvers.iter().any(|a| match (a, who) {
        (Approver::Local, Answerer::Local(_)) => true,
        (Approver::Operator(n), Answerer::Console(c)) => n == c && policy.operators.contains_key(c),
        (Approver::Role(role), Answerer::Console(c)) => policy.operators.get(c).is_some_and(|o| o.role >= *role),
        _ => false,
    })
}

fn any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, name))
}

/// Whether a command pattern matches `command` at some word start: the whole command, or what
/// follows a separator, quote, bracket, `$`, `/` or blank (errs towards asking).
pub fn command_matches(pattern: &str, command: &str) -> bool {
    let cmd = command.trim();
    // The pattern's literal start must be somewhere in the command, and a match can only begin
    // where it does: most commands are ruled out without running the glob at all.
    let lit = pattern.split(['*', '?']).next().unwrap_or("");
    if !cmd.contains(lit) {
        return false;
    }
    let try_at = |rest: &str| rest.starts_with(lit) && glob_match(pattern, rest);
    if try_at(cmd) {
        return true;
    }
    let starts = cmd
        .char_indices()
        .filter(|&(_, c)| c.is_whitespace() || ";&|()`'\"$/{}<>=\\!".contains(c))
        .map(|(i, c)| i + c.len_utf8());
    for i in starts {
        let rest = cmd[i..].trim_start();
        if !rest.is_empty() && try_at(rest) {
            return true;
        }
    }
    false
}

/// Whether a remote rule's condition holds on `args`: every constrained argument is absent or
/// unreadable (it cannot be ruled out) or passes its rule.
fn conditions_hold(when: &BTreeMap<String, ArgRule>, args: &Map<String, Value>) -> bool {
    when.iter().all(|(name, rule)| match super::authorize::arg_values(args, name) {
        Ok(Some(found)) => found.into_iter().all(|v| !readable(rule, v) || rule.check(v).is_ok()),
        Ok(None) | Err(_) => true,
    })
}

/// Whether `v` has the type `rule` reads (a string for paths, patterns and values, a number for
/// bounds): only then can it rule the condition out.
fn readable(rule: &ArgRule, v: &Value) -> bool {
    let strings = !rule.prefixes.is_empty() || !rule.like.is_empty() || rule.one_of.is_some();
    let numbers = rule.at_most.is_some() || rule.at_least.is_some();
    (!strings || v.is_string()) && (!numbers || (v.is_number() && !v.is_string()))
}

fn covers(on: &Covers, g: &Gated<'_>) -> bool {
    match (on, *g) {
        (Covers::Ssh { targets, roles, commands }, Gated::Ssh { target, role, command }) => {
            any(targets, target)
                && (roles.is_empty() || any(roles, role))
                && (commands.is_empty() || command.is_some_and(|c| commands.iter().any(|p| command_matches(p, c))))
        }
        (Covers::Http { services, methods, paths }, Gated::Http { service, method, path }) => {
            any(services, service)
                && methods.as_ref().is_none_or(|m| m.contains(method))
                && paths.as_ref().is_none_or(|ps| ps.iter().any(|p| p.matches(path)))
        }
        (Covers::Remote { remotes, tools, when }, Gated::RemoteTool { remote, tool, args }) => {
            any(remotes, remote) && (tools.is_empty() || any(tools, tool)) && conditions_hold(when, args)
        }
        (Covers::Delegate { to }, Gated::Delegate { to: agent }) => any(to, agent),
        _ => false,
    }
}

/// The rules that make `agent`'s action `g` wait for approval, if any.
pub fn requirement<'p>(policy: &'p Policy, agent: &str, g: &Gated<'_>) -> Option<Requirement<'p>> {
    if policy.approvals.rules.is_empty() {
        return None;
    }
    let rules: Vec<&ApprovalRule> = policy
        .approvals
        .rules
        .values()
        .filter(|r| r.agents.is_empty() || any(&r.agents, agent))
        .filter(|r| covers(&r.on, g))
        .collect();
    (!rules.is_empty()).then_some(Requirement { rules })
}

/// The approval rules that would hold some of `agent`'s commands as `role` on `target` by
/// their command patterns (keystrokes to a terminal cannot be matched against those).
pub fn command_rules<'p>(policy: &'p Policy, agent: &str, target: &str, role: &str) -> Vec<&'p str> {
    policy
        .approvals
        .rules
        .iter()
        .filter(|(_, r)| r.agents.is_empty() || any(&r.agents, agent))
        .filter(|(_, r)| match &r.on {
            Covers::Ssh { targets, roles, commands } => {
                !commands.is_empty() && any(targets, target) && (roles.is_empty() || any(roles, role))
            }
            _ => false,
        })
        .map(|(name, _)| name.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
operators:
  alice: {password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$J5VYwqUgTn6v0bqvC2EIRk6YBnJ1U1uYYVQEzj3aAcE", role: admin}
  bob: {password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$J5VYwqUgTn6v0bqvC2EIRk6YBnJ1U1uYYVQEzj3aAcE", role: viewer}
roles: {op: {principal: op}, read: {principal: r}}
targets: {nas: {host: h, allowed_roles: [op, read]}}
agents: {a: {uid: 1, ssh: {nas: {roles: [op, read]}}}}
approvals:
  rules:
    restart:
      ssh: {targets: [nas], roles: [op], commands: ["systemctl *"]}
      approvers: [bob]
      timeout: 5m
      waiver: 10m
    everything-op:
      ssh: {targets: ["*"], roles: [op]}
      four_eyes: true
      timeout: 15m
      waiver: 30m
    deletes:
      remote: {remotes: [files], tools: ["delete_*"], when: {path: {prefix: /data}}}
    handoff:
      delegate: {to: ["*"]}
      agents: [a]
"#;

    fn p() -> Policy {
        Policy::parse(POLICY, "t").unwrap()
    }

    #[test]
    fn command_patterns_match_at_every_word_start() {
        for c in ["systemctl stop x", "sudo systemctl stop x", "ls; systemctl stop x", "bash -c 'systemctl stop x'"] {
            assert!(command_matches("systemctl *", c), "{c}");
        }
        assert!(command_matches("systemctl *", "/usr/bin/systemctl restart nginx"));
        assert!(!command_matches("systemctl *", "ls /etc/systemd"));
        assert!(!command_matches("systemctl *", "mysystemctl x"));
    }

    #[test]
    fn every_matching_rule_holds() {
        let p = p();
        let g = Gated::Ssh { target: "nas", role: "op", command: Some("sudo systemctl restart nginx") };
        let r = requirement(&p, "a", &g).unwrap();
        assert_eq!(r.names(), ["everything-op", "restart"]);
        assert_eq!(r.needed(), 2);
        assert_eq!(r.timeout(), Duration::from_secs(300));
        assert_eq!(r.waiver(), Some(Duration::from_secs(600)));
        // bob is named by one rule; the other (default approvers) wants an admin or the CLI.
        assert!(!r.accepts(&p, &Answerer::Console("bob".into())));
        assert!(!r.accepts(&p, &Answerer::Console("alice".into())));
        assert!(!r.accepts(&p, &Answerer::Local(0)));
        // Only the role-wide rule: alice (admin) and the CLI are accepted, bob (viewer) not.
        let g = Gated::Ssh { target: "nas", role: "op", command: Some("uptime") };
        let r = requirement(&p, "a", &g).unwrap();
        assert_eq!(r.names(), ["everything-op"]);
        assert!(r.accepts(&p, &Answerer::Console("alice".into())));
        assert!(r.accepts(&p, &Answerer::Local(0)));
        assert!(!r.accepts(&p, &Answerer::Console("bob".into())));
        assert!(!r.accepts(&p, &Answerer::Console("mallory".into())));
        // Another role needs none; a session as op does (no command patterns on that rule).
        assert!(requirement(&p, "a", &Gated::Ssh { target: "nas", role: "read", command: Some("x") }).is_none());
        assert!(requirement(&p, "a", &Gated::Ssh { target: "nas", role: "op", command: None }).is_some());
    }

    #[test]
    fn argument_conditions_lean_towards_asking() {
        let p = p();
        let call = |v: Value| {
            let args = v.as_object().cloned().unwrap();
            requirement(&p, "a", &Gated::RemoteTool { remote: "files", tool: "delete_file", args: &args }).is_some()
        };
        assert!(call(serde_json::json!({"path": "/data/x"})));
        assert!(!call(serde_json::json!({"path": "/tmp/x"})));
        assert!(call(serde_json::json!({})), "absent: cannot be ruled out");
        assert!(call(serde_json::json!({"path": 3})), "unreadable: cannot be ruled out");
        let args = serde_json::json!({"path": "/data/x"}).as_object().cloned().unwrap();
        assert!(requirement(&p, "a", &Gated::RemoteTool { remote: "files", tool: "read_file", args: &args }).is_none());
        assert!(requirement(&p, "a", &Gated::Delegate { to: "b" }).is_some());
        assert!(requirement(&p, "other", &Gated::Delegate { to: "b" }).is_none());
    }

    #[test]
    fn bad_rules_are_refused_with_the_key_that_is_wrong() {
        let base = "roles: {op: {principal: op}}\ntargets: {nas: {host: h, allowed_roles: [op]}}\nagents: {a: {uid: 1}}\napprovals:\n";
        for (section, words) in [
            ("  rules: {x: {ssh: {targets: [nas]}, http: {services: [s]}}}\n", "exactly one of"),
            ("  rules: {x: {approvers: [nobody], ssh: {targets: [nas]}}}\n", "\"nobody\" is not an operator"),
            ("  rules: {x: {approvers: [], ssh: {targets: [nas]}}}\n", "at least one approver"),
            ("  rules: {x: {ssh: {targets: []}}}\n", "at least one name"),
            ("  rules: {x: {ssh: {targets: [nas]}, timeout: 0s}}\n", "between 1s and 24h"),
            ("  rules: {x: {ssh: {targets: [nas]}, waiver: 2d}}\n", "approvals.rules.x.waiver"),
            ("  rules: {x: {remote: {remotes: [r], when: {path: {}}}}}\n", "needs prefix, max"),
            ("  notify: {n: {webhook: \"ftp://x\"}}\n", "only http and https"),
            ("  notify: {n: {webhook: \"http://x\", ntfy: \"http://y\"}}\n", "exactly one of webhook"),
            ("  notify: {n: {ntfy: \"http://x\", token: \"hunter2\"}}\n", "not a secret reference"),
            ("  hold: 10m\n", "at most 2m"),
            ("  console_url: \"https://h:1/console\"\n", "origin only"),
            ("  surprise: 1\n", "unknown field"),
        ] {
            let e = Policy::parse(&format!("{base}{section}"), "t").unwrap_err().to_string();
            assert!(e.contains(words), "{section}: {e}");
        }
        let warn = Policy::parse(&format!("{base}  rules: {{x: {{ssh: {{targets: [nsa]}}}}}}\n"), "t").unwrap();
        assert!(warn.warnings.iter().any(|w| w.contains("\"nsa\" names nothing")), "{:?}", warn.warnings);
    }
}
