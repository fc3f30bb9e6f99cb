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
}

impl Actor {
    /// The name in audit records (`agent`, `operator:uidN`, `signal:SIGHUP`).
    pub fn name(&self) -> String {
        match self {
            Actor::Agent { name, .. } => name.clone(),
            Actor::Operator { uid } => format!("operator:uid{uid}"),
            Actor::Signal(s) => format!("signal:{s}"),
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
