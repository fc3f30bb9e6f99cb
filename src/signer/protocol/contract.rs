//! What the broker and the signer agree on besides frames: the signer's hard limits (the broker
//! validates its policy against them), the audit checkpoint message and its verification, and
//! where the key files live. The broker imports these from here, never from `signer::keys` or
//! `signer::custody`.

use std::path::{Path, PathBuf};

/// Descriptor number of the control socket in the keeper (the broker passes it there on exec).
pub const CONTROL_FD: i32 = 3;

/// Hard upper bound on certificate validity, whatever the configuration says.
pub const HARD_MAX_CERT_TTL_SECS: u32 = 24 * 3600;
/// How far into the past a certificate may start (to absorb clock skew on targets).
pub const MAX_BACKDATE_SECS: u64 = 600;
/// Extensions a certificate may carry.
pub const KNOWN_EXTENSIONS: [&str; 6] = [
    "no-touch-required",
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
];
/// Domain separation prefix of every audit checkpoint signature. A certificate's signed data starts
/// with a big-endian length (`00 00 00 20 ssh-ed25519-cert-v01@...`), so the two can never collide;
/// the checkpoint key is also a different key, derived from the sealing key.
pub const CHECKPOINT_DOMAIN: &[u8] = b"ephyr-audit-checkpoint-v1\0";

/// The message an audit checkpoint signature covers.
pub fn checkpoint_message(digest: &[u8; 32]) -> Vec<u8> {
    let mut m = CHECKPOINT_DOMAIN.to_vec();
    m.extend_from_slice(digest);
    m
}

/// Verifies an audit checkpoint signature with the checkpoint public key.
pub fn verify_checkpoint(public_key: &[u8], digest: &[u8; 32], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(&checkpoint_message(digest), signature)
        .is_ok()
}

/// Whether `p` is an acceptable Unix user name for a principal.
pub fn valid_principal(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 32
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !p.starts_with('-')
}

/// Subdirectory of the data dir that holds the keys.
pub const KEYS_DIR: &str = "keys";
pub(crate) const CA_KEY: &str = "ca_key";
pub(crate) const CA_PUB: &str = "ca_key.pub";
pub(crate) const SEALING_KEY: &str = "sealing_key";
pub(crate) const CHECKPOINT_PUB: &str = "audit_checkpoint.pub";
/// Paths of the key files under one data dir.
#[derive(Clone, Debug)]
pub struct KeyPaths {
    /// `<data-dir>/keys`.
    pub dir: PathBuf,
}

impl KeyPaths {
    /// Key paths for `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join(KEYS_DIR) }
    }
    /// The CA private key.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join(CA_KEY)
    }
    /// The CA public key line.
    pub fn ca_pub(&self) -> PathBuf {
        self.dir.join(CA_PUB)
    }
    /// The sealing key.
    pub fn sealing_key(&self) -> PathBuf {
        self.dir.join(SEALING_KEY)
    }
    /// The audit checkpoint public key (base64 of the raw Ed25519 key, one line).
    pub fn checkpoint_pub(&self) -> PathBuf {
        self.dir.join(CHECKPOINT_PUB)
    }
}
