//! Narrow handles: the few things a feature asks of the rest of the broker, as small traits, so
//! that the feature takes only what it uses and its logic can be unit-tested with an in-memory
//! stand-in. (The audit trail's handle is `audit::AuditSink`; metrics are the `Metrics` value.)
//!
//! What runs here: nothing; the broker's real implementations are `signer_client::Signer`
//! (this file) and the audit log.

use std::future::Future;
use std::pin::Pin;

use super::signer_client::{CallError, Signer};
use crate::signer::protocol::{CertRequest, Request, Response};

/// A certificate from the signer: its serial and OpenSSH text.
pub type SignedCert = (u64, String);

/// What SSH needs of the signer: certificates, and its own validity cap.
pub trait CertSigner {
    /// Asks the signer to certify `req`.
    fn sign<'a>(&'a self, req: CertRequest) -> Pin<Box<dyn Future<Output = Result<SignedCert, CallError>> + 'a>>;

    /// The signer's longest certificate validity, seconds (fixed at its start); `None` while it
    /// is not up.
    fn max_cert_ttl(&self) -> Option<u64>;
}

impl CertSigner for Signer {
    fn sign<'a>(&'a self, req: CertRequest) -> Pin<Box<dyn Future<Output = Result<SignedCert, CallError>> + 'a>> {
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
}
