//! The signer keeper: the process the broker starts with `ephyr __signer`.
//!
//! What runs here: one thread, no files after start-up, no network. It reads the keys (before it
//! drops privileges), enters the sandbox, reports `Ready` on the control socket (descriptor 3), and
//! then only answers control requests: fork a fresh worker (killing the previous one) and hand its
//! socket to the broker with `SCM_RIGHTS`, or fork a throwaway probe child that tries one sandbox
//! escape. System calls after the sandbox: recv/send/sendmsg on the control socket, `socketpair`
//! (AF_UNIX), `clone` (fork, never threads), `wait4`, `kill(SIGKILL)` of its own children, and the
//! worker set-up calls (`prctl`, `seccomp`). It exits when the broker closes the control socket.
//!
//! Why a keeper at all: the broker drops to an unprivileged uid that cannot read the CA key, so it
//! cannot start a signer from scratch once running. The keeper holds the keys, never parses more
//! than a 10-byte control frame, and can give the broker a new worker whenever one dies
//! (docs/decisions/0002-signer-keeper-and-workers.md).

use std::os::fd::{AsFd, OwnedFd};

use super::custody::Custody;
use super::keys::{CaKey, SealingKey, ensure_keys, load_keys};
use super::protocol::{
    ControlRequest, ControlResponse, ErrorCode, MAX_FRAME, ProbeKind, ProbeLayer, ProbeResult, SeccompState,
    SignerError,
};
use super::sandbox::{self, Profile};
use super::{SignerArgs, worker};
use crate::os;

fn send(control: &OwnedFd, msg: &ControlResponse, id: u64) {
    if let Err(e) = os::send_packet(control.as_fd(), &msg.encode(id)) {
        log::error!("control socket send failed: {e}");
    }
}

fn fail(control: &OwnedFd, code: ErrorCode, message: String) -> i32 {
    log::error!("{message}");
    send(control, &ControlResponse::Failed(SignerError { code, message }), 0);
    2
}

use super::protocol::CONTROL_FD;

/// Runs the keeper. Returns the process exit code.
pub fn run(args: SignerArgs) -> i32 {
    let control = match os::inherited_seqpacket(CONTROL_FD) {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("the signer must be started by the broker (control socket on fd 3): {e}");
            return 2;
        }
    };
    let proof = match os::single_threaded() {
        Ok(p) => p,
        Err(e) => {
            return fail(&control, ErrorCode::Internal, format!("signer start-up: {e}"));
        }
    };
    let parent = std::os::unix::process::parent_id();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // The broker decides when we stop (it closes the control socket, or we die with it).
        let _ = os::ignore_signal(sig);
    }
    if let Err(e) = args.config.validate() {
        return fail(&control, ErrorCode::Internal, format!("signer configuration: {e}"));
    }

    let keys = match &args.data_dir {
        None => CaKey::generate().and_then(|ca| Ok((ca, SealingKey::generate()?))),
        Some(dir) => {
            let ensured = if args.generate_missing_keys { ensure_keys(dir, false).map(drop) } else { Ok(()) };
            ensured.and_then(|()| load_keys(dir))
        }
    };
    let (ca, sealing) = match keys {
        Ok(k) => k,
        Err(e) => {
            return fail(&control, ErrorCode::KeysUnavailable, format!("signer cannot load its keys: {e}"));
        }
    };
    let rate = match os::SharedCounters::new() {
        Ok(r) => r,
        Err(e) => {
            return fail(&control, ErrorCode::Internal, format!("signer: shared page: {e}"));
        }
    };
    let mut custody = Custody::new(&ca, &sealing, args.config.clone(), rate);
    drop((ca, sealing));

    // The sandbox, layer by layer.
    let was_root = os::user_ids().1 == 0;
    let mut problems = sandbox::drop_privileges(args.target, parent);
    let observed = sandbox::observe(was_root);
    problems.extend(observed.problems.iter().cloned());
    let (landlock, abi, ll_problem) = sandbox::apply_landlock();
    problems.extend(ll_problem);
    let mut probes = Vec::new();
    if args.self_check {
        // (ptrace is not probed here: Landlock only restricts tracing across domains, and the
        // probe's parent is in the same one; seccomp covers it below.)
        for kind in [ProbeKind::OpenFile, ProbeKind::Connect, ProbeKind::Execve] {
            probes.push(run_probe(ProbeLayer::Landlock, kind, &control, &proof, args.insecure_no_sandbox));
        }
    }
    let (seccomp, sc_problem) = sandbox::apply_seccomp(Profile::Keeper);
    problems.extend(sc_problem);
    let report = sandbox::report(problems, &observed, (landlock, abi), seccomp, args.insecure_no_sandbox);
    custody.set_sandbox(report.clone());

    if args.self_check {
        for kind in ProbeKind::ALL {
            probes.push(run_probe(ProbeLayer::Worker, kind, &control, &proof, true));
        }
        send(&control, &ControlResponse::Ready(custody.status()), 0);
        send(&control, &ControlResponse::Probes(probes), 0);
        return 0;
    }
    if !report.enforced {
        let why = report.problems.join("; ");
        if !args.insecure_no_sandbox {
            return fail(
                &control,
                ErrorCode::SandboxNotEnforced,
                format!(
                    "refusing to serve: the signer sandbox is not fully enforced ({why}). \
                     Fix the kernel/privileges, or start with --insecure-no-sandbox to run without it"
                ),
            );
        }
        log::error!("!!! INSECURE: the signer runs WITHOUT a complete sandbox (--insecure-no-sandbox): {why} !!!");
    }
    log::info!(
        "signer ready: uid={} landlock_abi={} seccomp={:?} ca={}",
        report.uid,
        report.landlock_abi,
        report.seccomp,
        custody.status().ca_public_key
    );
    send(&control, &ControlResponse::Ready(custody.status()), 0);
    Keeper { control: Some(control), custody, proof, worker: None, insecure: args.insecure_no_sandbox }.serve()
}

struct Keeper {
    control: Option<OwnedFd>,
    custody: Custody,
    proof: os::SingleThreaded,
    worker: Option<i32>,
    insecure: bool,
}

impl Keeper {
    fn control(&self) -> &OwnedFd {
        self.control.as_ref().expect("the keeper owns its control socket")
    }

    fn serve(mut self) -> i32 {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            let pkt = match os::recv_packet(self.control().as_fd(), &mut buf) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("control socket: {e}");
                    return 1;
                }
            };
            if pkt.len == 0 && !pkt.truncated {
                log::debug!("broker closed the control socket; signer exiting");
                return 0;
            }
            self.reap();
            let frame = &buf[..pkt.len];
            let id = super::protocol::frame_id(frame);
            let request = if pkt.truncated {
                Err(SignerError { code: ErrorCode::TooLarge, message: "control frame exceeds 16 KiB".into() })
            } else {
                ControlRequest::decode(frame)
                    .map(|(_, r)| r)
                    .map_err(|e| SignerError { code: e.code, message: e.reason.into() })
            };
            match request {
                Ok(ControlRequest::SpawnWorker) => self.spawn_worker(id),
                Ok(ControlRequest::Probe(kind)) => {
                    let r = run_probe(ProbeLayer::Worker, kind, self.control(), &self.proof, true);
                    send(self.control(), &ControlResponse::Probes(vec![r]), id);
                }
                Err(e) => send(self.control(), &ControlResponse::Failed(e), id),
            }
        }
    }

    fn reap(&mut self) {
        while let Ok(Some((pid, how))) = os::wait_child(-1, false) {
            if Some(pid) == self.worker {
                log::warn!("signer worker {pid} ended: {how:?}");
                self.worker = None;
            }
        }
    }

    fn spawn_worker(&mut self, id: u64) {
        if let Some(old) = self.worker.take() {
            let _ = os::kill(old, libc::SIGKILL);
            let _ = os::wait_child(old, true);
        }
        let (broker_end, worker_end) = match os::socketpair_seqpacket() {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("cannot create the worker socket: {e}");
                return send(
                    self.control(),
                    &ControlResponse::Failed(SignerError { code: ErrorCode::Internal, message: msg }),
                    id,
                );
            }
        };
        let keeper_pid = std::process::id();
        match os::fork(&self.proof) {
            Ok(os::Forked::Child) => {
                drop(self.control.take());
                drop(broker_end);
                if os::set_parent_death_kill().is_err() || std::os::unix::process::parent_id() != keeper_pid {
                    os::exit_now(3);
                }
                let (state, problem) = sandbox::apply_seccomp(Profile::Worker);
                if state != SeccompState::Enforced && !self.insecure {
                    log::error!("worker seccomp filter failed: {}", problem.unwrap_or_default());
                    os::exit_now(2);
                }
                worker::serve(worker_end, &self.custody)
            }
            Ok(os::Forked::Parent { child }) => {
                drop(worker_end);
                self.worker = Some(child);
                let msg = ControlResponse::Spawned { pid: child as u32 }.encode(id);
                if let Err(e) = os::send_with_fd(self.control().as_fd(), &msg, broker_end.as_fd()) {
                    log::error!("could not pass the worker socket to the broker: {e}");
                }
                log::info!("signer worker {child} started");
            }
            Err(e) => {
                let msg = format!("fork failed: {e}");
                send(
                    self.control(),
                    &ControlResponse::Failed(SignerError { code: ErrorCode::Internal, message: msg }),
                    id,
                );
            }
        }
    }
}

/// Forks a probe child that sets up `layer` and attempts `kind`; returns how it ended.
fn run_probe(
    layer: ProbeLayer,
    kind: ProbeKind,
    spare: &OwnedFd,
    proof: &os::SingleThreaded,
    install_worker_filter: bool,
) -> ProbeResult {
    match os::fork(proof) {
        Ok(os::Forked::Child) => {
            if layer == ProbeLayer::Worker && install_worker_filter {
                let _ = sandbox::apply_seccomp(Profile::Worker);
            }
            sandbox::probe_child(kind, layer, spare.as_fd(), proof)
        }
        Ok(os::Forked::Parent { child }) => match os::wait_child(child, true) {
            Ok(Some((_, status))) => sandbox::probe_outcome(layer, kind, status),
            _ => ProbeResult { layer, kind, outcome: super::protocol::ProbeOutcome::Unexpected(-1) },
        },
        Err(_) => ProbeResult { layer, kind, outcome: super::protocol::ProbeOutcome::Unexpected(-2) },
    }
}
