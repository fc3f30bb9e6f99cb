//! `ephyr serve`: start-up, the executor, signals and shutdown.
//!
//! Order of start-up (DESIGN.md §1), each step before the next:
//! 1. read the policy (file, or the built-in dev policy) and resolve users — no threads exist yet;
//! 2. prepare the data dir, then `socketpair` + fork/exec the signer keeper;
//! 3. bind the TCP listeners and the local Unix socket (as root, if started as root);
//! 4. drop the broker's privileges;
//! 5. run everything else on one `LocalExecutor` on the main thread: wait for the signer, serve,
//!    handle SIGTERM/SIGINT (graceful stop) and SIGHUP (reload hook).
//!
//! Shutdown: stop accepting, let in-flight requests finish (up to `--shutdown-timeout`), close the
//! signer's control socket (keeper and worker exit), remove a temporary data dir, exit 0.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use smol::LocalExecutor;

use super::PolicySource;
use super::audit::{AuditConfig, AuditLog, Event, Kind};
use super::blocking::BlockingPool;
use super::datadir::{DEFAULT_CONFIG_DIR, DEFAULT_DATA_DIR, DataDir};
use super::http::{self, Connections};
use super::metrics::Metrics;
use super::privileges::{self, drop_privileges, resolve_identities};
use super::signer_client::{Launch, Signer};
use super::{Broker, local, routes};
use crate::signer::{SignerConfig, TargetIds};

/// Options of `ephyr serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Policy file (default `/etc/ephyr/policy.yaml`; with `--dev`, the built-in dev policy).
    pub config: Option<PathBuf>,
    /// Data dir (default `/var/lib/ephyr`; with `--dev`, a temporary one).
    pub data_dir: Option<PathBuf>,
    /// MCP/API listener.
    pub listen: SocketAddr,
    /// Dashboard listener.
    pub dashboard_listen: SocketAddr,
    /// Local socket path (default `<data-dir>/ephyr.sock`).
    pub socket: Option<PathBuf>,
    /// Development mode.
    pub dev: bool,
    /// Let the signer serve without a complete sandbox.
    pub insecure_no_sandbox: bool,
    /// Broker account when started as root.
    pub broker_user: Option<String>,
    /// Signer account when started as root.
    pub signer_user: Option<String>,
    /// How long in-flight requests may take to finish on shutdown.
    pub shutdown_timeout: Duration,
    /// Certificate chain for both listeners.
    pub tls_cert: Option<PathBuf>,
    /// Its key.
    pub tls_key: Option<PathBuf>,
    /// More names for a generated certificate.
    pub tls_names: Vec<String>,
    /// Plain HTTP on a non-loopback address.
    pub insecure_plain_http: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            config: None,
            data_dir: None,
            listen: "127.0.0.1:8554".parse().expect("literal address"),
            dashboard_listen: "127.0.0.1:8553".parse().expect("literal address"),
            socket: None,
            dev: false,
            insecure_no_sandbox: false,
            broker_user: None,
            signer_user: None,
            shutdown_timeout: Duration::from_secs(10),
            tls_cert: None,
            tls_key: None,
            tls_names: Vec::new(),
            insecure_plain_http: false,
        }
    }
}

/// Why `serve` stopped with an error; each maps to a documented exit code.
#[derive(Debug)]
pub enum ServeError {
    /// The policy or options are invalid (exit 3).
    Config(String),
    /// Start-up failed: files, listeners, privileges, signer (exit 1).
    Startup(String),
    /// The signer was lost for good while running (exit 70).
    SignerLost(String),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::Config(m) | ServeError::Startup(m) | ServeError::SignerLost(m) => f.write_str(m),
        }
    }
}

impl ServeError {
    /// Process exit code (documented in docs/cli.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Config(_) => 3,
            ServeError::Startup(_) => 1,
            ServeError::SignerLost(_) => 70,
        }
    }
}

fn startup<E: fmt::Display>(what: &str) -> impl FnOnce(E) -> ServeError + '_ {
    move |e| ServeError::Startup(format!("{what}: {e}"))
}

fn bind_tcp(addr: SocketAddr, what: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).map_err(|e| ServeError::Startup(format!("cannot listen on {addr} ({what}): {e}")))
}

fn bind_unix(path: &PathBuf) -> Result<UnixListener, ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            // A live broker would still answer; a stale socket file from a killed one is removed.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::Startup(format!(
                    "{} is in use: another ephyr broker is running with this data dir",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(startup("removing a stale socket"))?;
        }
        Ok(_) => {
            return Err(ServeError::Startup(format!("{} exists and is not a socket", path.display())));
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(|e| ServeError::Startup(format!("{}: {e}", path.display())))?;
    // Anyone may connect; SO_PEERCRED decides what they may do.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(startup("socket mode"))?;
    Ok(l)
}

/// Decides the listeners' TLS: the given certificate; else, when a listener binds a
/// non-loopback address, the local CA in the data dir's `tls/`; else none.
/// Plain HTTP on a non-loopback address needs `--insecure-plain-http`.
fn tls_source(
    opts: &ServeOptions,
    data_dir: &DataDir,
    listeners: &[SocketAddr],
) -> Result<Option<super::tls::Source>, ServeError> {
    use super::tls::Source;
    let exposed = listeners.iter().any(|a| !a.ip().is_loopback());
    Ok(match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => Some(Source::Given { cert: cert.clone(), key: key.clone() }),
        (Some(_), None) | (None, Some(_)) => {
            return Err(ServeError::Config("--tls-cert and --tls-key go together".into()));
        }
        (None, None) if !exposed => None,
        (None, None) if opts.insecure_plain_http => {
            log::warn!(
                "INSECURE: plain HTTP on a non-loopback address (--insecure-plain-http): API keys, task tokens \
                 and the console's session cross the network in clear text"
            );
            None
        }
        (None, None) => {
            Some(Source::Local { dir: data_dir.tls(), names: super::tls::local_names(listeners, &opts.tls_names) })
        }
    })
}

/// Loads (for the local CA: makes or renews) the listeners' certificate.
fn load_tls(source: super::tls::Source) -> Result<Rc<super::tls::Tls>, ServeError> {
    super::tls::Tls::load(source).map(Rc::new).map_err(|e| ServeError::Config(format!("TLS: {e}")))
}

/// Runs the broker until it is told to stop.
pub fn run(opts: ServeOptions) -> Result<(), ServeError> {
    crate::logging::init("broker");
    let started = Instant::now();

    // 1. Policy and identities.
    let root = privileges::is_root();
    let ids = if root {
        Some(resolve_identities(opts.broker_user.as_deref(), opts.signer_user.as_deref()).map_err(ServeError::Config)?)
    } else {
        None
    };

    // 2. Data dir, then the signer — before any thread exists.
    let data_dir = match (&opts.data_dir, opts.dev) {
        (Some(d), _) => DataDir::at(d),
        (None, true) => DataDir::temporary().map_err(startup("temporary data dir"))?,
        (None, false) => DataDir::at(DEFAULT_DATA_DIR),
    };
    data_dir.prepare(ids.as_ref().map(|i| &i.broker)).map_err(ServeError::Startup)?;
    let mut dev_key = None;
    let source = match (&opts.config, opts.dev) {
        (Some(path), _) => PolicySource::File(path.clone()),
        (None, true) => {
            let (key, hash) = dev_api_key(&data_dir, ids.as_ref().map(|i| &i.broker)).map_err(ServeError::Startup)?;
            dev_key = Some(key);
            PolicySource::BuiltinDev { dev_key_hash: hash }
        }
        (None, false) => PolicySource::File(PathBuf::from(DEFAULT_CONFIG_DIR).join("policy.yaml")),
    };
    let policy = source.load().map_err(|e| ServeError::Config(format!("policy not loaded:\n{e}")))?;
    for w in &policy.warnings {
        log::warn!("policy: {w}");
    }
    if !opts.dev && !data_dir.keys().ca_key().exists() {
        return Err(ServeError::Startup(format!(
            "{} does not exist: run `ephyr init --data-dir {}` first",
            data_dir.keys().ca_key().display(),
            data_dir.root.display()
        )));
    }
    let signer_config = SignerConfig {
        max_cert_ttl_secs: policy.limits.cert_ttl_max.as_secs() as u32,
        principals: policy.signer_principals(),
        rate_limit: policy.limits.signer_rate.count,
        rate_window_secs: policy.limits.signer_rate.window.as_secs() as u32,
        sealed: super::signer_client::sealed_targets(&policy),
    };
    signer_config.validate().map_err(ServeError::Config)?;
    let launch = Launch::new(
        (!data_dir.temporary).then(|| data_dir.root.clone()),
        opts.dev,
        ids.as_ref().map(|i| TargetIds { uid: i.signer.uid, gid: i.signer.gid }),
        &signer_config,
        opts.insecure_no_sandbox,
    );
    // Profilers that run the broker under an interpreter (valgrind) change /proc/self/exe; they
    // may name the real binary for the signer. Only an unprivileged broker honours this: a root
    // broker always re-executes itself.
    let launch = match std::env::var_os("EPHYR_SIGNER_EXE") {
        Some(exe) if !root => {
            log::warn!("EPHYR_SIGNER_EXE: the signer runs from {}", std::path::Path::new(&exe).display());
            launch.with_exe(exe)
        }
        _ => launch,
    };
    let keeper = launch.spawn(false).map_err(startup("starting the signer"))?;

    // 3. Listeners (as root if started as root).
    let api = bind_tcp(opts.listen, "MCP/API")?;
    let dashboard = bind_tcp(opts.dashboard_listen, "dashboard")?;
    let socket_path = opts.socket.clone().unwrap_or_else(|| data_dir.socket());
    let unix = bind_unix(&socket_path)?;
    let (listen, dashboard_listen) = (
        api.local_addr().map_err(startup("listener address"))?,
        dashboard.local_addr().map_err(startup("listener address"))?,
    );

    // A given certificate may be readable by root only: it is read before the drop. The local CA
    // is made (or renewed) after it, by the broker's user in the `tls/` it owns, so start-up needs
    // no CAP_CHOWN for it.
    let tls_source = tls_source(&opts, &data_dir, &[listen, dashboard_listen])?;
    let given = match &tls_source {
        Some(s @ super::tls::Source::Given { .. }) => Some(load_tls(s.clone())?),
        _ => None,
    };

    // 4. Privileges.
    let identity = drop_privileges(ids.as_ref().map(|i| &i.broker)).map_err(ServeError::Startup)?;
    let tls = match (given, tls_source) {
        (Some(t), _) => Some(t),
        (None, Some(local)) => Some(load_tls(local)?),
        (None, None) => None,
    };
    if identity.changed_identity {
        log::info!("broker dropped privileges to uid {} gid {}", identity.uid, identity.gid);
    } else {
        log::warn!(
            "running unprivileged as uid {}: the broker and signer share a user, so the CA key on disk is \
             readable by the broker; start as root for privilege separation",
            identity.uid
        );
    }

    // 5. The executor.
    let ex = Rc::new(LocalExecutor::new());
    let result = crate::broker::reactor::block_on(ex.run(async {
        let signals = super::reactor::Signals::new(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
            .map_err(startup("signal handlers"))?;
        let (fatal_tx, fatal_rx) = async_channel::bounded(1);
        let metrics = Rc::new(Metrics::default());
        let (signer_events_tx, signer_events) = async_channel::bounded(64);
        let (signer, supervisor) = Signer::start(launch, keeper, fatal_tx, metrics.clone(), signer_events_tx)
            .await
            .map_err(|e| ServeError::Startup(e.to_string()))?;
        ex.spawn(supervisor).detach();
        let pool = BlockingPool::new(2, 64);
        let audit = AuditLog::open(&data_dir.audit(), pool.clone(), AuditConfig::default(), metrics.clone())
            .map_err(|e| ServeError::Startup(format!("audit log: {e}")))?;
        ex.spawn(audit.clone().run_flusher()).detach();
        ex.spawn(audit.clone().run_checkpoints(Rc::new(signer.clone()))).detach();
        let logs = super::journal::Files::new(data_dir.state(), pool.clone(), ex.clone());
        let (tasks, loaded) = {
            let signer = signer.clone();
            super::tasks::TaskStore::load(&logs, crate::time::now(), move |context, sealed| {
                let signer = signer.clone();
                async move {
                    let key = signer.unseal(context, sealed).await.map_err(|e| e.message())?;
                    Ok(crate::macaroon::RootKey::from_bytes(key.expose()))
                }
            })
            .await
            .map_err(|e| ServeError::Startup(format!("task state: {e}")))?
        };
        if loaded.torn_bytes > 0 {
            log::warn!("task journal: cut off a torn last record ({} bytes, never acknowledged)", loaded.torn_bytes);
        }
        for u in &loaded.unsealable {
            log::error!("task journal: {u}: its tasks are dropped (journal from another data dir?)");
        }
        log::info!("tasks: {} live in {} trees", loaded.tasks, loaded.trees);
        let (certs, torn) = super::ssh::registry::Registry::load(&logs, crate::time::now().secs().max(0) as u64)
            .await
            .map_err(|e| ServeError::Startup(format!("certificate registry: {e}")))?;
        if torn > 0 {
            log::warn!("certificate journal: cut off a torn last record ({torn} bytes, never acknowledged)");
        }
        let pins = super::federation::pins::Pins::load(&logs)
            .await
            .map_err(|e| ServeError::Startup(format!("tool pins: {}", e.message())))?;
        let freezes = super::freeze::Freezes::load(&logs)
            .await
            .map_err(|e| ServeError::Startup(format!("freezes: {}", e.message())))?;
        let approvals = super::approvals::Approvals::load(&logs)
            .await
            .map_err(|e| ServeError::Startup(format!("approvals: {}", e.message())))?;
        let runs = super::runs::Runs::load(&logs)
            .await
            .map_err(|e| ServeError::Startup(format!("runs: {}", e.message())))?;
        let keys = super::runs::keys::Keys::load(&logs, Rc::new(super::upstream::conn::Conns::new(ex.clone())))
            .await
            .map_err(|e| ServeError::Startup(format!("disposable keys: {}", e.message())))?;
        let agents = super::agents::Directory::load(&logs)
            .await
            .map_err(|e| ServeError::Startup(format!("agent directory: {}", e.message())))?;
        let oauth = super::oauth::OAuth::load(&logs, Rc::new(super::upstream::conn::Conns::new(ex.clone())))
            .await
            .map_err(|e| ServeError::Startup(format!("oauth: {}", e.message())))?;
        let mut policy = policy;
        policy.frozen = freezes.frozen();
        for w in agents.overlay(&mut policy) {
            log::warn!("agents: {w}");
        }
        let known = super::ssh::hosts::KnownHosts::load(&data_dir.state().join("known_hosts"))
            .map_err(|e| ServeError::Startup(format!("known hosts: {e}")))?;
        let broker = Rc::new(Broker {
            audit: audit.clone(),
            metrics: metrics.clone(),
            policy_source: source,
            signer: signer.clone(),
            policy: super::policy::PolicyCell::new(policy),
            started,
            identity,
            data_dir: data_dir.clone(),
            listen,
            dashboard_listen,
            socket: socket_path.clone(),
            pool: pool.clone(),
            auth: super::auth::Authenticator::new(),
            agent_limits: super::rate::RateLimiter::new(10_000),
            tasks: Rc::new(tasks),
            sessions: http::mcp::Sessions::default(),
            changes: http::mcp::ChangeFeed::default(),
            ssh: super::ssh::Ssh::new(certs, known, super::ssh::recording::Store { dir: data_dir.recordings() }),
            secrets: super::secrets::Secrets::new(data_dir.state().join("secrets")),
            proxy: super::proxy::Proxy::new(ex.clone()),
            admission: http::admission::Admission::new(metrics.clone()),
            catalog: super::tools::Catalog::new(),
            federation: super::federation::Federation::new(ex.clone(), pins).with_private(
                std::iter::once(data_dir.root.clone())
                    .chain(opts.socket.as_ref().and_then(|s| s.parent()).map(std::path::Path::to_path_buf))
                    .collect(),
            )
            .with_vault(Box::new(super::secrets::SealedFiles {
                dir: data_dir.state().join("remote-tokens"),
                pool: pool.clone(),
                signer: signer.clone(),
            })),
            freezes,
            approvals,
            console: super::console::Console::default(),
            tls,
            runs,
            keys,
            agents,
            oauth,
        });
        {
            // The directory learns which grants are exercised from what the audit log records.
            let weak = Rc::downgrade(&broker);
            broker.audit.observe(Box::new(move |e| {
                if let Some(b) = weak.upgrade() {
                    super::agents::api::exercised(&b, e);
                }
            }));
        }
        ex.spawn(super::console::graphs::run(Rc::downgrade(&broker))).detach();
        ex.spawn(super::approvals::notify::run(
            Rc::downgrade(&broker),
            Rc::new(super::upstream::conn::Conns::new(ex.clone())),
        ))
        .detach();
        record_start(&broker).await.map_err(|e| ServeError::Startup(e.to_string()))?;
        // Sign this process's first lines at once (in the background: serving does not wait for
        // the signer and the fsync): every log then has a checkpoint moments after it starts, so a
        // log without one is a rewritten one (audit::verify).
        {
            let (audit, signer) = (audit.clone(), signer.clone());
            ex.spawn(async move {
                if let Err(e) = audit.checkpoint(&signer, false).await {
                    log::warn!("first audit checkpoint failed: {e}");
                }
            })
            .detach();
        }
        super::maintenance::spawn(&ex, &broker, signer_events);
        let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
        let conns = Connections::default();
        spawn_listeners(&ex, &broker, Listeners { api, dashboard, unix }, &stop_rx, &conns);
        let ca = signer.health().status.map(|s| s.ca_public_key).unwrap_or_default();
        let scheme = broker.scheme();
        log::info!(
            "serving: MCP/API {scheme}://{listen} console {scheme}://{dashboard_listen} socket {} (ready in {:.1} ms)",
            socket_path.display(),
            started.elapsed().as_secs_f64() * 1000.0
        );
        if let Some(t) = &broker.tls {
            let d = t.describe();
            match d["ca_file"].as_str() {
                Some(ca) => log::warn!(
                    "TLS from the local CA {ca}, fingerprint {}: clients must trust that file (docs/console.md, \"TLS\")",
                    t.fingerprint()
                ),
                None => log::info!("TLS with the given certificate, fingerprint {}", t.fingerprint()),
            }
        }
        if opts.dev {
            print_dev_banner(&broker, &ca, dev_key.as_ref());
        }

        // Wait for a reason to stop, in a task of its own: the executor re-polls this block at
        // every wake-up, and polling the signal pipe there cost a read(2) each time.
        let waiter = {
            let broker = broker.clone();
            ex.spawn(async move { wait_for_stop(&broker, &signals, &fatal_rx).await })
        };
        let outcome = waiter.await;

        stop(&broker, &signer, &outcome, Stopping { stop_tx, stop_rx, conns, timeout: opts.shutdown_timeout, started })
            .await;
        outcome
    }));
    drop(unix_cleanup(&socket_path));
    data_dir.remove_if_temporary();
    log::info!("stopped");
    result
}

/// The listeners, bound before privileges were dropped.
struct Listeners {
    api: TcpListener,
    dashboard: TcpListener,
    unix: UnixListener,
}

/// Starts accepting on every listener until `stop_rx` closes.
fn spawn_listeners(
    ex: &Rc<smol::LocalExecutor<'static>>,
    broker: &Rc<Broker>,
    l: Listeners,
    stop_rx: &async_channel::Receiver<()>,
    conns: &Connections,
) {
    let Listeners { api, dashboard, unix } = l;
    for (name, fut) in [
        (
            "MCP/API",
            Box::pin(http::serve_tcp(
                ex.clone(),
                api,
                broker.admission.clone(),
                routes::api_handler(broker.clone()),
                stop_rx.clone(),
                conns.clone(),
                broker.tls.clone(),
            )) as std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>>>>,
        ),
        (
            "dashboard",
            Box::pin(http::serve_tcp(
                ex.clone(),
                dashboard,
                broker.admission.clone(),
                routes::dashboard_handler(broker.clone()),
                stop_rx.clone(),
                conns.clone(),
                broker.tls.clone(),
            )),
        ),
        (
            "local socket",
            Box::pin(http::serve_unix(
                ex.clone(),
                unix,
                local::local_handler(broker.clone()),
                stop_rx.clone(),
                conns.clone(),
            )),
        ),
    ] {
        ex.spawn(async move {
            if let Err(e) = fut.await {
                log::error!("{name} listener failed: {e}");
            }
        })
        .detach();
    }
}

/// Waits for SIGTERM/SIGINT (a clean stop), reloading the policy on SIGHUP, or for the signer
/// to be lost for good (an error).
async fn wait_for_stop(
    broker: &Rc<Broker>,
    signals: &super::reactor::Signals,
    fatal_rx: &async_channel::Receiver<String>,
) -> Result<(), ServeError> {
    loop {
        let next = futures_lite::future::or(async { Ok(signals.next().await) }, async {
            Err(fatal_rx.recv().await.unwrap_or_else(|_| "signer supervisor ended".into()))
        })
        .await;
        match next {
            Ok(Ok(libc::SIGHUP)) => {
                log::info!("SIGHUP received: reloading the policy");
                if let Some(t) = &broker.tls {
                    match t.reload() {
                        Ok(fp) => log::info!("TLS certificate re-read: {fp}"),
                        Err(e) => log::error!("TLS certificate not re-read (the current one stays): {e}"),
                    }
                }
                let _ = super::ops::reload(broker, &super::ops::Actor::Signal("SIGHUP")).await;
            }
            Ok(Ok(sig)) => {
                log::info!("{} received: shutting down", if sig == libc::SIGINT { "Int" } else { "Term" });
                break Ok(());
            }
            Ok(Err(e)) => {
                log::warn!("signal pipe unreadable ({e}): shutting down");
                break Ok(());
            }
            Err(msg) => break Err(ServeError::SignerLost(msg)),
        }
    }
}

/// What a graceful stop needs.
struct Stopping {
    stop_tx: async_channel::Sender<()>,
    stop_rx: async_channel::Receiver<()>,
    conns: Connections,
    timeout: std::time::Duration,
    started: Instant,
}

/// Graceful stop: no new connections, end notification streams, finish in-flight requests, the
/// last audit records and the final checkpoint, then the signer.
async fn stop(broker: &Rc<Broker>, signer: &Signer, outcome: &Result<(), ServeError>, s: Stopping) {
    let Stopping { stop_tx, stop_rx, conns, timeout, started } = s;
    let audit = &broker.audit;
    broker.changes.close();
    stop_rx.close();
    drop(stop_tx);
    let left = conns.drain(Instant::now() + timeout).await;
    if left > 0 {
        log::warn!("{left} connection(s) still open after {}s; closing", timeout.as_secs());
    }
    let stop = Event::new(Kind::Broker, "broker_stop").outcome(serde_json::json!({
        "reason": match &outcome { Ok(()) => "signal".to_string(), Err(e) => e.to_string() },
        "uptime_secs": started.elapsed().as_secs(),
    }));
    broker.audit_now(stop).await;
    if outcome.is_ok() {
        // Sign everything up to here, so a verifier can tell a clean end from a truncation.
        if let Err(e) = audit.checkpoint(signer, true).await {
            log::error!("final audit checkpoint failed: {e}");
        }
    }
    let _ = audit.flushed().await;
    signer.shutdown().await;
}

async fn record_start(broker: &Broker) -> Result<(), super::audit::AuditError> {
    use super::audit::AuditSink as _;
    let h = broker.signer.health();
    let start = Event::new(Kind::Broker, "broker_start").outcome(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uid": broker.identity.uid,
        "listen": broker.listen.to_string(),
        "dashboard_listen": broker.dashboard_listen.to_string(),
        "policy_digest": broker.policy().digest,
    }));
    broker.audit.record(start)?.durable().await?;
    if let Some(t) = broker.audit.unsigned_tail() {
        let ev = Event::new(Kind::Broker, "audit_tail_unsigned").error("audit_tail_unsigned", t.describe()).outcome(
            serde_json::json!({
                "lines": t.lines.map(|(a, b)| [a, b]),
                "after_clean_stop": t.after_clean_stop,
                "head_mismatch": t.head_mismatch,
            }),
        );
        broker.audit.record(ev)?.durable().await?;
    }
    if let Some(s) = h.status {
        let b = &s.sandbox;
        let ev = Event::new(Kind::Signer, "sandbox_status").outcome(serde_json::json!({
            "enforced": b.enforced,
            "insecure_override": b.insecure_override,
            "uid": b.uid,
            "landlock_abi": b.landlock_abi,
            "landlock": format!("{:?}", b.landlock),
            "seccomp": format!("{:?}", b.seccomp),
            "caps_cleared": b.caps_cleared,
            "problems": b.problems,
            "ca_public_key": s.ca_public_key,
        }));
        broker.audit.record(ev)?.durable().await?;
    }
    Ok(())
}

fn unix_cleanup(path: &PathBuf) -> std::io::Result<()> {
    std::fs::remove_file(path)
}

/// The dev agent's API key: kept in `<data-dir>/state/dev_api_key` for a persistent dev data dir,
/// generated fresh for a temporary one; stored in the fast form (`api_key::fast_hash`).
fn dev_api_key(
    data_dir: &DataDir,
    owner: Option<&crate::users::Account>,
) -> Result<(crate::secret::SecretString, String), String> {
    use crate::broker::auth::api_key;
    let path = data_dir.state().join("dev_api_key");
    let key = match std::fs::read_to_string(&path) {
        Ok(k) if api_key::key_id(k.trim()).is_some() => crate::secret::SecretString::new(k.trim().to_owned()),
        _ => {
            let (k, _) = api_key::generate()?;
            if !data_dir.temporary {
                crate::broker::datadir::write_atomic(&path, k.expose().as_bytes())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if let Some(o) = owner {
                    std::os::unix::fs::chown(&path, Some(o.uid), Some(o.gid))
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            k
        }
    };
    let hash = api_key::fast_hash(key.expose()).ok_or("the dev key is not in ephyr's format")?;
    Ok((key, hash))
}

fn print_dev_banner(broker: &Broker, ca: &str, key: Option<&crate::secret::SecretString>) {
    let url = format!("{}://{}/mcp", broker.scheme(), broker.listen);
    let where_ = if broker.data_dir.temporary {
        format!("temporary data dir {} (removed on exit)", broker.data_dir.root.display())
    } else {
        format!("data dir {}", broker.data_dir.root.display())
    };
    let socket = broker.socket.display();
    let (key_line, key) = match key {
        Some(k) => (format!("{}   (agent \"dev\")", k.expose()), k.expose().to_owned()),
        None => (
            "the keys of your policy's agents (`ephyr keygen agent NAME` makes one)".to_owned(),
            "<API key>".to_owned(),
        ),
    };
    let policy = match &broker.policy_source {
        super::PolicySource::File(p) => format!("{}", p.display()),
        super::PolicySource::BuiltinDev { .. } => {
            "built in (target localhost = 127.0.0.1:22, roles read/op as users ephyr-read/ephyr-op)".to_owned()
        }
    };
    let snippet = serde_json::json!({
        "mcpServers": { "ephyr": { "type": "http", "url": url, "headers": { "Authorization": format!("Bearer {key}") } } }
    });
    println!(
        "\nephyr {} dev broker is running ({where_})\n\n  MCP endpoint:   {url}\n  API key:        {key_line}\n  Policy:         {policy}\n  Health:         {}://{}/healthz\n  Local CLI:      export EPHYR_SOCKET={socket}   (then: ephyr status, ephyr exec, ephyr policy reload)\n  CA public key (put this line in TrustedUserCAKeys on your targets):\n    {ca}\n\nConnect Claude Code:\n  claude mcp add --transport http ephyr {url} --header \"Authorization: Bearer {key}\"\n\nOr paste into a JSON configuration (Claude Code's .mcp.json, Cursor's mcp.json):\n{}\n\nA first working exec:\n  ephyr demo          every step on this machine, with a throwaway sshd on loopback (seconds)\n  a real host:        put it in a policy as a target, then `ephyr target setup-script`\n                      prints what to run on it (docs/target-setup.md); the built-in policy's\n                      users ephyr-read/ephyr-op do not exist on 127.0.0.1 until you do that\n\nOther clients (Claude Desktop, SDKs): docs/mcp-clients.md\nStop with Ctrl-C.\n",
        env!("CARGO_PKG_VERSION"),
        broker.scheme(),
        broker.listen,
        serde_json::to_string_pretty(&snippet).unwrap_or_default()
    );
}
