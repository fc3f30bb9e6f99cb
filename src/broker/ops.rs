//! Operations: the acts that operators, agents and signals ask of the broker — revoke a task,
//! revoke a certificate, close an SSH session, reload the policy. Each is carried out here, once,
//! with all its effects and one audit record naming who asked ([`Actor`]); the local API, the
//! agent tools and the signal handler only check who may ask and translate the answer.
//!
//! What runs here: the executor thread. Effects: the task store and certificate registry (their
//! journals, on the blocking pool), SSH sessions (closed on the SSH runtime), the audit trail.
//! Revoking a task also reaches streams and sessions through task events (`tasks::events`).

use std::rc::Rc;

use serde_json::json;

use super::audit::{AuditSink as _, Event, Kind};
use super::policy::FreezeKind;
use super::policy::PolicyError;
use super::ssh::Session;
use super::tasks::TaskView;
use super::{Broker, Error};

/// Who asked.
#[derive(Clone, Debug)]
pub enum Actor {
    /// An agent, through a tool.
    Agent {
        /// The agent.
        name: String,
        /// The task it acted as, if it used a task token.
        task: Option<String>,
    },
    /// A local process on the broker's socket (root or the broker's user).
    Operator {
        /// Its uid (from `SO_PEERCRED`).
        uid: u32,
    },
    /// A signal (`SIGHUP`).
    Signal(&'static str),
    /// An operator signed in to the console (`operators.<name>`).
    Console {
        /// The operator's name.
        name: String,
    },
    /// The broker itself (`run_lease`: a run's lease ran out).
    Broker(&'static str),
}

impl Actor {
    /// The name in audit records (`agent`, `operator:uidN`, `signal:SIGHUP`).
    pub fn name(&self) -> String {
        match self {
            Actor::Agent { name, .. } => name.clone(),
            Actor::Operator { uid } => format!("operator:uid{uid}"),
            Actor::Signal(s) => format!("signal:{s}"),
            Actor::Console { name } => format!("console:{name}"),
            Actor::Broker(why) => format!("broker:{why}"),
        }
    }

    /// Names the actor in a record (its `agent` field).
    fn stamp(&self, ev: Event) -> Event {
        ev.agent(self.name())
    }

    /// The task the actor acted as, if an agent with a task token.
    fn task(&self) -> Option<&str> {
        match self {
            Actor::Agent { task: Some(t), .. } => Some(t),
            _ => None,
        }
    }
}

/// Records `ev` and waits until it is durable.
async fn record(broker: &Broker, ev: Event) -> Result<(), String> {
    let ticket = broker.audit.record(ev).map_err(|e| e.to_string())?;
    ticket.durable().await.map_err(|e| e.to_string())
}

/// Revokes task `v` and, with it, every descendant: tokens fail at once, streams end and SSH
/// sessions of the tree close (task events; the sessions also here, before answering), and
/// their certificates are listed on the KRL. Returns how many descendants it took along.
pub async fn revoke_task(broker: &Broker, actor: &Actor, v: &TaskView) -> Result<usize, Error> {
    let id = v.task.id;
    let cascade = broker.tasks.revoke(id, crate::time::now()).await?;
    // The record's task is the one revoked (audit queries by tree find it there).
    let ev = actor
        .stamp(Event::new(Kind::Task, "task_revoke"))
        .task(id.to_string(), broker.tasks.lineage(id))
        .initiated_by(v.task.initiated_by.clone())
        .allow()
        .action(json!({"by_task": actor.task()}))
        .outcome(json!({"cascade_count": cascade, "holder_agent": v.task.agent}));
    let recorded = record(broker, ev).await;
    broker.metrics.inc("ephyr_tasks_total", &[("op", "revoke")]);
    broker.ssh.sweep(broker.ports(), &broker.policy()).await;
    recorded.map_err(|e| Error::Unavailable(format!("task {id} is revoked, but its audit record failed: {e}")))?;
    Ok(cascade)
}

/// Puts certificate `serial` on the KRL and closes the session that holds it, if any.
pub async fn revoke_cert(broker: &Broker, actor: &Actor, serial: u64) -> Result<(), Error> {
    match broker.ssh.registry.revoke(serial, crate::time::now().0).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::NotFound(format!(
                "no valid certificate with serial {serial:016x} was issued by this broker"
            )));
        }
        Err(e) => return Err(e),
    }
    let closed = match broker.ssh.session_with_serial(serial) {
        Some(s) => {
            broker.ssh.close(broker.ports(), &s, "its certificate was revoked").await;
            Some(s.id.clone())
        }
        None => None,
    };
    let ev = actor.stamp(
        Event::new(Kind::Cert, "cert_revoked")
            .action(json!({ "serial": format!("{serial:016x}") }))
            .allow()
            .outcome(json!({ "session_closed": closed })),
    );
    record(broker, ev).await.map_err(|e| {
        Error::Unavailable(format!("certificate {serial:016x} is revoked, but its audit record failed: {e}"))
    })
}

/// Closes an SSH session (its connection, its certificate's key); recorded as `session_close`.
pub async fn close_session(broker: &Broker, actor: &Actor, s: &Rc<Session>) {
    let why = match actor {
        Actor::Agent { .. } => "closed by the agent".to_owned(),
        other => format!("closed by {}", other.name()),
    };
    broker.ssh.close(broker.ports(), s, &why).await;
}

/// Pins the new definitions of a remote's quarantined tools (`tool`, or all of them) and serves
/// them again; one `tool_approved` record each. Returns the tools approved.
pub async fn approve_tools(
    broker: &Broker,
    actor: &Actor,
    remote: &str,
    tool: Option<&str>,
) -> Result<Vec<String>, Error> {
    let done = broker.federation.approve(remote, tool, &actor.name()).await?;
    for t in &done {
        broker
            .audit_now(
                actor
                    .stamp(Event::new(Kind::Federation, "tool_approved"))
                    .action(json!({ "remote": remote, "remote_tool": t }))
                    .allow(),
            )
            .await;
    }
    Ok(done)
}

/// What a successful reload did.
#[derive(Clone, Debug)]
pub struct Reloaded {
    /// Digest of the new policy.
    pub digest: String,
    /// Its warnings, plus principals the signer will refuse until a restart.
    pub warnings: Vec<String>,
}

/// Re-reads the policy (on the blocking pool) and swaps it in whole, or keeps the current one
/// and returns every problem. Certificates and sessions are not touched.
/// Re-reads the policy (on the blocking pool) and swaps it in whole, or keeps the current one and
/// returns every problem; either way one `policy_reload` record names who asked. Certificates and
/// sessions are not touched (sweeps close what the new policy no longer allows).
pub async fn reload(broker: &Broker, actor: &Actor) -> Result<Reloaded, PolicyError> {
    let source = broker.policy_source.clone();
    let loaded = broker.pool.run(move || source.load()).await.unwrap_or_else(|| {
        Err(PolicyError {
            problems: vec![super::policy::Problem {
                at: "broker".into(),
                path: String::new(),
                message: "the blocking pool is gone".into(),
                hint: None,
            }],
            warnings: Vec::new(),
        })
    });
    match loaded {
        Ok(new) => {
            broker.metrics.inc("ephyr_policy_reloads_total", &[("outcome", "ok")]);
            let mut warnings = new.warnings.clone();
            if let Some(s) = broker.signer.health().status {
                warnings.extend(super::signer_mismatches(&new, &s.limits));
            }
            let digest = new.digest.clone();
            let old = broker.policy().digest.clone();
            let mut new = new;
            // Freezes and the agent directory are the operators', not the file's: they outlive
            // every reload.
            new.frozen = broker.freezes.frozen();
            let overlaid = broker.agents.overlay(&mut new);
            warnings.extend(overlaid);
            broker.policy.replace(new);
            broker.secrets.clear();
            broker.proxy.clear();
            broker.changes.notify();
            log::info!("policy reloaded: {digest}");
            let ev = actor.stamp(Event::new(Kind::Policy, "policy_reload").outcome(
                serde_json::json!({ "ok": true, "previous": old, "digest": digest, "warnings": warnings.len() }),
            ));
            broker.audit_now(ev).await;
            for w in &warnings {
                log::warn!("policy: {w}");
            }
            Ok(Reloaded { digest, warnings })
        }
        Err(e) => {
            log::error!("policy reload failed; keeping the current policy:\n{e}");
            broker.metrics.inc("ephyr_policy_reloads_total", &[("outcome", "invalid")]);
            let first: Vec<String> = e.problems.iter().take(5).map(|p| p.to_string()).collect();
            let ev =
                actor
                    .stamp(Event::new(Kind::Policy, "policy_reload").error("invalid_policy", first.join("; ")).outcome(
                    serde_json::json!({ "ok": false, "kept": broker.policy().digest, "problems": e.problems.len() }),
                ));
            broker.audit_now(ev).await;
            Err(e)
        }
    }
}

/// What a freeze did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FreezeEffects {
    /// It was frozen already (nothing changed).
    pub already: bool,
    /// Tasks revoked (each with its subtree).
    pub tasks_revoked: usize,
    /// Certificates put on the KRL.
    pub certs_revoked: usize,
    /// SSH sessions closed.
    pub ssh_sessions_closed: usize,
    /// MCP sessions (and their streams) ended.
    pub mcp_sessions_ended: usize,
    /// Approval requests it covered, denied (a held call is told at once).
    pub approvals_denied: usize,
}

/// Checks that `kind`/`name` names something the broker knows: a policy entry, or a live task.
fn freezable(broker: &Broker, kind: FreezeKind, name: &str) -> Result<Option<TaskView>, Error> {
    let p = broker.policy();
    let known = match kind {
        FreezeKind::Agent => p.agents.contains_key(name),
        FreezeKind::Target => p.targets.contains_key(name),
        FreezeKind::Service => p.services.contains_key(name),
        FreezeKind::Remote => p.remotes.contains_key(name),
        FreezeKind::Task => {
            let id = ulid::Ulid::from_string(name)
                .map_err(|_| Error::Invalid(format!("{name:?} is not a task id (26 characters, Crockford base32)")))?;
            return match broker.tasks.view(id) {
                Some(v) => Ok(Some(v)),
                None => Err(Error::NotFound(format!("no live task {name}"))),
            };
        }
    };
    if known { Ok(None) } else { Err(Error::NotFound(format!("no {} {name:?} in the policy", kind.as_str()))) }
}

/// Swaps in a policy snapshot carrying the current freezes and the agent directory.
pub fn refresh_policy(broker: &Broker) {
    let mut p = (*broker.policy()).clone();
    p.frozen = broker.freezes.frozen();
    broker.agents.overlay(&mut p);
    broker.policy.replace(p);
}

/// The kill switch: freezes `kind`/`name` at once (every new request it covers is refused from
/// this moment), then revokes the live tasks and certificates it covers, closes SSH sessions,
/// ends the agent's MCP sessions and streams, and journals the freeze (it survives restarts).
/// One `freeze` record names the operator and what it did.
pub async fn freeze(
    broker: &Broker,
    actor: &Actor,
    kind: FreezeKind,
    name: &str,
    reason: &str,
) -> Result<FreezeEffects, Error> {
    if reason.chars().count() > super::freeze::MAX_REASON || reason.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "the reason must be at most {} characters, without control characters",
            super::freeze::MAX_REASON
        )));
    }
    let task = freezable(broker, kind, name)?;
    let Some(durable) = broker.freezes.freeze(kind, name, &actor.name(), reason)? else {
        return Ok(FreezeEffects { already: true, ..FreezeEffects::default() });
    };
    // Refuse first, clean up after: nothing the freeze covers is granted from here on.
    refresh_policy(broker);
    let why = format!("{} {name} was frozen by {}", kind.as_str(), actor.name());
    let fx = end_covered(broker, actor, kind, name, task, &why).await?;
    let journaled = durable.wait().await;
    let ev = actor.stamp(
        Event::new(Kind::Operator, "freeze")
            .action(json!({ "kind": kind.as_str(), "name": name, "reason": reason }))
            .allow()
            .outcome(serde_json::to_value(&fx).unwrap_or_default()),
    );
    let recorded = record(broker, ev).await;
    broker.metrics.inc("ephyr_freezes_total", &[("kind", kind.as_str())]);
    journaled.map_err(|e| {
        Error::Unavailable(format!(
            "{} {name} is frozen now, but the freeze was not journaled and will not survive a restart: {}",
            kind.as_str(),
            e.message()
        ))
    })?;
    recorded.map_err(|e| {
        Error::Unavailable(format!("{} {name} is frozen, but its audit record failed: {e}", kind.as_str()))
    })?;
    Ok(fx)
}

/// Ends what a freeze of `kind`/`name` (or an agent's suspension or revocation) covers, once
/// `authorize` or `authenticate` already refuses it: an agent's MCP sessions (before the change
/// feed wakes their streams, which then end), live tasks (each with its subtree), certificates
/// (on the KRL) and the SSH sessions holding them, and open approval requests (denied with
/// `why`, so an approval given later cannot let it act).
pub async fn end_covered(
    broker: &Broker,
    actor: &Actor,
    kind: FreezeKind,
    name: &str,
    task: Option<TaskView>,
    why: &str,
) -> Result<FreezeEffects, Error> {
    let mut fx = FreezeEffects::default();
    if kind == FreezeKind::Agent {
        fx.mcp_sessions_ended = broker.sessions.remove_agent(name);
    }
    broker.changes.notify();
    let now = crate::time::now().secs().max(0) as u64;
    match kind {
        FreezeKind::Task => {
            if let Some(v) = task.filter(|v| v.revoked.is_none()) {
                fx.tasks_revoked += 1 + revoke_task(broker, actor, &v).await?;
            }
        }
        FreezeKind::Agent => {
            let mut mine: Vec<TaskView> = broker
                .tasks
                .visible(&super::tasks::Scope::All)
                .into_iter()
                .filter(|v| v.task.agent == name && v.revoked.is_none())
                .collect();
            mine.sort_by_key(|v| v.task.depth);
            for v in mine {
                if !broker.tasks.unusable(&v.task.id.to_string()) {
                    fx.tasks_revoked += 1 + revoke_task(broker, actor, &v).await?;
                }
            }
        }
        FreezeKind::Service => broker.proxy.clear(),
        FreezeKind::Target | FreezeKind::Remote => {}
    }
    if matches!(kind, FreezeKind::Agent | FreezeKind::Target) {
        let covered = broker.ssh.registry.list(now, |c| match kind {
            FreezeKind::Agent => c.agent == name,
            _ => c.target == name,
        });
        for c in covered.into_iter().filter(|c| c.revoked_at.is_none()) {
            if broker.ssh.session_with_serial(c.cert.serial).is_some() {
                fx.ssh_sessions_closed += 1;
            }
            revoke_cert(broker, actor, c.cert.serial).await?;
            fx.certs_revoked += 1;
        }
    }
    let denied = broker.approvals.deny_open(&actor.name(), why, |r| match kind {
        FreezeKind::Agent => r.agent == name,
        FreezeKind::Task => r.lineage.iter().any(|t| t == name),
        FreezeKind::Target => r.action["kind"] == "ssh" && r.action["target"] == name,
        FreezeKind::Service => r.action["kind"] == "http" && r.action["service"] == name,
        FreezeKind::Remote => r.action["kind"] == "remote" && r.action["remote"] == name,
    });
    fx.approvals_denied = denied.len();
    for d in denied {
        let _ = d.wait().await;
    }
    broker.metrics.set("ephyr_approvals_pending", &[], broker.approvals.pending() as f64);
    let before = broker.ssh.session_count();
    broker.ssh.sweep(broker.ports(), &broker.policy()).await;
    fx.ssh_sessions_closed += before.saturating_sub(broker.ssh.session_count());
    Ok(fx)
}

/// Lifts a freeze (journaled first: if the log fails, it stays frozen). Revoked tasks and
/// certificates stay revoked. `Ok(false)`: it was not frozen.
pub async fn unfreeze(broker: &Broker, actor: &Actor, kind: FreezeKind, name: &str) -> Result<bool, Error> {
    let Some(durable) = broker.freezes.thaw(kind, name, &actor.name())? else {
        return Ok(false);
    };
    if let Err(e) = durable.wait().await {
        return Err(Error::Unavailable(format!(
            "{} {name} stays frozen: the unfreeze was not journaled: {}",
            kind.as_str(),
            e.message()
        )));
    }
    broker.freezes.forget(kind, name);
    refresh_policy(broker);
    broker.changes.notify();
    let ev = actor
        .stamp(Event::new(Kind::Operator, "unfreeze").action(json!({ "kind": kind.as_str(), "name": name })).allow());
    record(broker, ev).await.map_err(|e| Error::Unavailable(format!("unfrozen, but its audit record failed: {e}")))?;
    Ok(true)
}

/// An operator's answer to approval request `id`: approve (with an optional waiver, within the
/// rules' longest) or deny (a reason is required: the agent is told it). Only operators answer —
/// a local process on the socket or a console operator — and only those every rule behind the
/// request accepts (`approvers`), each once (four eyes needs two different people).
pub async fn decide_approval(
    broker: &Broker,
    actor: &Actor,
    id: &str,
    approve: bool,
    reason: &str,
    waiver: Option<std::time::Duration>,
) -> Result<(super::approvals::Decided, super::approvals::Request), Error> {
    use super::approvals::{Decided, MAX_REASON};
    use super::policy::approval::{Answerer, Requirement};
    let who = match actor {
        Actor::Operator { uid } => Answerer::Local(*uid),
        Actor::Console { name } => Answerer::Console(name.clone()),
        _ => return Err(Error::Refused("only operators answer approval requests".into())),
    };
    let reason = reason.trim();
    if reason.chars().count() > MAX_REASON || reason.chars().any(|c| c.is_control()) {
        return Err(Error::Invalid(format!("a reason is at most {MAX_REASON} characters on one line")));
    }
    if !approve && reason.is_empty() {
        return Err(Error::Invalid("a denial needs a reason (the agent is told it)".into()));
    }
    let r = broker.approvals.get(id).ok_or_else(|| Error::NotFound(format!("no approval request {id:?}")))?;
    let policy = broker.policy();
    let req = Requirement::named(&policy, &r.rules);
    if req.rules.is_empty() {
        return Err(Error::Refused(format!(
            "the rules behind request {id} ({}) are no longer in the policy; the agent's next call is decided by the current one",
            r.rules.join(", ")
        )));
    }
    if !req.accepts(&policy, &who) {
        return Err(Error::Refused(format!(
            "{} may not answer request {id}: its approvers are {}",
            who.name(),
            req.approvers_text()
        )));
    }
    let waiver_secs = match (approve, waiver) {
        (false, Some(_)) => return Err(Error::Invalid("a waiver goes with an approval, not a denial".into())),
        (_, None) => 0,
        (true, Some(w)) => match req.waiver() {
            Some(max) if w <= max && !w.is_zero() => w.as_secs(),
            Some(max) => {
                return Err(Error::Invalid(format!(
                    "the rules allow a waiver of at most {}",
                    crate::time::format_duration(max)
                )));
            }
            None => return Err(Error::Invalid(format!("rule {} allows no waiver", r.rules.join(", ")))),
        },
    };
    let (decided, durable) = broker.approvals.vote(id, &who, approve, reason, waiver_secs)?;
    let synced = durable.wait().await;
    let label = match decided {
        Decided::Approved => "approved",
        Decided::Partly => "partly",
        Decided::Denied => "denied",
    };
    broker.metrics.inc("ephyr_approvals_total", &[("outcome", label)]);
    if decided != Decided::Partly {
        let waited = (crate::time::now().secs() - r.at).max(0) as u64;
        broker.metrics.add("ephyr_approval_decision_seconds_total", &[], waited);
    }
    broker.metrics.set("ephyr_approvals_pending", &[], broker.approvals.pending() as f64);
    let ev = Event::new(Kind::Approval, "approval_decision")
        .agent(who.name())
        .action(json!({
            "approval": id, "for_agent": r.agent, "task": r.task, "approve": approve,
            "reason": reason, "waiver_secs": waiver_secs, "rules": r.rules,
        }))
        .allow()
        .outcome(json!({ "decided": label }));
    let recorded = record(broker, ev).await;
    synced?;
    recorded.map_err(|e| Error::Unavailable(format!("the answer is recorded, but its audit record failed: {e}")))?;
    log::info!("approval request {id}: {label} by {}", who.name());
    let after = broker.approvals.get(id).unwrap_or(r);
    Ok((decided, after))
}

/// Expires approval requests whose time is up (nobody answered, or the approval was not used),
/// each with an audit record.
pub fn expire_approvals(broker: &Broker) {
    use super::audit::AuditSink as _;
    let expired = broker.approvals.expire_due();
    if expired.is_empty() {
        return;
    }
    for (r, _durable) in &expired {
        broker.metrics.inc("ephyr_approvals_total", &[("outcome", "expired")]);
        let ev = Event::new(Kind::Approval, "approval_expired")
            .agent(r.agent.clone())
            .action(json!({ "approval": r.id, "rules": r.rules, "approvals": r.votes.len(), "needed": r.needed }))
            .allow();
        let ev = match &r.task {
            Some(t) => ev.task(t.clone(), r.lineage.clone()),
            None => ev,
        };
        if let Err(e) = broker.audit.note(ev) {
            log::error!("audit: {e}");
        }
    }
    broker.metrics.set("ephyr_approvals_pending", &[], broker.approvals.pending() as f64);
}
