//! The policy file as YAML shapes it (serde). Nothing outside `policy` sees these types: they are
//! validated into [`super::Policy`].
//!
//! The schema is a superset of the Go Ephyr policy (`roles`, `targets.*.allowed_roles`,
//! `agents.*.ssh/services/remotes`, `templates`, `inherits`, `global`), so an Ephyr file loads or
//! gets a precise message for each key we treat differently (see `validate`).

use std::collections::BTreeMap;

use serde::Deserialize;

/// `limits:` (ours) — also reachable through Go's `global:` keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Certificate TTL when a request names none (`5m`).
    pub cert_ttl_default: Option<String>,
    /// Longest certificate validity, also the signer's cap (`30m`).
    pub cert_ttl_max: Option<String>,
    /// Live certificates per agent.
    pub max_certs_per_agent: Option<u32>,
    /// Live certificates in total.
    pub max_certs_total: Option<u32>,
    /// Requests per agent and window (`600/1m`).
    pub requests_per_agent: Option<String>,
    /// Certificates the signer signs per window (`600/1m`).
    pub signer_rate: Option<String>,
    /// Longest task lifetime.
    pub task_ttl_max: Option<String>,
    /// Task lifetime when a request names none.
    pub task_ttl_default: Option<String>,
    /// Deepest delegation chain (levels below a root task).
    pub delegation_depth_max: Option<u8>,
    /// How long an unbound delegated task may wait for `task_bind`.
    pub bind_deadline: Option<String>,
    /// Every target must pin a host key or a host CA.
    pub host_key_strict: Option<bool>,
    /// Most bytes of SSH command recordings kept (`256MiB`); the oldest go first.
    pub recordings_max_size: Option<String>,
    /// Most SSH command recordings kept.
    pub recordings_max_files: Option<u32>,
    /// Largest file the file tools read or write (`1MiB`).
    pub file_max_size: Option<String>,
    /// A session with nothing sent for this long is closed (`5m`).
    pub session_idle: Option<String>,
    /// A session is closed this long after it was opened, whatever it does (default: none; a
    /// shell or terminal session ends with its certificate anyway).
    pub session_max: Option<String>,
    /// Bytes of a command's stdout and of its stderr returned and recorded, each; of a terminal's
    /// output per `session_input` (`1MiB`).
    pub output_max: Option<String>,
}

/// Go Ephyr's `global:` section (compatibility).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalFile {
    /// → `limits.max_certs_total`.
    pub max_active_certs: Option<u32>,
    /// → `limits.cert_ttl_default`.
    pub default_ttl: Option<String>,
    /// → `limits.cert_ttl_max`.
    pub max_ttl: Option<String>,
    /// → `limits.requests_per_agent`.
    pub rate_limit: Option<GoRateLimit>,
    /// → `limits.host_key_strict`.
    pub host_key_strict: Option<bool>,
}

/// Go's `global.rate_limit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoRateLimit {
    /// Requests per window.
    pub requests_per_window: i64,
    /// Window in seconds.
    pub window_seconds: i64,
}

/// `operators.<name>:` — a person who signs in to the console.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorFile {
    /// Argon2id PHC hash of the password (`ephyr operator add NAME`).
    pub password_hash: String,
    /// `viewer` (default) or `admin`.
    pub role: Option<String>,
    /// Free text.
    pub description: Option<String>,
}

/// `roles.<name>:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleFile {
    /// Remote Unix user the certificate names.
    pub principal: String,
    /// Free text.
    pub description: Option<String>,
    /// Login shell for `ephyr target setup-script` (absolute path).
    pub shell: Option<String>,
    /// sudo rights for the setup script: `true` or a list of command patterns.
    pub sudo: Option<SudoFile>,
    /// Create it as a system account (setup script).
    pub system: Option<bool>,
    /// The command policy for this role on every target (both the target's and the role's apply).
    pub commands: Option<crate::command::CommandsFile>,
}

/// `roles.<name>.sudo`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SudoFile {
    /// All or nothing.
    All(bool),
    /// Only these commands.
    Commands(Vec<String>),
}

/// `targets.<name>:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// Host name or IP.
    pub host: String,
    /// SSH port (default 22).
    pub port: Option<u32>,
    /// Free text.
    pub description: Option<String>,
    /// Display only (Go).
    pub vlan: Option<serde_yaml_ng::Value>,
    /// Roles usable on this target (names from `roles:`).
    #[serde(default)]
    pub allowed_roles: Vec<String>,
    /// Pinned host key (`ssh-ed25519 AAAA...`).
    pub host_key: Option<String>,
    /// Pinned host key fingerprint (`SHA256:...`).
    pub host_key_fingerprint: Option<String>,
    /// A host CA whose host certificates are accepted (`ssh-ed25519 AAAA...`).
    pub host_ca: Option<String>,
    /// Longest certificate for this target (Go name).
    pub max_ttl: Option<String>,
    /// Longest certificate for this target.
    pub cert_ttl_max: Option<String>,
    /// Certificate TTL when a request names none.
    pub cert_ttl_default: Option<String>,
    /// `force-command` critical option on every certificate for this target.
    pub force_command: Option<String>,
    /// `source-address` critical option (comma-separated CIDRs).
    pub source_address: Option<String>,
    /// Certificate extensions (default: `permit-pty`).
    pub extensions: Option<Vec<String>>,
    /// Serve this target (default true).
    pub enabled: Option<bool>,
    /// Go: enable the command filter (ours: implied by `command_allow`/`command_deny`).
    pub command_filter: Option<bool>,
    /// Legacy: whole-command globs a simple command must match one of (see `commands`).
    pub command_allow: Option<Vec<String>>,
    /// Legacy: whole-command globs, each simple command must match one (see `commands`).
    pub command_deny: Option<Vec<String>>,
    /// The command policy, checked on the command's shell syntax tree.
    pub commands: Option<crate::command::CommandsFile>,
    /// The target runs only commands the signer signed (`ephyr shim` as the forced command).
    pub verify_on_target: Option<bool>,
    /// Where the file tools may read and write (SFTP).
    pub files: Option<FilesFile>,
    /// Where the `ephyr` binary is on the target (default `/usr/local/bin/ephyr`).
    pub shim_path: Option<String>,
    /// The user CA's public key on the target (default `/etc/ssh/ephyr_ca.pub`).
    pub shim_ca: Option<String>,
    /// Go: disable the agent after a denied command (not supported).
    pub auto_revoke_on_deny: Option<bool>,
    /// Go: pending-approval flow (only `true`, i.e. no approval, is supported).
    pub auto_approve: Option<bool>,
}

/// A reference to a secret as written: `env:NAME`, `file:/path` or `store:NAME`.
pub type SecretText = String;

/// How a credential is injected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    /// `bearer`, `basic`, `header` or `query`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Where the secret comes from.
    pub secret: SecretText,
    /// Header name (`header`, default `Authorization`).
    pub header: Option<String>,
    /// Prefix before the secret in the header (`header`), e.g. `Token `.
    pub prefix: Option<String>,
    /// Query parameter (`query`, default `token`).
    pub param: Option<String>,
    /// User name (`basic`).
    pub username: Option<String>,
}

/// TLS settings of an upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM file of CA certificates to trust instead of the system roots.
    pub ca_file: Option<String>,
    /// PEM client certificate (mutual TLS).
    pub client_cert: Option<String>,
    /// PEM client key (mutual TLS); a secret reference.
    pub client_key: Option<SecretText>,
    /// `SHA256:<64 hex digits>` (or base64) of the server's certificate: trusted alone.
    pub fingerprint: Option<String>,
}

/// `services.<name>:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// Base URL (`https://api.openai.com`).
    pub url: String,
    /// Free text.
    pub description: Option<String>,
    /// Credential injection.
    pub credential: Option<CredentialFile>,
    /// Hosts requests (and the credential) may go to: names, `*.suffix`, or `*` without a
    /// credential (default: the URL's host).
    pub allowed_hosts: Option<Vec<String>>,
    /// Methods allowed on this service (default all).
    pub methods: Option<Vec<String>>,
    /// Path patterns allowed (`/v1/*` or exact paths; default all).
    pub paths: Option<Vec<String>>,
    /// Static, non-secret headers.
    pub headers: Option<BTreeMap<String, String>>,
    /// TLS settings.
    pub tls: Option<TlsFile>,
    /// Whole exchange, streaming included (`120s`).
    pub timeout: Option<String>,
    /// TCP connect and TLS handshake (`10s`).
    pub connect_timeout: Option<String>,
    /// Until the response headers, and between body chunks (`30s`).
    pub read_timeout: Option<String>,
    /// Largest response (`10MiB`).
    pub max_response: Option<String>,
    /// Largest request body.
    pub max_request: Option<String>,
    /// Shape of the proxy's own errors: `openai`, `anthropic` or `plain` (default: by the URL's
    /// host, `plain` for other hosts).
    pub errors: Option<String>,
    /// Serve this service (default true).
    pub enabled: Option<bool>,
    /// Disposable per-run keys (`runs.<name>.keys`).
    pub mint: Option<MintFile>,
}

/// `remotes.<name>:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteFile {
    /// MCP endpoint URL (Streamable HTTP); or `command`.
    pub url: Option<String>,
    /// A command speaking MCP on stdio: program and arguments.
    pub command: Option<Vec<String>>,
    /// Environment variables of the command (its whole environment besides `PATH`).
    pub env: Option<BTreeMap<String, String>>,
    /// Environment variables of the command filled from secret references.
    pub secret_env: Option<BTreeMap<String, String>>,
    /// Working directory of the command.
    pub cwd: Option<String>,
    /// The command's confinement.
    pub sandbox: Option<SandboxFile>,
    /// Free text.
    pub description: Option<String>,
    /// Credential injection.
    pub credential: Option<CredentialFile>,
    /// Tools offered (default all the remote lists).
    pub tools: Option<Vec<String>>,
    /// Namespace of its tools (`<prefix>.<tool>`, default the remote's name).
    pub tool_prefix: Option<String>,
    /// TLS settings.
    pub tls: Option<TlsFile>,
    /// Per-call timeout.
    pub timeout: Option<String>,
    /// Serve this remote (default true).
    pub enabled: Option<bool>,
    /// Tool pinning: `strict` (default), `warn` or `off`.
    pub pin: Option<String>,
    /// Static headers (HTTP).
    pub headers: Option<BTreeMap<String, String>>,
    /// Largest answer read (`4MiB`).
    pub max_response: Option<String>,
    /// The remote is protected by OAuth 2.1: the broker is its client (docs/federation.md).
    pub oauth: Option<RemoteOAuthFile>,
}

/// `remotes.<name>.oauth:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteOAuthFile {
    /// A client registered with the remote's authorization server beforehand.
    pub client_id: Option<String>,
    /// Its secret, a secret reference (a confidential pre-registered client).
    pub client_secret: Option<SecretText>,
    /// An HTTPS URL where the broker's client ID metadata document is published.
    pub client_id_url: Option<String>,
    /// Where the authorization server sends the operator's browser back.
    pub redirect_uri: Option<String>,
    /// Scopes to ask for (default: what the remote's challenge or metadata names).
    pub scopes: Option<Vec<String>>,
    /// One sign-in per agent rather than one for the remote (default false).
    pub per_agent: Option<bool>,
}

/// `remotes.<name>.sandbox:` (stdio remotes).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxFile {
    /// Paths it may read (and execute) besides the system's.
    #[serde(default)]
    pub read: Vec<String>,
    /// Paths it may write under.
    #[serde(default)]
    pub write: Vec<String>,
    /// Network sockets allowed (default false).
    pub network: Option<bool>,
    /// Largest data segment (`1GiB`).
    pub memory: Option<String>,
    /// Most open descriptors (256).
    pub open_files: Option<u64>,
    /// Most processes and threads of its user (256).
    pub processes: Option<u64>,
}

/// `network:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFile {
    /// Destination CIDRs allowed (also lifts the default denials).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Destination CIDRs denied.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `mcp:` — the MCP endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpFile {
    /// Browser origins allowed besides loopback ones (`https://host:port`).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Host names allowed in the Host header when the listener is on loopback (besides
    /// localhost, 127.0.0.1 and ::1).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Largest request body (`1MiB`).
    pub max_request_size: Option<String>,
    /// How long a verified API key is cached (`60s`; `0s` disables the cache).
    pub auth_cache_ttl: Option<String>,
    /// Idle time after which a session-era MCP session ends (`30m`).
    pub session_idle_timeout: Option<String>,
    /// Most live session-era MCP sessions.
    pub max_sessions: Option<u32>,
    /// Most open notification streams (GET streams and subscriptions).
    pub max_streams: Option<u32>,
}

/// `agents.<a>.ssh.<target>:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshGrantFile {
    /// Roles on the target(s).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Go: parsed, never used there; only `true` is accepted here.
    pub auto_approve: Option<bool>,
}

/// `agents.<a>.services.<service>:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceGrantFile {
    /// Methods (default all the service allows).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path patterns (default all the service allows).
    #[serde(default)]
    pub paths: Vec<String>,
}

/// One argument constraint in a policy grant.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgFile {
    /// Path prefix (normalised, absolute).
    pub prefix: Option<String>,
    /// Maximum number.
    pub max: Option<f64>,
    /// Minimum number.
    pub min: Option<f64>,
    /// Allowed values.
    pub one_of: Option<Vec<String>>,
    /// Allowed patterns (`*` any run of characters, `?` one).
    pub glob: Option<Vec<String>>,
}

/// `agents.<a>.remotes.<remote>:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteGrantFile {
    /// Tools or tool patterns (default all the remote offers).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Tool patterns refused even if `tools` covers them.
    #[serde(default)]
    pub deny_tools: Vec<String>,
    /// Argument constraints by argument name, on every tool of the grant.
    #[serde(default)]
    pub args: BTreeMap<String, ArgFile>,
    /// Argument constraints of one tool: tool → argument → constraint.
    #[serde(default)]
    pub tool_args: BTreeMap<String, BTreeMap<String, ArgFile>>,
    /// Resources it may read: patterns over the remote's own URIs (default: all of them when
    /// `tools` is not given either, else none).
    pub resources: Option<Vec<String>>,
    /// Prompts it may get (default: all when `tools` is not given either, else none).
    pub prompts: Option<Vec<String>>,
}

/// The grant blocks shared by agents and templates.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    /// Free text.
    pub description: Option<String>,
    /// SSH: target name or pattern → roles.
    pub ssh: Option<BTreeMap<String, SshGrantFile>>,
    /// HTTP services: name or pattern → methods/paths.
    pub services: Option<BTreeMap<String, Option<ServiceGrantFile>>>,
    /// Remote MCP servers: name or pattern → tools/args.
    pub remotes: Option<BTreeMap<String, Option<RemoteGrantFile>>>,
    /// Dashboard access level.
    pub dashboard: Option<String>,
    /// What an agent enrolled from this template must prove (docs/agents.md).
    pub attest: Option<AttestFile>,
    /// Agents enrolled from this template may delegate (default false; policy agents that
    /// inherit the template set their own `can_delegate`).
    pub can_delegate: Option<bool>,
}

/// `templates.<name>.attest:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestFile {
    /// A Kubernetes projected service-account token.
    pub kubernetes: Option<KubernetesAttestFile>,
    /// How often a fresh token is needed (`1h`; default: only at join).
    pub every: Option<String>,
}

/// `templates.<name>.attest.kubernetes:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesAttestFile {
    /// The cluster's JWK set (`kubectl get --raw /openid/v1/jwks`), a file path.
    pub jwks_file: String,
    /// The tokens' issuer (`kubectl get --raw /.well-known/openid-configuration`).
    pub issuer: String,
    /// The audience of the projected token (`serviceAccountToken.audience`).
    pub audience: String,
    /// Namespaces accepted.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Service account names accepted.
    #[serde(default)]
    pub service_accounts: Vec<String>,
}

/// `agents.<name>:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Free text.
    pub description: Option<String>,
    /// Argon2id PHC hash of the agent's API key (`ephyr keygen agent NAME`).
    pub api_key_hash: Option<String>,
    /// Local uid for the Unix socket (SO_PEERCRED).
    pub uid: Option<u32>,
    /// Templates to inherit, in order (the first definition of a key wins).
    #[serde(default)]
    pub inherits: Vec<String>,
    /// SSH grants.
    pub ssh: Option<BTreeMap<String, SshGrantFile>>,
    /// HTTP grants.
    pub services: Option<BTreeMap<String, Option<ServiceGrantFile>>>,
    /// Remote MCP grants.
    pub remotes: Option<BTreeMap<String, Option<RemoteGrantFile>>>,
    /// Dashboard access level.
    pub dashboard: Option<String>,
    /// May delegate tasks (default false).
    pub can_delegate: Option<bool>,
    /// Deepest delegation below its root tasks.
    pub max_delegation_depth: Option<u8>,
    /// Longest task it may create.
    pub max_task_ttl: Option<String>,
    /// Every task of this agent must be bound to a holder key.
    pub require_pop: Option<bool>,
    /// Live certificates (Go name).
    pub max_concurrent_certs: Option<u32>,
    /// Requests per window (`100/1m`).
    pub rate_limit: Option<String>,
    /// Serve this agent (default true).
    pub enabled: Option<bool>,
}

/// `approvals:` — actions that wait for a person.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsFile {
    /// Base URL of the console, for the link in notifications (`https://ephyr.lan:8553`).
    pub console_url: Option<String>,
    /// How long a call without a progress token is held open waiting (`20s`; `0s`: answer at
    /// once with the pending result).
    pub hold: Option<String>,
    /// Most pending requests per agent.
    pub max_pending_per_agent: Option<u32>,
    /// Where a new request is announced.
    #[serde(default)]
    pub notify: BTreeMap<String, NotifyFile>,
    /// The rules, by name.
    #[serde(default)]
    pub rules: BTreeMap<String, ApprovalRuleFile>,
}

/// `approvals.notify.<name>:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyFile {
    /// A generic JSON webhook (POST).
    pub webhook: Option<String>,
    /// An ntfy topic URL (`https://ntfy.sh/my-topic`): a push to a phone.
    pub ntfy: Option<String>,
    /// A bearer token for the receiver, by reference (`store:NAME`, `env:NAME`, `file:/path`).
    pub token: Option<String>,
}

/// `approvals.rules.<name>:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRuleFile {
    /// Free text.
    pub description: Option<String>,
    /// Agents it applies to (name patterns; default every agent).
    pub agents: Option<Vec<String>>,
    /// SSH: targets, roles, command patterns.
    pub ssh: Option<ApprovalSshFile>,
    /// HTTP: services, methods, paths.
    pub http: Option<ApprovalHttpFile>,
    /// Federated tools: remotes, tools, argument conditions.
    pub remote: Option<ApprovalRemoteFile>,
    /// Task delegation to another agent.
    pub delegate: Option<ApprovalDelegateFile>,
    /// Who may approve: operator names, `role:admin`, `role:viewer`, `local` (the CLI on the
    /// broker's host). Default `[role:admin, local]`.
    pub approvers: Option<Vec<String>>,
    /// How long a request waits for a decision (default 15m).
    pub timeout: Option<String>,
    /// Two different approvers.
    pub four_eyes: Option<bool>,
    /// Longest waiver an approver may grant with an approval (the same action again, for this
    /// agent and task, without asking) — none by default.
    pub waiver: Option<String>,
}

/// `approvals.rules.<name>.ssh:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSshFile {
    /// Target patterns.
    pub targets: Vec<String>,
    /// Role patterns (default every role).
    pub roles: Option<Vec<String>>,
    /// Command patterns (default every command and session).
    pub commands: Option<Vec<String>>,
}

/// `approvals.rules.<name>.http:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalHttpFile {
    /// Service patterns.
    pub services: Vec<String>,
    /// Methods (default every method).
    pub methods: Option<Vec<String>>,
    /// Path patterns (default every path).
    pub paths: Option<Vec<String>>,
}

/// `approvals.rules.<name>.remote:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRemoteFile {
    /// Remote patterns.
    pub remotes: Vec<String>,
    /// Tool patterns on the remote (default every tool).
    pub tools: Option<Vec<String>>,
    /// Argument conditions: the rule applies when every one holds (or its argument is absent).
    #[serde(default)]
    pub when: BTreeMap<String, ArgFile>,
}

/// `approvals.rules.<name>.delegate:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalDelegateFile {
    /// Agents a task is handed to (patterns; `*`: any other agent).
    pub to: Vec<String>,
}

/// A target's `files:`: where the file tools (SFTP) may read and write.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesFile {
    /// Paths that may be read and listed (`/etc/nginx/*`, or an exact path).
    #[serde(default)]
    pub read: Vec<String>,
    /// Paths that may be written (and read).
    #[serde(default)]
    pub write: Vec<String>,
}

/// `oauth:` — the built-in OAuth 2.1 authorization server (docs/oauth.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthFile {
    /// Issuer URL (default: from the request's Host).
    pub issuer: Option<String>,
    /// The console's base URL for the consent page.
    pub console_url: Option<String>,
    /// Access token lifetime (`1h`).
    pub access_ttl: Option<String>,
    /// Refresh token lifetime (`30d`).
    pub refresh_ttl: Option<String>,
    /// Dynamic client registration (default true).
    pub registration: Option<bool>,
    /// Hosts whose HTTPS URLs may be client ids (client ID metadata documents).
    #[serde(default)]
    pub client_id_domains: Vec<String>,
    /// CA file for fetching client ID metadata documents.
    pub client_id_ca_file: Option<String>,
}

/// `lifecycle:` — how enrolled agents come and go (docs/agents.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleFile {
    /// Join token lifetime when `ephyr agent enroll` names none (`15m`).
    pub join_ttl: Option<String>,
    /// Longest join token (`1d`).
    pub join_ttl_max: Option<String>,
    /// Unused this long: active → idle (`30d`).
    pub idle_after: Option<String>,
    /// Idle this long: an enrolled agent is decommissioned (`60d`).
    pub decommission_after: Option<String>,
    /// A grant unused this long is reported as drift (`30d`).
    pub drift_after: Option<String>,
    /// `report` (default: the background reaper only reports) or `apply`.
    pub reaper: Option<String>,
}

/// `runs.<name>:` — a template for `ephyr run HOST` (docs/runs.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// Free text.
    pub description: Option<String>,
    /// Agents that may start runs from it (default: every agent).
    pub agents: Option<Vec<String>>,
    /// The SSH role the run connects to its host as.
    pub role: Option<String>,
    /// Longest run (`30m`).
    pub ttl: Option<String>,
    /// How long the run outlives its CLI's last renewal (`30s`).
    pub lease: Option<String>,
    /// What the run's task may reach, as `task_create`'s envelope (targets, roles, services,
    /// remotes, methods, tools, args).
    pub envelope: Option<serde_json::Value>,
    /// Most proxied requests and LLM tokens per run.
    pub budget: Option<BudgetFile>,
    /// Services whose run gets a disposable key minted for it (the service needs `mint:`).
    pub keys: Option<Vec<String>>,
    /// The broker's base URL as the host reaches it (default: the listener's address).
    pub broker_url: Option<String>,
}

/// `runs.<name>.budget:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetFile {
    /// Proxied requests.
    pub requests: Option<u64>,
    /// LLM tokens (input + output, from the providers' usage fields).
    pub tokens: Option<u64>,
}

/// `services.<name>.mint:` — disposable per-run keys from the provider's admin API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintFile {
    /// `openai` (a project service account per run).
    pub provider: String,
    /// The admin key (a secret reference; `store:NAME`).
    pub admin_key: SecretText,
    /// The project the keys are made in (`proj_...`).
    pub project: String,
    /// The keys' scopes (`api.model.read`, ...; default: the provider's for a member).
    pub scopes: Option<Vec<String>>,
    /// The admin API's base URL (default `https://api.openai.com/v1`).
    pub url: Option<String>,
}
