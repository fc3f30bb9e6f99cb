//! The broker's side of the signer: launch the keeper, talk to workers, restart them.
//!
//! What runs here: `socketpair` + fork/exec of `/proc/self/exe __signer` (control socket passed as
//! descriptor 3), then, on the executor, non-blocking SEQPACKET `send`/`recv`/`recvmsg` on the
//! control socket and the current worker's socket (received with `SCM_RIGHTS`), and `waitpid` on the
//! keeper. One supervisor task reads worker responses and matches them to callers by request id.
//!
//! Failure handling (DESIGN.md §1): when a worker dies, its socket reports EOF at once; every pending
//! call fails with [`CallError::WorkerDied`] (nothing half-issued), and the supervisor asks the
//! keeper for a fresh worker. Calls that arrive meanwhile wait up to [`WORKER_WAIT`]. If the keeper
//! itself dies, it is relaunched when its keys are readable (same CA required); otherwise the
//! broker is told to stop, since only a restart with privileges can bring the keys back.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::broker::deadline::Deadline;
use crate::broker::reactor::Io;

use super::deadline::within;

use super::Error;
use super::audit::CheckpointSigner;
use super::metrics::Metrics;
use crate::os;
use crate::signer::protocol::CONTROL_FD;
use crate::signer::protocol::{
    ControlRequest, ControlResponse, MAX_FRAME, ProbeResult, Request, Response, SignerError, StatusReport,
};
use crate::signer::{SignerConfig, TargetIds};

/// How long a call waits for a worker while one is being (re)started.
pub const WORKER_WAIT: Duration = Duration::from_secs(3);
/// How long a call waits for its answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the keeper may take to load keys and enter its sandbox.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start a keeper: the command line of `ephyr __signer`.
#[derive(Clone, Debug)]
pub struct Launch {
    exe: PathBuf,
    args: Vec<OsString>,
    /// Whether a relaunch would find the same keys (they are on disk).
    pub persistent_keys: bool,
}

impl Launch {
    /// Builds the command line.
    pub fn new(
        data_dir: Option<PathBuf>,
        generate_missing_keys: bool,
        target: Option<TargetIds>,
        config: &SignerConfig,
        insecure_no_sandbox: bool,
    ) -> Self {
        let mut args: Vec<OsString> = vec!["__signer".into()];
        let persistent_keys = data_dir.is_some();
        match data_dir {
            Some(d) => {
                args.push("--data-dir".into());
                args.push(d.into_os_string());
            }
            None => args.push("--ephemeral-keys".into()),
        }
        if generate_missing_keys && persistent_keys {
            args.push("--generate-missing-keys".into());
        }
        if let Some(t) = target {
            args.push("--uid".into());
            args.push(t.uid.to_string().into());
            args.push("--gid".into());
            args.push(t.gid.to_string().into());
        }
        args.push("--max-cert-ttl".into());
        args.push(config.max_cert_ttl_secs.to_string().into());
        args.push("--rate-limit".into());
        args.push(config.rate_limit.to_string().into());
        args.push("--rate-window".into());
        args.push(config.rate_window_secs.to_string().into());
        for p in &config.principals {
            args.push("--principal".into());
            args.push(p.into());
        }
        for (name, t) in &config.sealed {
            let json = serde_json::to_vec(t).expect("a sealed target serialises");
            args.push("--sealed".into());
            args.push(format!("{name}={}", data_encoding::BASE64URL_NOPAD.encode(&json)).into());
        }
        if insecure_no_sandbox {
            args.push("--insecure-no-sandbox".into());
        }
        Self { exe: PathBuf::from("/proc/self/exe"), args, persistent_keys }
    }

    /// Uses another `ephyr` executable (tests launch the built binary from their own process).
    pub fn with_exe(mut self, exe: impl Into<PathBuf>) -> Self {
        self.exe = exe.into();
        self
    }

    /// Creates the control socket pair and fork+execs the keeper. Safe to call before any thread
    /// exists (it is the first thing `serve` does) and later for relaunches.
    pub fn spawn(&self, self_check: bool) -> io::Result<KeeperProcess> {
        let (ours, theirs) = os::socketpair_seqpacket()?;
        let mut cmd = Command::new(&self.exe);
        std::os::unix::process::CommandExt::arg0(&mut cmd, "ephyr-signer");
        cmd.args(&self.args);
        if self_check {
            cmd.arg("--self-check");
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        // The key holder inherits no environment but the log level: nothing the broker's
        // environment names (LD_PRELOAD, LD_LIBRARY_PATH, ...) is loaded beside the CA key.
        cmd.env_clear();
        if let Some(level) = std::env::var_os("EPHYR_LOG") {
            cmd.env("EPHYR_LOG", level);
        }
        os::pass_fd_on_exec(&mut cmd, theirs, CONTROL_FD);
        let child = cmd.spawn()?;
        // Dropping `cmd` closes our copy of the keeper's end, so its death reads as EOF here.
        drop(cmd);
        Ok(KeeperProcess { child, control: Some(ours) })
    }
}

/// A started keeper: its process and our end of the control socket.
pub struct KeeperProcess {
    child: Child,
    control: Option<OwnedFd>,
}

impl KeeperProcess {
    /// Process id of the keeper.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Why the signer could not be started.
#[derive(Debug)]
pub enum StartError {
    /// The keeper refused to start (keys, sandbox); the message says why.
    Refused(SignerError),
    /// The keeper died or said something unexpected before it was ready.
    Failed(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Refused(e) => write!(f, "the signer refused to start: {}", e.message),
            StartError::Failed(m) => write!(f, "the signer failed to start: {m}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Why one call to the signer did not produce an answer. Nothing was issued in any of these cases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// No worker is available (starting, or the signer is down); the message says which.
    Unavailable(String),
    /// The worker died while the request was in flight.
    WorkerDied,
    /// No answer within [`CALL_TIMEOUT`].
    Timeout,
    /// The signer refused the request (its own limits) — the reason is inside.
    Refused(SignerError),
    /// The answer did not decode or was of the wrong kind.
    Protocol(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Unavailable(m) => write!(f, "signer unavailable: {m}"),
            CallError::WorkerDied => {
                f.write_str("the signer worker died while handling this request; nothing was issued, retry")
            }
            CallError::Timeout => write!(f, "the signer did not answer within {}s", CALL_TIMEOUT.as_secs()),
            CallError::Refused(e) => write!(f, "refused by the signer: {e}"),
            CallError::Protocol(m) => write!(f, "signer protocol error: {m}"),
        }
    }
}

impl std::error::Error for CallError {}

/// A point-in-time view for `/healthz`, `doctor` and metrics.
#[derive(Clone, Debug)]
pub struct Health {
    /// A worker is connected.
    pub available: bool,
    /// Keeper process id.
    pub keeper_pid: Option<u32>,
    /// Current worker process id.
    pub worker_pid: Option<u32>,
    /// Worker restarts since start.
    pub restarts: u64,
    /// The last status report (keys, sandbox, limits).
    pub status: Option<StatusReport>,
    /// Why it is unavailable, if it is.
    pub problem: Option<String>,
}

type Reply = async_channel::Sender<Result<Response, CallError>>;

/// Lifecycle events the broker audits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignerEvent {
    /// A worker was started.
    WorkerStarted {
        /// Its pid.
        pid: u32,
    },
    /// A worker ended (crash, kill).
    WorkerEnded {
        /// Its pid.
        pid: u32,
        /// What the broker saw.
        why: String,
    },
    /// The keeper was relaunched (unprivileged brokers only).
    KeeperRelaunched {
        /// The new keeper's pid.
        pid: u32,
    },
    /// The signer is lost for good.
    Lost {
        /// Why.
        why: String,
    },
}

struct Worker {
    sock: Rc<Io<OwnedFd>>,
    pid: u32,
    generation: u64,
}

struct State {
    keeper: Option<(Child, Rc<Io<OwnedFd>>)>,
    worker: Option<Worker>,
    pending: HashMap<u64, Reply>,
    status: Option<StatusReport>,
    problem: Option<String>,
    stopping: bool,
}

struct Inner {
    launch: Launch,
    state: RefCell<State>,
    next_id: Cell<u64>,
    restarts: Cell<u64>,
    worker_up: event_listener::Event,
    fatal: RefCell<Option<async_channel::Sender<String>>>,
    metrics: Rc<Metrics>,
    events: async_channel::Sender<SignerEvent>,
}

/// Handle to the signer, cheap to clone, for the single-threaded executor.
#[derive(Clone)]
pub struct Signer(Rc<Inner>);

async fn recv_control(sock: &Io<OwnedFd>) -> io::Result<(ControlResponse, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_FRAME];
    let (pkt, fd) = sock.read_with(|s| os::recv_with_fd(s.as_fd(), &mut buf)).await?;
    if pkt.len == 0 && !pkt.truncated {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the signer keeper closed its control socket"));
    }
    if pkt.truncated {
        return Err(io::Error::other("oversized control frame from the keeper"));
    }
    let (_, msg) = ControlResponse::decode(&buf[..pkt.len]).map_err(|e| io::Error::other(e.to_string()))?;
    Ok((msg, fd))
}

async fn send_control(sock: &Io<OwnedFd>, req: &ControlRequest, id: u64) -> io::Result<()> {
    let frame = req.encode(id);
    sock.write_with(|s| os::send_packet(s.as_fd(), &frame)).await
}

/// Waits for the keeper's first message. Returns its status report.
pub async fn wait_ready(keeper: &mut KeeperProcess) -> Result<(StatusReport, Rc<Io<OwnedFd>>), StartError> {
    let fd = keeper.control.take().ok_or_else(|| StartError::Failed("control socket already taken".into()))?;
    let sock = Rc::new(Io::new(fd).map_err(|e| StartError::Failed(e.to_string()))?);
    match within(READY_TIMEOUT, recv_control(&sock)).await {
        None => Err(StartError::Failed(format!("no answer within {}s", READY_TIMEOUT.as_secs()))),
        Some(Err(e)) => {
            let status = keeper.child.try_wait().ok().flatten();
            Err(StartError::Failed(format!("{e}{}", status.map(|s| format!(" (keeper {s})")).unwrap_or_default())))
        }
        Some(Ok((ControlResponse::Ready(s), _))) => Ok((s, sock)),
        Some(Ok((ControlResponse::Failed(e), _))) => {
            let _ = keeper.child.wait();
            Err(StartError::Refused(e))
        }
        Some(Ok((other, _))) => Err(StartError::Failed(format!("unexpected first message {other:?}"))),
    }
}

/// Runs a self-check keeper to completion: its status and the probe results (for `doctor`).
pub async fn self_check(launch: &Launch) -> Result<(StatusReport, Vec<ProbeResult>), StartError> {
    let mut keeper = launch.spawn(true).map_err(|e| StartError::Failed(e.to_string()))?;
    let (status, sock) = wait_ready(&mut keeper).await?;
    let probes = match within(READY_TIMEOUT, recv_control(&sock)).await {
        Some(Ok((ControlResponse::Probes(p), _))) => p,
        Some(Ok((other, _))) => {
            return Err(StartError::Failed(format!("unexpected message {other:?}")));
        }
        Some(Err(e)) => return Err(StartError::Failed(e.to_string())),
        None => return Err(StartError::Failed("probe results timed out".into())),
    };
    let _ = keeper.child.wait();
    Ok((status, probes))
}

impl Signer {
    /// Starts using a keeper that is already spawned: waits for it to be ready, then returns the
    /// handle and the supervisor future (spawn it on the executor). `fatal` receives a message if
    /// the signer can no longer be brought back, so the broker can stop cleanly.
    pub async fn start(
        launch: Launch,
        mut keeper: KeeperProcess,
        fatal: async_channel::Sender<String>,
        metrics: Rc<Metrics>,
        events: async_channel::Sender<SignerEvent>,
    ) -> Result<(Signer, impl std::future::Future<Output = ()>), StartError> {
        let (status, control) = wait_ready(&mut keeper).await?;
        let inner = Rc::new(Inner {
            launch,
            state: RefCell::new(State {
                keeper: Some((keeper.child, control)),
                worker: None,
                pending: HashMap::new(),
                status: Some(status),
                problem: Some("starting".into()),
                stopping: false,
            }),
            next_id: Cell::new(1),
            restarts: Cell::new(0),
            worker_up: event_listener::Event::new(),
            fatal: RefCell::new(Some(fatal)),
            metrics,
            events,
        });
        let signer = Signer(inner);
        let sup = signer.clone();
        Ok((signer, async move { sup.supervise().await }))
    }

    /// Sends one request and waits for its answer.
    ///
    /// A request that could not even be sent because the worker was already dead (its EOF not yet
    /// read) was never in flight: it waits for the replacement and is sent there. A request the
    /// worker received and died on fails with [`CallError::WorkerDied`].
    pub async fn call(&self, req: Request) -> Result<Response, CallError> {
        let kind = match &req {
            Request::Status => "status",
            Request::SignUserCert(_) => "sign_cert",
            Request::Seal { .. } => "seal",
            Request::Unseal { .. } => "unseal",
            Request::SignCheckpoint { .. } => "checkpoint",
            Request::SignExec(_) => "exec",
        };
        let started = Instant::now();
        let result = self.call_inner(&req).await;
        self.0.metrics.observe(
            "ephyr_signer_request_duration_seconds",
            &[("kind", kind)],
            started.elapsed().as_secs_f64(),
        );
        result
    }

    async fn call_inner(&self, req: &Request) -> Result<Response, CallError> {
        let frame_for = |id: u64| req.encode(id);
        let mut dead_generation = None;
        let (id, rx) = loop {
            let (sock, generation) = self.current_worker(dead_generation).await?;
            let id = self.0.next_id.get();
            self.0.next_id.set(id.wrapping_add(1));
            let (tx, rx) = async_channel::bounded(1);
            self.0.state.borrow_mut().pending.insert(id, tx);
            let frame = frame_for(id);
            match sock.write_with(|s| os::send_packet(s.as_fd(), &frame)).await {
                Ok(()) => break (id, rx),
                Err(e) => {
                    self.0.state.borrow_mut().pending.remove(&id);
                    let dead = matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
                    );
                    if !dead || dead_generation.is_some() {
                        return Err(if dead { CallError::WorkerDied } else { CallError::Unavailable(e.to_string()) });
                    }
                    dead_generation = Some(generation);
                }
            }
        };
        match within(CALL_TIMEOUT, rx.recv()).await {
            None => {
                self.0.state.borrow_mut().pending.remove(&id);
                Err(CallError::Timeout)
            }
            Some(Err(_)) => Err(CallError::WorkerDied),
            Some(Ok(r)) => match r? {
                Response::Error(e) => Err(CallError::Refused(e)),
                ok => Ok(ok),
            },
        }
    }

    /// Current health.
    pub fn health(&self) -> Health {
        let st = self.0.state.borrow();
        Health {
            available: st.worker.is_some(),
            keeper_pid: st.keeper.as_ref().map(|(c, _)| c.id()),
            worker_pid: st.worker.as_ref().map(|w| w.pid),
            restarts: self.0.restarts.get(),
            status: st.status.clone(),
            problem: st.problem.clone(),
        }
    }

    /// Stops: no more restarts, close the control socket (the keeper exits and its worker dies
    /// with it), and reap the keeper.
    pub async fn shutdown(&self) {
        let keeper = {
            let mut st = self.0.state.borrow_mut();
            st.stopping = true;
            st.worker = None;
            st.keeper.take()
        };
        self.0.worker_up.notify(usize::MAX);
        if let Some((mut child, control)) = keeper {
            drop(control);
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        log::warn!("signer keeper {} did not exit after its control socket closed", child.id());
                        break;
                    }
                    Ok(None) => {
                        Deadline::after(Duration::from_millis(5)).await;
                    }
                }
            }
        }
    }

    /// The current worker's socket and generation, waiting (up to [`WORKER_WAIT`]) while there is
    /// none or while it is still the generation known to be dead.
    async fn current_worker(&self, not: Option<u64>) -> Result<(Rc<Io<OwnedFd>>, u64), CallError> {
        let deadline = Instant::now() + WORKER_WAIT;
        loop {
            let listener = self.0.worker_up.listen();
            {
                let st = self.0.state.borrow();
                if let Some(w) = st.worker.as_ref().filter(|w| Some(w.generation) != not) {
                    return Ok((w.sock.clone(), w.generation));
                }
                if st.stopping {
                    return Err(CallError::Unavailable("the broker is shutting down".into()));
                }
            }
            let now = Instant::now();
            if now >= deadline || within(deadline - now, listener).await.is_none() {
                let why = self.0.state.borrow().problem.clone().unwrap_or_else(|| "restarting".into());
                return Err(CallError::Unavailable(why));
            }
        }
    }

    fn fail_pending(&self, err: CallError) {
        let pending: Vec<Reply> = self.0.state.borrow_mut().pending.drain().map(|(_, tx)| tx).collect();
        for tx in pending {
            let _ = tx.try_send(Err(err.clone()));
        }
    }

    fn fatal(&self, msg: String) {
        log::error!("{msg}");
        let _ = self.0.events.try_send(SignerEvent::Lost { why: msg.clone() });
        self.0.state.borrow_mut().problem = Some(msg.clone());
        if let Some(tx) = self.0.fatal.borrow_mut().take() {
            let _ = tx.try_send(msg);
        }
    }

    async fn supervise(self) {
        let mut recent: Vec<Instant> = Vec::new();
        loop {
            if self.0.state.borrow().stopping {
                return;
            }
            let worker = match self.spawn_worker().await {
                Ok(w) => w,
                Err(SpawnError::Fatal(msg)) => return self.fatal(msg),
                Err(SpawnError::Retry(msg)) => {
                    log::warn!("signer: {msg}; retrying");
                    self.0.state.borrow_mut().problem = Some(msg);
                    Deadline::after(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let sock = worker.sock.clone();
            let pid = worker.pid;
            {
                let mut st = self.0.state.borrow_mut();
                st.worker = Some(worker);
                st.problem = None;
            }
            let _ = self.0.events.try_send(SignerEvent::WorkerStarted { pid });
            self.0.worker_up.notify(usize::MAX);
            let why = self.read_responses(&sock).await;
            let stopping = {
                let mut st = self.0.state.borrow_mut();
                st.worker = None;
                st.problem = Some(format!("signer worker {pid} ended ({why}); restarting"));
                st.stopping
            };
            self.fail_pending(CallError::WorkerDied);
            if stopping {
                return;
            }
            self.0.restarts.set(self.0.restarts.get() + 1);
            self.0.metrics.inc("ephyr_signer_restarts_total", &[]);
            let _ = self.0.events.try_send(SignerEvent::WorkerEnded { pid, why: why.clone() });
            log::warn!("signer worker {pid} ended ({why}); starting a new one");
            // Crash-loop guard: more than 5 restarts in 10 s backs off a little.
            let now = Instant::now();
            recent.retain(|t| now.duration_since(*t) < Duration::from_secs(10));
            recent.push(now);
            if recent.len() > 5 {
                Deadline::after(Duration::from_millis(200 * recent.len() as u64)).await;
            }
        }
    }

    async fn read_responses(&self, sock: &Io<OwnedFd>) -> String {
        // Frames may carry secrets (Unsealed answers): wiped after each one and on drop.
        let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_FRAME]);
        loop {
            let pkt = match sock.read_with(|s| os::recv_packet(s.as_fd(), &mut buf)).await {
                Ok(p) => p,
                Err(e) => return e.to_string(),
            };
            if pkt.len == 0 && !pkt.truncated {
                return "socket closed".into();
            }
            let decoded = if pkt.truncated {
                Err("oversized frame from the signer".to_string())
            } else {
                Response::decode(&buf[..pkt.len]).map_err(|e| e.to_string())
            };
            match decoded {
                Ok((id, resp)) => {
                    let tx = self.0.state.borrow_mut().pending.remove(&id);
                    if let Some(tx) = tx {
                        let _ = tx.try_send(Ok(resp));
                    }
                }
                Err(e) => {
                    log::error!("signer answered with a bad frame: {e}");
                    let id = crate::signer::protocol::frame_id(&buf[..pkt.len]);
                    let tx = self.0.state.borrow_mut().pending.remove(&id);
                    if let Some(tx) = tx {
                        let _ = tx.try_send(Err(CallError::Protocol(e)));
                    }
                }
            }
            zeroize::Zeroize::zeroize(&mut buf[..pkt.len]);
        }
    }

    async fn spawn_worker(&self) -> Result<Worker, SpawnError> {
        for attempt in 0..2 {
            let control = self.0.state.borrow().keeper.as_ref().map(|(_, c)| c.clone());
            let control = match control {
                Some(c) => c,
                None => self.relaunch_keeper().await?,
            };
            let result = async {
                send_control(&control, &ControlRequest::SpawnWorker, 0).await?;
                recv_control(&control).await
            };
            match within(READY_TIMEOUT, result).await {
                Some(Ok((ControlResponse::Spawned { pid }, Some(fd)))) => {
                    let sock = Io::new(fd).map_err(|e| SpawnError::Retry(e.to_string()))?;
                    let generation = self.0.next_id.get();
                    self.0.next_id.set(generation.wrapping_add(1));
                    return Ok(Worker { sock: Rc::new(sock), pid, generation });
                }
                Some(Ok((ControlResponse::Failed(e), _))) => {
                    return Err(SpawnError::Retry(format!("the keeper could not start a worker: {}", e.message)));
                }
                Some(Ok((other, _))) => {
                    return Err(SpawnError::Retry(format!("unexpected keeper answer {other:?}")));
                }
                Some(Err(e)) if attempt == 0 => {
                    // The keeper is gone: reap it and relaunch once.
                    log::error!("signer keeper lost: {e}");
                    if let Some((mut child, _)) = self.0.state.borrow_mut().keeper.take() {
                        let _ = child.try_wait();
                    }
                }
                Some(Err(e)) => {
                    return Err(SpawnError::Fatal(format!("signer keeper lost again: {e}")));
                }
                None => {
                    return Err(SpawnError::Retry("the keeper did not answer a spawn request".into()));
                }
            }
        }
        Err(SpawnError::Fatal("the signer keeper could not be recovered".into()))
    }

    async fn relaunch_keeper(&self) -> Result<Rc<Io<OwnedFd>>, SpawnError> {
        if !self.0.launch.persistent_keys {
            return Err(SpawnError::Fatal(
                "the signer keeper died and its keys were ephemeral (temporary dev broker); stopping".into(),
            ));
        }
        let expected = self.0.state.borrow().status.as_ref().map(|s| s.ca_public_key.clone());
        let mut keeper =
            self.0.launch.spawn(false).map_err(|e| SpawnError::Fatal(format!("relaunching the signer: {e}")))?;
        let (status, control) = wait_ready(&mut keeper).await.map_err(|e| {
            SpawnError::Fatal(format!(
                "the signer keeper died and could not be relaunched ({e}); restart the ephyr service \
                 (an unprivileged broker cannot read the CA key, by design)"
            ))
        })?;
        if expected.is_some() && expected.as_deref() != Some(status.ca_public_key.as_str()) {
            return Err(SpawnError::Fatal("the relaunched signer has a different CA key; stopping".into()));
        }
        log::warn!("signer keeper relaunched as pid {}", keeper.child.id());
        let _ = self.0.events.try_send(SignerEvent::KeeperRelaunched { pid: keeper.child.id() });
        let mut st = self.0.state.borrow_mut();
        st.status = Some(status);
        st.keeper = Some((keeper.child, control.clone()));
        Ok(control)
    }
}

impl Signer {
    /// Seals `plaintext` under the data dir's sealing key, bound to `context`.
    /// `Err` is `Error::Signer`: the signer refused or could not answer.
    pub async fn seal(&self, context: String, plaintext: crate::secret::SecretBytes) -> Result<Vec<u8>, Error> {
        match self.call(Request::Seal { context, plaintext }).await {
            Ok(Response::Sealed(b)) => Ok(b),
            Ok(_) => Err(Error::Signer("unexpected answer to seal".into())),
            Err(e) => Err(Error::Signer(e.to_string())),
        }
    }

    /// Opens a blob made by [`Signer::seal`] with the same `context`.
    /// `Err` is `Error::Signer` (a blob sealed under another key is refused this way too).
    pub async fn unseal(&self, context: String, sealed: Vec<u8>) -> Result<crate::secret::SecretBytes, Error> {
        match self.call(Request::Unseal { context, sealed }).await {
            Ok(Response::Unsealed(b)) => Ok(b),
            Ok(_) => Err(Error::Signer("unexpected answer to unseal".into())),
            Err(e) => Err(Error::Signer(e.to_string())),
        }
    }
}

impl CheckpointSigner for Signer {
    fn sign<'a>(&'a self, digest: [u8; 32]) -> super::audit::Signed<'a> {
        Box::pin(async move {
            let key = self.health().status.map(|s| s.checkpoint_public_key).ok_or("signer status unknown")?;
            match self.call(Request::SignCheckpoint { digest }).await {
                Ok(Response::CheckpointSignature(sig)) => Ok((sig, key)),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

enum SpawnError {
    Retry(String),
    Fatal(String),
}

impl From<SpawnError> for CallError {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::Retry(m) | SpawnError::Fatal(m) => CallError::Unavailable(m),
        }
    }
}

/// The targets that verify commands themselves (`verify_on_target`), as the signer is started
/// with them: each target's role principals and command policy.
pub fn sealed_targets(
    policy: &super::policy::Policy,
) -> std::collections::BTreeMap<String, crate::signer::protocol::exec::SealedTarget> {
    policy
        .targets
        .iter()
        .filter(|(_, t)| t.verify_on_target.is_some())
        .map(|(name, t)| {
            let principals =
                t.allowed_roles.iter().filter_map(|r| policy.roles.get(r)).map(|r| r.principal.clone()).collect();
            (name.clone(), crate::signer::protocol::exec::SealedTarget { principals, commands: t.commands.clone() })
        })
        .collect()
}
