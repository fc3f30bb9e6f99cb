//! The control channel (broker ↔ signer keeper): spawning workers and the sandbox self-check.
//! Pure.

use super::codec::{DecodeError, Writer, kind, malformed, open_frame};
use super::worker::{get_error, get_status, put_error, put_status};
use super::*;

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
