//! Policy: the typed, validated, indexed form of `policy.yaml`, and the one decision function.
//!
//! Pure: parsing, validation and [`authorize`] take values and return values; only [`load_file`]
//! reads a file. `file` holds the serde (YAML-shaped) types, which [`validate`] turns into a
//! [`Policy`]; nothing else sees the raw form. Every problem is reported with `file:line:column`,
//! the key path, and a hint; all problems are listed, not just the first.
//!
//! The schema, with every key and default, is documented in docs/policy.md and as a JSON Schema in
//! docs/policy.schema.json.

pub mod approval;
pub(crate) mod authorize;
pub(crate) mod diff;
pub mod file;
pub(crate) mod key_hash;
pub(crate) mod locate;
pub(crate) mod network;
pub(crate) mod pattern;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

pub use authorize::{
    Action, ActionKind, Arguments, Decision, Denial, DenyCode, Grant, Principal, Rule, TaskOp, authorize,
};

use crate::macaroon::envelope::ArgRule;
use network::NetworkPolicy;
use pattern::{NamePattern, PathPattern};

/// Whether `s` can name a service, remote, target, role or stored secret: 1-64 of
/// `[A-Za-z0-9_.-]` (never a `/`, so a name is also a safe file name).
pub fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// HTTP methods a service or grant may name.
pub const HTTP_METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"];

/// The built-in development policy used by `ephyr serve --dev`.
pub const DEV_POLICY: &str = include_str!("../../../policies/dev.yaml");

/// A rate: `count` per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per window.
    pub count: u32,
    /// Window length.
    pub window: Duration,
}

/// The shape of the proxy's own error answers and stream-ending events for a service, so that
/// the provider's SDK shows the agent the reason (`services.<name>.errors`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorStyle {
    /// `{"error": code, "message": text}`.
    #[default]
    Plain,
    /// OpenAI's `{"error": {"message", "type", "code"}}` (also OpenAI-compatible servers).
    OpenAi,
    /// Anthropic's `{"type": "error", "error": {"type", "message"}}`.
    Anthropic,
}

impl ErrorStyle {
    /// From the policy value.
    pub fn parse(s: &str) -> Option<ErrorStyle> {
        match s {
            "plain" => Some(ErrorStyle::Plain),
            "openai" => Some(ErrorStyle::OpenAi),
            "anthropic" => Some(ErrorStyle::Anthropic),
            _ => None,
        }
    }

    /// The default for a service at `host`: the two providers' API hosts get their shape.
    pub fn for_host(host: &str) -> ErrorStyle {
        match host {
            "api.openai.com" => ErrorStyle::OpenAi,
            "api.anthropic.com" => ErrorStyle::Anthropic,
            _ => ErrorStyle::Plain,
        }
    }
}

/// Global limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Certificate TTL when a request names none.
    pub cert_ttl_default: Duration,
    /// Longest certificate (also the signer's cap).
    pub cert_ttl_max: Duration,
    /// Live certificates per agent (default for agents that set none).
    pub max_certs_per_agent: u32,
    /// Live certificates in total.
    pub max_certs_total: u32,
    /// Requests per agent (default for agents that set none).
    pub requests_per_agent: Rate,
    /// Certificates the signer signs per window.
    pub signer_rate: Rate,
    /// Longest task.
    pub task_ttl_max: Duration,
    /// Task TTL when a request names none.
    pub task_ttl_default: Duration,
    /// Deepest delegation chain.
    pub delegation_depth_max: u8,
    /// How long an unbound delegated task may wait for `task_bind`.
    pub bind_deadline: Duration,
    /// Every target must pin a host key or a host CA.
    pub host_key_strict: bool,
    /// Most bytes of SSH command recordings kept.
    pub recordings_max_size: u64,
    /// Most SSH command recordings kept.
    pub recordings_max_files: u32,
    /// Largest file the file tools read or write, in bytes.
    pub file_max_size: u64,
    /// A session unused this long is closed.
    pub session_idle: Duration,
    /// A session is closed this long after it opened (`None`: no absolute limit beyond its
    /// certificate's for shell and terminal sessions).
    pub session_max: Option<Duration>,
    /// Bytes of output returned (and recorded) per stream per command, or per terminal call.
    pub output_max: usize,
}

/// sudo rights of a role (used only by `ephyr target setup-script`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sudo {
    /// None.
    None,
    /// Everything.
    All,
    /// Only these command patterns.
    Commands(Vec<String>),
}

/// A role: a remote user on targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// The Unix user certificates name.
    pub principal: String,
    /// Free text.
    pub description: String,
    /// Login shell for the setup script.
    pub shell: Option<String>,
    /// sudo rights for the setup script.
    pub sudo: Sudo,
    /// System account (setup script).
    pub system: bool,
    /// The role's command policy on every target, if any.
    pub commands: Option<crate::command::CommandPolicy>,
}

/// How a target's host key is checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostKeyPin {
    /// Pinned key (OpenSSH public key line).
    pub key: Option<String>,
    /// Pinned SHA-256 fingerprint (`SHA256:...`).
    pub fingerprint: Option<String>,
    /// Host CA (OpenSSH public key line).
    pub ca: Option<String>,
}

impl HostKeyPin {
    /// Whether anything is pinned.
    pub fn is_set(&self) -> bool {
        self.key.is_some() || self.fingerprint.is_some() || self.ca.is_some()
    }
}

/// An SSH target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Free text.
    pub description: String,
    /// Roles usable here.
    pub allowed_roles: BTreeSet<String>,
    /// Host key checking.
    pub host_key: HostKeyPin,
    /// Certificate TTL when a request names none.
    pub cert_ttl_default: Duration,
    /// Longest certificate.
    pub cert_ttl_max: Duration,
    /// `force-command` on every certificate.
    pub force_command: Option<String>,
    /// `source-address` on every certificate.
    pub source_address: Option<String>,
    /// Certificate extensions.
    pub extensions: Vec<String>,
    /// Served at all.
    pub enabled: bool,
    /// The command policy (`commands:` and the legacy `command_allow`/`command_deny`), if any.
    pub commands: Option<crate::command::CommandPolicy>,
    /// The target verifies every command itself (`verify_on_target`).
    pub verify_on_target: Option<OnTarget>,
    /// Where the file tools may go (`files:`); `None`: see [`Target::file_access`].
    pub files: Option<FileAccess>,
}

/// A target's `files:`: paths the file tools may read (and list) and write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileAccess {
    /// Readable (a writable path is readable too).
    pub read: Vec<PathPattern>,
    /// Writable.
    pub write: Vec<PathPattern>,
}

impl Target {
    /// Whether the file tools may read (`write` = false) or write anything here as a role whose
    /// command policy is restricted (`role_restricted`) or not; see [`Target::file_access`].
    pub fn files_possible(&self, role_restricted: bool, write: bool) -> bool {
        match &self.files {
            Some(f) => !f.write.is_empty() || (!write && !f.read.is_empty()),
            None => {
                !(self.commands.is_some()
                    || role_restricted
                    || self.verify_on_target.is_some()
                    || self.force_command.is_some())
            }
        }
    }

    /// Whether the file tools may read (`write` = false) or write the resolved absolute `path`
    /// as `role` (whose command policy is `role_commands`); `Err` says why not. Without `files:`
    /// they may go anywhere the role can, unless the target or the role restricts commands, or
    /// the target has a forced command: then an SFTP channel would be a way around that, so
    /// there are no file tools until `files:` says where.
    pub fn file_access(&self, role_restricted: bool, path: &str, write: bool) -> Result<(), String> {
        let verb = if write { "write" } else { "read" };
        let Some(files) = &self.files else {
            if self.files_possible(role_restricted, write) {
                return Ok(());
            }
            return Err(format!(
                "the target or the role restricts commands and the target has no `files:` section, so the file tools are off there (they would bypass the command policy); list the paths they may {verb} under targets.<name>.files"
            ));
        };
        let read = files.read.iter().chain(&files.write);
        let fits =
            if write { files.write.iter().any(|p| p.matches(path)) } else { read.clone().any(|p| p.matches(path)) };
        if fits {
            return Ok(());
        }
        let listed: Vec<String> = if write {
            files.write.iter().map(ToString::to_string).collect()
        } else {
            read.map(ToString::to_string).collect()
        };
        Err(format!(
            "{path} is not under the paths files.{verb} allows ({})",
            if listed.is_empty() { "none".to_owned() } else { listed.join(", ") }
        ))
    }
}

/// How a `verify_on_target` target runs the verifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnTarget {
    /// The `ephyr` binary on the target.
    pub path: String,
    /// The user CA's public key file on the target.
    pub ca: String,
}

impl OnTarget {
    /// The forced command of certificates (and of the target's sshd) for target `name`.
    pub fn force_command(&self, name: &str) -> String {
        format!("{} shim --target {name} --ca {}", self.path, self.ca)
    }
}

/// Where a secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretRef {
    /// An environment variable of the broker.
    Env(String),
    /// A file readable by the broker.
    File(String),
    /// The encrypted store (`ephyr secret set NAME`).
    Store(String),
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File(p) => write!(f, "file:{p}"),
            SecretRef::Store(n) => write!(f, "store:{n}"),
        }
    }
}

/// How a credential is injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// `Authorization: Bearer <secret>`.
    Bearer,
    /// `Authorization: Basic base64(user:secret)`.
    Basic {
        /// User name.
        username: String,
    },
    /// `<header>: <prefix><secret>`.
    Header {
        /// Header name.
        name: String,
        /// Text before the secret.
        prefix: String,
    },
    /// `?<param>=<secret>`.
    Query {
        /// Parameter name.
        param: String,
    },
}

/// A credential: how and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// How it is injected.
    pub kind: CredentialKind,
    /// Where the secret comes from (the value is never in the policy).
    pub secret: SecretRef,
}

/// TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tls {
    /// CA bundle file instead of the system roots.
    pub ca_file: Option<String>,
    /// Client certificate file.
    pub client_cert: Option<String>,
    /// Client key.
    pub client_key: Option<SecretRef>,
    /// SHA-256 of the one server certificate trusted (instead of CAs and the name check).
    pub fingerprint: Option<[u8; 32]>,
}

/// An absolute http(s) URL, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or IP literal (no brackets).
    pub host: String,
    /// Port (scheme default when absent).
    pub port: u16,
    /// Base path (no trailing `/`, `""` for the root).
    pub base_path: String,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{}://{host}:{}{}", self.scheme, self.port, self.base_path)
    }
}

/// An HTTP service the broker proxies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Base URL.
    pub url: UpstreamUrl,
    /// Free text.
    pub description: String,
    /// Credential injection.
    pub credential: Option<Credential>,
    /// Hosts requests and the credential may go to: exact names (lower case), `*.suffix`, or
    /// `*` (only for a service without a credential). Always includes the URL's own host.
    pub allowed_hosts: BTreeSet<String>,
    /// Methods allowed (`None` = all).
    pub methods: Option<BTreeSet<String>>,
    /// Path patterns allowed (`None` = all).
    pub paths: Option<Vec<PathPattern>>,
    /// Static headers.
    pub headers: Vec<(String, String)>,
    /// TLS settings.
    pub tls: Tls,
    /// The whole exchange, response body included.
    pub timeout: Duration,
    /// TCP connect and TLS handshake.
    pub connect_timeout: Duration,
    /// Until the response headers arrive, and between body chunks.
    pub read_timeout: Duration,
    /// Largest response body.
    pub max_response: u64,
    /// Largest request body.
    pub max_request: u64,
    /// The shape of the proxy's own errors on `/v1/proxy/<service>/`.
    pub errors: ErrorStyle,
    /// Served at all.
    pub enabled: bool,
    /// Disposable per-run keys from the provider's admin API.
    pub mint: Option<Mint>,
}

/// Where a service's disposable keys come from (`services.<name>.mint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mint {
    /// The provider's admin API.
    pub provider: MintProvider,
    /// The admin key.
    pub admin_key: SecretRef,
    /// The project keys are made in.
    pub project: String,
    /// The keys' scopes (empty: the provider's default for a project member).
    pub scopes: Vec<String>,
    /// The admin API's base URL.
    pub url: UpstreamUrl,
}

/// Providers that can mint keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MintProvider {
    /// OpenAI: a project service account per key (its key expires server-side).
    OpenAi,
}

/// `runs.<name>`: what `ephyr run HOST` starts from (docs/runs.md).
#[derive(Clone, Debug, PartialEq)]
pub struct RunTemplate {
    /// Its name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Agents that may use it (empty: every agent).
    pub agents: BTreeSet<String>,
    /// The SSH role runs connect as.
    pub role: String,
    /// Longest run.
    pub ttl: Duration,
    /// How long a run outlives its CLI's last renewal.
    pub lease: Duration,
    /// The run task's envelope, as `task_create` takes it (a JSON object).
    pub envelope: serde_json::Value,
    /// Limits on proxied traffic.
    pub budget: Budget,
    /// Services that get a disposable key per run.
    pub keys: Vec<String>,
    /// The broker's base URL as the host reaches it.
    pub broker_url: Option<String>,
}

/// A run's limits on proxied traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Requests.
    pub requests: Option<u64>,
    /// LLM tokens (input + output).
    pub tokens: Option<u64>,
}

impl Service {
    /// Whether a request (and the credential) may go to `host` (lower case): the URL's host, a
    /// listed name, a `*.suffix` pattern (a proper subdomain), or `*`.
    pub fn host_allowed(&self, host: &str) -> bool {
        host_specificity(&self.allowed_hosts, host).is_some()
    }
}

/// How closely `patterns` name `host`: `None` if not at all; otherwise higher is more specific
/// (an exact name beats a longer suffix pattern, which beats a shorter one, which beats `*`).
pub fn host_specificity(patterns: &BTreeSet<String>, host: &str) -> Option<usize> {
    patterns
        .iter()
        .filter_map(|p| {
            if p == host {
                Some(usize::MAX)
            } else if p == "*" {
                Some(0)
            } else {
                let suffix = p.strip_prefix('*')?;
                (host.len() > suffix.len() && host.ends_with(suffix)).then_some(suffix.len())
            }
        })
        .max()
}

/// A federated MCP server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// How it is reached.
    pub transport: Transport,
    /// Free text.
    pub description: String,
    /// Credential injection.
    pub credential: Option<Credential>,
    /// Tools offered (`None` = all it lists).
    pub tools: Option<BTreeSet<String>>,
    /// Namespace of its tools.
    pub tool_prefix: String,
    /// TLS settings.
    pub tls: Tls,
    /// Per-call timeout.
    pub timeout: Duration,
    /// Served at all.
    pub enabled: bool,
    /// What a changed tool definition does.
    pub pin: PinMode,
    /// Static headers sent with every request (HTTP).
    pub headers: Vec<(String, String)>,
    /// Largest answer read, bytes (a stdio remote's largest message).
    pub max_response: usize,
    /// OAuth 2.1 towards the remote (`federation::auth`), if it is protected by it.
    pub oauth: Option<RemoteOAuth>,
}

/// `remotes.<name>.oauth`: how the broker signs in to a remote protected by OAuth 2.1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteOAuth {
    /// A pre-registered client id (else a client ID metadata document, else registration).
    pub client_id: Option<String>,
    /// The pre-registered client's secret.
    pub client_secret: Option<SecretRef>,
    /// The URL of the broker's client ID metadata document, when the operator publishes one.
    pub client_id_url: Option<String>,
    /// The redirect URI the authorization server sends the browser back to.
    pub redirect_uri: String,
    /// Scopes asked for; `None`: from the remote's challenge or metadata.
    pub scopes: Option<Vec<String>>,
    /// One sign-in per agent (calls carry the calling agent's token).
    pub per_agent: bool,
}

/// The redirect URI a remote's sign-in uses when the policy names none: the broker's callback
/// under its OAuth issuer when one is set, else a loopback address whose final URL the operator
/// pastes back (`ephyr remote login`).
pub const LOOPBACK_REDIRECT: &str = "http://127.0.0.1/ephyr/oauth/callback";

/// How a remote is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Streamable HTTP at this endpoint.
    Http(UpstreamUrl),
    /// A command the broker starts, confined, speaking MCP on its standard input and output.
    Stdio(Box<StdioCommand>),
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Http(u) => u.fmt(f),
            Transport::Stdio(c) => write!(f, "stdio: {}", c.argv.join(" ")),
        }
    }
}

/// A stdio remote's command and its confinement (`remotes.<name>.command` and `sandbox`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StdioCommand {
    /// Program and arguments (the program is looked up on the configured `PATH`).
    pub argv: Vec<String>,
    /// The whole environment besides `PATH`: only these variables...
    pub env: BTreeMap<String, String>,
    /// ...and these, resolved from the secret references when the command starts.
    pub secret_env: BTreeMap<String, SecretRef>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// Paths it may read and execute (besides the system's libraries and programs).
    pub read: Vec<String>,
    /// Paths it may read, write, create and remove under.
    pub write: Vec<String>,
    /// Whether it may open network sockets (IPv4 and IPv6).
    pub network: bool,
    /// Largest data segment in bytes (`RLIMIT_DATA`).
    pub memory: u64,
    /// Most open descriptors (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// Most processes and threads of its user (`RLIMIT_NPROC`).
    pub processes: u64,
}

/// Tool pinning for a remote (`remotes.<name>.pin`): what happens when a tool's definition
/// differs from the one recorded when it was first seen (or last approved).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PinMode {
    /// Quarantined (not listed, not callable) until an operator approves it.
    #[default]
    Strict,
    /// Served, with a warning in the log and the audit trail.
    Warn,
    /// Not recorded, not checked.
    Off,
}

/// Dashboard access levels, ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DashboardLevel {
    /// No access.
    None,
    /// Read-only.
    Viewer,
    /// Can revoke, toggle.
    Operator,
    /// Everything.
    Admin,
}

impl DashboardLevel {
    /// Parses `none|viewer|operator|admin`.
    pub fn parse(s: &str) -> Option<DashboardLevel> {
        Some(match s {
            "none" => DashboardLevel::None,
            "viewer" => DashboardLevel::Viewer,
            "operator" => DashboardLevel::Operator,
            "admin" => DashboardLevel::Admin,
            _ => return None,
        })
    }

    /// The name.
    pub fn as_str(self) -> &'static str {
        match self {
            DashboardLevel::None => "none",
            DashboardLevel::Viewer => "viewer",
            DashboardLevel::Operator => "operator",
            DashboardLevel::Admin => "admin",
        }
    }
}

/// One grant and where it was written (for `policy explain` and audit).
#[derive(Clone, Debug, PartialEq)]
pub struct GrantEntry<T> {
    /// Names it covers.
    pub pattern: NamePattern,
    /// What it grants.
    pub value: T,
    /// Where: `agents.claude.ssh.web` or `templates.readonly.ssh.*`.
    pub source: String,
}

/// Grants by name, most specific first (exact names, then longer patterns, then `*`).
#[derive(Clone, Debug, PartialEq)]
pub struct Grants<T> {
    entries: Vec<GrantEntry<T>>,
    exact: BTreeMap<String, usize>,
}

impl<T> Default for Grants<T> {
    fn default() -> Self {
        Grants { entries: Vec::new(), exact: BTreeMap::new() }
    }
}

impl<T> Grants<T> {
    /// The grant for `name`: an exact entry if there is one (even an empty one: it shadows
    /// patterns), else the most specific matching pattern.
    pub fn lookup(&self, name: &str) -> Option<&GrantEntry<T>> {
        if let Some(&i) = self.exact.get(name) {
            return Some(&self.entries[i]);
        }
        self.entries.iter().find(|e| e.pattern.is_wildcard() && e.pattern.matches(name))
    }

    /// All entries, most specific first.
    pub fn entries(&self) -> &[GrantEntry<T>] {
        &self.entries
    }

    /// Adds an entry unless one with the same pattern exists (the first definition wins).
    fn add(&mut self, entry: GrantEntry<T>) {
        if self.entries.iter().any(|e| e.pattern == entry.pattern) {
            return;
        }
        self.entries.push(entry);
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.pattern.specificity()));
        self.exact.clear();
        for (i, e) in self.entries.iter().enumerate() {
            if let NamePattern::Exact(n) = &e.pattern {
                self.exact.insert(n.clone(), i);
            }
        }
    }
}

/// What an agent may do on a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceGrant {
    /// Methods (`None` = all the service allows).
    pub methods: Option<BTreeSet<String>>,
    /// Path patterns (`None` = all the service allows).
    pub paths: Option<Vec<PathPattern>>,
}

/// What an agent may do on a remote.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteGrant {
    /// Tools or patterns of them (`*` any run, `?` one character; `None` = all it offers).
    pub tools: Option<BTreeSet<String>>,
    /// Tool patterns refused even if `tools` covers them.
    pub deny_tools: Vec<String>,
    /// Argument constraints on every tool of the grant.
    pub args: BTreeMap<String, ArgRule>,
    /// Argument constraints of one tool.
    pub tool_args: BTreeMap<String, BTreeMap<String, ArgRule>>,
    /// Resource URI patterns (`*` any run, `?` one character) of the remote's own URIs.
    pub resources: Vec<String>,
    /// Prompt names (`*` = all).
    pub prompts: BTreeSet<String>,
}

/// An agent, with templates already merged.
#[derive(Clone, Debug, PartialEq)]
pub struct Agent {
    /// Its name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Argon2id PHC string of its API key.
    pub api_key_hash: Option<String>,
    /// Local uid for the Unix socket.
    pub uid: Option<u32>,
    /// SSH: target → roles.
    pub ssh: Grants<BTreeSet<String>>,
    /// HTTP services.
    pub services: Grants<ServiceGrant>,
    /// Remote MCP servers.
    pub remotes: Grants<RemoteGrant>,
    /// Dashboard level.
    pub dashboard: DashboardLevel,
    /// May delegate.
    pub can_delegate: bool,
    /// Deepest delegation below its root tasks.
    pub max_delegation_depth: u8,
    /// Longest task.
    pub max_task_ttl: Duration,
    /// Tasks must be bound to a holder key.
    pub require_pop: bool,
    /// Live certificates.
    pub max_concurrent_certs: u32,
    /// Requests per window.
    pub rate_limit: Rate,
    /// Served at all.
    pub enabled: bool,
    /// Where it stands in its lifecycle (`agents` directory; `Active` for a policy agent nobody
    /// has changed). Checked on every use of every credential of the agent.
    pub state: crate::broker::agents::AgentState,
    /// Enrolled agents: the operator who owns it (policy agents: none).
    pub owner: Option<String>,
    /// Enrolled agents: the template that gives its grants (policy agents: none).
    pub template: Option<String>,
}

/// `templates.<name>.attest:` — what an agent enrolled from the template must prove at join,
/// and how often again (docs/agents.md "Attestation").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attestation {
    /// The cluster's service-account token signing keys (from `jwks_file`, read at load).
    pub keys: Vec<crate::broker::jose::Key>,
    /// The tokens' issuer.
    pub issuer: String,
    /// The audience the projected token was made for.
    pub audience: String,
    /// Namespaces accepted (empty: any).
    pub namespaces: Vec<String>,
    /// Service account names accepted (empty: any).
    pub service_accounts: Vec<String>,
    /// A fresh token is needed this often (`None`: only at join).
    pub every: Option<Duration>,
}

/// `oauth:` — the built-in OAuth 2.1 authorization server (docs/oauth.md). Present: enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthSettings {
    /// The issuer URL (`https://ephyr.lan:8554`); `None`: from the request's `Host`.
    pub issuer: Option<String>,
    /// The console's base URL for the consent page; `None`: the `Host` with the dashboard port.
    pub console_url: Option<String>,
    /// Lifetime of an access token (a task token).
    pub access_ttl: Duration,
    /// Lifetime of a grant's refresh tokens (from the consent).
    pub refresh_ttl: Duration,
    /// Dynamic client registration (RFC 7591) is open.
    pub registration: bool,
    /// Client ID metadata documents: the hosts whose HTTPS URLs may be client ids (exact, or
    /// `*.domain`); empty: off.
    pub client_id_domains: Vec<String>,
    /// A CA file to trust when fetching them (a homelab CA); `None`: the system's roots.
    pub client_id_ca_file: Option<String>,
}

/// `lifecycle:` — how enrolled agents come and go (docs/agents.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    /// How long a join token from `ephyr agent enroll` is valid when the operator names none.
    pub join_ttl: Duration,
    /// Longest join token.
    pub join_ttl_max: Duration,
    /// An active agent unused this long becomes idle.
    pub idle_after: Duration,
    /// An enrolled agent idle this long is decommissioned.
    pub decommission_after: Duration,
    /// A grant not exercised this long is reported as drift.
    pub drift_after: Duration,
    /// The background reaper carries out its plan (`false`: it only reports it).
    pub reaper_apply: bool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        Lifecycle {
            join_ttl: Duration::from_secs(15 * 60),
            join_ttl_max: Duration::from_secs(DAY),
            idle_after: Duration::from_secs(30 * DAY),
            decommission_after: Duration::from_secs(60 * DAY),
            drift_after: Duration::from_secs(30 * DAY),
            reaper_apply: false,
        }
    }
}

/// MCP endpoint settings (`mcp:`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McpSettings {
    /// Browser origins allowed besides loopback ones, normalised (`scheme://host:port`).
    pub allowed_origins: Vec<String>,
    /// Extra Host names accepted on a loopback listener.
    pub allowed_hosts: Vec<String>,
    /// Largest request body, bytes.
    pub max_request_size: usize,
    /// How long a verified API key is cached.
    pub auth_cache_ttl: Duration,
    /// Idle time after which a session ends.
    pub session_idle_timeout: Duration,
    /// Most live sessions.
    pub max_sessions: u32,
    /// Most open notification streams.
    pub max_streams: u32,
}

impl Default for McpSettings {
    fn default() -> Self {
        McpSettings {
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_request_size: 1 << 20,
            auth_cache_ttl: Duration::from_secs(60),
            session_idle_timeout: Duration::from_secs(30 * 60),
            max_sessions: 1000,
            max_streams: 64,
        }
    }
}

/// `scheme://host[:port]` with the default port made explicit and the host lower-cased, or
/// `None` if `s` is not an origin.
pub fn normalize_origin(s: &str) -> Option<String> {
    let uri: http::Uri = s.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let auth = uri.authority()?;
    if auth.as_str().contains('@') || uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return None;
    }
    let host = auth.host().to_ascii_lowercase();
    let port = auth.port_u16().unwrap_or(default_port);
    Some(format!("{scheme}://{host}:{port}"))
}

/// A validated policy. Built once per load and shared read-only (`Rc<Policy>`); a reload swaps
/// the whole value, so no reader ever sees a half-applied policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// The MCP endpoint.
    pub mcp: McpSettings,
    /// Global limits.
    pub limits: Limits,
    /// Roles by name.
    pub roles: BTreeMap<String, Role>,
    /// SSH targets by name.
    pub targets: BTreeMap<String, Target>,
    /// HTTP services by name.
    pub services: BTreeMap<String, Service>,
    /// Remote MCP servers by name.
    pub remotes: BTreeMap<String, Remote>,
    /// Destination network rules.
    pub network: NetworkPolicy,
    /// Agents by name.
    pub agents: BTreeMap<String, Agent>,
    /// Agent names by local uid.
    pub agents_by_uid: BTreeMap<u32, String>,
    /// Console accounts by name.
    pub operators: BTreeMap<String, Operator>,
    /// Actions that wait for an operator (`approvals:`).
    pub approvals: approval::Approvals,
    /// Templates for `ephyr run` (`runs:`).
    pub runs: BTreeMap<String, RunTemplate>,
    /// Agent templates (`templates:`), each merged alone into an agent with the defaults: what an
    /// enrolled agent of that template is granted.
    pub templates: BTreeMap<String, Agent>,
    /// How enrolled agents come and go (`lifecycle:`).
    pub lifecycle: Lifecycle,
    /// The built-in authorization server (`oauth:`; `None`: off).
    pub oauth: Option<OAuthSettings>,
    /// Attestation required of agents enrolled from a template, by template.
    pub attest: BTreeMap<String, Attestation>,
    /// Generation of the agent directory merged into `agents` (0: none); with `digest` it names
    /// the set of agents and keys this snapshot holds.
    pub directory: u64,
    /// What operators have frozen (the kill switch; not from the file: carried across reloads).
    pub frozen: Frozen,
    /// Non-fatal findings (Go-compatibility notes, agents with no grants, ...).
    pub warnings: Vec<String>,
    /// SHA-256 of the source text, hex (identifies a policy version in the audit log).
    pub digest: String,
    /// The source text as loaded (the console shows it, hashes redacted).
    pub text: String,
}

/// What can be frozen (`ephyr freeze KIND NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezeKind {
    /// An agent: every request it makes.
    Agent,
    /// A task tree (revoked; the mark records why).
    Task,
    /// An SSH target.
    Target,
    /// An HTTP service.
    Service,
    /// A remote MCP server.
    Remote,
}

impl FreezeKind {
    /// Every kind.
    pub const ALL: [FreezeKind; 5] =
        [FreezeKind::Agent, FreezeKind::Task, FreezeKind::Target, FreezeKind::Service, FreezeKind::Remote];

    /// The word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FreezeKind::Agent => "agent",
            FreezeKind::Task => "task",
            FreezeKind::Target => "target",
            FreezeKind::Service => "service",
            FreezeKind::Remote => "remote",
        }
    }

    /// From its word; an unknown one is refused with the words there are.
    pub fn parse(s: &str) -> Result<FreezeKind, String> {
        FreezeKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown kind {s:?}: agent, task, target, service or remote"))
    }
}

/// The frozen names, by kind: `authorize` refuses anything they cover before any grant counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frozen(std::collections::BTreeSet<(FreezeKind, String)>);

impl Frozen {
    /// Whether `name` of `kind` is frozen.
    pub fn has(&self, kind: FreezeKind, name: &str) -> bool {
        !self.0.is_empty() && self.0.iter().any(|(k, n)| *k == kind && n == name)
    }

    /// Adds or removes one; whether that changed anything.
    pub fn set(&mut self, kind: FreezeKind, name: &str, on: bool) -> bool {
        if on { self.0.insert((kind, name.to_owned())) } else { self.0.remove(&(kind, name.to_owned())) }
    }

    /// Every frozen `(kind, name)`.
    pub fn iter(&self) -> impl Iterator<Item = &(FreezeKind, String)> {
        self.0.iter()
    }

    /// Nothing frozen.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What an operator may do in the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OperatorRole {
    /// Sees every view; changes nothing.
    Viewer,
    /// Also revokes, closes, freezes, approves and reloads.
    Admin,
}

impl OperatorRole {
    /// The policy's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Viewer => "viewer",
            OperatorRole::Admin => "admin",
        }
    }
}

/// A console account (`operators.<name>`).
#[derive(Clone, PartialEq, Eq)]
pub struct Operator {
    /// Its name (audit records name it `console:<name>`).
    pub name: String,
    /// Argon2id PHC hash of its password.
    pub password_hash: String,
    /// What it may do.
    pub role: OperatorRole,
}

impl fmt::Debug for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Operator").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

/// One problem found while loading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `file:line:col` or `file`.
    pub at: String,
    /// Key path, e.g. `agents.claude.ssh.web.roles`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it, if we can say.
    pub hint: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.at)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Why a policy did not load: every problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// The problems, in file order where known.
    pub problems: Vec<Problem>,
    /// What would fail at request time (also when there are problems: one pass shows all).
    pub warnings: Vec<String>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            p.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

impl Policy {
    /// Parses and validates YAML text; `origin` names the source in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        validate::build(text, origin)
    }

    /// Every secret reference the policy names, with the service, remote or notifier that uses it.
    pub fn secret_refs(&self) -> Vec<(&String, &SecretRef)> {
        self.services
            .iter()
            .flat_map(|(n, s)| {
                let cred = s.credential.as_ref().map(|c| (n, &c.secret));
                cred.into_iter().chain(s.tls.client_key.as_ref().map(|k| (n, k)))
            })
            .chain(self.remotes.iter().filter_map(|(n, r)| r.credential.as_ref().map(|c| (n, &c.secret))))
            .chain(self.remotes.iter().flat_map(|(n, r)| match &r.transport {
                Transport::Stdio(c) => c.secret_env.values().map(|s| (n, s)).collect(),
                Transport::Http(_) => Vec::new(),
            }))
            .chain(self.approvals.notify.iter().filter_map(|(n, x)| x.token.as_ref().map(|t| (n, t))))
            .collect()
    }

    /// The sealed-store secrets (`store:NAME`) the policy uses, each with the services and
    /// remotes that use it.
    pub fn store_refs(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let refs = self.secret_refs();
        for (user, r) in refs {
            if let SecretRef::Store(name) = r {
                out.entry(name.clone()).or_default().push(user.clone());
            }
        }
        out
    }

    /// Every principal any role uses that some target allows: the signer's allow-list.
    pub fn signer_principals(&self) -> BTreeSet<String> {
        let used: BTreeSet<&String> = self.targets.values().flat_map(|t| t.allowed_roles.iter()).collect();
        self.roles.iter().filter(|(name, _)| used.contains(name)).map(|(_, r)| r.principal.clone()).collect()
    }

    /// The agent mapped to a local uid.
    pub fn agent_for_uid(&self, uid: u32) -> Option<&Agent> {
        self.agents_by_uid.get(&uid).and_then(|n| self.agents.get(n))
    }
}

/// The current policy, swapped whole. Readers take a snapshot (`Rc<Policy>`) and use only that
/// for a whole request, so a reload between two of their steps can never mix versions.
#[derive(Debug)]
pub struct PolicyCell(std::cell::RefCell<std::rc::Rc<Policy>>);

impl PolicyCell {
    /// A cell holding `p`.
    pub fn new(p: Policy) -> Self {
        PolicyCell(std::cell::RefCell::new(std::rc::Rc::new(p)))
    }

    /// The current policy.
    pub fn snapshot(&self) -> std::rc::Rc<Policy> {
        self.0.borrow().clone()
    }

    /// Replaces the policy in one step.
    pub fn replace(&self, p: Policy) {
        *self.0.borrow_mut() = std::rc::Rc::new(p);
    }
}

/// Reads and parses a policy file.
pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        problems: vec![Problem {
            at: path.display().to_string(),
            path: String::new(),
            message: e.to_string(),
            hint: None,
        }],
        warnings: Vec::new(),
    })?;
    Policy::parse(&text, &path.display().to_string())
}
