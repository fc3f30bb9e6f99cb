//! The one module allowed to use `unsafe`: thin, documented wrappers over the Linux system calls
//! that neither `std` nor our sandbox crates expose safely.
//!
//! What runs here: no threads and no files of its own. System calls: `socketpair`, `sendmsg` and
//! `recvmsg` (with `SCM_RIGHTS`), `send`/`recv` on SOCK_SEQPACKET sockets, `fork`, `dup2`/`fcntl` in
//! a pre-exec hook, `prctl` (PDEATHSIG, DUMPABLE, NO_NEW_PRIVS), `setgroups`, `setresgid`,
//! `setresuid`, `getresuid`, `setrlimit`, `waitpid`, `kill`, `signal`, `sigaction` with a handler
//! that writes to a pipe ([`signal_pipe`]), `mmap`/`munmap` (one shared page),
//! `getsockopt(SO_PEERCRED)`, `tcgetattr`/`tcsetattr` and `ioctl(TIOCGWINSZ)` (a raw terminal
//! for `ephyr run`), the sandbox escape probes (`execve`, `socket`, `connect`, `ptrace`),
//! and glibc's `mallopt` (no system call).
//!
//! Every `unsafe` block states why it is sound. Callers elsewhere in the crate are
//! `#![forbid(unsafe_code)]`, so any invariant a wrapper relies on is checked here, at run time.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc == -1 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn cvt_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc as usize) }
}

/// Fixes glibc's mmap threshold at 128 KiB. By default glibc raises it to the size of every large
/// block freed, so a transient 19 MiB buffer (an Argon2id check) is next served from a thread's
/// arena and stays resident: eight checks left the broker at 120 MB. With the threshold fixed, a
/// large block is always its own mapping and goes back to the system when freed. (musl already
/// maps and unmaps large blocks; there this does nothing.) Call once at start, before threads.
pub fn return_large_blocks_to_the_system() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` only sets an allocator parameter; it is called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// A connected pair of `AF_UNIX`/`SOCK_SEQPACKET` sockets, both close-on-exec.
///
/// SEQPACKET keeps message boundaries (one frame = one `send`), is reliable and ordered, and
/// reports EOF when the peer dies, which is how the broker notices a dead signer at once.
pub fn socketpair_seqpacket() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two ints, as socketpair(2) requires.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) })?;
    // SAFETY: on success both descriptors are freshly created and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Arranges for `fd` to appear as descriptor `target` (without close-on-exec) in the program that
/// `cmd` executes, and for nothing else of ours to leak: every other descriptor we create is
/// close-on-exec.
pub fn pass_fd_on_exec(cmd: &mut Command, fd: OwnedFd, target: RawFd) {
    let hook = move || -> io::Result<()> {
        // Keep `fd` alive (it is moved into the closure) until the child has duplicated it.
        let source = fd.as_raw_fd();
        if source == target {
            // dup2 onto itself would leave FD_CLOEXEC set; clear it instead.
            // SAFETY: fcntl on a descriptor we own; F_SETFD takes an int flag argument.
            cvt(unsafe { libc::fcntl(source, libc::F_SETFD, 0) })?;
        } else {
            // SAFETY: dup2 is async-signal-safe; `source` is open (owned by this closure) and the new
            // descriptor `target` does not carry FD_CLOEXEC.
            cvt(unsafe { libc::dup2(source, target) })?;
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec in the child. It only calls dup2/fcntl, which are
    // async-signal-safe, allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Takes ownership of an inherited descriptor `fd` after checking that it is an open
/// `SOCK_SEQPACKET` socket, and marks it close-on-exec.
pub fn inherited_seqpacket(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    let mut ty: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: out-pointer and length describe `ty` exactly.
    cvt(unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&mut ty as *mut libc::c_int).cast(), &mut len)
    })?;
    if ty != libc::SOCK_SEQPACKET {
        return Err(io::Error::other(format!("descriptor {fd} is not a SOCK_SEQPACKET socket")));
    }
    // SAFETY: F_SETFD with an int flag on a descriptor checked above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    // SAFETY: the descriptor is open, is the socket our parent passed us, and nothing else in this
    // process owns it (it is claimed once, at start).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Proof, checked at run time, that the calling process had exactly one thread.
///
/// Created by [`single_threaded`] (which reads `/proc/self/status`, so it must run before the
/// filesystem is sandboxed). It is neither `Send` nor `Sync`, so it stays on the thread that checked.
pub struct SingleThreaded(std::marker::PhantomData<*const ()>);

/// Checks that this process has exactly one thread, and returns the proof [`fork`] requires.
pub fn single_threaded() -> io::Result<SingleThreaded> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))?;
    if threads == 1 {
        Ok(SingleThreaded(std::marker::PhantomData))
    } else {
        Err(io::Error::other(format!("process has {threads} threads; fork needs exactly one")))
    }
}

/// Which side of a [`fork`] we are on.
pub enum Forked {
    /// The original process; `child` is the new process id.
    Parent {
        /// Process id of the child.
        child: i32,
    },
    /// The new process.
    Child,
}

/// `fork(2)` for a process proven single-threaded (the signer keeper never starts threads).
pub fn fork(_proof: &SingleThreaded) -> io::Result<Forked> {
    // SAFETY: the process has one thread (checked when `_proof` was made, and the token cannot leave
    // that thread), so the child inherits no lock held by another thread and may run normal code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent { child }),
    }
}

/// Outcome of receiving one SEQPACKET message.
pub struct Packet {
    /// Bytes copied into the buffer.
    pub len: usize,
    /// The message was longer than the buffer (the rest was discarded by the kernel).
    pub truncated: bool,
}

/// Receives one message. A zero-length result with `truncated == false` means the peer closed.
pub fn recv_packet(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Packet> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes. With MSG_TRUNC the return value is the
    // real message length, which may exceed the buffer; the kernel never writes past `buf.len()`.
    let n = cvt_size(unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) })?;
    Ok(Packet { len: n.min(buf.len()), truncated: n > buf.len() })
}

/// Sends one message (never raises SIGPIPE).
pub fn send_packet(sock: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes.
    let n = cvt_size(unsafe { libc::send(sock.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) })?;
    if n == data.len() { Ok(()) } else { Err(io::Error::other("short send on a SEQPACKET socket")) }
}

const CMSG_SPACE_ONE_FD: usize = 64; // comfortably >= CMSG_SPACE(sizeof(int)) on every ABI

/// Sends `data` with one file descriptor attached (`SCM_RIGHTS`).
pub fn send_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut control = [0u8; CMSG_SPACE_ONE_FD];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header that we then fill in.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as _;
    // SAFETY: `msg` points at `control`, which is large enough for one header plus one int, so
    // CMSG_FIRSTHDR returns a non-null pointer inside `control` and CMSG_DATA stays in bounds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
    }
    // SAFETY: `msg` and everything it points to (iov, data, control) outlive the call.
    let n = cvt_size(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })?;
    if n == data.len() { Ok(()) } else { Err(io::Error::other("short sendmsg")) }
}

/// Receives one message and at most one attached descriptor (made close-on-exec).
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(Packet, Option<OwnedFd>)> {
    let mut control = [0u8; CMSG_SPACE_ONE_FD];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    // SAFETY: `msg` points at live buffers of the stated lengths.
    let n = cvt_size(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC) })?;
    let mut received = None;
    // SAFETY: the kernel filled `control` and set msg_controllen; CMSG_FIRSTHDR/NXTHDR walk only
    // within it. Each SCM_RIGHTS payload holds ints that are new descriptors owned by us now.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = payload / size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    // Keep the first; any extra descriptor is closed when dropped here.
                    if received.is_none() {
                        received = Some(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let truncated = n > buf.len() || msg.msg_flags & libc::MSG_CTRUNC != 0;
    Ok((Packet { len: n.min(buf.len()), truncated }, received))
}

/// `prctl(PR_SET_PDEATHSIG, SIGKILL)`: die when the parent thread exits. Must be set *after* any
/// uid/gid change, because the kernel clears it on credential changes.
pub fn set_parent_death_kill() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// `prctl(PR_SET_DUMPABLE, 0)`: no core dumps, no ptrace or `/proc/<pid>/mem` access by the same
/// uid. Also reset by credential changes, so set it after them.
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }).map(drop)
}

/// Whether the process is dumpable (`PR_GET_DUMPABLE`).
pub fn is_dumpable() -> io::Result<bool> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }).map(|v| v != 0)
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`: execve can never grant privileges again.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map(drop)
}

/// Whether `no_new_privs` is set.
pub fn no_new_privs() -> io::Result<bool> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) }).map(|v| v != 0)
}

/// Real, effective and saved user ids.
pub fn user_ids() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out-pointers; getresuid cannot fail with valid pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

/// Real, effective and saved group ids.
pub fn group_ids() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out-pointers; getresgid cannot fail with valid pointers.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

/// Number of supplementary groups.
pub fn supplementary_group_count() -> io::Result<usize> {
    // SAFETY: size 0 with a null list only asks for the count.
    cvt(unsafe { libc::getgroups(0, std::ptr::null_mut()) }).map(|n| n as usize)
}

/// Changes to `uid`/`gid` for real, effective and saved ids, with no supplementary groups, then
/// verifies that every id changed (so a partial drop can never go unnoticed).
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups with size 0 and a null list clears the supplementary groups.
    cvt(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only. glibc applies the change to every thread of the process.
    cvt(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::setresuid(uid, uid, uid) })?;
    if user_ids() != (uid, uid, uid) || group_ids() != (gid, gid, gid) || supplementary_group_count()? != 0 {
        return Err(io::Error::other("uid/gid change did not take full effect"));
    }
    Ok(())
}

/// The architecture seccomp filters are compiled for (this binary's); the signer's sandbox and
/// a stdio remote's confinement share it.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
pub fn seccomp_arch() -> seccompiler::TargetArch {
    #[cfg(target_arch = "x86_64")]
    return seccompiler::TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return seccompiler::TargetArch::aarch64;
    #[cfg(target_arch = "riscv64")]
    return seccompiler::TargetArch::riscv64;
}

/// A resource limit [`set_limit`] can lower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `RLIMIT_DATA`: data segment and private writable mappings, in bytes.
    Data,
    /// `RLIMIT_NOFILE`: open descriptors.
    OpenFiles,
    /// `RLIMIT_NPROC`: processes and threads of the real user id.
    Processes,
    /// `RLIMIT_CORE`: core file size (0: none).
    Core,
}

/// Sets both the soft and the hard value of `limit` to `value` (inherited across `execve`).
pub fn set_limit(limit: Limit, value: u64) -> io::Result<()> {
    let resource = match limit {
        Limit::Data => libc::RLIMIT_DATA,
        Limit::OpenFiles => libc::RLIMIT_NOFILE,
        Limit::Processes => libc::RLIMIT_NPROC,
        Limit::Core => libc::RLIMIT_CORE,
    };
    let lim = libc::rlimit { rlim_cur: value as libc::rlim_t, rlim_max: value as libc::rlim_t };
    // SAFETY: `lim` is a valid, initialised rlimit that setrlimit(2) only reads.
    cvt(unsafe { libc::setrlimit(resource, &lim) })?;
    Ok(())
}

/// How a child process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

/// `waitpid`. With `block == false`, returns `Ok(None)` if the child is still running.
/// `pid == -1` waits for any child.
pub fn wait_child(pid: i32, block: bool) -> io::Result<Option<(i32, ExitStatus)>> {
    let mut status = 0;
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: `status` is a valid out-pointer.
    let got = cvt(unsafe { libc::waitpid(pid, &mut status, flags) })?;
    if got == 0 {
        return Ok(None);
    }
    let how = if libc::WIFEXITED(status) {
        ExitStatus::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ExitStatus::Signaled(libc::WTERMSIG(status))
    } else {
        return Ok(None);
    };
    Ok(Some((got, how)))
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::kill(pid, signal) }).map(drop)
}

/// Sets `signal` to be ignored.
pub fn ignore_signal(signal: i32) -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code, so there is nothing to be async-signal-safe.
    if unsafe { libc::signal(signal, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A terminal switched to raw mode (`ephyr run` with a terminal): keystrokes, Ctrl-C included,
/// go to the remote program as bytes. The previous settings come back when this is dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts the terminal on `fd` in raw mode (`cfmakeraw`); `Err` if `fd` is not a terminal.
    pub fn enter(fd: BorrowedFd<'_>) -> io::Result<RawTerminal> {
        let fd = fd.as_raw_fd();
        // SAFETY: a zeroed termios is a valid buffer for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { zeroed() };
        // SAFETY: `fd` is borrowed (open for this call); `saved` is a valid termios.
        cvt(unsafe { libc::tcgetattr(fd, &mut saved) })?;
        let mut raw = saved;
        // SAFETY: cfmakeraw only changes the flags of the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: as above, with a termios tcgetattr filled and cfmakeraw changed.
        cvt(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) })?;
        Ok(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores settings tcgetattr returned; on a descriptor that was closed in the
        // meantime the call fails harmlessly (EBADF).
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The size (cols, rows) of the terminal on `fd`, if it is one.
pub fn terminal_size(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    // SAFETY: a zeroed winsize is a valid buffer for TIOCGWINSZ to fill.
    let mut ws: libc::winsize = unsafe { zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer; `fd` is borrowed.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then(|| (u32::from(ws.ws_col), u32::from(ws.ws_row)))
}

/// The write end of the signal pipe, for the handler (-1: none installed).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    // SAFETY: only async-signal-safe calls (`write`, and `__errno_location`, which returns this
    // thread's errno slot); errno is restored so the interrupted code never sees the handler's.
    unsafe {
        let errno = libc::__errno_location();
        let saved = *errno;
        let byte = signal as u8;
        // The write end is non-blocking: with 64 KiB of unread signals one is dropped, never a hang.
        libc::write(fd, (&byte as *const u8).cast(), 1);
        *errno = saved;
    }
}

/// Delivers `signals` as bytes (the signal number) on a pipe: a handler installed with
/// `sigaction` writes one byte per delivery, and the returned read end (close-on-exec; blocking
/// unless its owner changes that) reads them. Nothing is blocked or masked, so child processes
/// start with the signal mask they would have had anyway, and `exec` resets the handlers to
/// their defaults. Once per process; a second call is refused.
pub fn signal_pipe(signals: &[i32]) -> io::Result<OwnedFd> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    let flags = cvt(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: the same, with integer flags.
    cvt(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    if SIGNAL_PIPE.compare_exchange(-1, write.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst).is_err() {
        return Err(io::Error::other("signal handlers are already installed"));
    }
    // The write end lives as long as the process (the handler may run at any time).
    std::mem::forget(write);
    for &signal in signals {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler only does
        // async-signal-safe work (above). SA_RESTART: system calls it interrupts are restarted.
        unsafe {
            let mut action: libc::sigaction = zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            cvt(libc::sigemptyset(&mut action.sa_mask))?;
            cvt(libc::sigaction(signal, &action, std::ptr::null_mut()))?;
        }
    }
    Ok(read)
}

/// One page of memory shared between a process and the children it forks afterwards, viewed as
/// atomic 64-bit counters. The signer keeps its rate-limit window here, so a worker restart cannot
/// reset the budget.
pub struct SharedCounters {
    ptr: *mut AtomicU64,
    len: usize,
}

impl SharedCounters {
    const BYTES: usize = 4096;

    /// Maps a fresh zeroed shared page.
    pub fn new() -> io::Result<Self> {
        // SAFETY: anonymous shared mapping with no address hint; the kernel returns zeroed memory
        // or MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast(), len: Self::BYTES / size_of::<AtomicU64>() })
    }

    /// The counters (all zero initially).
    pub fn slots(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned (so aligned for AtomicU64), `len` counters long, lives
        // until `self` is dropped, and is only ever accessed through atomics.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`; no reference outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), Self::BYTES) };
    }
}

/// Credentials of the process on the other end of a Unix socket (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Peer process id at connect time.
    pub pid: i32,
    /// Peer effective user id.
    pub uid: u32,
    /// Peer effective group id.
    pub gid: u32,
}

/// Reads `SO_PEERCRED` from a connected Unix socket.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCredentials> {
    // SAFETY: ucred is plain old data.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: out-pointer and length describe `cred` exactly.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(PeerCredentials { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// Sandbox probe: `execve(path)`. Returns the error if it fails; on success the process image is
/// replaced, so it never returns.
pub fn probe_execve(path: &str) -> io::Error {
    let Ok(c_path) = CString::new(path) else {
        return io::Error::from(io::ErrorKind::InvalidInput);
    };
    let argv = [c_path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated path, argv and envp arrays terminated by null pointers.
    unsafe { libc::execve(c_path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Sandbox probe: `socket(AF_INET, SOCK_STREAM)`. Closes the socket if one was created.
pub fn probe_socket_inet() -> io::Result<()> {
    // SAFETY: integer arguments only.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh descriptor we own.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Sandbox probe: `connect` an existing descriptor to 127.0.0.1:`port` over TCP semantics.
pub fn probe_connect(sock: BorrowedFd<'_>, port: u16) -> io::Result<()> {
    // SAFETY: sockaddr_in is plain old data.
    let mut addr: libc::sockaddr_in = unsafe { zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = port.to_be();
    addr.sin_addr = libc::in_addr { s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be() };
    // SAFETY: pointer and length describe `addr` exactly.
    cvt(unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sandbox probe: `ptrace(PTRACE_TRACEME)`.
pub fn probe_ptrace_traceme() -> io::Result<()> {
    // SAFETY: PTRACE_TRACEME takes no pointer arguments.
    cvt(unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) } as libc::c_int).map(drop)
}

/// The local time zone's offset from UTC, in seconds east, at Unix time `secs` (from `TZ` or
/// `/etc/localtime`, via `localtime_r`). 0 if it cannot be determined.
pub fn utc_offset_at(secs: i64) -> i32 {
    let t: libc::time_t = secs as libc::time_t;
    // SAFETY: tm is plain old data; localtime_r writes into it and reads `t`.
    let mut tm: libc::tm = unsafe { zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is the thread-safe variant.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() { 0 } else { tm.tm_gmtoff as i32 }
}

/// Terminates the process immediately with `code`, without running destructors or atexit handlers
/// (used by forked children so they never touch state that belongs to the parent).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}
