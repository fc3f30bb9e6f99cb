//! Narrow handles: the few things a feature asks of the rest of the broker, as small traits, so
//! that the feature takes only what it uses and its logic can be unit-tested with in-memory
//! stand-ins. SSH and the HTTP proxy take a [`Ports`] value; the agent tools take a `tools::Ctx`
//! made of `Ports`, the feature handles they drive, a [`Sealer`] and the [`Operations`] port.
//! Nothing below the composition layer (`serve`, the transports, `tools::call`) holds the
//! `Broker` itself.
//!
//! What runs here: nothing of its own; the broker's real implementations are here (for the
//! signer, the task store and the broker's secret resolution) and in `audit` (the audit log).
//! Stand-ins live with the tests that use them.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use super::audit::{AuditSink, Event};
use super::blocking::BlockingPool;
use super::metrics::Metrics;
use super::ops::Actor;
use super::policy::SecretRef;
use super::signer_client::{CallError, Signer};
use super::ssh::Session;
use super::tasks::{TaskStore, TaskView};
use super::{Broker, Error};
use crate::secret::SecretBytes;
use crate::signer::protocol::{CertRequest, ExecRequest, Request, Response};
use crate::time::UnixMicros;

/// A future on the executor thread.
pub type Local<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// A certificate from the signer: its serial and OpenSSH text.
pub type SignedCert = (u64, String);

/// What SSH needs of the signer: certificates, its validity cap and its CA key.
pub trait CertSigner {
    /// Asks the signer to certify `req`.
    fn sign<'a>(&'a self, req: CertRequest) -> Local<'a, Result<SignedCert, CallError>>;

    /// The signer's longest certificate validity, seconds (fixed at its start); `None` while it
    /// is not up.
    fn max_cert_ttl(&self) -> Option<u64>;

    /// The user CA's public key (OpenSSH text); `None` while the signer is not up.
    fn ca_public_key(&self) -> Option<String>;

    /// Asks the signer for an exec envelope (`verify_on_target` targets): its text and SSHSIG.
    fn sign_exec<'a>(&'a self, req: ExecRequest) -> Local<'a, Result<(String, String), CallError>> {
        let _ = req;
        Box::pin(async { Err(CallError::Protocol("this signer signs no exec envelopes".into())) })
    }
}

impl CertSigner for Signer {
    fn sign<'a>(&'a self, req: CertRequest) -> Local<'a, Result<SignedCert, CallError>> {
        Box::pin(async move {
            match self.call(Request::SignUserCert(req)).await? {
                Response::Certificate { serial, certificate } => Ok((serial, certificate)),
                other => Err(CallError::Protocol(format!("unexpected signer answer {other:?}"))),
            }
        })
    }

    fn max_cert_ttl(&self) -> Option<u64> {
        self.health().status.map(|s| u64::from(s.limits.max_cert_ttl_secs))
    }

    fn sign_exec<'a>(&'a self, req: ExecRequest) -> Local<'a, Result<(String, String), CallError>> {
        Box::pin(async move {
            match self.call(Request::SignExec(req)).await? {
                Response::ExecSigned { envelope, signature } => Ok((envelope, signature)),
                other => Err(CallError::Protocol(format!("unexpected signer answer {other:?}"))),
            }
        })
    }

    fn ca_public_key(&self) -> Option<String> {
        self.health().status.map(|s| s.ca_public_key)
    }
}

/// Seals state at rest with the signer's key (task root keys).
pub trait Sealer {
    /// Seals `plaintext` bound to `context`.
    fn seal(&self, context: String, plaintext: SecretBytes) -> Local<'_, Result<Vec<u8>, Error>>;
}

impl Sealer for Signer {
    fn seal(&self, context: String, plaintext: SecretBytes) -> Local<'_, Result<Vec<u8>, Error>> {
        Box::pin(Signer::seal(self, context, plaintext))
    }
}

/// Whether a task can still act, for what outlives a request (sessions, streams).
pub trait TaskLiveness {
    /// The task (text id) is unknown, expired, or it or an ancestor is revoked.
    fn unusable(&self, task: &str) -> bool;

    /// Resolves once `task` is unusable or `also` (a token's own expiry) passes. Owns what it
    /// needs: a response body keeps it after the request's borrows end.
    fn ended(&self, task: String, also: Option<UnixMicros>) -> Local<'static, ()>;
}

impl TaskLiveness for Rc<TaskStore> {
    fn unusable(&self, task: &str) -> bool {
        TaskStore::unusable(self, task)
    }

    fn ended(&self, task: String, also: Option<UnixMicros>) -> Local<'static, ()> {
        let store = self.clone();
        Box::pin(async move { store.until_unusable(&task, also).await })
    }
}

/// Upstream credentials by reference (`env:`, `file:`, `secret:`).
pub trait SecretSource {
    /// The secret's value; `Err` (`Error::Unavailable`) names the reference, never a value.
    fn resolve<'a>(&'a self, r: &'a SecretRef) -> Local<'a, Result<SecretBytes, Error>>;
}

impl SecretSource for Broker {
    fn resolve<'a>(&'a self, r: &'a SecretRef) -> Local<'a, Result<SecretBytes, Error>> {
        Box::pin(self.secrets.resolve(&self.pool, &self.signer, r))
    }
}

/// The operations layer (`ops`) as the agent tools reach it.
pub trait Operations {
    /// Revokes a task and its descendants (`ops::revoke_task`).
    fn revoke_task<'a>(&'a self, actor: &'a Actor, v: &'a TaskView) -> Local<'a, Result<usize, Error>>;

    /// Closes an SSH session (`ops::close_session`).
    fn close_session<'a>(&'a self, actor: &'a Actor, s: &'a Rc<Session>) -> Local<'a, ()>;
}

impl Operations for Broker {
    fn revoke_task<'a>(&'a self, actor: &'a Actor, v: &'a TaskView) -> Local<'a, Result<usize, Error>> {
        Box::pin(super::ops::revoke_task(self, actor, v))
    }

    fn close_session<'a>(&'a self, actor: &'a Actor, s: &'a Rc<Session>) -> Local<'a, ()> {
        Box::pin(super::ops::close_session(self, actor, s))
    }
}

/// What SSH and the proxy use of the rest of the broker.
#[derive(Clone, Copy)]
pub struct Ports<'a> {
    /// The audit trail.
    pub audit: &'a dyn AuditSink,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// Certificates.
    pub signer: &'a dyn CertSigner,
    /// Task revocation and expiry.
    pub tasks: &'a dyn TaskLiveness,
    /// Upstream credentials.
    pub secrets: &'a dyn SecretSource,
    /// Blocking work (DNS, files, TLS set-up).
    pub pool: &'a BlockingPool,
    /// Approval requests (the gate of actions an `approvals:` rule holds).
    pub approvals: &'a super::approvals::Approvals,
    /// Where this request's progress goes, if its client asked for progress.
    pub progress: Option<&'a super::dispatch::Progress>,
}

impl<'a> Ports<'a> {
    /// The same handles, reporting progress to `progress` (a held approval reports its wait).
    pub fn with_progress(self, progress: Option<&'a super::dispatch::Progress>) -> Ports<'a> {
        Ports { progress, ..self }
    }

    /// Records an event and waits until it is durable; on failure logs it (for events that do not
    /// gate a response — those call `audit.record` themselves and refuse on error).
    pub async fn audit_now(&self, e: Event) {
        match self.audit.record(e) {
            Ok(t) => {
                if let Err(err) = t.durable().await {
                    log::error!("{err}");
                }
            }
            Err(err) => log::error!("{err}"),
        }
    }
}

impl Broker {
    /// The broker's narrow handles.
    pub fn ports(&self) -> Ports<'_> {
        Ports {
            audit: &*self.audit,
            metrics: &self.metrics,
            signer: &self.signer,
            tasks: &self.tasks,
            secrets: self,
            pool: &self.pool,
            approvals: &self.approvals,
            progress: None,
        }
    }

    /// Records an event and waits until it is durable, logging a failure ([`Ports::audit_now`]).
    pub async fn audit_now(&self, e: Event) {
        self.ports().audit_now(e).await
    }
}
