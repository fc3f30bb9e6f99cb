//! The signer wire protocol, shared by the signer and the broker's signer client.
//!
//! Pure: bytes in, values out. Every message is one SOCK_SEQPACKET datagram:
//!
//! ```text
//! frame   = version:u8 (=1) | kind:u8 | id:u64be | body
//! str     = len:u16be | UTF-8 bytes            bytes = len:u16be | bytes
//! strlist = count:u8 | str*                    opt   = 0 | 1 str
//! ```
//!
//! Frames are at most [`MAX_FRAME`] bytes; lists, strings and byte fields have their own bounds;
//! a frame with trailing bytes, an unknown kind or a wrong version is rejected. Two channels use
//! it: the *worker* channel (broker ↔ signer worker: [`Request`]/[`Response`]) and the *control*
//! channel (broker ↔ signer keeper: [`ControlRequest`]/[`ControlResponse`]).

use std::fmt;

use crate::secret::SecretBytes;

/// Protocol version carried in every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 16 * 1024;
/// Largest plaintext the signer seals.
pub const MAX_SEAL_PLAINTEXT: usize = 8 * 1024;
/// Most principals in one certificate request.
pub const MAX_PRINCIPALS: usize = 32;
/// Most extensions in one certificate request.
pub const MAX_EXTENSIONS: usize = 8;
const HEADER: usize = 10;

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
}

impl ErrorCode {
    const ALL: [ErrorCode; 14] = [
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

/// A sandbox escape the keeper can try in a throwaway child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// `open("/etc/passwd")`.
    OpenFile,
    /// `socket(AF_INET, SOCK_STREAM)`.
    SocketInet,
    /// `connect()` to 127.0.0.1 on an existing descriptor.
    Connect,
    /// `execve("/bin/true")`.
    Execve,
    /// `ptrace(PTRACE_TRACEME)`.
    Ptrace,
    /// `fork()` from a worker.
    Fork,
}

impl ProbeKind {
    /// Every probe, in report order.
    pub const ALL: [ProbeKind; 6] =
        [Self::OpenFile, Self::SocketInet, Self::Connect, Self::Execve, Self::Ptrace, Self::Fork];

    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenFile => "open_file",
            Self::SocketInet => "socket_inet",
            Self::Connect => "connect",
            Self::Execve => "execve",
            Self::Ptrace => "ptrace",
            Self::Fork => "fork",
        }
    }

    fn to_u8(self) -> u8 {
        Self::ALL.iter().position(|k| *k == self).map_or(0, |i| i as u8 + 1)
    }

    fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v).checked_sub(1)?).copied()
    }
}

/// What happened when a probe tried its escape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The seccomp filter killed the probe (SIGSYS).
    KilledBySeccomp,
    /// The call failed with this errno (EACCES from Landlock, EPERM from a dropped privilege).
    Denied(i32),
    /// The escape worked: the sandbox is broken.
    Escaped,
    /// The probe ended some other way (exit code or signal number, negated for signals).
    Unexpected(i32),
}

impl ProbeOutcome {
    /// True unless the escape worked or the result is unexplained.
    pub fn blocked(self) -> bool {
        matches!(self, Self::KilledBySeccomp | Self::Denied(_))
    }

    /// Human description.
    pub fn describe(self) -> String {
        match self {
            Self::KilledBySeccomp => "blocked: killed by seccomp (SIGSYS)".into(),
            Self::Denied(errno) => format!("blocked: {}", std::io::Error::from_raw_os_error(errno)),
            Self::Escaped => "NOT BLOCKED: the call succeeded".into(),
            Self::Unexpected(c) if c < 0 => format!("unexpected: probe died by signal {}", -c),
            Self::Unexpected(c) => format!("unexpected: probe exited with {c}"),
        }
    }
}

/// Which layer a probe ran under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeLayer {
    /// Privileges dropped and Landlock applied, no seccomp yet: shows Landlock on its own.
    Landlock,
    /// The full worker sandbox, exactly as a serving worker has it.
    Worker,
}

impl ProbeLayer {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Landlock => "landlock_only",
            Self::Worker => "full_worker_sandbox",
        }
    }
}

/// One probe result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    /// Layer it ran under.
    pub layer: ProbeLayer,
    /// What it tried.
    pub kind: ProbeKind,
    /// What happened.
    pub outcome: ProbeOutcome,
}

/// A request on the keeper control channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// Fork a fresh worker (any previous worker is killed first) and pass its socket back.
    SpawnWorker,
    /// Try an escape from a throwaway child under the full worker sandbox.
    Probe(ProbeKind),
}

/// A keeper message on the control channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlResponse {
    /// First message after start: keys loaded and sandbox applied.
    Ready(StatusReport),
    /// A worker was forked; its socket rides along as `SCM_RIGHTS`.
    Spawned {
        /// Worker process id.
        pid: u32,
    },
    /// Probe results (one for [`ControlRequest::Probe`], all of them for a self-check run).
    Probes(Vec<ProbeResult>),
    /// The keeper could not start or could not do what was asked.
    Failed(SignerError),
}

/// Why a frame did not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Error code to answer with.
    pub code: ErrorCode,
    /// What was wrong.
    pub reason: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.code.as_str())
    }
}

impl std::error::Error for DecodeError {}

fn malformed(reason: &'static str) -> DecodeError {
    DecodeError { code: ErrorCode::Malformed, reason }
}

mod kind {
    pub const STATUS: u8 = 0x01;
    pub const SIGN_CERT: u8 = 0x02;
    pub const SEAL: u8 = 0x03;
    pub const UNSEAL: u8 = 0x04;
    pub const SIGN_CHECKPOINT: u8 = 0x05;
    pub const R_STATUS: u8 = 0x81;
    pub const R_CERT: u8 = 0x82;
    pub const R_SEALED: u8 = 0x83;
    pub const R_UNSEALED: u8 = 0x84;
    pub const R_CHECKPOINT: u8 = 0x85;
    pub const C_SPAWN: u8 = 0x10;
    pub const C_PROBE: u8 = 0x11;
    pub const C_READY: u8 = 0x90;
    pub const C_SPAWNED: u8 = 0x91;
    pub const C_PROBES: u8 = 0x92;
    pub const ERROR: u8 = 0xFF;
}

/// An encoded request or response frame. It may carry a secret (a `Seal` plaintext, an `Unsealed`
/// answer), so it is zeroized when dropped; encoders reserve room before writing a secret, so no
/// reallocation leaves a copy behind.
pub type Frame = zeroize::Zeroizing<Vec<u8>>;

struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: u8, id: u64) -> Self {
        let mut v = Vec::with_capacity(256);
        v.push(PROTOCOL_VERSION);
        v.push(kind);
        v.extend_from_slice(&id.to_be_bytes());
        Self(v)
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn bytes(&mut self, v: &[u8]) {
        // Callers bound their fields far below u16::MAX; clamp defensively rather than wrap.
        let n = v.len().min(u16::MAX as usize);
        self.u16(n as u16);
        self.0.extend_from_slice(&v[..n]);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    /// Writes secret bytes without a reallocation after them.
    fn secret(&mut self, v: &[u8]) {
        self.0.reserve_exact(2 + v.len());
        self.bytes(v);
    }
    fn frame(self) -> Frame {
        zeroize::Zeroizing::new(self.0)
    }
    fn strs(&mut self, v: &[String]) {
        let n = v.len().min(u8::MAX as usize);
        self.u8(n as u8);
        for s in &v[..n] {
            self.str(s);
        }
    }
    fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(malformed("frame truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(malformed("boolean field is neither 0 nor 1")),
        }
    }
    fn bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(DecodeError { code: ErrorCode::TooLarge, reason: "field longer than its limit" });
        }
        self.take(n)
    }
    fn str(&mut self, max: usize) -> Result<String, DecodeError> {
        let b = self.bytes(max)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| malformed("string field is not UTF-8"))
    }
    fn strs(&mut self, max_items: usize, max_len: usize) -> Result<Vec<String>, DecodeError> {
        let n = self.u8()? as usize;
        if n > max_items {
            return Err(DecodeError { code: ErrorCode::TooLarge, reason: "list has too many items" });
        }
        (0..n).map(|_| self.str(max_len)).collect()
    }
    fn opt_str(&mut self, max: usize) -> Result<Option<String>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str(max).map(Some),
            _ => Err(malformed("option tag is neither 0 nor 1")),
        }
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() { Ok(()) } else { Err(malformed("trailing bytes after the frame body")) }
    }
}

/// Splits a frame into (kind, id, body) after checking size and version.
fn open_frame(frame: &[u8]) -> Result<(u8, u64, Reader<'_>), DecodeError> {
    if frame.len() > MAX_FRAME {
        return Err(DecodeError { code: ErrorCode::TooLarge, reason: "frame exceeds 16 KiB" });
    }
    if frame.len() < HEADER {
        return Err(malformed("frame shorter than its 10-byte header"));
    }
    if frame[0] != PROTOCOL_VERSION {
        return Err(DecodeError { code: ErrorCode::UnsupportedVersion, reason: "unsupported protocol version" });
    }
    let id = u64::from_be_bytes(frame[2..10].try_into().expect("8 bytes"));
    Ok((frame[1], id, Reader { buf: &frame[HEADER..] }))
}

/// The request id of a frame, if its header is readable (used to address an error reply).
pub fn frame_id(frame: &[u8]) -> u64 {
    frame.get(2..10).map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

const MAX_STR: usize = 4096;
const MAX_NAME: usize = 256;

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
            _ => {
                return Err(DecodeError { code: ErrorCode::UnexpectedKind, reason: "not a signer request kind" });
            }
        };
        r.finish()?;
        Ok((id, req))
    }
}

fn put_error(w: &mut Writer, e: &SignerError) {
    w.u16(e.code.to_u16());
    w.str(&e.message);
}

fn get_error(r: &mut Reader<'_>) -> Result<SignerError, DecodeError> {
    let code = ErrorCode::from_u16(r.u16()?).ok_or(malformed("unknown error code"))?;
    Ok(SignerError { code, message: r.str(MAX_STR)? })
}

fn put_status(w: &mut Writer, s: &StatusReport) {
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
}

fn get_status(r: &mut Reader<'_>) -> Result<StatusReport, DecodeError> {
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
            kind::ERROR => Response::Error(get_error(&mut r)?),
            _ => {
                return Err(DecodeError { code: ErrorCode::UnexpectedKind, reason: "not a signer response kind" });
            }
        };
        r.finish()?;
        Ok((id, resp))
    }
}

impl ControlRequest {
    /// Encodes with request id `id`.
    pub fn encode(&self, id: u64) -> Vec<u8> {
        match self {
            ControlRequest::SpawnWorker => Writer::new(kind::C_SPAWN, id).0,
            ControlRequest::Probe(p) => {
                let mut w = Writer::new(kind::C_PROBE, id);
                w.u8(p.to_u8());
                w.0
            }
        }
    }

    /// Decodes a control request.
    pub fn decode(frame: &[u8]) -> Result<(u64, ControlRequest), DecodeError> {
        let (k, id, mut r) = open_frame(frame)?;
        let req = match k {
            kind::C_SPAWN => ControlRequest::SpawnWorker,
            kind::C_PROBE => ControlRequest::Probe(ProbeKind::from_u8(r.u8()?).ok_or(malformed("unknown probe"))?),
            _ => {
                return Err(DecodeError { code: ErrorCode::UnexpectedKind, reason: "not a control request kind" });
            }
        };
        r.finish()?;
        Ok((id, req))
    }
}

impl ControlResponse {
    /// Encodes as the answer to control request `id`.
    pub fn encode(&self, id: u64) -> Vec<u8> {
        let mut w;
        match self {
            ControlResponse::Ready(s) => {
                w = Writer::new(kind::C_READY, id);
                put_status(&mut w, s);
            }
            ControlResponse::Spawned { pid } => {
                w = Writer::new(kind::C_SPAWNED, id);
                w.u32(*pid);
            }
            ControlResponse::Probes(list) => {
                w = Writer::new(kind::C_PROBES, id);
                w.u8(list.len().min(32) as u8);
                for p in list.iter().take(32) {
                    w.u8(match p.layer {
                        ProbeLayer::Landlock => 1,
                        ProbeLayer::Worker => 2,
                    });
                    w.u8(p.kind.to_u8());
                    let (tag, v) = match p.outcome {
                        ProbeOutcome::KilledBySeccomp => (1, 0),
                        ProbeOutcome::Denied(e) => (2, e),
                        ProbeOutcome::Escaped => (3, 0),
                        ProbeOutcome::Unexpected(c) => (4, c),
                    };
                    w.u8(tag);
                    w.i32(v);
                }
            }
            ControlResponse::Failed(e) => {
                w = Writer::new(kind::ERROR, id);
                put_error(&mut w, e);
            }
        }
        w.0
    }

    /// Decodes a keeper message.
    pub fn decode(frame: &[u8]) -> Result<(u64, ControlResponse), DecodeError> {
        let (k, id, mut r) = open_frame(frame)?;
        let resp = match k {
            kind::C_READY => ControlResponse::Ready(get_status(&mut r)?),
            kind::C_SPAWNED => ControlResponse::Spawned { pid: r.u32()? },
            kind::C_PROBES => {
                let n = r.u8()? as usize;
                if n > 32 {
                    return Err(malformed("too many probe results"));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let layer = match r.u8()? {
                        1 => ProbeLayer::Landlock,
                        2 => ProbeLayer::Worker,
                        _ => return Err(malformed("unknown probe layer")),
                    };
                    let kind = ProbeKind::from_u8(r.u8()?).ok_or(malformed("unknown probe"))?;
                    let tag = r.u8()?;
                    let v = r.i32()?;
                    let outcome = match tag {
                        1 => ProbeOutcome::KilledBySeccomp,
                        2 => ProbeOutcome::Denied(v),
                        3 => ProbeOutcome::Escaped,
                        4 => ProbeOutcome::Unexpected(v),
                        _ => return Err(malformed("unknown probe outcome")),
                    };
                    list.push(ProbeResult { layer, kind, outcome });
                }
                ControlResponse::Probes(list)
            }
            kind::ERROR => ControlResponse::Failed(get_error(&mut r)?),
            _ => {
                return Err(DecodeError { code: ErrorCode::UnexpectedKind, reason: "not a control response kind" });
            }
        };
        r.finish()?;
        Ok((id, resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_status() -> StatusReport {
        StatusReport {
            pid: 42,
            ca_public_key: "ssh-ed25519 AAAA ca".into(),
            checkpoint_public_key: vec![7; 32],
            sandbox: SandboxReport {
                enforced: true,
                insecure_override: false,
                uid: 65534,
                gid: 65534,
                no_new_privs: true,
                dumpable: false,
                caps_cleared: true,
                landlock_abi: 7,
                landlock: LandlockState::Enforced,
                seccomp: SeccompState::Enforced,
                problems: vec![],
            },
            limits: SignerLimits {
                max_cert_ttl_secs: 3600,
                principals: vec!["agent-read".into()],
                rate_limit: 60,
                rate_window_secs: 60,
            },
        }
    }

    #[test]
    fn every_message_round_trips() {
        let cert = CertRequest {
            public_key: "ssh-ed25519 AAAAC3 x".into(),
            principals: vec!["a".into(), "b".into()],
            key_id: "ephyr:agent:task:1".into(),
            valid_after: 1,
            valid_before: 2,
            force_command: Some("/usr/bin/id".into()),
            source_address: None,
            extensions: vec!["permit-pty".into()],
        };
        for req in [
            Request::Status,
            Request::SignUserCert(cert),
            Request::Seal { context: "c".into(), plaintext: SecretBytes::new(vec![1, 2, 3]) },
            Request::Unseal { context: "c".into(), sealed: vec![9; 40] },
            Request::SignCheckpoint { digest: [3; 32] },
        ] {
            let (id, back) = Request::decode(&req.encode(77)).unwrap();
            assert_eq!(id, 77);
            assert_eq!(req, back);
        }
        for resp in [
            Response::Status(sample_status()),
            Response::Certificate { serial: 5, certificate: "ssh-ed25519-cert-v01@openssh.com AAAA".into() },
            Response::Sealed(vec![1; 60]),
            Response::CheckpointSignature(vec![2; 64]),
            Response::Error(SignerError { code: ErrorCode::RateLimited, message: "slow down".into() }),
        ] {
            assert_eq!(Response::decode(&resp.encode(3)).unwrap(), (3, resp));
        }
        for c in [ControlRequest::SpawnWorker, ControlRequest::Probe(ProbeKind::Execve)] {
            assert_eq!(ControlRequest::decode(&c.encode(9)).unwrap(), (9, c));
        }
        let probes = ControlResponse::Probes(vec![
            ProbeResult { layer: ProbeLayer::Landlock, kind: ProbeKind::OpenFile, outcome: ProbeOutcome::Denied(13) },
            ProbeResult {
                layer: ProbeLayer::Worker,
                kind: ProbeKind::SocketInet,
                outcome: ProbeOutcome::KilledBySeccomp,
            },
        ]);
        for c in [ControlResponse::Ready(sample_status()), ControlResponse::Spawned { pid: 4 }, probes] {
            assert_eq!(ControlResponse::decode(&c.encode(1)).unwrap(), (1, c));
        }
    }

    #[test]
    fn malformed_frames_are_rejected_with_reasons() {
        let good = Request::Status.encode(1);
        assert_eq!(Request::decode(&good[..5]).unwrap_err().code, ErrorCode::Malformed);
        let mut v2 = good.clone();
        v2[0] = 2;
        assert_eq!(Request::decode(&v2).unwrap_err().code, ErrorCode::UnsupportedVersion);
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(Request::decode(&trailing).unwrap_err().reason, "trailing bytes after the frame body");
        let mut unknown = good.clone();
        unknown[1] = 0x42;
        assert_eq!(Request::decode(&unknown).unwrap_err().code, ErrorCode::UnexpectedKind);
        assert_eq!(Request::decode(&vec![1u8; MAX_FRAME + 1]).unwrap_err().code, ErrorCode::TooLarge);
        // A response kind is not a request.
        assert_eq!(Request::decode(&Response::Sealed(vec![]).encode(1)).unwrap_err().code, ErrorCode::UnexpectedKind);
        // Oversized seal plaintext.
        let big = Request::Seal { context: "c".into(), plaintext: SecretBytes::new(vec![0; MAX_SEAL_PLAINTEXT + 1]) };
        assert_eq!(Request::decode(&big.encode(1)).unwrap_err().code, ErrorCode::TooLarge);
        // Wrong digest length.
        let mut w = Writer::new(kind::SIGN_CHECKPOINT, 1);
        w.bytes(&[0; 31]);
        assert!(Request::decode(&w.0).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
            let _ = ControlRequest::decode(&bytes);
            let _ = ControlResponse::decode(&bytes);
        }

        #[test]
        fn cert_requests_round_trip(
            key in "[ -~]{0,200}",
            principals in proptest::collection::vec("[a-z_-]{1,32}", 0..MAX_PRINCIPALS),
            key_id in "[ -~]{0,200}",
            after in any::<u64>(), before in any::<u64>(),
            fc in proptest::option::of("[ -~]{0,100}"),
            sa in proptest::option::of("[0-9./,]{0,60}"),
            ext in proptest::collection::vec("[a-z-]{1,30}", 0..MAX_EXTENSIONS),
        ) {
            let req = Request::SignUserCert(CertRequest {
                public_key: key, principals, key_id, valid_after: after, valid_before: before,
                force_command: fc, source_address: sa, extensions: ext,
            });
            let id = after ^ before;
            prop_assert_eq!(Request::decode(&req.encode(id)).unwrap(), (id, req));
        }
    }
}
