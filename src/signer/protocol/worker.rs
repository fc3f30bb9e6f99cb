//! The worker channel (broker ↔ signer worker): [`Request`] and [`Response`], and the status
//! report both channels share. Pure.

use std::fmt;

use super::codec::{DecodeError, Frame, MAX_NAME, MAX_STR, Reader, Writer, kind, malformed, open_frame};
use super::*;
use crate::secret::SecretBytes;

/// A request from the broker to a signer worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Public keys, limits and sandbox state.
    Status,
    /// Sign an OpenSSH user certificate.
    SignUserCert(CertRequest),
    /// Encrypt `plaintext` under the sealing key, bound to `context`.
    Seal {
        /// Associated data: what the blob is for (e.g. `rootkey:<task ULID>`); unsealing needs the same.
        context: String,
        /// The secret to seal (at most [`MAX_SEAL_PLAINTEXT`] bytes).
        plaintext: SecretBytes,
    },
    /// Decrypt a blob made by `Seal` with the same context.
    Unseal {
        /// The context given to `Seal`.
        context: String,
        /// The sealed blob.
        sealed: Vec<u8>,
    },
    /// Sign an audit checkpoint (chain head digest) with the checkpoint key.
    SignCheckpoint {
        /// SHA-256 chain head.
        digest: [u8; 32],
    },
    /// Sign an exec envelope for a target that verifies commands itself (`exec::Envelope`; the
    /// signer picks the nonce and checks the command against the target's policy it was started with).
    SignExec(ExecRequest),
}

/// A command to sign for a `verify_on_target` target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRequest {
    /// Target name.
    pub target: String,
    /// The Unix user it runs as.
    pub principal: String,
    /// The exact command (at most [`exec::MAX_EXEC_COMMAND`] bytes).
    pub command: String,
    /// The envelope's end of validity, Unix seconds.
    pub expires: u64,
}

/// An OpenSSH user-certificate request. The signer checks it against its own limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRequest {
    /// Subject public key, OpenSSH text form (`ssh-ed25519 AAAA...`).
    pub public_key: String,
    /// Principals (remote user names); each must be on the signer's allow-list.
    pub principals: Vec<String>,
    /// Key id, shown in sshd logs (names agent, task and a serial).
    pub key_id: String,
    /// Start of validity, Unix seconds.
    pub valid_after: u64,
    /// End of validity, Unix seconds.
    pub valid_before: u64,
    /// `force-command` critical option.
    pub force_command: Option<String>,
    /// `source-address` critical option (comma-separated CIDRs).
    pub source_address: Option<String>,
    /// Extensions to grant (`permit-pty`, ...); empty grants none.
    pub extensions: Vec<String>,
}

/// A signer worker's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status(StatusReport),
    /// A signed certificate.
    Certificate {
        /// Certificate serial (random).
        serial: u64,
        /// The certificate, OpenSSH text form, no trailing newline.
        certificate: String,
    },
    /// A sealed blob.
    Sealed(Vec<u8>),
    /// Unsealed plaintext.
    Unsealed(SecretBytes),
    /// Ed25519 signature over the domain-separated checkpoint message.
    CheckpointSignature(Vec<u8>),
    /// A signed exec envelope: its text and the SSHSIG (PEM).
    ExecSigned {
        /// The envelope text.
        envelope: String,
        /// The SSHSIG over it, PEM.
        signature: String,
    },
    /// The request was refused or failed; the signer carries on.
    Error(SignerError),
}

/// A refusal with a code and a human reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Why, for humans and the audit log (never contains key material).
    pub message: String,
}

impl fmt::Display for SignerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// Signer error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame did not decode.
    Malformed,
    /// The frame exceeded [`MAX_FRAME`].
    TooLarge,
    /// Unknown protocol version.
    UnsupportedVersion,
    /// A frame kind this side does not accept.
    UnexpectedKind,
    /// A principal is not on the signer's allow-list.
    PrincipalNotAllowed,
    /// The requested validity exceeds the signer's TTL cap.
    TtlTooLong,
    /// The validity window is inverted, already over, or starts too far in the past.
    ValidityInvalid,
    /// The signer's own rate limit is exhausted for this window.
    RateLimited,
    /// The subject public key did not parse or uses an unsupported algorithm.
    InvalidPublicKey,
    /// Some other field is invalid (key id, extension, option, size).
    InvalidRequest,
    /// A sealed blob failed authentication (wrong context, tampered, or another key).
    UnsealFailed,
    /// An internal failure inside the signer.
    Internal,
    /// The signer could not read its keys at start (missing, unreadable or invalid).
    KeysUnavailable,
    /// A sandbox layer is not fully enforced and `--insecure-no-sandbox` was not given.
    SandboxNotEnforced,
    /// The command of an exec envelope is refused by the target's command policy.
    CommandRefused,
}

impl ErrorCode {
    const ALL: [ErrorCode; 15] = [
        Self::Malformed,
        Self::TooLarge,
        Self::UnsupportedVersion,
        Self::UnexpectedKind,
        Self::PrincipalNotAllowed,
        Self::TtlTooLong,
        Self::ValidityInvalid,
        Self::RateLimited,
        Self::InvalidPublicKey,
        Self::InvalidRequest,
        Self::UnsealFailed,
        Self::Internal,
        Self::KeysUnavailable,
        Self::SandboxNotEnforced,
        Self::CommandRefused,
    ];

    fn to_u16(self) -> u16 {
        Self::ALL.iter().position(|c| *c == self).map_or(0, |i| i as u16 + 1)
    }

    fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.get(usize::from(v).checked_sub(1)?).copied()
    }

    /// Stable machine-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed_frame",
            Self::TooLarge => "frame_too_large",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnexpectedKind => "unexpected_kind",
            Self::PrincipalNotAllowed => "principal_not_allowed",
            Self::TtlTooLong => "ttl_too_long",
            Self::ValidityInvalid => "validity_invalid",
            Self::RateLimited => "rate_limited",
            Self::InvalidPublicKey => "invalid_public_key",
            Self::InvalidRequest => "invalid_request",
            Self::UnsealFailed => "unseal_failed",
            Self::Internal => "internal",
            Self::KeysUnavailable => "keys_unavailable",
            Self::SandboxNotEnforced => "sandbox_not_enforced",
            Self::CommandRefused => "command_refused",
        }
    }
}

/// What the signer reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusReport {
    /// Process id of the answering process.
    pub pid: u32,
    /// CA public key, OpenSSH text form, no trailing newline.
    pub ca_public_key: String,
    /// Audit checkpoint public key (raw Ed25519, 32 bytes).
    pub checkpoint_public_key: Vec<u8>,
    /// Sandbox state.
    pub sandbox: SandboxReport,
    /// The limits the signer enforces on its own.
    pub limits: SignerLimits,
}

/// The signer's own limits, independent of the broker's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerLimits {
    /// Longest certificate validity, seconds (hard cap 24 h).
    pub max_cert_ttl_secs: u32,
    /// Principals it will put in certificates.
    pub principals: Vec<String>,
    /// Signatures allowed per window.
    pub rate_limit: u32,
    /// Window length, seconds.
    pub rate_window_secs: u32,
    /// Targets it signs exec envelopes for: `NAME SHA256` of each (`exec::SealedTarget::digest`).
    pub sealed: Vec<String>,
}

/// Enforcement state of one Landlock ruleset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandlockState {
    /// The kernel has no Landlock (or it is not enabled at boot).
    Unsupported,
    /// Available but the ruleset was not applied.
    NotEnforced,
    /// Every access right the running kernel's ABI knows is handled and denied.
    Enforced,
}

/// Enforcement state of the seccomp filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompState {
    /// No seccomp support for this architecture or kernel.
    Unsupported,
    /// The filter was not installed.
    NotEnforced,
    /// The allow-list filter is installed; anything else kills the process.
    Enforced,
}

/// The signer's sandbox, layer by layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxReport {
    /// All layers are fully enforced.
    pub enforced: bool,
    /// Started with `--insecure-no-sandbox` (serving although a layer is missing).
    pub insecure_override: bool,
    /// Effective uid after the drop.
    pub uid: u32,
    /// Effective gid after the drop.
    pub gid: u32,
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// The process is dumpable (should be false).
    pub dumpable: bool,
    /// Every capability set (incl. bounding and ambient) is empty.
    pub caps_cleared: bool,
    /// Landlock ABI of the running kernel (0 = none).
    pub landlock_abi: u8,
    /// Landlock state.
    pub landlock: LandlockState,
    /// seccomp state.
    pub seccomp: SeccompState,
    /// Human-readable reasons for every layer that is not fully enforced.
    pub problems: Vec<String>,
}

impl Request {
    /// Encodes with request id `id`.
    pub fn encode(&self, id: u64) -> Frame {
        let mut w;
        match self {
            Request::Status => w = Writer::new(kind::STATUS, id),
            Request::SignUserCert(c) => {
                w = Writer::new(kind::SIGN_CERT, id);
                w.str(&c.public_key);
                w.strs(&c.principals);
                w.str(&c.key_id);
                w.u64(c.valid_after);
                w.u64(c.valid_before);
                w.opt_str(c.force_command.as_deref());
                w.opt_str(c.source_address.as_deref());
                w.strs(&c.extensions);
            }
            Request::Seal { context, plaintext } => {
                w = Writer::new(kind::SEAL, id);
                w.str(context);
                w.secret(plaintext.expose());
            }
            Request::Unseal { context, sealed } => {
                w = Writer::new(kind::UNSEAL, id);
                w.str(context);
                w.bytes(sealed);
            }
            Request::SignCheckpoint { digest } => {
                w = Writer::new(kind::SIGN_CHECKPOINT, id);
                w.bytes(digest);
            }
            Request::SignExec(e) => {
                w = Writer::new(kind::SIGN_EXEC, id);
                w.str(&e.target);
                w.str(&e.principal);
                w.str(&e.command);
                w.u64(e.expires);
            }
        }
        w.frame()
    }

    /// Decodes a request frame into (id, request).
    pub fn decode(frame: &[u8]) -> Result<(u64, Request), DecodeError> {
        let (k, id, mut r) = open_frame(frame)?;
        let req = match k {
            kind::STATUS => Request::Status,
            kind::SIGN_CERT => Request::SignUserCert(CertRequest {
                public_key: r.str(MAX_STR)?,
                principals: r.strs(MAX_PRINCIPALS, MAX_NAME)?,
                key_id: r.str(MAX_NAME)?,
                valid_after: r.u64()?,
                valid_before: r.u64()?,
                force_command: r.opt_str(MAX_STR)?,
                source_address: r.opt_str(MAX_STR)?,
                extensions: r.strs(MAX_EXTENSIONS, MAX_NAME)?,
            }),
            kind::SEAL => Request::Seal {
                context: r.str(MAX_NAME)?,
                plaintext: SecretBytes::new(r.bytes(MAX_SEAL_PLAINTEXT)?.to_vec()),
            },
            kind::UNSEAL => Request::Unseal { context: r.str(MAX_NAME)?, sealed: r.bytes(MAX_FRAME)?.to_vec() },
            kind::SIGN_CHECKPOINT => {
                let d = r.bytes(32)?;
                let digest: [u8; 32] = d.try_into().map_err(|_| malformed("checkpoint digest must be 32 bytes"))?;
                Request::SignCheckpoint { digest }
            }
            kind::SIGN_EXEC => Request::SignExec(ExecRequest {
                target: r.str(MAX_NAME)?,
                principal: r.str(MAX_NAME)?,
                command: r.str(exec::MAX_EXEC_COMMAND)?,
                expires: r.u64()?,
            }),
            _ => {
                return Err(DecodeError { code: ErrorCode::UnexpectedKind, reason: "not a signer request kind" });
            }
        };
        r.finish()?;
        Ok((id, req))
    }
}

pub(super) fn put_error(w: &mut Writer, e: &SignerError) {
    w.u16(e.code.to_u16());
    w.str(&e.message);
}

pub(super) fn get_error(r: &mut Reader<'_>) -> Result<SignerError, DecodeError> {
    let code = ErrorCode::from_u16(r.u16()?).ok_or(malformed("unknown error code"))?;
    Ok(SignerError { code, message: r.str(MAX_STR)? })
}

pub(super) fn put_status(w: &mut Writer, s: &StatusReport) {
    w.u32(s.pid);
    w.str(&s.ca_public_key);
    w.bytes(&s.checkpoint_public_key);
    let b = &s.sandbox;
    w.bool(b.enforced);
    w.bool(b.insecure_override);
    w.u32(b.uid);
    w.u32(b.gid);
    w.bool(b.no_new_privs);
    w.bool(b.dumpable);
    w.bool(b.caps_cleared);
    w.u8(b.landlock_abi);
    w.u8(match b.landlock {
        LandlockState::Unsupported => 0,
        LandlockState::NotEnforced => 1,
        LandlockState::Enforced => 2,
    });
    w.u8(match b.seccomp {
        SeccompState::Unsupported => 0,
        SeccompState::NotEnforced => 1,
        SeccompState::Enforced => 2,
    });
    w.strs(&b.problems);
    let l = &s.limits;
    w.u32(l.max_cert_ttl_secs);
    w.strs(&l.principals);
    w.u32(l.rate_limit);
    w.u32(l.rate_window_secs);
    w.strs(&l.sealed);
}

pub(super) fn get_status(r: &mut Reader<'_>) -> Result<StatusReport, DecodeError> {
    Ok(StatusReport {
        pid: r.u32()?,
        ca_public_key: r.str(MAX_STR)?,
        checkpoint_public_key: r.bytes(32)?.to_vec(),
        sandbox: SandboxReport {
            enforced: r.bool()?,
            insecure_override: r.bool()?,
            uid: r.u32()?,
            gid: r.u32()?,
            no_new_privs: r.bool()?,
            dumpable: r.bool()?,
            caps_cleared: r.bool()?,
            landlock_abi: r.u8()?,
            landlock: match r.u8()? {
                0 => LandlockState::Unsupported,
                1 => LandlockState::NotEnforced,
                2 => LandlockState::Enforced,
                _ => return Err(malformed("unknown landlock state")),
            },
            seccomp: match r.u8()? {
                0 => SeccompState::Unsupported,
                1 => SeccompState::NotEnforced,
                2 => SeccompState::Enforced,
                _ => return Err(malformed("unknown seccomp state")),
            },
            problems: r.strs(32, MAX_STR)?,
        },
        limits: SignerLimits {
            max_cert_ttl_secs: r.u32()?,
            principals: r.strs(u8::MAX as usize, MAX_NAME)?,
            rate_limit: r.u32()?,
            rate_window_secs: r.u32()?,
            sealed: r.strs(u8::MAX as usize, MAX_NAME)?,
        },
    })
}

impl Response {
    /// Encodes as the answer to request `id`.
    pub fn encode(&self, id: u64) -> Frame {
        let mut w;
        match self {
            Response::Status(s) => {
                w = Writer::new(kind::R_STATUS, id);
                put_status(&mut w, s);
            }
            Response::Certificate { serial, certificate } => {
                w = Writer::new(kind::R_CERT, id);
                w.u64(*serial);
                w.str(certificate);
            }
            Response::Sealed(b) => {
                w = Writer::new(kind::R_SEALED, id);
                w.bytes(b);
            }
            Response::Unsealed(b) => {
                w = Writer::new(kind::R_UNSEALED, id);
                w.secret(b.expose());
            }
            Response::CheckpointSignature(sig) => {
                w = Writer::new(kind::R_CHECKPOINT, id);
                w.bytes(sig);
            }
            Response::ExecSigned { envelope, signature } => {
                w = Writer::new(kind::R_EXEC, id);
                w.str(envelope);
                w.str(signature);
            }
            Response::Error(e) => {
                w = Writer::new(kind::ERROR, id);
                put_error(&mut w, e);
            }
        }
        w.frame()
    }

    /// Decodes a response frame into (id, response).
    pub fn decode(frame: &[u8]) -> Result<(u64, Response), DecodeError> {
        let (k, id, mut r) = open_frame(frame)?;
        let resp = match k {
            kind::R_STATUS => Response::Status(get_status(&mut r)?),
            kind::R_CERT => Response::Certificate { serial: r.u64()?, certificate: r.str(8192)? },
            kind::R_SEALED => Response::Sealed(r.bytes(MAX_FRAME)?.to_vec()),
            kind::R_UNSEALED => Response::Unsealed(SecretBytes::new(r.bytes(MAX_SEAL_PLAINTEXT)?.to_vec())),
            kind::R_CHECKPOINT => Response::CheckpointSignature(r.bytes(64)?.to_vec()),
            kind::R_EXEC => Response::ExecSigned { envelope: r.str(MAX_FRAME)?, signature: r.str(MAX_STR)? },
            kind::ERROR => Response::Error(get_error(&mut r)?),
            _ => {
                return Err(DecodeError { code: ErrorCode::UnexpectedKind, reason: "not a signer response kind" });
            }
        };
        r.finish()?;
        Ok((id, resp))
    }
}
