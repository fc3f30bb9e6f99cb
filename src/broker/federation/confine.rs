//! The confinement of a stdio remote: what `ephyr __remote-sandbox SPEC` does between being
//! started by the broker and executing the remote's command.
//!
//! What runs here: that short-lived process only, single-threaded, before `execve` (the broker
//! never runs this code). In order: resource limits (`RLIMIT_DATA`, `RLIMIT_NOFILE`,
//! `RLIMIT_NPROC`, no core files); as root (only in tests: the broker itself never runs as
//! root), the capability bounding set emptied, so the program gains no capability at `execve`;
//! `PR_SET_PDEATHSIG(SIGKILL)` with a check that the broker is still
//! its parent; `PR_SET_NO_NEW_PRIVS`; a Landlock ruleset handling every filesystem right, with
//! read-and-execute rules for the system paths ([`SYSTEM_READ`]) and the configured `read`
//! paths, all rights under the `write` paths, and when the network is off every TCP right;
//! signal and abstract-socket scoping (the program cannot signal the broker or reach its
//! abstract sockets); then two seccomp filters, one refusing (`EPERM`) the system calls a tool
//! server never needs (tracing, mounting, kernel modules, BPF, key rings, ...) and, when the
//! network is off, one refusing (`EACCES`) IPv4, IPv6 and packet sockets. The environment was
//! cleaned by the broker before this process started. A layer that cannot be applied stops the
//! start with the reason on standard error (exit 126); a kernel without Landlock refuses too.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::process::CommandExt as _;
use std::path::Path;

use landlock::{
    ABI, Access, AccessFs, AccessNet, LandlockStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
    path_beneath_rules,
};
use serde::{Deserialize, Serialize};

use crate::os;

/// Where a stdio remote may read and execute by default: the system's programs and libraries
/// and the few files a dynamically linked program and its TLS stack read (those that exist).
pub const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/passwd",
    "/etc/group",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
];

/// Files every program may also write (the bit bucket).
const SYSTEM_WRITE: &[&str] = &["/dev/null"];

/// What the confined process is told (one JSON argument; no secrets: they are in its
/// environment).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// Paths it may read and execute.
    pub read: Vec<String>,
    /// Paths it may write under.
    pub write: Vec<String>,
    /// IPv4/IPv6 sockets allowed.
    pub network: bool,
    /// `RLIMIT_DATA` in bytes.
    pub memory: u64,
    /// `RLIMIT_NOFILE`.
    pub open_files: u64,
    /// `RLIMIT_NPROC`.
    pub processes: u64,
    /// The broker's process id (the expected parent).
    pub parent: u32,
}

/// Applies every layer and executes the command; returns only with the reason it could not.
pub fn enter(spec: &Spec) -> Result<Infallible, String> {
    let (program, args) = spec.argv.split_first().ok_or("no command")?;
    for (limit, value) in [
        (os::Limit::Data, spec.memory),
        (os::Limit::OpenFiles, spec.open_files),
        (os::Limit::Processes, spec.processes),
        (os::Limit::Core, 0),
    ] {
        os::set_limit(limit, value).map_err(|e| format!("setting {limit:?} to {value}: {e}"))?;
    }
    let (_, euid, _) = os::user_ids();
    if euid == 0 {
        caps::clear(None, caps::CapSet::Bounding).map_err(|e| format!("dropping the capability bounding set: {e}"))?;
        caps::clear(None, caps::CapSet::Ambient).map_err(|e| format!("clearing ambient capabilities: {e}"))?;
        caps::clear(None, caps::CapSet::Inheritable).map_err(|e| format!("clearing inheritable capabilities: {e}"))?;
    }
    os::set_parent_death_kill().map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    if std::os::unix::process::parent_id() != spec.parent {
        return Err("the broker is gone".into());
    }
    std::env::set_current_dir(&spec.cwd).map_err(|e| format!("working directory {:?}: {e}", spec.cwd))?;
    for p in spec.read.iter().chain(&spec.write) {
        if !Path::new(p).exists() {
            return Err(format!("sandbox path {p:?} does not exist"));
        }
    }
    os::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    landlock(spec)?;
    seccomp(spec.network)?;
    let e = std::process::Command::new(program).args(args).exec();
    Err(format!("starting {program:?}: {e}"))
}

fn landlock(spec: &Spec) -> Result<(), String> {
    let abi = ABI::V9;
    let fail = |e: landlock::RulesetError| format!("Landlock: {e}");
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(abi)).map_err(fail)?;
    if !spec.network {
        ruleset = ruleset.handle_access(AccessNet::from_all(abi)).map_err(fail)?;
    }
    let system: Vec<&str> = SYSTEM_READ.iter().copied().filter(|p| Path::new(p).exists()).collect();
    let read = system.iter().copied().chain(spec.read.iter().map(String::as_str));
    let write = SYSTEM_WRITE.iter().copied().chain(spec.write.iter().map(String::as_str));
    let status = ruleset
        .scope(Scope::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(read, AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(write, AccessFs::from_all(abi))))
        .and_then(|r| r.restrict_self())
        .map_err(fail)?;
    match (status.landlock, status.ruleset) {
        (LandlockStatus::NotEnabled | LandlockStatus::NotImplemented, _) => {
            Err("Landlock is not available on this kernel; stdio remotes are only started confined".into())
        }
        (_, RulesetStatus::NotEnforced) => Err("the Landlock ruleset was not enforced".into()),
        _ => Ok(()),
    }
}

/// System calls a tool server never needs; refused with `EPERM`.
const REFUSED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_kexec_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_setns,
    libc::SYS_unshare,
];

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
fn seccomp(network: bool) -> Result<(), String> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let arch = os::seccomp_arch();
    let compile = |rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32| {
        let f = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch)
            .map_err(|e| format!("seccomp filter: {e}"))?;
        BpfProgram::try_from(f).map_err(|e| format!("seccomp filter: {e}"))
    };
    let refused = compile(REFUSED.iter().map(|nr| (*nr, vec![])).collect(), libc::EPERM)?;
    seccompiler::apply_filter(&refused).map_err(|e| format!("seccomp: {e}"))?;
    if !network {
        let families = [libc::AF_INET, libc::AF_INET6, libc::AF_PACKET]
            .into_iter()
            .map(|f| {
                let c = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, f as u64)
                    .map_err(|e| format!("seccomp condition: {e}"))?;
                SeccompRule::new(vec![c]).map_err(|e| format!("seccomp rule: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let sockets = compile(BTreeMap::from([(libc::SYS_socket, families)]), libc::EACCES)?;
        seccompiler::apply_filter(&sockets).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
fn seccomp(_network: bool) -> Result<(), String> {
    Err("no seccomp filter for this architecture; stdio remotes are only started confined".into())
}
