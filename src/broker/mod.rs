//! The broker: everything except key custody, on one single-threaded executor whose thread also
//! drives the I/O reactor.
//!
//! Entry point: [`serve::run`]. What runs where is documented per module: `serve` (start-up,
//! signals, shutdown), `signer_client` (the signer processes), `http` (listeners and connections),
//! `routes` (the TCP endpoints), `local` (the Unix-socket API), `privileges` (the drop),
//! `blocking` (the bounded pool for blocking work), `reactor` (the event loop: epoll
//! registrations and `block_on`), `deadline` (request timeouts on the reactor's one wait), `datadir` (files), `policy` (configuration).

pub mod agents;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod blocking;
pub(crate) mod console;
pub mod datadir;
pub mod deadline;
pub(crate) mod dispatch;
pub(crate) mod error;
pub(crate) mod federation;
pub(crate) mod freeze;

pub(crate) mod http;
pub mod jose;
pub mod journal;
pub(crate) mod local;
pub(crate) mod maintenance;
pub mod metrics;
pub mod oauth;
pub(crate) mod ops;
pub mod policy;
pub mod ports;
pub(crate) mod privileges;
pub mod proxy;
pub(crate) mod rate;
pub mod reactor;
pub(crate) mod resources;
pub(crate) mod routes;
pub mod runs;
pub(crate) mod secrets;
pub mod serve;
pub mod signer_client;
pub mod ssh;
pub mod tasks;
pub(crate) mod textdiff;
pub mod tls;
pub(crate) mod tools;
pub(crate) mod upstream;

pub use error::Error;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

/// Where the policy comes from (re-read on every reload).
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// A file.
    File(PathBuf),
    /// The built-in dev policy, with the dev agent's API-key hash.
    BuiltinDev {
        /// PHC hash of the dev API key.
        dev_key_hash: String,
    },
}

impl PolicySource {
    /// Reads and validates the policy.
    pub fn load(&self) -> Result<policy::Policy, policy::PolicyError> {
        match self {
            PolicySource::File(p) => policy::load_file(p),
            PolicySource::BuiltinDev { dev_key_hash } => {
                let mut p = policy::Policy::parse(policy::DEV_POLICY, "built-in dev policy")?;
                if let Some(a) = p.agents.get_mut("dev") {
                    a.api_key_hash = Some(dev_key_hash.clone());
                }
                p.warnings.retain(|w| !w.contains("agents.dev: has neither"));
                Ok(p)
            }
        }
    }
}

/// Shared broker state, owned by the executor thread.
pub struct Broker {
    /// Where the policy comes from.
    pub policy_source: PolicySource,
    /// The signer.
    pub signer: signer_client::Signer,
    /// The current policy (swapped whole on reload).
    pub policy: policy::PolicyCell,
    /// When the broker started.
    pub started: Instant,
    /// Who the broker runs as.
    pub identity: privileges::Dropped,
    /// The data dir.
    pub data_dir: datadir::DataDir,
    /// MCP/API listener address.
    pub listen: SocketAddr,
    /// Dashboard listener address.
    pub dashboard_listen: SocketAddr,
    /// Local socket path.
    pub socket: PathBuf,
    /// Pool for blocking work.
    pub pool: blocking::BlockingPool,
    /// The audit trail.
    pub audit: Rc<audit::AuditLog>,
    /// Metrics.
    pub metrics: Rc<metrics::Metrics>,
    /// Authentication (API-key cache, failure limits).
    pub auth: auth::Authenticator,
    /// Requests per agent.
    pub agent_limits: rate::RateLimiter<String>,
    /// Task trees.
    pub tasks: Rc<tasks::TaskStore>,
    /// MCP sessions (session-era clients).
    pub sessions: http::mcp::Sessions,
    /// Change notifications for open MCP streams (policy reloads, shutdown).
    pub changes: http::mcp::ChangeFeed,
    /// SSH: issued certificates, sessions, first-use host keys.
    pub ssh: ssh::Ssh,
    /// Upstream credentials (`env:`, `file:`, the sealed store).
    pub secrets: secrets::Secrets,
    /// The HTTP proxy (pooled upstream connections, TLS settings).
    pub proxy: proxy::Proxy,
    /// Connection caps on the TCP listeners.
    pub admission: Rc<http::admission::Admission>,
    /// What `tools/list` shows each caller.
    pub catalog: tools::Catalog,
    /// Remote MCP servers: their tools, sessions and health.
    pub federation: federation::Federation,
    /// Approval requests (actions that wait for an operator), journaled.
    pub approvals: approvals::Approvals,
    /// What operators froze (the kill switch), journaled.
    pub freezes: freeze::Freezes,
    /// The operator console's sessions, limiter and samples.
    pub console: console::Console,
    /// TLS on the TCP listeners (`None`: plain HTTP).
    pub tls: Option<Rc<tls::Tls>>,
    /// `ephyr run`: runs, their leases, budgets and usage, journaled.
    pub runs: runs::Runs,
    /// Disposable provider keys of runs, journaled.
    pub keys: runs::keys::Keys,
    /// The agent directory: lifecycle states, enrolled agents, use; journaled.
    pub agents: agents::Directory,
    /// The built-in OAuth authorization server's clients and grants; journaled.
    pub oauth: oauth::OAuth,
}

impl Broker {
    /// Whether a TCP listener binds a non-loopback address (it faces the network).
    pub fn exposed(&self) -> bool {
        !self.listen.ip().is_loopback() || !self.dashboard_listen.ip().is_loopback()
    }

    /// `https` when the listeners speak TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// What a policy asks that the running signer's limits (fixed when it started, from the policy
/// of that moment) will not give: each a warning with what happens and how to fix it.
pub fn signer_mismatches(p: &policy::Policy, limits: &crate::signer::protocol::SignerLimits) -> Vec<String> {
    let mut out = Vec::new();
    let allowed: std::collections::BTreeSet<&String> = limits.principals.iter().collect();
    for pr in p.signer_principals().iter().filter(|pr| !allowed.contains(pr)) {
        out.push(format!(
            "principal {pr:?} is not on the signer's allow-list (fixed at start): certificates for it are refused until ephyr restarts"
        ));
    }
    for (name, t) in signer_client::sealed_targets(p) {
        let line = format!("{name} {}", t.digest());
        if limits.sealed.contains(&line) {
            continue;
        }
        out.push(if limits.sealed.iter().any(|l| l.split(' ').next() == Some(name.as_str())) {
            format!(
                "target {name:?} verifies commands on the host and its roles or command policy changed: the signer signs its commands under the policy it started with until ephyr restarts"
            )
        } else {
            format!(
                "target {name:?} verifies commands on the host, but the signer was started without it: every command there is refused until ephyr restarts"
            )
        });
    }
    let cap = std::time::Duration::from_secs(u64::from(limits.max_cert_ttl_secs));
    let mut ttls = vec![("limits.cert_ttl_max".to_owned(), p.limits.cert_ttl_max)];
    for (name, t) in &p.targets {
        ttls.push((format!("targets.{name}.cert_ttl_max"), t.cert_ttl_max));
    }
    for (at, ttl) in ttls.into_iter().filter(|(_, t)| *t > cap) {
        out.push(format!(
            "{at} is {}, above the running signer's certificate cap of {} (fixed at start): certificates are shortened to {} until ephyr restarts",
            crate::time::format_duration(ttl),
            crate::time::format_duration(cap),
            crate::time::format_duration(cap)
        ));
    }
    let r = p.limits.signer_rate;
    if u64::from(r.count) * u64::from(limits.rate_window_secs) > u64::from(limits.rate_limit) * r.window.as_secs() {
        out.push(format!(
            "limits.signer_rate allows {} per {}, more than the running signer's {} per {}s (fixed at start): the signer refuses beyond its own rate until ephyr restarts",
            r.count,
            crate::time::format_duration(r.window),
            limits.rate_limit,
            limits.rate_window_secs
        ));
    }
    out
}

impl Broker {
    /// Counts one request against the agent's `rate_limit`; `Err` says how long to wait.
    pub fn take_request(&self, policy: &policy::Policy, agent: &str, now: Instant) -> Result<(), std::time::Duration> {
        match policy.agents.get(agent) {
            Some(a) => self.agent_limits.take(&a.name, a.rate_limit, now),
            None => Ok(()),
        }
    }

    /// The current policy. Callers hold the `Rc` for the whole request, so a reload in between
    /// never mixes two policies in one decision.
    pub fn policy(&self) -> Rc<policy::Policy> {
        self.policy.snapshot()
    }
}
