//! SSH access: per-request ephemeral certificates, persistent sessions, the file tools
//! (`files`), the issued-certificate registry and the revocation list (KRL).
//!
//! What runs here: orchestration on the executor thread — `authorize`, limits, a fresh Ed25519
//! key in memory, a certificate from the signer, the audit record, then the connection and the
//! command on the SSH runtime (`client` and `sftp`, the only files that see russh or tokio). The
//! agent never sees a key or a certificate.
//!
//! A session belongs to the agent and task that opened it. Every command on it is authorized
//! again against the session's **own** target and role under the caller's current token, so a
//! revoked task, or a token narrowed away from that target, cannot use it (DESIGN.md invariant
//! 6). A session ends after `limits.session_idle` without use, `limits.session_max` after it
//! opened, when its task is revoked or expires, or when its certificate expires unused; a command
//! within [`RENEW_MARGIN`] of the certificate's expiry first renews it (new key, new certificate,
//! new connection).

pub(crate) mod client;
pub mod files;
pub mod hosts;
pub(crate) mod krl;
pub(crate) mod pty;
pub mod recording;
pub mod registry;
pub(crate) mod setup;
pub mod sftp;
pub mod terminal;
pub(crate) mod verify;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Error;
use super::audit::{AuditSink, Event, Kind};
use super::auth::Caller;
use super::policy::{Action, ActionKind, Arguments, Decision, Policy, Target};
use super::ports::{CertSigner, Ports};
use super::signer_client::CallError;
use crate::signer::protocol::{CertRequest, ErrorCode};
use client::{Conn, ExecLimits, ExecResult, HostCheck, SshError};

/// A command on a session whose certificate expires sooner than this renews it first.
pub const RENEW_MARGIN: u64 = 30;
/// Certificates start this far in the past (clock skew between broker and host).
pub const BACKDATE: u64 = 60;
/// TCP + handshake + authentication.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Command deadline when the call names none, and the longest allowed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest command deadline.
pub const MAX_TIMEOUT_SECS: i64 = 3600;
/// Longest command text.
pub const MAX_COMMAND: usize = 64 * 1024;
/// Characters of a command kept in audit lines.
const AUDIT_COMMAND_CHARS: usize = 1024;

/// An SSH error as the broker reports it: an upstream failure with the SSH error's code.
fn ssh_err(e: SshError) -> Error {
    Error::Upstream { code: e.code(), message: e.to_string() }
}

/// Who asks for an SSH operation, under which policy snapshot, with which call arguments.
#[derive(Clone, Copy)]
pub struct Asker<'a> {
    /// What SSH uses of the rest of the broker.
    pub ports: Ports<'a>,
    /// The caller.
    pub caller: &'a Caller,
    /// The policy snapshot of the request.
    pub policy: &'a Policy,
    /// The tool call's arguments (argument constraints are checked against them).
    pub arguments: Arguments<'a>,
}

/// An open session.
pub struct Session {
    /// Its id (16 random bytes, hex).
    pub id: String,
    /// The agent that opened it.
    pub agent: String,
    /// The task that opened it (`None`: an API-key caller).
    pub task: Option<String>,
    /// Target name.
    pub target: String,
    /// Role name.
    pub role: String,
    /// The remote user.
    pub principal: String,
    /// Unix seconds.
    pub created: u64,
    conn: RefCell<Rc<Conn>>,
    /// The certificate in use (its serial stays in `serial`); taken at close, and dropping the
    /// session releases it too.
    held: RefCell<Option<registry::Held>>,
    serial: Cell<u64>,
    cert_until: Cell<u64>,
    last_used: Cell<Instant>,
    commands: Cell<u64>,
    /// The kept shell of a `shell` session (`None`: each command runs in a fresh shell).
    shell: Option<Rc<client::Shell>>,
    /// The terminal of a `pty` session, and its size (columns, rows).
    pty: Option<Rc<pty::Pty>>,
    size: Cell<(u32, u32)>,
}

/// How a session runs what it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Each command in a fresh shell on a new channel.
    Exec,
    /// Every command in one kept shell (no terminal): `cd` and `export` carry over.
    Shell,
    /// A terminal (`cols`×`rows`) running the login shell; keystrokes go in with
    /// `session_input` (`terminal`).
    Pty {
        /// Columns.
        cols: u32,
        /// Rows.
        rows: u32,
    },
}

impl Mode {
    /// Its name in results and audit lines.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Exec => "exec",
            Mode::Shell => "shell",
            Mode::Pty { .. } => "pty",
        }
    }
}

impl Session {
    /// What a recording of `command` on this session is of.
    fn about<'a>(&'a self, agent: &'a str, command: &'a str, started: u64) -> recording::About<'a> {
        recording::About {
            started,
            agent,
            target: &self.target,
            role: &self.role,
            command,
            session: Some(&self.id),
            terminal: None,
        }
    }

    /// Serial of the certificate in use.
    pub fn serial(&self) -> u64 {
        self.serial.get()
    }

    /// Commands (or keystroke sends) run on it so far.
    pub fn commands(&self) -> u64 {
        self.commands.get()
    }

    /// Whether it has been open longer than `limits.session_max`.
    fn past_max(&self, policy: &Policy, now: u64) -> bool {
        policy.limits.session_max.is_some_and(|m| now >= self.created + m.as_secs())
    }

    /// `Err` (and the session closed) when it has been open longer than `limits.session_max`.
    async fn within_max(&self, ssh: &Ssh, ports: Ports<'_>, policy: &Policy, me: &Rc<Session>) -> Result<(), Error> {
        if !self.past_max(policy, now_secs()) {
            return Ok(());
        }
        ssh.close(ports, me, "limits.session_max reached").await;
        Err(Error::Refused(format!(
            "session {:?} reached limits.session_max and was closed; open a new session",
            self.id
        )))
    }

    fn mode(&self) -> Mode {
        match (&self.shell, &self.pty) {
            (Some(_), _) => Mode::Shell,
            (_, Some(_)) => {
                let (cols, rows) = self.size.get();
                Mode::Pty { cols, rows }
            }
            _ => Mode::Exec,
        }
    }

    /// As `list_sessions` shows it.
    pub fn view(&self) -> Value {
        json!({
            "session_id": self.id,
            "target": self.target,
            "role": self.role,
            "principal": self.principal,
            "task_id": self.task,
            "created_at": crate::time::format_rfc3339(self.created as i64, None),
            "idle_secs": self.last_used.get().elapsed().as_secs(),
            "commands": self.commands.get(),
            "cert_serial": format!("{:016x}", self.serial()),
            "cert_expires_at": crate::time::format_rfc3339(self.cert_until.get() as i64, None),
            "mode": self.mode().name(),
            "terminal": match self.mode() {
                Mode::Pty { cols, rows } => json!({ "cols": cols, "rows": rows }),
                _ => Value::Null,
            },
        })
    }
}

/// What a command produced, with the certificate and connection it used.
#[derive(Debug)]
pub struct Ran {
    /// The command's result.
    pub result: ExecResult,
    /// Serial of the certificate used.
    pub serial: u64,
    /// A first-use host key warning, if this connection recorded one.
    pub host_key_warning: Option<String>,
    /// Connect + authentication time (zero on a kept session).
    pub connect: Duration,
    /// The recording's id (`None` when it could not be written: the audit log says why).
    pub recording: Option<String>,
    /// Something the caller should know (a shell session that ended with this command).
    pub notice: Option<String>,
}

/// The SSH service.
#[derive(Debug, Default)]
pub struct Ssh {
    /// Issued certificates.
    pub registry: registry::Registry,
    /// First-use host keys.
    pub known: hosts::KnownHosts,
    sessions: RefCell<BTreeMap<String, Rc<Session>>>,
    krl_version: Cell<u64>,
    /// Where command recordings go (`None` only in unit tests).
    recordings: Option<recording::Store>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({} {}@{}/{})", self.id, self.agent, self.target, self.role)
    }
}

/// Validates a command argument.
pub fn check_command_text(command: &str) -> Result<(), String> {
    if command.trim().is_empty() {
        return Err("argument \"command\" is empty".into());
    }
    if command.len() > MAX_COMMAND {
        return Err(format!("argument \"command\" is {} bytes; the limit is {MAX_COMMAND}", command.len()));
    }
    if command.contains('\0') {
        return Err("argument \"command\" contains a NUL byte".into());
    }
    Ok(())
}

fn now_secs() -> u64 {
    crate::time::now().secs().max(0) as u64
}

/// A command as audit lines keep it (at most 1024 characters).
pub fn audit_command(c: &str) -> String {
    if c.chars().count() <= AUDIT_COMMAND_CHARS {
        c.to_owned()
    } else {
        let mut s: String = c.chars().take(AUDIT_COMMAND_CHARS).collect();
        s.push('…');
        s
    }
}

fn signer_failure(e: &CallError) -> Error {
    match e {
        CallError::Refused(r) if r.code == ErrorCode::RateLimited => Error::Signer(format!(
            "the signer's certificate rate limit is reached ({}); retry shortly or use a session",
            r.message
        )),
        CallError::Refused(r) => Error::Signer(format!("the signer refused the certificate: {}", r.message)),
        other => Error::Signer(format!("no certificate: {other}")),
    }
}

fn random_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    data_encoding::HEXLOWER.encode(&b)
}

/// Whether a caller may see, use or close a session: same agent, the same task (or a task below
/// it), and the session's own target and role within the caller's policy and token (a child
/// narrowed to another target does not see its parent's session).
fn owns(policy: &Policy, caller: &Caller, s: &Session) -> bool {
    if caller.agent != s.agent {
        return false;
    }
    let same_tree = match (caller.token(), &s.task) {
        (None, None) => true,
        (Some(t), Some(task)) => t.lineage.iter().any(|x| x == task),
        _ => false,
    };
    same_tree
        && super::policy::authorize(
            policy,
            &caller.principal(),
            &Action::reach(None, ActionKind::Ssh { target: &s.target, role: &s.role }),
        )
        .is_allow()
}

/// The approval gate for a command (or a session): an `approvals:` rule may hold it until an
/// operator approved exactly this command on this target as this role, for this agent and task.
async fn approval(
    ports: Ports<'_>,
    policy: &Policy,
    caller: &Caller,
    target: &str,
    role: &str,
    command: Option<&str>,
) -> Result<(), Error> {
    let gated = super::policy::approval::Gated::Ssh { target, role, command };
    super::approvals::clear(ports, policy, caller, gated, || {
        let mut shown = json!({ "kind": "ssh", "target": target, "role": role });
        if let Some(c) = command {
            shown["command"] = serde_json::Value::from(audit_command(c));
        }
        super::approvals::Subject { shown, exact: command.unwrap_or_default().as_bytes().to_vec() }
    })
    .await
}

fn with_task(ev: Event, caller: &Caller) -> Event {
    match caller.token() {
        Some(t) => ev.task(t.task.clone(), t.lineage.clone()).initiated_by(t.initiated_by.clone()),
        None => ev,
    }
}

impl Ssh {
    /// The service with a loaded registry and first-use host keys.
    pub fn new(registry: registry::Registry, known: hosts::KnownHosts, recordings: recording::Store) -> Ssh {
        Ssh { registry, known, sessions: RefCell::default(), krl_version: Cell::new(0), recordings: Some(recordings) }
    }

    /// Records a command's result (asciicast, secrets the policy names masked) and audits the
    /// recording's SHA-256. A failure is logged and audited; the command's result still returns.
    async fn record(
        &self,
        ports: Ports<'_>,
        caller: &Caller,
        policy: &Policy,
        about: recording::About<'_>,
        r: &ExecResult,
    ) -> Option<String> {
        let store = self.recordings.clone()?;
        let mut secrets = Vec::new();
        for (_, sr) in policy.secret_refs() {
            if let Ok(v) = ports.secrets.resolve(sr).await {
                secrets.push(v);
            }
        }
        let bytes = recording::cast(&about, r, &secrets);
        drop(secrets);
        let id = crate::ids::new_ulid(crate::time::now()).to_string();
        let (max, files) = (policy.limits.recordings_max_size, policy.limits.recordings_max_files as usize);
        let name = id.clone();
        let saved = ports
            .pool
            .run(move || store.save(&name, &bytes, max, files))
            .await
            .unwrap_or_else(|| Err("the blocking pool is gone".into()));
        let ev = with_task(Event::new(Kind::Ssh, "ssh_recording"), caller).agent(caller.agent.clone()).action(json!({
            "target": about.target, "role": about.role, "command": audit_command(about.command), "session": about.session,
        }));
        match saved {
            Ok(s) => {
                ports.metrics.inc("ephyr_ssh_recordings_total", &[("outcome", "ok")]);
                let ev = ev.allow().outcome(json!({
                    "recording": id, "sha256": s.sha256, "bytes": s.bytes, "rotated": s.rotated,
                    "exit_code": r.exit_status,
                }));
                ports.audit_now(ev).await;
                Some(id)
            }
            Err(e) => {
                log::error!("recording of a command on {:?} not written: {e}", about.target);
                ports.metrics.inc("ephyr_ssh_recordings_total", &[("outcome", "error")]);
                ports.audit_now(ev.error("recording_failed", e)).await;
                None
            }
        }
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// `authorize` for a connection (`command` = `None`) or a command on `target` as `role`;
    /// the role's principal on success.
    fn authorize(
        policy: &Policy,
        caller: &Caller,
        tool: &str,
        arguments: Arguments<'_>,
        target: &str,
        role: &str,
        command: Option<&str>,
    ) -> Result<String, Error> {
        let principal = caller.principal();
        let kind = match command {
            Some(command) => ActionKind::SshCommand { target, role, command },
            None => ActionKind::Ssh { target, role },
        };
        match super::policy::authorize(policy, &principal, &Action { tool: Some(tool), kind, arguments }) {
            Decision::Allow(g) => g
                .principal
                .map(str::to_owned)
                .ok_or_else(|| Error::Refused(format!("role {role:?} names no principal"))),
            Decision::Deny(d) => Err(Error::Denied(d)),
        }
    }

    fn host_check(&self, name: &str, t: &Target, strict: bool) -> Result<HostCheck, Error> {
        let pin = &t.host_key;
        if let Some(k) = &pin.key {
            return client::parse_public_key(k)
                .map(HostCheck::Key)
                .map_err(|e| Error::Refused(format!("target {name:?}: host_key: {e}")));
        }
        if let Some(f) = &pin.fingerprint {
            return Ok(HostCheck::Fingerprint(f.clone()));
        }
        if let Some(ca) = &pin.ca {
            return client::parse_public_key(ca)
                .map(|ca| HostCheck::Ca { ca, host: t.host.clone() })
                .map_err(|e| Error::Refused(format!("target {name:?}: host_ca: {e}")));
        }
        if strict {
            return Err(Error::Refused(format!(
                "target {name:?} pins no host key and limits.host_key_strict is set; add host_key, host_key_fingerprint or host_ca"
            )));
        }
        Ok(HostCheck::Tofu(self.known.get(name, &format!("{}:{}", t.host, t.port))))
    }

    /// Certificate + connection for `target`/`role` (already authorized as `principal`).
    #[allow(clippy::too_many_arguments)]
    async fn connect(
        &self,
        ports: Ports<'_>,
        caller: &Caller,
        policy: &Policy,
        target_name: &str,
        role: &str,
        principal: &str,
        session: Option<&str>,
        ttl: Duration,
    ) -> Result<(Conn, registry::Issued, registry::Held, Option<String>), Error> {
        let t = policy.targets.get(target_name).ok_or_else(|| Error::Refused(format!("no target {target_name:?}")))?;
        let host_check = self.host_check(target_name, t, policy.limits.host_key_strict)?;
        self.within_limits(policy, caller)?;
        let (now, until) = validity(ports.signer, caller, ttl, now_secs())?;
        let (key, cert, issued) = issue(
            ports.signer,
            ports.metrics,
            caller,
            Wanted { target_name, target: t, role, principal, session },
            now,
            until,
        )
        .await?;
        // The issuance is recorded (audit + registry) before the certificate is used; both
        // syncs run while the connection is set up, and are awaited before anything is returned.
        let ev = issued_event(caller, &issued, json!({ "session": session }));
        let ticket = ports.audit.record(ev).map_err(|e| Error::audit(e.to_string()))?;
        // Held from here: released when `held` drops, on every path out of here and of callers.
        let (held, registered) = self.registry.hold(issued.clone()).map_err(Error::audit)?;
        let spec = client::ConnectSpec {
            host: t.host.clone(),
            port: t.port,
            user: principal.to_owned(),
            key,
            cert,
            host_check: host_check.clone(),
            timeout: CONNECT_TIMEOUT,
        };
        let (connected, durable) = futures_lite::future::zip(client::connect(spec), async {
            ticket.durable().await.map_err(|e| e.to_string())?;
            if let Some(d) = registered {
                d.wait().await.map_err(|e| e.message())?;
            }
            Ok::<(), String>(())
        })
        .await;
        if let Err(e) = durable {
            if let Ok(c) = &connected {
                c.close().await;
            }
            return Err(Error::audit(e));
        }
        let conn = match connected {
            Ok(c) => c,
            Err(e) => {
                ports.metrics.inc("ephyr_ssh_connects_total", &[("outcome", e.code())]);
                if let SshError::HostKeyMismatch { expected, presented } = &e {
                    log::error!(
                        "target {target_name:?}: host key mismatch: presented {presented}, expected {expected}"
                    );
                    ports
                        .audit_now(
                            with_task(Event::new(Kind::Ssh, "host_key_mismatch"), caller)
                                .agent(caller.agent.clone())
                                .action(json!({ "target": target_name, "host": t.host, "port": t.port }))
                                .error("host_key_mismatch", e.to_string()),
                        )
                        .await;
                }
                return Err(ssh_err(e));
            }
        };
        ports.metrics.inc("ephyr_ssh_connects_total", &[("outcome", "ok")]);
        let warning = match host_check {
            HostCheck::Tofu(None) => Some(self.trust_on_first_use(ports, caller, target_name, t, &conn).await),
            _ => None,
        };
        Ok((conn, issued, held, warning))
    }

    /// A certificate for a key the caller holds (`ephyr run`: the CLI connects itself), as
    /// `role` on `target`, valid for `ttl` (within the task). Gated like a terminal session (the
    /// run's agent gets a terminal), authorized under the caller's token, recorded (audit +
    /// registry, held until `Held` drops) before it is returned. Also returns the principal
    /// and how the host's key must be checked (never "any key": a target without a pinned or
    /// recorded key is refused).
    #[allow(clippy::too_many_arguments)]
    pub async fn certify_run(
        &self,
        ports: Ports<'_>,
        caller: &Caller,
        policy: &Policy,
        target_name: &str,
        role: &str,
        public_key: &str,
        ttl: Duration,
    ) -> Result<RunCert, Error> {
        let key = client::parse_public_key(public_key).map_err(|e| Error::Invalid(format!("public_key: {e}")))?;
        terminal::allowed(policy, &caller.agent, target_name, role, (80, 24))?;
        let principal = Self::authorize(policy, caller, "run", Arguments::None, target_name, role, None)?;
        let t = policy.targets.get(target_name).ok_or_else(|| Error::Refused(format!("no target {target_name:?}")))?;
        let host_check = match self.host_check(target_name, t, policy.limits.host_key_strict)? {
            HostCheck::Tofu(None) => {
                return Err(Error::Refused(format!(
                    "target {target_name:?} pins no host key and none was recorded yet; pin one (`ephyr target scan {target_name}`) first"
                )));
            }
            HostCheck::Tofu(Some(f)) => HostCheck::Fingerprint(f),
            other => other,
        };
        self.within_limits(policy, caller)?;
        let (now, until) = validity(ports.signer, caller, ttl, now_secs())?;
        let wanted = Wanted { target_name, target: t, role, principal: &principal, session: None };
        let (cert, issued) = issue_for(
            ports.signer,
            ports.metrics,
            caller,
            wanted,
            now,
            until,
            key.to_openssh().map_err(|e| Error::Invalid(format!("public_key: {e}")))?,
        )
        .await?;
        let ev = issued_event(caller, &issued, json!({ "run": true }));
        let ticket = ports.audit.record(ev).map_err(|e| Error::audit(e.to_string()))?;
        let (held, registered) = self.registry.hold(issued.clone()).map_err(Error::audit)?;
        ticket.durable().await.map_err(|e| Error::audit(e.to_string()))?;
        if let Some(d) = registered {
            d.wait().await.map_err(|e| Error::audit(e.message()))?;
        }
        let certificate = cert.to_openssh().map_err(|e| Error::Unavailable(format!("certificate: {e}")))?;
        Ok(RunCert {
            certificate,
            principal,
            host: t.host.clone(),
            port: t.port,
            host_check,
            serial: issued.serial,
            held,
        })
    }

    /// The concurrency limits: the agent's own and the broker's.
    fn within_limits(&self, policy: &Policy, caller: &Caller) -> Result<(), Error> {
        let agent = policy.agents.get(&caller.agent);
        let per_agent = agent.map_or(policy.limits.max_certs_per_agent, |a| a.max_concurrent_certs);
        let (mine, total) = self.registry.in_use(&caller.agent);
        if mine >= per_agent {
            return Err(Error::Refused(format!(
                "agent {:?} holds {mine} certificates (its limit is {per_agent}); close a session or wait for a command to finish",
                caller.agent
            )));
        }
        if total >= policy.limits.max_certs_total {
            return Err(Error::Refused(format!(
                "the broker holds {total} certificates (limits.max_certs_total); retry later"
            )));
        }
        Ok(())
    }

    /// Records a host key seen on first use (no pin), and says so: the warning for the caller.
    async fn trust_on_first_use(
        &self,
        ports: Ports<'_>,
        caller: &Caller,
        target_name: &str,
        t: &Target,
        conn: &Conn,
    ) -> String {
        let addr = format!("{}:{}", t.host, t.port);
        if let Some((path, text)) = self.known.record(target_name, &addr, &conn.host_key) {
            let _ = ports.pool.run(move || hosts::write(&path, &text)).await;
        }
        let w = format!(
            "target {target_name:?} pins no host key: trusted {} on first use and recorded it; pin it in the policy (host_key_fingerprint)",
            conn.host_key
        );
        log::warn!("{w}");
        ports
            .audit_now(
                Event::new(Kind::Ssh, "host_key_first_use")
                    .agent(caller.agent.clone())
                    .action(json!({ "target": target_name, "host": t.host, "port": t.port }))
                    .outcome(json!({ "fingerprint": conn.host_key })),
            )
            .await;
        w
    }

    /// Records that a command is about to run (fails closed when the audit trail is down); the
    /// returned ticket is awaited before the result is returned.
    fn record_exec(
        audit: &dyn AuditSink,
        caller: &Caller,
        target: &str,
        role: &str,
        command: &str,
        session: Option<&str>,
    ) -> Result<super::audit::Ticket, Error> {
        let ev = with_task(Event::new(Kind::Ssh, "ssh_exec"), caller)
            .agent(caller.agent.clone())
            .action(json!({ "target": target, "role": role, "command": audit_command(command), "session": session }))
            .allow();
        audit.record(ev).map_err(|e| Error::audit(e.to_string()))
    }

    /// One command with a new certificate and connection.
    pub async fn exec_once(
        &self,
        asker: Asker<'_>,
        target: &str,
        role: &str,
        command: &str,
        timeout: Duration,
    ) -> Result<Ran, Error> {
        let Asker { ports, caller, policy, arguments } = asker;
        check_command_text(command).map_err(Error::Refused)?;
        let principal = Self::authorize(policy, caller, "exec", arguments, target, role, Some(command))?;
        approval(ports, policy, caller, target, role, Some(command)).await?;
        let ttl = policy.targets.get(target).map_or(policy.limits.cert_ttl_default, |t| t.cert_ttl_default);
        let started = Instant::now();
        let (conn, issued, held, warning) =
            self.connect(ports, caller, policy, target, role, &principal, None, ttl).await?;
        let connect = started.elapsed();
        let started = now_secs();
        // The envelope first (a sealed target): `ssh_exec` is recorded only for a command that is sent.
        let ran = match wire_command(ports, policy, target, &principal, command).await {
            Ok(sent) => match Self::record_exec(ports.audit, caller, target, role, command, None) {
                Ok(ticket) => {
                    let limits = ExecLimits {
                        max_stdout: policy.limits.output_max,
                        max_stderr: policy.limits.output_max,
                        timeout,
                    };
                    let (r, d) = futures_lite::future::zip(conn.exec(sent, limits), ticket.durable()).await;
                    d.map_err(|e| Error::audit(format!("{e} (the command ran; its record may be incomplete)")))
                        .and(r.map_err(ssh_err))
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        conn.close().await;
        drop(held);
        let result = ran?;
        let about =
            recording::About { started, agent: &caller.agent, target, role, command, session: None, terminal: None };
        let recording = self.record(ports, caller, policy, about, &result).await;
        Ok(Ran { result, serial: issued.serial, host_key_warning: warning, connect, recording, notice: None })
    }

    /// Opens a session.
    pub async fn session_create(
        &self,
        asker: Asker<'_>,
        target: &str,
        role: &str,
        mode: Mode,
    ) -> Result<(Rc<Session>, Option<String>), Error> {
        let Asker { ports, caller, policy, arguments } = asker;
        let principal = Self::authorize(policy, caller, "session_create", arguments, target, role, None)?;
        if let Mode::Pty { cols, rows } = mode {
            terminal::allowed(policy, &caller.agent, target, role, (cols, rows))?;
        }
        if mode == Mode::Shell && policy.targets.get(target).is_some_and(|t| t.verify_on_target.is_some()) {
            return Err(Error::Refused(format!(
                "target {target:?} verifies every command on the host, one signed command at a time: shell sessions are not available there (use mode exec)"
            )));
        }
        approval(ports, policy, caller, target, role, None).await?;
        let ttl = policy.targets.get(target).map_or(policy.limits.cert_ttl_max, |t| t.cert_ttl_max);
        let id = random_id();
        let (conn, issued, held, warning) =
            self.connect(ports, caller, policy, target, role, &principal, Some(&id), ttl).await?;
        let (kept, pty) = match mode {
            Mode::Exec => (None, None),
            Mode::Shell => match conn.open_shell(CONNECT_TIMEOUT).await {
                Ok(sh) => (Some(Rc::new(sh)), None),
                Err(e) => {
                    conn.close().await;
                    return Err(ssh_err(e));
                }
            },
            Mode::Pty { cols, rows } => match conn.open_pty(cols, rows, CONNECT_TIMEOUT).await {
                Ok(p) => (None, Some(Rc::new(p))),
                Err(e) => {
                    conn.close().await;
                    return Err(ssh_err(e));
                }
            },
        };
        let size = match mode {
            Mode::Pty { cols, rows } => (cols, rows),
            _ => (0, 0),
        };
        let s = Rc::new(Session {
            id: id.clone(),
            agent: caller.agent.clone(),
            task: caller.token().map(|t| t.task.clone()),
            target: target.to_owned(),
            role: role.to_owned(),
            principal,
            created: now_secs(),
            conn: RefCell::new(Rc::new(conn)),
            serial: Cell::new(held.serial()),
            held: RefCell::new(Some(held)),
            cert_until: Cell::new(issued.valid_before),
            last_used: Cell::new(Instant::now()),
            commands: Cell::new(0),
            shell: kept,
            pty,
            size: Cell::new(size),
        });
        self.sessions.borrow_mut().insert(id.clone(), s.clone());
        ports.metrics.set("ephyr_ssh_sessions", &[], self.session_count() as f64);
        ports
            .audit_now(
                with_task(Event::new(Kind::Ssh, "session_create"), caller)
                    .agent(caller.agent.clone())
                    .action(json!({ "target": target, "role": role, "session": id, "mode": mode.name() }))
                    .allow()
                    .outcome(json!({ "serial": format!("{:016x}", issued.serial), "expires": issued.valid_before })),
            )
            .await;
        Ok((s, warning))
    }

    /// The caller's session `id` (the same answer whether it does not exist or is another's).
    pub fn session_for(&self, policy: &Policy, caller: &Caller, id: &str) -> Result<Rc<Session>, Error> {
        match self.sessions.borrow().get(id) {
            Some(s) if owns(policy, caller, s) => Ok(s.clone()),
            _ => Err(Error::Refused(format!(
                "no session {id:?} for this caller (sessions belong to the agent and task that opened them)"
            ))),
        }
    }

    /// A command on a session, authorized against the session's own target and role under the
    /// caller's current token.
    pub async fn session_exec(
        &self,
        asker: Asker<'_>,
        id: &str,
        command: &str,
        timeout: Duration,
    ) -> Result<Ran, Error> {
        let Asker { ports, caller, policy, arguments } = asker;
        let s = self.session_for(policy, caller, id)?;
        check_command_text(command).map_err(Error::Refused)?;
        let principal = Self::authorize(policy, caller, "exec", arguments, &s.target, &s.role, Some(command))?;
        approval(ports, policy, caller, &s.target, &s.role, Some(command)).await?;
        if principal != s.principal {
            self.close(ports, &s, "role principal changed").await;
            return Err(Error::Refused(format!(
                "session {id:?} was closed: role {:?} now maps to another principal; open a new session",
                s.role
            )));
        }
        s.within_max(self, ports, policy, &s).await?;
        if let Some(shell) = &s.shell {
            return self.shell_exec(asker, &s, shell, command, timeout).await;
        }
        if s.pty.is_some() {
            return Err(Error::Refused(format!(
                "session {id:?} is a terminal (mode pty): send keystrokes with session_input, or open an exec or shell session"
            )));
        }
        let mut connect = Duration::ZERO;
        let mut warning = None;
        let conn = s.conn.borrow().clone();
        if conn.is_closed() || s.cert_until.get() <= now_secs() + RENEW_MARGIN {
            // Renew: a new key and certificate (authorized just above), a new connection.
            let started = Instant::now();
            let ttl = policy.targets.get(&s.target).map_or(policy.limits.cert_ttl_max, |t| t.cert_ttl_max);
            let (fresh, issued, held, w) =
                self.connect(ports, caller, policy, &s.target, &s.role, &principal, Some(&s.id), ttl).await?;
            let old = s.conn.replace(Rc::new(fresh));
            // The old certificate is released here, before anything else is awaited.
            s.serial.set(held.serial());
            drop(s.held.replace(Some(held)));
            s.cert_until.set(issued.valid_before);
            old.close().await;
            connect = started.elapsed();
            warning = w;
        }
        let conn = s.conn.borrow().clone();
        let started = now_secs();
        let sent = wire_command(ports, policy, &s.target, &s.principal, command).await?;
        let ticket = Self::record_exec(ports.audit, caller, &s.target, &s.role, command, Some(&s.id))?;
        s.last_used.set(Instant::now());
        s.commands.set(s.commands.get() + 1);
        let limits = ExecLimits { max_stdout: policy.limits.output_max, max_stderr: policy.limits.output_max, timeout };
        let (r, d) = futures_lite::future::zip(conn.exec(sent, limits), ticket.durable()).await;
        s.last_used.set(Instant::now());
        d.map_err(|e| Error::audit(format!("{e} (the command ran; its record may be incomplete)")))?;
        let result = r.map_err(ssh_err)?;
        let recording = self.record(ports, caller, policy, s.about(&caller.agent, command, started), &result).await;
        Ok(Ran { result, serial: s.serial(), host_key_warning: warning, connect, recording, notice: None })
    }

    /// A command in a `shell` session's kept shell (already authorized and cleared by
    /// `session_exec`). The shell is never renewed: its certificate's end, or the shell ending
    /// (exit, timeout, output cap), ends the session.
    async fn shell_exec(
        &self,
        asker: Asker<'_>,
        s: &Rc<Session>,
        shell: &client::Shell,
        command: &str,
        timeout: Duration,
    ) -> Result<Ran, Error> {
        let Asker { ports, caller, policy, .. } = asker;
        let conn = s.conn.borrow().clone();
        if shell.is_closed() || conn.is_closed() || s.cert_until.get() <= now_secs() + RENEW_MARGIN {
            self.close(ports, s, "the shell ended").await;
            return Err(Error::Refused(format!(
                "shell session {:?} has ended (its shell exited, or its certificate is about to expire); open a new session",
                s.id
            )));
        }
        let started = now_secs();
        let ticket = Self::record_exec(ports.audit, caller, &s.target, &s.role, command, Some(&s.id))?;
        s.last_used.set(Instant::now());
        s.commands.set(s.commands.get() + 1);
        let limits = ExecLimits { max_stdout: policy.limits.output_max, max_stderr: policy.limits.output_max, timeout };
        let (r, d) = futures_lite::future::zip(shell.run(command.to_owned(), limits), ticket.durable()).await;
        s.last_used.set(Instant::now());
        d.map_err(|e| Error::audit(format!("{e} (the command ran; its record may be incomplete)")))?;
        let result = r.map_err(ssh_err)?;
        let recording = self.record(ports, caller, policy, s.about(&caller.agent, command, started), &result).await;
        let notice = if shell.is_closed() {
            self.close(ports, s, "the shell ended").await;
            Some("the session's shell ended with this command (it exited, timed out or passed the output cap): the session is closed".to_owned())
        } else {
            None
        };
        Ok(Ran { result, serial: s.serial(), host_key_warning: None, connect: Duration::ZERO, recording, notice })
    }

    /// Closes a session (its connection, its certificate's key).
    pub async fn close(&self, ports: Ports<'_>, s: &Rc<Session>, why: &str) {
        if self.sessions.borrow_mut().remove(&s.id).is_none() {
            return;
        }
        drop(s.held.borrow_mut().take());
        if let Some(shell) = &s.shell {
            shell.close().await;
        }
        if let Some(pty) = &s.pty {
            pty.close().await;
        }
        let conn = s.conn.borrow().clone();
        conn.close().await;
        ports.metrics.set("ephyr_ssh_sessions", &[], self.session_count() as f64);
        ports
            .audit_now(
                Event::new(Kind::Ssh, "session_close")
                    .agent(s.agent.clone())
                    .action(json!({ "target": s.target, "role": s.role, "session": s.id }))
                    .outcome(json!({ "reason": why, "commands": s.commands.get() })),
            )
            .await;
    }

    /// The open session whose current certificate is `serial`.
    pub fn session_with_serial(&self, serial: u64) -> Option<Rc<Session>> {
        self.sessions.borrow().values().find(|s| s.serial() == serial).cloned()
    }

    /// Every open session (operators).
    pub fn sessions(&self) -> Vec<Rc<Session>> {
        self.sessions.borrow().values().cloned().collect()
    }

    /// The open session `id`, if any.
    pub fn session(&self, id: &str) -> Option<Rc<Session>> {
        self.sessions.borrow().get(id).cloned()
    }

    /// The caller's sessions.
    pub fn sessions_of(&self, policy: &Policy, caller: &Caller) -> Vec<Rc<Session>> {
        self.sessions.borrow().values().filter(|s| owns(policy, caller, s)).cloned().collect()
    }

    /// Closes sessions that are idle, whose certificate has expired, whose task is revoked or
    /// gone, or whose agent may no longer use their target and role; drops expired
    /// certificates from the registry.
    pub async fn sweep(&self, ports: Ports<'_>, policy: &Policy) {
        let now = now_secs();
        let doomed: Vec<(Rc<Session>, &'static str)> = self
            .sessions
            .borrow()
            .values()
            .filter_map(|s| {
                let why = if s.last_used.get().elapsed() >= policy.limits.session_idle {
                    "idle"
                } else if s.past_max(policy, now) {
                    "limits.session_max reached"
                } else if s.cert_until.get() <= now {
                    "certificate expired"
                } else if s.conn.borrow().is_closed() {
                    "connection lost"
                } else if s.pty.as_ref().is_some_and(|p| p.is_closed()) {
                    "the terminal's shell ended"
                } else if s.task.as_deref().is_some_and(|t| ports.tasks.unusable(t)) {
                    "task revoked or expired"
                } else if !policy_allows(policy, &s.agent, &s.target, &s.role) {
                    "policy no longer allows it"
                } else {
                    return None;
                };
                Some((s.clone(), why))
            })
            .collect();
        for (s, why) in doomed {
            self.close(ports, &s, why).await;
        }
        self.registry.collect(now);
    }

    /// The current KRL: certificates of revoked (or vanished) tasks and operator-revoked ones
    /// that are still valid. `None` while the CA key is unknown (signer not up yet).
    pub fn krl(&self, ports: Ports<'_>) -> Option<Vec<u8>> {
        let ca = ports.signer.ca_public_key()?;
        let blob = ca.split_whitespace().nth(1).and_then(|b| data_encoding::BASE64.decode(b.as_bytes()).ok())?;
        let now = now_secs();
        let serials = self.registry.revoked_serials(now, |t| ports.tasks.unusable(t));
        let v = self.krl_version.get().max(crate::time::now().0.max(0) as u64);
        self.krl_version.set(v + 1);
        Some(krl::encode(&blob, &serials, v, now, "ephyr revoked certificates"))
    }
}

/// The validity window of a new certificate: from now, at most `ttl`, never past the signer's own
/// cap (fixed at its start: a reload may ask for more, and `reload` warns), nor past the token's
/// expiry (a certificate must not outlive the task). `(now, until)`, Unix seconds.
fn validity(signer: &dyn CertSigner, caller: &Caller, ttl: Duration, now: u64) -> Result<(u64, u64), Error> {
    let cap = signer.max_cert_ttl().unwrap_or(u64::MAX);
    let mut until = now + ttl.as_secs().clamp(1, cap.max(1));
    if let Some(exp) = caller.token().and_then(|t| t.envelope().expires_before) {
        until = until.min(exp.secs().max(0) as u64);
    }
    if until <= now {
        return Err(Error::Refused("the task expires now; no certificate".into()));
    }
    Ok((now, until))
}

/// A certificate for `ephyr run` ([`Ssh::certify_run`]).
pub struct RunCert {
    /// OpenSSH certificate text.
    pub certificate: String,
    /// The remote user.
    pub principal: String,
    /// Where the host is.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// How its key is checked.
    pub host_check: HostCheck,
    /// The certificate's serial.
    pub serial: u64,
    /// Counted among the agent's certificates in use until dropped.
    pub held: registry::Held,
}

/// What a certificate is asked for.
struct Wanted<'a> {
    target_name: &'a str,
    target: &'a Target,
    role: &'a str,
    principal: &'a str,
    session: Option<&'a str>,
}

/// How long an exec envelope is valid: it is used at once (the target keeps its nonce until then).
const ENVELOPE_TTL: u64 = 60;

/// The command as sent: on a `verify_on_target` target, inside an envelope the signer signed
/// (the target's `ephyr shim` runs only that); elsewhere the command itself.
async fn wire_command(
    ports: Ports<'_>,
    policy: &Policy,
    target: &str,
    principal: &str,
    command: &str,
) -> Result<String, Error> {
    use crate::signer::protocol::{ExecRequest, exec};
    if policy.targets.get(target).and_then(|t| t.verify_on_target.as_ref()).is_none() {
        return Ok(command.to_owned());
    }
    if command.len() > exec::MAX_EXEC_COMMAND {
        return Err(Error::Refused(format!(
            "target {target:?} verifies commands itself; a command there is at most {} bytes",
            exec::MAX_EXEC_COMMAND
        )));
    }
    let req = ExecRequest {
        target: target.to_owned(),
        principal: principal.to_owned(),
        command: command.to_owned(),
        expires: now_secs() + ENVELOPE_TTL,
    };
    let (text, sshsig) = ports.signer.sign_exec(req).await.map_err(|e| signer_failure(&e))?;
    Ok(exec::to_wire(&text, &sshsig))
}

/// The audit record of an issued certificate (`extra`'s fields join the action's).
fn issued_event(caller: &Caller, issued: &registry::Issued, extra: serde_json::Value) -> Event {
    let mut action = json!({ "target": issued.target, "role": issued.role, "principal": issued.principal });
    if let (Some(a), Some(e)) = (action.as_object_mut(), extra.as_object()) {
        a.extend(e.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    with_task(Event::new(Kind::Cert, "cert_issued"), caller).agent(caller.agent.clone()).action(action).allow().outcome(
        json!({ "serial": format!("{:016x}", issued.serial), "key_id": issued.key_id, "valid_after": issued.valid_after, "valid_before": issued.valid_before }),
    )
}

/// A fresh key in memory and its certificate from the signer, with the registry record.
async fn issue(
    signer: &dyn CertSigner,
    metrics: &super::metrics::Metrics,
    caller: &Caller,
    w: Wanted<'_>,
    now: u64,
    until: u64,
) -> Result<(client::Key, client::Cert, registry::Issued), Error> {
    let key = client::ephemeral_key().map_err(ssh_err)?;
    let (cert, issued) = issue_for(signer, metrics, caller, w, now, until, client::public_openssh(&key)).await?;
    Ok((key, cert, issued))
}

/// Certifies `public_key` (OpenSSH text) as `w` asks.
async fn issue_for(
    signer: &dyn CertSigner,
    metrics: &super::metrics::Metrics,
    caller: &Caller,
    w: Wanted<'_>,
    now: u64,
    until: u64,
    public_key: String,
) -> Result<(client::Cert, registry::Issued), Error> {
    let Wanted { target_name, target: t, role, principal, session } = w;
    let request_id = crate::ids::new_ulid(crate::time::now());
    let task = caller.token().map(|t| t.task.clone());
    let key_id = format!("ephyr:{}:{}:{target_name}/{role}:{request_id}", caller.agent, task.as_deref().unwrap_or("-"));
    let req = CertRequest {
        public_key,
        principals: vec![principal.to_owned()],
        key_id: key_id.clone(),
        valid_after: now.saturating_sub(BACKDATE),
        valid_before: until,
        force_command: t
            .verify_on_target
            .as_ref()
            .map(|o| o.force_command(target_name))
            .or_else(|| t.force_command.clone()),
        source_address: t.source_address.clone(),
        extensions: t.extensions.clone(),
    };
    let (serial, certificate) = match signer.sign(req).await {
        Ok(c) => c,
        Err(e) => {
            metrics.inc("ephyr_certificates_refused_total", &[]);
            return Err(signer_failure(&e));
        }
    };
    metrics.inc("ephyr_certificates_issued_total", &[("requester", "agent")]);
    let cert = client::parse_cert(&certificate).map_err(ssh_err)?;
    let issued = registry::Issued {
        serial,
        key_id: key_id.clone(),
        agent: caller.agent.clone(),
        task,
        lineage: caller.token().map(|t| t.lineage.clone()).unwrap_or_default(),
        target: target_name.to_owned(),
        role: role.to_owned(),
        principal: principal.to_owned(),
        valid_after: now.saturating_sub(BACKDATE),
        valid_before: until,
        session: session.map(str::to_owned),
    };
    Ok((cert, issued))
}

/// Whether `agent`'s policy (no token) reaches `target` as `role`.
pub(crate) fn policy_allows(policy: &Policy, agent: &str, target: &str, role: &str) -> bool {
    let p = super::policy::Principal { agent, token: None, delegators: &[] };
    super::policy::authorize(policy, &p, &Action::reach(None, ActionKind::Ssh { target, role })).is_allow()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::auth::Via;
    use crate::signer::protocol::SignerError;
    use std::cell::RefCell;

    /// An in-memory stand-in for the signer (the real one is tested in tests/foundation.rs and
    /// tests/ssh.rs): remembers requests, answers with a fixed certificate or refuses.
    struct FakeSigner {
        cap: Option<u64>,
        refuse: Option<ErrorCode>,
        seen: RefCell<Vec<CertRequest>>,
    }

    impl CertSigner for FakeSigner {
        fn sign<'a>(
            &'a self,
            req: CertRequest,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(u64, String), CallError>> + 'a>> {
            self.seen.borrow_mut().push(req);
            let r = match self.refuse {
                Some(code) => Err(CallError::Refused(SignerError { code, message: "3 per minute".into() })),
                None => Err(CallError::Protocol("no certificate in a unit test".into())),
            };
            Box::pin(async move { r })
        }

        fn max_cert_ttl(&self) -> Option<u64> {
            self.cap
        }

        fn ca_public_key(&self) -> Option<String> {
            None
        }
    }

    fn api_caller() -> Caller {
        Caller { agent: "alice".into(), via: Via::ApiKey, fingerprint: [1; 32], source: None }
    }

    #[test]
    fn validity_is_clamped_to_the_signers_cap() {
        let s = FakeSigner { cap: Some(600), refuse: None, seen: RefCell::default() };
        let now = 1_900_000_000;
        assert_eq!(validity(&s, &api_caller(), Duration::from_secs(3600), now).unwrap(), (now, now + 600));
        assert_eq!(validity(&s, &api_caller(), Duration::from_secs(60), now).unwrap(), (now, now + 60));
        let unknown = FakeSigner { cap: None, refuse: None, seen: RefCell::default() };
        assert_eq!(validity(&unknown, &api_caller(), Duration::ZERO, now).unwrap(), (now, now + 1));
    }

    #[test]
    fn a_signer_refusal_is_a_clear_error_and_counted() {
        let p =
            Policy::parse("roles: {r: {principal: p}}\ntargets: {web: {host: h, allowed_roles: [r]}}\n", "t").unwrap();
        let t = p.targets["web"].clone();
        let metrics = super::super::metrics::Metrics::default();
        let s = FakeSigner { cap: Some(600), refuse: Some(ErrorCode::RateLimited), seen: RefCell::default() };
        let w = Wanted { target_name: "web", target: &t, role: "r", principal: "p", session: None };
        let e = crate::broker::reactor::block_on(issue(&s, &metrics, &api_caller(), w, 1_900_000_000, 1_900_000_600))
            .unwrap_err();
        assert!(
            matches!(&e, Error::Signer(m) if m.contains("rate limit is reached") && m.contains("use a session")),
            "{e:?}"
        );
        assert_eq!(metrics.get("ephyr_certificates_refused_total", &[]), 1.0);
        let req = &s.seen.borrow()[0];
        assert_eq!(req.principals, ["p"]);
        assert_eq!((req.valid_after, req.valid_before), (1_900_000_000 - BACKDATE, 1_900_000_600));
        assert!(req.key_id.starts_with("ephyr:alice:-:web/r:"), "{}", req.key_id);
        assert!(req.public_key.starts_with("ssh-ed25519 "), "a fresh key per certificate");
    }

    #[test]
    fn command_text_is_checked() {
        assert!(check_command_text("  ").unwrap_err().contains("empty"));
        assert!(check_command_text("a\0b").unwrap_err().contains("NUL"));
        assert!(check_command_text(&"x".repeat(MAX_COMMAND + 1)).unwrap_err().contains("limit"));
        check_command_text("uptime").unwrap();
    }
}
