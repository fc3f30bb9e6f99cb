//! The SSH client: russh, on one tokio current-thread runtime confined to this file
//! (docs/decisions/0007-ssh-client.md).
//!
//! What runs here: a dedicated thread (`ephyr-ssh`, started on first use) drives a tokio
//! current-thread runtime; every connection and channel lives there. The broker's smol executor
//! hands work over with [`on_runtime`] and awaits tokio's `JoinHandle`, which is an ordinary
//! future. Nothing else in the broker sees tokio or russh types (but `sftp`, the SFTP channel on a
//! [`Conn`]): callers get [`Conn`], [`ExecResult`] and [`SshError`].
//!
//! Sockets set `TCP_NODELAY` (without it every round trip waits for a delayed ACK, ~40 ms on
//! loopback). Host keys are checked inside the handshake by [`HostCheck`]; a mismatch ends the
//! connection before authentication, so the certificate is never offered to a wrong host.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use russh::keys::ssh_key::{self, Certificate, HashAlg, PrivateKey, PublicKey};
use russh::{ChannelMsg, Sig, client};

/// Why an SSH operation failed. Each names what went wrong, for the agent and the audit line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SshError {
    /// TCP connect failed (refused, no route, DNS).
    Unreachable(String),
    /// The host presented a key that is not the pinned one (or not signed by the host CA).
    HostKeyMismatch {
        /// What policy (or the trust-on-first-use record) expects.
        expected: String,
        /// What the host presented (SHA-256 fingerprint).
        presented: String,
    },
    /// sshd refused the certificate.
    AuthRefused(String),
    /// Connecting (TCP + handshake + authentication) took too long.
    Timeout(Duration),
    /// Anything else on the wire.
    Protocol(String),
}

impl SshError {
    /// Stable code for audit lines and error texts.
    pub fn code(&self) -> &'static str {
        match self {
            SshError::Unreachable(_) => "host_unreachable",
            SshError::HostKeyMismatch { .. } => "host_key_mismatch",
            SshError::AuthRefused(_) => "auth_refused",
            SshError::Timeout(_) => "connect_timeout",
            SshError::Protocol(_) => "ssh_error",
        }
    }
}

impl std::fmt::Display for SshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshError::Unreachable(m) => write!(f, "host unreachable: {m}"),
            SshError::HostKeyMismatch { expected, presented } => write!(
                f,
                "host key mismatch: the host presented {presented} but {expected} is expected; refusing to authenticate"
            ),
            SshError::AuthRefused(m) => write!(f, "authentication refused by the host: {m}"),
            SshError::Timeout(d) => write!(f, "connecting took longer than {}s", d.as_secs_f32()),
            SshError::Protocol(m) => write!(f, "ssh: {m}"),
        }
    }
}

/// How the host's key is checked.
#[derive(Clone, Debug)]
pub enum HostCheck {
    /// Exactly this key.
    Key(PublicKey),
    /// A key with this `SHA256:` fingerprint.
    Fingerprint(String),
    /// A host certificate signed by this CA, naming `host` as a principal, valid now.
    Ca {
        /// The host CA.
        ca: PublicKey,
        /// The name the certificate must carry.
        host: String,
    },
    /// Trust on first use: `Some` = the key recorded earlier; `None` = accept and report.
    Tofu(Option<String>),
}

impl HostCheck {
    pub fn expected(&self) -> String {
        match self {
            HostCheck::Key(k) => format!("pinned key {}", k.fingerprint(HashAlg::Sha256)),
            HostCheck::Fingerprint(f) => format!("pinned fingerprint {f}"),
            HostCheck::Ca { ca, host } => {
                format!("a certificate for {host:?} from host CA {}", ca.fingerprint(HashAlg::Sha256))
            }
            HostCheck::Tofu(Some(f)) => format!("{f} (recorded on first use)"),
            HostCheck::Tofu(None) => "any key (first use)".into(),
        }
    }

    /// As the broker hands it to `ephyr run` (`{"key": ...}`, `{"fingerprint": ...}`,
    /// `{"ca": ..., "host": ...}`); first use is never handed out.
    pub fn to_json(&self) -> serde_json::Value {
        let text = |k: &PublicKey| k.to_openssh().unwrap_or_default();
        match self {
            HostCheck::Key(k) => serde_json::json!({ "key": text(k) }),
            HostCheck::Fingerprint(f) | HostCheck::Tofu(Some(f)) => serde_json::json!({ "fingerprint": f }),
            HostCheck::Ca { ca, host } => serde_json::json!({ "ca": text(ca), "host": host }),
            HostCheck::Tofu(None) => serde_json::Value::Null,
        }
    }

    /// The other side of [`HostCheck::to_json`].
    pub fn from_json(v: &serde_json::Value) -> Result<HostCheck, String> {
        if let Some(k) = v["key"].as_str() {
            return parse_public_key(k).map(HostCheck::Key);
        }
        if let Some(f) = v["fingerprint"].as_str().filter(|f| f.starts_with("SHA256:")) {
            return Ok(HostCheck::Fingerprint(f.to_owned()));
        }
        if let (Some(ca), Some(host)) = (v["ca"].as_str(), v["host"].as_str()) {
            return Ok(HostCheck::Ca { ca: parse_public_key(ca)?, host: host.to_owned() });
        }
        Err(format!("no usable host key check in {v}"))
    }

    /// Whether `presented` passes; its fingerprint for the record.
    fn check(&self, presented: &russh::keys::PublicKeyOrCertificate) -> (bool, String) {
        use russh::keys::PublicKeyOrCertificate as P;
        match presented {
            P::PublicKey { key, .. } => {
                let fp = key.fingerprint(HashAlg::Sha256).to_string();
                let ok = match self {
                    HostCheck::Key(k) => k.key_data() == key.key_data(),
                    HostCheck::Fingerprint(f) | HostCheck::Tofu(Some(f)) => *f == fp,
                    HostCheck::Tofu(None) => true,
                    HostCheck::Ca { .. } => false,
                };
                (ok, fp)
            }
            P::Certificate(cert) => {
                let fp = format!("host certificate of {}", cert.public_key().fingerprint(HashAlg::Sha256));
                let ok = match self {
                    HostCheck::Ca { ca, host } => {
                        let now = crate::time::now().secs().max(0) as u64;
                        cert.cert_type() == ssh_key::certificate::CertType::Host
                            && cert.validate_at(now, [&ca.fingerprint(HashAlg::Sha256)]).is_ok()
                            && cert.valid_principals().iter().any(|p| p == host)
                    }
                    _ => false,
                };
                (ok, fp)
            }
        }
    }
}

pub(super) struct Handler {
    check: HostCheck,
    /// What the host presented, and whether it passed.
    seen: Arc<Mutex<Option<(bool, String)>>>,
}

impl client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let (ok, fp) = self.check.check(key);
        if let Ok(mut s) = self.seen.lock() {
            *s = Some((ok, fp));
        }
        Ok(ok)
    }
}

static RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();

/// The SSH runtime, started on first use. If its thread cannot start (the process is out of
/// threads or memory), this call fails with a clear error and the next one tries again: SSH is
/// unavailable, the rest of the broker goes on.
fn runtime() -> Result<&'static tokio::runtime::Handle, SshError> {
    if let Some(h) = RUNTIME.get() {
        return Ok(h);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("ephyr-ssh".into()).stack_size(512 * 1024).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
            Ok(rt) => {
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(std::future::pending::<()>());
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
            }
        }
    });
    let handle = match spawned {
        Err(e) => Err(format!("its thread could not start: {e}")),
        Ok(_) => rx.recv().unwrap_or_else(|_| Err("its thread ended at once".into())),
    }
    .map_err(|e| {
        log::error!("ssh runtime: {e}");
        SshError::Protocol(format!("the SSH runtime is unavailable ({e}); retry later"))
    })?;
    // Only the executor thread gets here, so this is the one handle.
    Ok(RUNTIME.get_or_init(|| handle))
}

/// Runs `f` on the SSH runtime and awaits it from any executor.
pub(super) async fn on_runtime<F>(f: F) -> Result<F::Output, SshError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime()?.spawn(f).await.map_err(|e| SshError::Protocol(format!("ssh task ended: {e}")))
}

/// What one connection needs.
pub struct ConnectSpec {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Remote user (the role's principal).
    pub user: String,
    /// The ephemeral private key (zeroized when dropped).
    pub key: PrivateKey,
    /// Its certificate from the signer.
    pub cert: Certificate,
    /// Host key check.
    pub host_check: HostCheck,
    /// TCP + handshake + authentication deadline.
    pub timeout: Duration,
}

/// A connected, authenticated SSH connection.
pub struct Conn {
    pub(super) handle: Arc<client::Handle<Handler>>,
    /// Fingerprint of the host key the host presented.
    pub host_key: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.host_key)
    }
}

/// An ephemeral private key (russh's type; zeroized when dropped).
pub type Key = PrivateKey;
/// A user certificate from the signer, as russh uses it.
pub type Cert = Certificate;

/// A new Ed25519 key, in memory only.
pub fn ephemeral_key() -> Result<PrivateKey, SshError> {
    use ring::rand::SecureRandom as _;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    ring::rand::SystemRandom::new().fill(&mut seed[..]).map_err(|_| SshError::Protocol("no randomness".into()))?;
    let pair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    Ok(PrivateKey::from(pair))
}

/// The OpenSSH text of `key`'s public half (what the signer certifies).
pub fn public_openssh(key: &PrivateKey) -> String {
    key.public_key().to_openssh().unwrap_or_default()
}

/// Parses a certificate from the signer.
pub fn parse_cert(text: &str) -> Result<Certificate, SshError> {
    Certificate::from_openssh(text).map_err(|e| SshError::Protocol(format!("certificate from the signer: {e}")))
}

/// A public key line (policy pins).
pub fn parse_public_key(text: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(text.trim()).map_err(|e| format!("not an OpenSSH public key: {e}"))
}

/// Connects, checks the host key, authenticates with the certificate.
pub async fn connect(spec: ConnectSpec) -> Result<Conn, SshError> {
    on_runtime(async move {
        let timeout = spec.timeout;
        match tokio::time::timeout(timeout, connect_inner(spec)).await {
            Ok(r) => r,
            Err(_) => Err(SshError::Timeout(timeout)),
        }
    })
    .await?
}

/// A TCP stream that re-arms `TCP_QUICKACK` after every read. sshd sets `TCP_NODELAY` only for
/// sessions with a terminal, so for `exec` it holds back its second small packet (Nagle) until
/// ours is acknowledged, and Linux delays that acknowledgement by up to 40 ms; the first command
/// on every connection paid it. Linux clears quick-ack mode on its own, hence per read.
struct QuickAck(tokio::net::TcpStream);

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if r.is_ready() {
            let _ = self.0.set_quickack(true);
        }
        r
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

async fn connect_inner(spec: ConnectSpec) -> Result<Conn, SshError> {
    let stream = tokio::net::TcpStream::connect((spec.host.as_str(), spec.port))
        .await
        .map_err(|e| SshError::Unreachable(format!("{}:{}: {e}", spec.host, spec.port)))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_quickack(true);
    let stream = QuickAck(stream);
    let mut config = client::Config { nodelay: true, ..Default::default() };
    if matches!(spec.host_check, HostCheck::Ca { .. }) {
        config.preferred.host_key_certificates = std::borrow::Cow::Borrowed(&[ssh_key::Algorithm::Ed25519]);
    }
    let expected = spec.host_check.expected();
    let seen = Arc::new(Mutex::new(None));
    let handler = Handler { check: spec.host_check, seen: seen.clone() };
    let connected = client::connect_stream(Arc::new(config), stream, handler).await;
    let presented = seen.lock().ok().and_then(|s| s.clone());
    let mut handle = match (connected, presented) {
        (Ok(h), Some((true, _))) => h,
        (_, Some((false, presented))) => return Err(SshError::HostKeyMismatch { expected, presented }),
        (Err(e), _) => return Err(SshError::Protocol(format!("handshake: {e}"))),
        (Ok(_), None) => return Err(SshError::Protocol("the host key was never checked".into())),
    };
    let host_key = presented_fp(&seen);
    let auth = handle
        .authenticate_openssh_cert(spec.user.clone(), Arc::new(spec.key), spec.cert)
        .await
        .map_err(|e| SshError::Protocol(format!("authentication: {e}")))?;
    if !auth.success() {
        return Err(SshError::AuthRefused(format!(
            "user {:?} with the broker's certificate (is the CA in TrustedUserCAKeys and the principal allowed?)",
            spec.user
        )));
    }
    Ok(Conn { handle: Arc::new(handle), host_key })
}

/// Records the host key a server presents, then ends the handshake (`ephyr target scan`).
struct Scanner {
    seen: Arc<Mutex<Option<(String, String)>>>,
}

impl client::Handler for Scanner {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let public = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            russh::keys::PublicKeyOrCertificate::Certificate(c) => russh::keys::PublicKey::from(c.public_key().clone()),
        };
        if let Ok(mut s) = self.seen.lock() {
            *s = Some((public.to_openssh().unwrap_or_default(), public.fingerprint(HashAlg::Sha256).to_string()));
        }
        Ok(false)
    }
}

/// The host key `host:port` presents: (OpenSSH public key line, `SHA256:` fingerprint). Nothing
/// is authenticated; the handshake stops at the key.
pub async fn scan(host: String, port: u16, timeout: Duration) -> Result<(String, String), SshError> {
    let work = async move {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| SshError::Unreachable(format!("{host}:{port}: {e}")))?;
        let seen = Arc::new(Mutex::new(None));
        let _ =
            client::connect_stream(Arc::new(client::Config::default()), stream, Scanner { seen: seen.clone() }).await;
        let got = seen.lock().ok().and_then(|s| s.clone());
        got.ok_or_else(|| {
            SshError::Protocol(format!("{host}:{port} did not present a host key (is it an SSH server?)"))
        })
    };
    on_runtime(async move {
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(SshError::Timeout(timeout)),
        }
    })
    .await?
}

fn presented_fp(seen: &Mutex<Option<(bool, String)>>) -> String {
    seen.lock().ok().and_then(|s| s.as_ref().map(|(_, f)| f.clone())).unwrap_or_default()
}

/// Output limits and deadline of one command.
#[derive(Clone, Copy, Debug)]
pub struct ExecLimits {
    /// Bytes of stdout kept.
    pub max_stdout: usize,
    /// Bytes of stderr kept.
    pub max_stderr: usize,
    /// Until the command is killed.
    pub timeout: Duration,
}

/// How a command ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// Standard output (at most `max_stdout` bytes).
    pub stdout: Vec<u8>,
    /// Standard error (at most `max_stderr` bytes).
    pub stderr: Vec<u8>,
    /// More stdout was produced than kept (the command was stopped).
    pub stdout_truncated: bool,
    /// More stderr was produced than kept (the command was stopped).
    pub stderr_truncated: bool,
    /// Exit status, when the command exited.
    pub exit_status: Option<u32>,
    /// The signal that ended it, when one did.
    pub exit_signal: Option<String>,
    /// The deadline passed and the command was killed.
    pub timed_out: bool,
    /// Wall time from channel open to the end.
    pub duration: Duration,
    /// When each piece of the kept output arrived (for the recording), at most [`MAX_TIMELINE`].
    pub timeline: Vec<Chunk>,
}

/// Most output arrivals a result keeps timing for (a recording shows later output at its end).
pub const MAX_TIMELINE: usize = 4096;

/// Kept output up to `end` (bytes of its stream) had arrived `at` after the channel opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    /// Since the channel opened.
    pub at: Duration,
    /// Standard error (else standard output).
    pub stderr: bool,
    /// End offset in that stream's kept bytes.
    pub end: usize,
}

impl ExecResult {
    pub(super) fn arrived(&mut self, at: Duration, stderr: bool) {
        let end = if stderr { self.stderr.len() } else { self.stdout.len() };
        match self.timeline.last() {
            Some(last) if last.stderr == stderr && last.end == end => {}
            // Full: the recording shows the rest of each stream at the end.
            _ if self.timeline.len() >= MAX_TIMELINE => {}
            _ => self.timeline.push(Chunk { at, stderr, end }),
        }
    }
}

fn keep(buf: &mut Vec<u8>, data: &[u8], cap: usize) -> bool {
    let room = cap.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
    data.len() > room
}

impl Conn {
    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Runs `command` on a new channel: no PTY, no stdin, no environment.
    ///
    /// When the output passes a cap or the deadline passes, the command is sent `SIGKILL`
    /// (sshd refuses signals for forced commands) and the channel is closed.
    pub async fn exec(&self, command: String, limits: ExecLimits) -> Result<ExecResult, SshError> {
        let handle = self.handle.clone();
        on_runtime(async move {
            let started = Instant::now();
            let mut ch = handle
                .channel_open_session()
                .await
                .map_err(|e| SshError::Protocol(format!("opening a channel: {e}")))?;
            ch.exec(true, command).await.map_err(|e| SshError::Protocol(format!("exec request: {e}")))?;
            let mut r = ExecResult::default();
            let deadline = tokio::time::Instant::from_std(started + limits.timeout);
            let mut stop = false;
            loop {
                let msg = match tokio::time::timeout_at(deadline, ch.wait()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(_) => {
                        r.timed_out = true;
                        stop = true;
                        break;
                    }
                };
                match msg {
                    ChannelMsg::Data { data } => {
                        r.stdout_truncated = keep(&mut r.stdout, &data, limits.max_stdout);
                        r.arrived(started.elapsed(), false);
                        if r.stdout_truncated {
                            stop = true;
                            break;
                        }
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        r.stderr_truncated = keep(&mut r.stderr, &data, limits.max_stderr);
                        r.arrived(started.elapsed(), true);
                        if r.stderr_truncated {
                            stop = true;
                            break;
                        }
                    }
                    ChannelMsg::ExitStatus { exit_status } => r.exit_status = Some(exit_status),
                    ChannelMsg::ExitSignal { signal_name, .. } => r.exit_signal = Some(sig_name(&signal_name)),
                    ChannelMsg::Failure => {
                        return Err(SshError::Protocol("the host refused to run the command".into()));
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            if stop {
                let _ = ch.signal(Sig::KILL).await;
                let _ = ch.close().await;
            }
            r.duration = started.elapsed();
            Ok(r)
        })
        .await?
    }

    /// Starts a shell on a new channel (no PTY) that will run commands one after the other
    /// ([`Shell::run`]); its output up to the first frame (profile scripts) is dropped.
    pub async fn open_shell(&self, timeout: Duration) -> Result<Shell, SshError> {
        let handle = self.handle.clone();
        let ch = on_runtime(async move {
            let ch = handle
                .channel_open_session()
                .await
                .map_err(|e| SshError::Protocol(format!("opening a channel: {e}")))?;
            ch.request_shell(true).await.map_err(|e| SshError::Protocol(format!("shell request: {e}")))?;
            Ok::<_, SshError>(ch)
        })
        .await??;
        let shell = Shell { ch: Kept::new(ch) };
        let limits = ExecLimits { max_stdout: 64 * 1024, max_stderr: 64 * 1024, timeout };
        let r = shell.run("true".into(), limits).await?;
        if r.exit_status != Some(0) {
            return Err(SshError::Protocol("the shell on the host did not start".into()));
        }
        Ok(shell)
    }

    /// Starts `command` on a new channel with its input and output streamed (`ephyr run`):
    /// with a terminal of `pty` = (TERM, cols, rows), or without one. Output comes back as it
    /// arrives, with back-pressure (a reader that stops reading stops the remote's output);
    /// the channel closes when [`Attached::input`] is dropped or the command ends.
    pub async fn attach(&self, command: String, pty: Option<(String, u32, u32)>) -> Result<Attached, SshError> {
        let handle = self.handle.clone();
        let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Input>(16);
        let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Output>(16);
        let ch = on_runtime(async move {
            let ch = handle
                .channel_open_session()
                .await
                .map_err(|e| SshError::Protocol(format!("opening a channel: {e}")))?;
            if let Some((term, cols, rows)) = &pty {
                ch.request_pty(true, term, *cols, *rows, 0, 0, &[])
                    .await
                    .map_err(|e| SshError::Protocol(format!("terminal request: {e}")))?;
            }
            ch.exec(true, command).await.map_err(|e| SshError::Protocol(format!("exec request: {e}")))?;
            Ok::<_, SshError>(ch)
        })
        .await??;
        let pump = async move {
            let mut ch = ch;
            let (mut status, mut signal) = (None, None);
            loop {
                tokio::select! {
                    msg = ch.wait() => match msg {
                        Some(ChannelMsg::Data { data }) => {
                            if out_tx.send(Output::Stdout(data.to_vec())).await.is_err() { break }
                        }
                        Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                            if out_tx.send(Output::Stderr(data.to_vec())).await.is_err() { break }
                        }
                        Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                        Some(ChannelMsg::ExitSignal { signal_name, .. }) => signal = Some(sig_name(&signal_name)),
                        Some(ChannelMsg::Failure) => {
                            let _ = out_tx.send(Output::Failed("the host refused to run the command".into())).await;
                            return;
                        }
                        Some(ChannelMsg::Close) | None => break,
                        Some(_) => {}
                    },
                    i = in_rx.recv() => match i {
                        Some(Input::Data(d)) => {
                            if ch.data(&d[..]).await.is_err() { break }
                        }
                        Some(Input::Eof) => {
                            let _ = ch.eof().await;
                        }
                        Some(Input::Resize(cols, rows)) => {
                            let _ = ch.window_change(cols, rows, 0, 0).await;
                        }
                        Some(Input::HangUp) | None => {
                            // The caller is gone: end the command.
                            let _ = ch.signal(Sig::HUP).await;
                            let _ = ch.close().await;
                            break;
                        }
                    },
                }
            }
            let _ = out_tx.send(Output::Exit { status, signal }).await;
        };
        runtime()?.spawn(pump);
        Ok(Attached { input: in_tx, output: out_rx })
    }

    /// Ends the connection.
    pub async fn close(&self) {
        let handle = self.handle.clone();
        let _ = on_runtime(async move {
            let _ = handle.disconnect(russh::Disconnect::ByApplication, "session closed", "en").await;
        })
        .await;
    }
}

/// What goes to an attached command ([`Conn::attach`]).
#[derive(Debug)]
pub enum Input {
    /// Bytes for its stdin (keystrokes, with a terminal).
    Data(Vec<u8>),
    /// No more input.
    Eof,
    /// The terminal's new size (cols, rows).
    Resize(u32, u32),
    /// Hang up: `SIGHUP` to the command and the channel closed (the caller is leaving).
    HangUp,
}

/// What comes from an attached command.
#[derive(Debug)]
pub enum Output {
    /// Standard output (everything, with a terminal).
    Stdout(Vec<u8>),
    /// Standard error.
    Stderr(Vec<u8>),
    /// The channel ended: the exit status or signal, when the host sent one.
    Exit {
        /// Exit status.
        status: Option<u32>,
        /// Signal name.
        signal: Option<String>,
    },
    /// The host refused the command.
    Failed(String),
}

/// An attached command: send to `input`, read `output` until [`Output::Exit`].
pub struct Attached {
    /// Its input (dropping it hangs the command up).
    pub input: tokio::sync::mpsc::Sender<Input>,
    /// Its output.
    pub output: tokio::sync::mpsc::Receiver<Output>,
}

/// A shell kept open on a session: commands run in it one after the other, so the working
/// directory and the environment carry over. Each command is framed: sent as one single-quoted
/// word to `command eval` (`command` keeps a syntax error from ending a POSIX shell such as dash: it fails
/// that command only; its stdin is `/dev/null`, so it cannot eat the next frame), followed by a marker line with a fresh nonce and the exit status on stdout and a
/// marker on stderr; the output is read up to the markers.
pub struct Shell {
    ch: Kept,
}

/// A channel kept open across calls (a session's shell or terminal): one call at a time holds
/// it; `None` once it has ended.
#[derive(Clone)]
pub(super) struct Kept(Arc<tokio::sync::Mutex<Option<russh::Channel<client::Msg>>>>);

impl Kept {
    pub(super) fn new(ch: russh::Channel<client::Msg>) -> Kept {
        Kept(Arc::new(tokio::sync::Mutex::new(Some(ch))))
    }

    /// The channel, for a call on the SSH runtime.
    pub(super) fn slot(&self) -> &tokio::sync::Mutex<Option<russh::Channel<client::Msg>>> {
        &self.0
    }

    /// Whether it has ended (a call in progress counts as open).
    pub(super) fn is_closed(&self) -> bool {
        self.0.try_lock().map(|c| c.is_none()).unwrap_or(false)
    }

    /// Ends it: EOF, then close.
    pub(super) async fn close(&self) {
        let ch = self.clone();
        let _ = on_runtime(async move {
            if let Some(c) = ch.0.lock().await.take() {
                let _ = c.eof().await;
                let _ = c.close().await;
            }
        })
        .await;
    }
}

impl std::fmt::Debug for Shell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shell")
    }
}

/// The text that runs `command` in the kept shell, and the two markers that end its output.
/// The command reaches `eval` as one single-quoted word (each `'` written as `'\''`), so the
/// shell takes it byte for byte, newlines included, and no quote in it can end the word early.
/// (Before, it was base64 decoded in a command substitution: a fork and an exec of `base64` on
/// the target, ~1.5 ms per command.) NUL bytes never get here (`check_command_text`).
fn frame(command: &str, nonce: &str) -> (String, String, String) {
    let quoted = command.replace('\'', "'\\''");
    let text = format!(
        "command eval '{quoted}' </dev/null; printf '\\n\\036ephyr:{nonce}:%s\\n' \"$?\"; printf '\\036ephyr:{nonce}\\n' >&2\n"
    );
    (text, format!("\n\u{1e}ephyr:{nonce}:"), format!("\u{1e}ephyr:{nonce}\n"))
}

/// Where the stdout marker `m` ends a frame: `(output length, exit status)` once the whole marker
/// line has arrived.
fn stdout_end(buf: &[u8], m: &str) -> Option<(usize, u32)> {
    let at = buf.windows(m.len()).position(|w| w == m.as_bytes())?;
    let rest = &buf[at + m.len()..];
    let nl = rest.iter().position(|b| *b == b'\n')?;
    let code = std::str::from_utf8(&rest[..nl]).ok()?.parse().ok()?;
    Some((at, code))
}

impl Shell {
    /// Whether the shell has ended (it exited, timed out or passed a cap).
    pub fn is_closed(&self) -> bool {
        self.ch.is_closed()
    }

    /// Runs one command in the shell. A command is refused while another runs. When the output
    /// passes a cap or the deadline passes, the shell is killed and closed: the session's state
    /// is gone, and so is the shell.
    pub async fn run(&self, command: String, limits: ExecLimits) -> Result<ExecResult, SshError> {
        let ch = self.ch.clone();
        let mut nonce = [0u8; 12];
        crate::secret::random_bytes(&mut nonce).map_err(|e| SshError::Protocol(e.to_string()))?;
        let nonce = data_encoding::HEXLOWER.encode(&nonce);
        on_runtime(async move {
            let Ok(mut guard) = ch.slot().try_lock() else {
                return Err(SshError::Protocol("the session's shell is running another command".into()));
            };
            let Some(c) = guard.as_mut() else {
                return Err(SshError::Protocol("the session's shell has ended; open a new session".into()));
            };
            let started = Instant::now();
            let (text, out_marker, err_marker) = frame(&command, &nonce);
            if let Err(e) = c.data(text.as_bytes()).await {
                *guard = None;
                return Err(SshError::Protocol(format!("the session's shell has ended ({e}); open a new session")));
            }
            let mut r = ExecResult::default();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let (mut out_done, mut err_done, mut ended) = (None, false, false);
            let deadline = tokio::time::Instant::from_std(started + limits.timeout);
            // Room for the markers on top of the caps.
            let (cap_out, cap_err) = (limits.max_stdout + 128, limits.max_stderr + 128);
            while out_done.is_none() || !err_done {
                let msg = match tokio::time::timeout_at(deadline, c.wait()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(_) => {
                        r.timed_out = true;
                        break;
                    }
                };
                match msg {
                    ChannelMsg::Data { data } if out_done.is_none() => {
                        out.extend_from_slice(&data);
                        out_done = stdout_end(&out, &out_marker);
                        r.stdout_truncated = out_done.is_none() && out.len() > cap_out;
                        if r.stdout_truncated {
                            break;
                        }
                        r.stdout = out[..out_done.map_or(out.len(), |(n, _)| n)].to_vec();
                        r.arrived(started.elapsed(), false);
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } if !err_done => {
                        err.extend_from_slice(&data);
                        err_done = err.ends_with(err_marker.as_bytes());
                        r.stderr_truncated = !err_done && err.len() > cap_err;
                        if r.stderr_truncated {
                            break;
                        }
                        let keep = if err_done { err.len() - err_marker.len() } else { err.len() };
                        r.stderr = err[..keep].to_vec();
                        r.arrived(started.elapsed(), true);
                    }
                    ChannelMsg::ExitStatus { exit_status } => r.exit_status = Some(exit_status),
                    ChannelMsg::ExitSignal { signal_name, .. } => r.exit_signal = Some(sig_name(&signal_name)),
                    ChannelMsg::Eof | ChannelMsg::Close => {
                        ended = true;
                        break;
                    }
                    _ => {}
                }
            }
            r.stdout.truncate(limits.max_stdout);
            r.stderr.truncate(limits.max_stderr);
            match out_done {
                Some((_, code)) if err_done => r.exit_status = Some(code),
                _ => {
                    // Timed out, over a cap, or the shell exited: it is gone for good.
                    if !ended {
                        let _ = c.signal(Sig::KILL).await;
                    }
                    let _ = c.close().await;
                    *guard = None;
                }
            }
            r.duration = started.elapsed();
            Ok(r)
        })
        .await?
    }

    /// Ends the shell.
    pub async fn close(&self) {
        self.ch.close().await;
    }
}

fn sig_name(s: &Sig) -> String {
    match s {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(c) => c.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame run by a real `sh`: the output ends at the markers with the exit status, a
    /// syntax error fails only its own command, and output that looks like a marker but has
    /// another nonce does not end the frame.
    #[test]
    fn a_frame_run_by_sh_ends_at_its_markers() {
        use std::io::Write as _;
        let nonce = "00112233445566778899aabb";
        let script = [
            frame("cd /tmp; X=1; printf 'a\\036ephyr:ffffffffffffffffffffffff:0\\nb'", nonce).0,
            frame("echo (", nonce).0,
            frame("printf '%s|' \"it's\" 'a\nb' '\\'; echo", nonce).0,
            frame("'; echo injected; '", nonce).0,
            frame("'", nonce).0,
            frame("echo $X $(pwd); exit 4", nonce).0,
        ]
        .concat();
        let mut child = std::process::Command::new("sh")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let (_, m, em) = frame("", nonce);
        let mut rest: &[u8] = &out.stdout;
        let mut got = Vec::new();
        while let Some((n, code)) = stdout_end(rest, &m) {
            got.push((String::from_utf8_lossy(&rest[..n]).into_owned(), code));
            let line_end = rest[n + m.len()..].iter().position(|b| *b == b'\n').unwrap();
            rest = &rest[n + m.len() + line_end + 1..];
        }
        assert_eq!(got[0], ("a\u{1e}ephyr:ffffffffffffffffffffffff:0\nb".to_owned(), 0));
        assert_ne!(got[1].1, 0, "a syntax error fails its command");
        assert_eq!(got[2], ("it's|a\nb|\\|\n".to_owned(), 0), "quotes, newlines and backslashes arrive as written");
        // A command that tries to close the frame's quote runs as the text it is: `'; echo
        // injected; '` is one quoted word, a command that does not exist; nothing is injected.
        assert_eq!(got[3], (String::new(), 127), "{got:?}");
        assert_ne!(got[4].1, 0, "an unbalanced quote is a syntax error of that command only");
        assert_eq!(got.len(), 5, "exit ends the shell before the last marker: {got:?}");
        assert_eq!(rest, b"1 /tmp\n", "the variable and the directory carried over");
        assert_eq!(out.status.code(), Some(4));
        assert_eq!(String::from_utf8_lossy(&out.stderr).matches(em.as_str()).count(), 5);
    }

    #[test]
    fn output_is_kept_up_to_the_cap_and_overflow_is_reported() {
        let mut b = Vec::new();
        assert!(!keep(&mut b, b"hello", 8));
        assert!(keep(&mut b, b"world", 8));
        assert_eq!(b, b"hellowor");
        assert!(keep(&mut b, b"!", 8));
        assert_eq!(b.len(), 8);
    }

    #[test]
    fn ephemeral_keys_differ_and_print_as_openssh_lines() {
        let a = ephemeral_key().unwrap();
        let b = ephemeral_key().unwrap();
        let (pa, pb) = (public_openssh(&a), public_openssh(&b));
        assert!(pa.starts_with("ssh-ed25519 AAAA"), "{pa}");
        assert_ne!(pa, pb);
    }

    #[test]
    fn host_checks_compare_keys_fingerprints_and_first_use_records() {
        let k = ephemeral_key().unwrap().public_key().clone();
        let other = ephemeral_key().unwrap().public_key().clone();
        let presented = russh::keys::PublicKeyOrCertificate::from(k.clone());
        let fp = k.fingerprint(HashAlg::Sha256).to_string();
        assert!(HostCheck::Key(k.clone()).check(&presented).0);
        assert!(!HostCheck::Key(other.clone()).check(&presented).0);
        assert!(HostCheck::Fingerprint(fp.clone()).check(&presented).0);
        assert!(!HostCheck::Fingerprint(other.fingerprint(HashAlg::Sha256).to_string()).check(&presented).0);
        assert!(HostCheck::Tofu(None).check(&presented).0);
        assert!(HostCheck::Tofu(Some(fp.clone())).check(&presented).0);
        assert!(!HostCheck::Tofu(Some("SHA256:x".into())).check(&presented).0);
        // A plain key never satisfies a host-CA target.
        assert!(!HostCheck::Ca { ca: other, host: "h".into() }.check(&presented).0);
    }
}
