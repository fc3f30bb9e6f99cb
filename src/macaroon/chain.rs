//! The HMAC chain: mint, attenuate, verify.
//!
//! libmacaroons' construction: `K = HMAC("macaroons-key-generator", root_key)`,
//! `sig_0 = HMAC(K, identifier)`, `sig_i = HMAC(sig_{i-1}, caveat_i)`; the token carries `sig_n`.
//! Anyone holding a token can append caveats (the signature is the key for the next step); only
//! the holder of the root key can create a chain from scratch. The final comparison is constant
//! time.

use std::fmt;

use super::envelope::{ReduceError, Reduced, Reducer, TimeError};
use super::hmac::{hmac_sha256, sha256_32};
use super::wire::Macaroon;
use crate::secret::{SecretBytes, constant_time_eq};
use crate::time::UnixMicros;

/// libmacaroons' key-derivation label.
pub const KEY_GENERATOR: &[u8] = b"macaroons-key-generator";

/// A root key: the secret of one task tree. Never printed; zeroized on drop.
#[derive(Clone)]
pub struct RootKey(SecretBytes);

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey([redacted])")
    }
}

impl RootKey {
    /// A root key from its bytes (ephyr uses 32 random bytes; libmacaroons allows any length).
    pub fn from_bytes(bytes: &[u8]) -> RootKey {
        RootKey(SecretBytes::new(bytes.to_vec()))
    }

    /// The secret, for sealing it at rest.
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }

    /// Derives the chain start for `identifier`: `HMAC(HMAC(generator, key), identifier)`.
    pub fn start(&self, identifier: &[u8]) -> ChainStart {
        // Keys longer than 64 bytes would have to be hashed first; ours never are.
        let mut derived = hmac_sha256(KEY_GENERATOR, self.0.expose());
        let sig0 = hmac_sha256(&derived, identifier);
        zeroize::Zeroize::zeroize(&mut derived);
        ChainStart { identifier: identifier.to_vec(), sig0 }
    }
}

/// The first chain signature of one token family (root key + identifier). Precomputed once per
/// task tree; whoever holds it can mint tokens for that tree, so it is secret.
pub struct ChainStart {
    identifier: Vec<u8>,
    sig0: [u8; 32],
}

impl fmt::Debug for ChainStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainStart({}, [redacted])", String::from_utf8_lossy(&self.identifier))
    }
}

impl Drop for ChainStart {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.sig0);
    }
}

impl ChainStart {
    /// The identifier this chain starts from.
    pub fn identifier(&self) -> &[u8] {
        &self.identifier
    }

    /// Mints a token with these caveats.
    pub fn mint(&self, location: &str, caveats: &[&str]) -> Macaroon {
        let mut sig = self.sig0;
        for c in caveats {
            sig = hmac_sha256(&sig, c.as_bytes());
        }
        let cavs: Vec<&[u8]> = caveats.iter().map(|c| c.as_bytes()).collect();
        Macaroon::from_parts(location.as_bytes(), &self.identifier, &cavs, sig)
    }

    /// Recomputes the chain of `m` and compares signatures (constant time). Calls `each` with the
    /// index, text and signature after every caveat.
    fn check(&self, m: &Macaroon, mut each: impl FnMut(usize, &[u8], &[u8; 32])) -> Result<(), VerifyError> {
        if m.identifier() != self.identifier.as_slice() {
            return Err(VerifyError::WrongRootKey);
        }
        let mut sig = self.sig0;
        for (i, c) in m.caveats().enumerate() {
            sig = hmac_sha256(&sig, c);
            each(i, c, &sig);
        }
        let ok = constant_time_eq(&sig, m.signature());
        zeroize::Zeroize::zeroize(&mut sig);
        if ok { Ok(()) } else { Err(VerifyError::BadSignature) }
    }

    /// Verifies the chain only (no caveat is interpreted).
    pub fn verify_signature(&self, m: &Macaroon) -> Result<(), VerifyError> {
        self.check(m, |_, _, _| {})
    }

    /// Verifies the chain, then reduces the caveats. Does not look at the clock: call
    /// [`Reduced::envelope`]`.check_time(now)` (or use [`ChainStart::verify`]).
    ///
    /// One pass: each caveat is parsed as its chain step is computed (so the lineage can carry the
    /// digest of the signature after each `task =` caveat), but a bad signature is always reported
    /// as such, before any caveat error.
    pub fn verify_and_reduce(&self, m: &Macaroon) -> Result<Reduced, VerifyError> {
        let mut reducer = Reducer::default();
        let mut caveat_error = None;
        self.check(m, |_, c, sig| {
            if caveat_error.is_none() {
                let binding = if c.starts_with(b"task = ") { sha256_32(sig) } else { [0; 32] };
                if let Err(e) = reducer.push(c, binding) {
                    caveat_error = Some(e);
                }
            }
        })?;
        if let Some(e) = caveat_error {
            return Err(VerifyError::Caveat(e));
        }
        reducer.finish(m.identifier(), true).map_err(VerifyError::Caveat)
    }

    /// Verifies the chain, reduces, and checks the validity window at `now`.
    pub fn verify(&self, m: &Macaroon, now: UnixMicros) -> Result<Reduced, VerifyError> {
        let r = self.verify_and_reduce(m)?;
        r.envelope.check_time(now).map_err(VerifyError::Time)?;
        Ok(r)
    }
}

/// Appends a first-party caveat (what any holder can do offline). The caveat is not parsed here:
/// a holder may append anything, and verification refuses what it cannot read.
pub fn attenuate(m: &Macaroon, caveat: &str) -> Macaroon {
    let sig = hmac_sha256(m.signature(), caveat.as_bytes());
    m.with_caveat(caveat.as_bytes(), sig)
}

/// Why a token does not verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyError {
    /// The token's identifier is not the one this root key belongs to.
    WrongRootKey,
    /// The chain does not reproduce the token's signature: tampered, reordered, truncated, or
    /// minted under another key.
    BadSignature,
    /// The chain is intact but a caveat is unreadable or the lineage is inconsistent.
    Caveat(ReduceError),
    /// The token is outside its validity window.
    Time(TimeError),
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::WrongRootKey => f.write_str("token was not issued under this root key"),
            VerifyError::BadSignature => f.write_str("token signature is invalid"),
            VerifyError::Caveat(e) => write!(f, "token caveat not accepted: {e}"),
            VerifyError::Time(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for VerifyError {}
