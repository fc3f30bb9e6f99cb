//! The signer's sandbox, applied in layers after the keys are in memory.
//!
//! What runs here, in order (DESIGN.md §1):
//! 1. as root only: drop the capability bounding set (`prctl(PR_CAPBSET_DROP)`), `setgroups([])`,
//!    `setresgid`/`setresuid` to the signer's unprivileged ids;
//! 2. `PR_SET_PDEATHSIG(SIGKILL)` (after the id change, which would clear it) and a parent check,
//!    `PR_SET_DUMPABLE(0)`, clear the ambient, inheritable, permitted and effective capability sets,
//!    `PR_SET_NO_NEW_PRIVS`; then verify every set from `/proc/self/status` (the last file read);
//! 3. Landlock at the best ABI the kernel offers: every filesystem and TCP access right handled with
//!    no rule granting any, plus signal and abstract-socket scoping — no file can be opened, no
//!    program executed, no TCP port bound or connected;
//! 4. a seccomp allow-list whose default action kills the process: the *keeper* profile (may fork
//!    workers, make AF_UNIX socket pairs, reap and SIGKILL children), and on top of it, in each
//!    worker, the *worker* profile (only what the request loop needs).
//!
//! The allow-lists are derived from what the keeper and worker loops call (see their module docs):
//! recv/send on SEQPACKET sockets, memory management for the allocator, `getrandom` for ring,
//! `clock_gettime` for `now`, `write` to stderr for the log, and exit.

use std::collections::BTreeMap;

use landlock::{ABI, Access, AccessFs, AccessNet, LandlockStatus, Ruleset, RulesetAttr, RulesetStatus, Scope};

use super::protocol::{LandlockState, ProbeKind, ProbeLayer, ProbeOutcome, ProbeResult, SandboxReport, SeccompState};
use crate::os;

/// Where the signer should end up (only used when it starts as root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetIds {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Steps 1 and 2. Returns the problems found (empty if all is well).
pub fn drop_privileges(target: Option<TargetIds>, expected_parent: u32) -> Vec<String> {
    let mut problems = Vec::new();
    let (_, euid, _) = os::user_ids();
    if euid == 0 {
        match target {
            Some(t) if t.uid != 0 => {
                if let Err(e) = caps::clear(None, caps::CapSet::Bounding) {
                    problems.push(format!("could not drop the capability bounding set: {e}"));
                }
                if let Err(e) = os::become_user(t.uid, t.gid) {
                    problems.push(format!("could not change to uid {} gid {}: {e}", t.uid, t.gid));
                }
            }
            _ => problems.push("started as root without an unprivileged target uid".into()),
        }
    }
    if let Err(e) = os::set_parent_death_kill() {
        problems.push(format!("PR_SET_PDEATHSIG failed: {e}"));
    }
    if std::os::unix::process::parent_id() != expected_parent {
        // The parent died before PDEATHSIG was armed; nobody will ever talk to us.
        os::exit_now(3);
    }
    if let Err(e) = os::set_not_dumpable() {
        problems.push(format!("PR_SET_DUMPABLE(0) failed: {e}"));
    }
    for set in [caps::CapSet::Ambient, caps::CapSet::Inheritable, caps::CapSet::Effective, caps::CapSet::Permitted] {
        if let Err(e) = caps::clear(None, set) {
            problems.push(format!("could not clear capability set {set:?}: {e}"));
        }
    }
    if let Err(e) = os::set_no_new_privs() {
        problems.push(format!("PR_SET_NO_NEW_PRIVS failed: {e}"));
    }
    problems
}

/// Facts read back after the drop (must run before Landlock and seccomp, which forbid the reads).
pub struct Observed {
    /// Every capability set is empty (the bounding set counts only if we could change it).
    pub caps_cleared: bool,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// The process is dumpable.
    pub dumpable: bool,
    /// Reasons for anything not as it should be.
    pub problems: Vec<String>,
}

/// Reads the identity and capability sets back and checks them.
pub fn observe(was_root: bool) -> Observed {
    let mut problems = Vec::new();
    let (_, uid, _) = os::user_ids();
    let (_, gid, _) = os::group_ids();
    let no_new_privs = os::no_new_privs().unwrap_or(false);
    let dumpable = os::is_dumpable().unwrap_or(true);
    if !no_new_privs {
        problems.push("no_new_privs is not set".into());
    }
    if dumpable {
        problems.push("the process is still dumpable".into());
    }
    if was_root && uid == 0 {
        problems.push("still uid 0 after the drop".into());
    }
    let status = match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("cannot read /proc/self/status: {e}"));
            return Observed { caps_cleared: false, uid, gid, no_new_privs, dumpable, problems };
        }
    };
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let value = status.lines().find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')));
        let zero = value.map(|v| u64::from_str_radix(v.trim(), 16) == Ok(0));
        match zero {
            Some(true) => {}
            // An unprivileged process cannot shrink its bounding set; with no_new_privs and an empty
            // permitted set it grants nothing, so only require it when we started as root.
            Some(false) if field == "CapBnd" && !was_root => {}
            Some(false) => problems.push(format!("{field} is not empty after the drop")),
            None => problems.push(format!("{field} missing from /proc/self/status")),
        }
    }
    let caps_cleared = !problems.iter().any(|p| p.starts_with("Cap"));
    Observed { caps_cleared, uid, gid, no_new_privs, dumpable, problems }
}

/// Step 3: Landlock. Returns (state, kernel ABI, problem).
pub fn apply_landlock() -> (LandlockState, u8, Option<String>) {
    // Ask for everything the newest ABI this crate knows can restrict; on an older kernel the
    // crate (best effort) keeps exactly the rights that kernel supports.
    let abi = ABI::V9;
    let result = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self());
    match result {
        Ok(status) => {
            let kernel_abi = match status.landlock {
                LandlockStatus::Available { effective_abi, kernel_abi } => {
                    kernel_abi.map_or(effective_abi as i32, |k| k.max(effective_abi as i32))
                }
                _ => 0,
            };
            let kernel_abi = u8::try_from(kernel_abi.clamp(0, 255)).unwrap_or(0);
            match (status.landlock, status.ruleset) {
                (LandlockStatus::NotEnabled | LandlockStatus::NotImplemented, _) => (
                    LandlockState::Unsupported,
                    0,
                    Some(
                        "Landlock is not available (kernel without CONFIG_SECURITY_LANDLOCK or not in the lsm= list)"
                            .into(),
                    ),
                ),
                (_, RulesetStatus::NotEnforced) => {
                    (LandlockState::NotEnforced, kernel_abi, Some("the Landlock ruleset was not enforced".into()))
                }
                // Fully or partially (= everything this kernel's ABI supports) enforced.
                _ => (LandlockState::Enforced, kernel_abi, None),
            }
        }
        Err(e) => (LandlockState::NotEnforced, 0, Some(format!("Landlock failed: {e}"))),
    }
}

/// Which allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// The keeper: forks workers, passes sockets, reaps children.
    Keeper,
    /// A worker: answers requests on one socket.
    Worker,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
mod filter {
    use super::*;
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };

    fn when(arg: u8, op: SeccompCmpOp, value: u64) -> Vec<SeccompRule> {
        let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("valid condition");
        vec![SeccompRule::new(vec![cond]).expect("valid rule")]
    }

    pub fn build(profile: Profile) -> Result<BpfProgram, String> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        let always = [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_mprotect,
            libc::SYS_futex,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_getrandom,
            libc::SYS_clock_gettime,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ];
        for nr in always {
            rules.insert(nr, vec![]);
        }
        // std checks a descriptor with fcntl(F_GETFD) before closing it in debug builds.
        rules.insert(libc::SYS_fcntl, when(1, SeccompCmpOp::Eq, libc::F_GETFD as u64));
        if profile == Profile::Keeper {
            rules.insert(libc::SYS_socketpair, when(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64));
            // fork(): clone without CLONE_THREAD (no threads, ever).
            rules.insert(libc::SYS_clone, when(0, SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64), 0));
            rules.insert(libc::SYS_set_robust_list, vec![]);
            rules.insert(libc::SYS_wait4, vec![]);
            rules.insert(libc::SYS_kill, when(1, SeccompCmpOp::Eq, libc::SIGKILL as u64));
            rules.insert(libc::SYS_getppid, vec![]);
            // A forked worker arms PDEATHSIG and installs its own, stricter filter.
            let prctl = [libc::PR_SET_PDEATHSIG, libc::PR_SET_NO_NEW_PRIVS]
                .into_iter()
                .map(|op| {
                    let c = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, op as u64)
                        .expect("valid condition");
                    SeccompRule::new(vec![c]).expect("valid rule")
                })
                .collect();
            rules.insert(libc::SYS_prctl, prctl);
            rules.insert(libc::SYS_seccomp, when(0, SeccompCmpOp::Eq, libc::SECCOMP_SET_MODE_FILTER as u64));
        }
        let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, os::seccomp_arch())
            .map_err(|e| format!("building the seccomp filter failed: {e}"))?;
        BpfProgram::try_from(filter).map_err(|e| format!("compiling the seccomp filter failed: {e}"))
    }

    pub fn apply(profile: Profile) -> (SeccompState, Option<String>) {
        match build(profile).and_then(|p| seccompiler::apply_filter(&p).map_err(|e| format!("seccomp: {e}"))) {
            Ok(()) => (SeccompState::Enforced, None),
            Err(e) => (SeccompState::NotEnforced, Some(e)),
        }
    }
}

/// Step 4: installs the seccomp allow-list for `profile`.
pub fn apply_seccomp(profile: Profile) -> (SeccompState, Option<String>) {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
    return filter::apply(profile);
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
    {
        let _ = profile;
        (SeccompState::Unsupported, Some("seccomp filters are not built for this architecture".into()))
    }
}

/// Assembles the report from what each layer returned. Makes no system calls (seccomp is on).
pub fn report(
    problems: Vec<String>,
    observed: &Observed,
    landlock: (LandlockState, u8),
    seccomp: SeccompState,
    insecure_override: bool,
) -> SandboxReport {
    let enforced = problems.is_empty()
        && observed.caps_cleared
        && landlock.0 == LandlockState::Enforced
        && seccomp == SeccompState::Enforced;
    SandboxReport {
        enforced,
        insecure_override,
        uid: observed.uid,
        gid: observed.gid,
        no_new_privs: observed.no_new_privs,
        dumpable: observed.dumpable,
        caps_cleared: observed.caps_cleared,
        landlock_abi: landlock.1,
        landlock: landlock.0,
        seccomp,
        problems,
    }
}

/// Exit code of a probe child: 0 = the call succeeded (escape), 100+errno = denied.
const DENIED_BASE: i32 = 100;

fn probe_exit(result: std::io::Result<()>) -> ! {
    match result {
        Ok(()) => os::exit_now(0),
        Err(e) => os::exit_now(DENIED_BASE + e.raw_os_error().unwrap_or(0).clamp(0, 150)),
    }
}

/// Runs in a forked probe child: attempts `kind` and exits with the result code.
pub fn probe_child(
    kind: ProbeKind,
    layer: ProbeLayer,
    spare_fd: std::os::fd::BorrowedFd<'_>,
    proof: &os::SingleThreaded,
) -> ! {
    match kind {
        ProbeKind::OpenFile => probe_exit(std::fs::File::open("/etc/passwd").map(drop)),
        ProbeKind::SocketInet => probe_exit(os::probe_socket_inet()),
        ProbeKind::Connect => match layer {
            // Under Landlock alone a TCP socket can be made; the connect itself must be denied.
            // ECONNREFUSED means the attempt reached the network stack, i.e. was not blocked.
            ProbeLayer::Landlock => {
                let r = std::net::TcpStream::connect(("127.0.0.1", 9)).map(drop);
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => os::exit_now(0),
                    other => probe_exit(other),
                }
            }
            ProbeLayer::Worker => probe_exit(os::probe_connect(spare_fd, 9)),
        },
        ProbeKind::Execve => {
            let e = os::probe_execve("/bin/true");
            probe_exit(Err(e))
        }
        ProbeKind::Ptrace => probe_exit(os::probe_ptrace_traceme()),
        ProbeKind::Fork => {
            // A fork child has exactly the one thread that forked, so the keeper's proof still holds.
            match os::fork(proof) {
                Ok(os::Forked::Child) => os::exit_now(0),
                Ok(os::Forked::Parent { .. }) => os::exit_now(0),
                Err(e) => probe_exit(Err(e)),
            }
        }
    }
}

/// Interprets how a probe child ended.
pub fn probe_outcome(layer: ProbeLayer, kind: ProbeKind, status: os::ExitStatus) -> ProbeResult {
    let outcome = match status {
        os::ExitStatus::Signaled(sig) if sig == libc::SIGSYS => ProbeOutcome::KilledBySeccomp,
        os::ExitStatus::Exited(0) => ProbeOutcome::Escaped,
        os::ExitStatus::Exited(c) if c >= DENIED_BASE => ProbeOutcome::Denied(c - DENIED_BASE),
        os::ExitStatus::Exited(c) => ProbeOutcome::Unexpected(c),
        os::ExitStatus::Signaled(s) => ProbeOutcome::Unexpected(-s),
    };
    ProbeResult { layer, kind, outcome }
}
