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

mod codec;
mod contract;
mod control;
pub mod exec;
mod worker;

pub use codec::{DecodeError, Frame, frame_id};
pub use contract::*;
pub use control::*;
pub use worker::*;

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
pub(crate) const HEADER: usize = 10;

#[cfg(test)]
mod tests {
    use super::codec::{Writer, kind};
    use super::*;
    use crate::secret::SecretBytes;
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
                sealed: vec!["web 00ff".into()],
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
            Request::SignExec(ExecRequest {
                target: "web".into(),
                principal: "agent-ro".into(),
                command: "x".repeat(exec::MAX_EXEC_COMMAND),
                expires: 9,
            }),
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
            Response::ExecSigned { envelope: "e".repeat(11_000), signature: "s".repeat(400) },
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

    /// This module is the whole broker↔signer contract: the broker never imports the signer's
    /// key custody or signing code (DESIGN.md §2).
    #[test]
    fn the_broker_imports_nothing_of_the_signer_but_this_protocol() {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out)
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p)
                }
            }
        }
        let mut files = Vec::new();
        walk(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/broker"), &mut files);
        assert!(files.len() > 20);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for forbidden in ["signer::keys", "signer::custody", "signer::sandbox", "signer::keeper", "signer::worker"]
            {
                let code_hits =
                    text.lines().filter(|l| !l.trim_start().starts_with("//") && l.contains(forbidden)).count();
                assert_eq!(code_hits, 0, "{} uses {forbidden}", f.display());
            }
        }
    }
}
