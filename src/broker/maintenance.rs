//! What runs in the background of a serving broker, each job a task on the executor:
//!
//! - every 30 s, expired tasks, their trees' keys and stale proof nonces are collected (and an
//!   `Expired` task event is published);
//! - on every `Revoked` task event, SSH sessions of revoked trees close at once;
//! - every 5 s, idle SSH sessions and those whose certificate expired close, and expired
//!   certificates leave the registry;
//! - every 2 s, federated remotes that are due are read again: a remote that went down is
//!   retried, a stdio remote that exited restarted (with backoff), a changed tool list re-read,
//!   and a change to what they serve announced to agents' notification streams;
//! - every second while any is open, approval requests nobody answered in time (and approvals not used in time)
//!   expire, each with an audit record; a held call waiting on one is woken;
//! - signer events (workers ended and restarted, the keeper relaunched) become audit records;
//! - every second while a run is live, runs whose lease ran out are ended (their tasks revoked);
//!   on every task event, runs whose task ended are ended too, and (then, and every 10 s) the
//!   disposable keys of runs that are over are revoked;
//! - a minute after start and then hourly, the agent reaper's plan (idle, decommissioned and
//!   orphaned agents; docs/agents.md) is computed, and carried out with `lifecycle.reaper: apply`.

use std::rc::Rc;

use super::Broker;
use super::audit::{Event, Kind};
use super::signer_client::SignerEvent;

/// Starts the background jobs.
pub fn spawn(
    ex: &Rc<smol::LocalExecutor<'static>>,
    broker: &Rc<Broker>,
    signer_events: async_channel::Receiver<SignerEvent>,
) {
    {
        // Expired tasks, their watermarks and trees' keys, and stale proof nonces go.
        let broker = broker.clone();
        ex.spawn(async move {
            loop {
                crate::broker::deadline::Deadline::after(std::time::Duration::from_secs(30)).await;
                let gone = broker.tasks.collect(crate::time::now());
                if gone > 0 {
                    log::info!("tasks: {gone} expired and removed");
                }
                broker.metrics.set("ephyr_tasks_active", &[], broker.tasks.len() as f64);
            }
        })
        .detach();
    }
    {
        // Approval requests past their time expire (a held call waiting on one is woken).
        let broker = broker.clone();
        ex.spawn(async move {
            loop {
                // Idle (nothing open): sleep until a request is opened, not every second.
                let listener = broker.approvals.changed.listen();
                if !broker.approvals.any_open() {
                    listener.await;
                }
                crate::broker::deadline::Deadline::after(std::time::Duration::from_secs(1)).await;
                super::ops::expire_approvals(&broker);
            }
        })
        .detach();
    }
    {
        // Revocations reach SSH sessions at once (task events): the sessions of a revoked
        // tree close whoever revoked it (tool, local API, cascade).
        let broker = broker.clone();
        ex.spawn(async move {
            let mut cursor = broker.tasks.events.cursor();
            loop {
                let listener = broker.tasks.events.listen();
                let revoked = match broker.tasks.events.since(cursor) {
                    Ok((events, next)) => {
                        cursor = next;
                        events.iter().any(|e| matches!(e, super::tasks::events::TaskEvent::Revoked { .. }))
                    }
                    Err(_lagged) => {
                        cursor = broker.tasks.events.cursor();
                        true
                    }
                };
                if revoked {
                    broker.ssh.sweep(broker.ports(), &broker.policy()).await;
                    continue;
                }
                listener.await;
            }
        })
        .detach();
    }
    {
        // Idle and expired SSH sessions close; expired certificates leave the registry.
        let broker = broker.clone();
        ex.spawn(async move {
            loop {
                crate::broker::deadline::Deadline::after(std::time::Duration::from_secs(5)).await;
                broker.ssh.sweep(broker.ports(), &broker.policy()).await;
            }
        })
        .detach();
    }
    {
        // Remotes are retried, restarted and re-read without waiting for an agent.
        let broker = broker.clone();
        ex.spawn(async move {
            let mut served = broker.federation.served_generation();
            loop {
                crate::broker::deadline::Deadline::after(std::time::Duration::from_secs(2)).await;
                let policy = broker.policy();
                if !policy.remotes.is_empty() {
                    broker.federation.refresh_due(broker.ports(), &policy).await;
                }
                // What the remotes serve changed (read again, approved): agents' streams hear of it.
                let now = broker.federation.served_generation();
                if now != served {
                    served = now;
                    broker.changes.notify();
                }
            }
        })
        .detach();
    }
    {
        // Leases: a run whose CLI stopped renewing dies within its lease and a second.
        let broker = broker.clone();
        ex.spawn(async move {
            loop {
                let listener = broker.runs.started.listen();
                if broker.runs.live() == 0 {
                    listener.await;
                    continue;
                }
                crate::broker::deadline::Deadline::after(std::time::Duration::from_secs(1)).await;
                for r in broker.runs.lapsed(std::time::Instant::now()) {
                    log::warn!("run {}: its lease ran out (the CLI stopped renewing); ending it", r.id());
                    let actor = super::ops::Actor::Broker("run_lease");
                    if let Err(e) = super::runs::api::finish(&broker, &r, "lease_expired", &actor, None).await {
                        log::error!("run {}: ending it failed: {}", r.id(), e.message());
                    }
                }
            }
        })
        .detach();
    }
    {
        // Runs whose task ended otherwise (revoked by a tool, the console, a freeze; expired)
        // end too; disposable keys of runs that are over are revoked (also every 10 s, which
        // retries a provider that was down and cleans up after a crash).
        let broker = broker.clone();
        ex.spawn(async move {
            loop {
                // Any task event (what it says does not matter: every run is checked) or 10 s.
                let listener = broker.tasks.events.listen();
                futures_lite::future::or(
                    listener,
                    crate::broker::deadline::Deadline::after(std::time::Duration::from_secs(10)),
                )
                .await;
                for r in broker.runs.list() {
                    let unusable = broker.tasks.unusable(&r.id().to_string());
                    let actor = super::ops::Actor::Broker("run_task_ended");
                    if r.ended().is_none() && unusable {
                        let _ = super::runs::api::finish(&broker, &r, "task_ended", &actor, None).await;
                    } else if r.ended().is_some() && !unusable {
                        // An ended run whose revocation failed (the journal was unavailable).
                        if let Err(e) = super::runs::api::revoke(&broker, &r, &actor).await {
                            log::error!("run {}: revoking its task failed again: {}", r.id(), e.message());
                        }
                    }
                }
                broker.runs.collect();
                if !broker.keys.outstanding().is_empty() {
                    let (_, failures) = broker.keys.sweep(&broker, false).await;
                    for f in failures {
                        log::warn!("disposable keys: {f} (retried in 10 s)");
                    }
                }
            }
        })
        .detach();
    }
    {
        // The reaper: a minute after start, then hourly; it reports its plan, and carries it
        // out only with `lifecycle.reaper: apply` (`ephyr agent reap --apply` does it by hand).
        let broker = broker.clone();
        ex.spawn(async move {
            let mut wait = std::time::Duration::from_secs(60);
            loop {
                crate::broker::deadline::Deadline::after(wait).await;
                wait = std::time::Duration::from_secs(3600);
                let apply = broker.policy().lifecycle.reaper_apply;
                let v = super::agents::api::reap(&broker, apply).await;
                let steps = v["steps"].as_array().map_or(0, Vec::len);
                if steps > 0 && !apply {
                    log::info!("reaper: {steps} agent(s) due a lifecycle step; `ephyr agent reap` shows them");
                }
            }
        })
        .detach();
    }
    {
        let broker = broker.clone();
        ex.spawn(async move {
            while let Ok(e) = signer_events.recv().await {
                broker.audit_now(signer_event(e)).await;
            }
        })
        .detach();
    }
}

/// The audit record of a signer event.
fn signer_event(e: SignerEvent) -> Event {
    match e {
        SignerEvent::WorkerStarted { pid } => {
            Event::new(Kind::Signer, "worker_started").outcome(serde_json::json!({ "pid": pid }))
        }
        SignerEvent::WorkerEnded { pid, why } => Event::new(Kind::Signer, "worker_ended")
            .error("signer_worker_ended", why)
            .outcome(serde_json::json!({ "pid": pid })),
        SignerEvent::KeeperRelaunched { pid } => {
            Event::new(Kind::Signer, "keeper_relaunched").outcome(serde_json::json!({ "pid": pid }))
        }
        SignerEvent::Lost { why } => Event::new(Kind::Signer, "signer_lost").error("signer_lost", why),
    }
}
