//! OAuth 2.1 towards remotes: the broker as the OAuth client of a remote MCP server's
//! authorization server (`remotes.<name>.oauth`). An operator connects the remote once
//! (`ephyr remote login NAME`, or the console); the broker keeps the tokens, sealed by the
//! signer, refreshes them, and puts the access token on the remote's requests. Agents never see
//! them; a remote that refuses its token is reported to the operator, not explained to the agent.
//!
//! Discovery follows the MCP authorization spec: the remote's `401` challenge
//! (`resource_metadata`, `scope`), its protected resource metadata (RFC 9728; the path-based
//! well-known address, then the root), the authorization server's metadata (RFC 8414 and OpenID
//! discovery at the addresses the spec lists, whose `issuer` must be the one named), and the
//! 2025-03-26 fallbacks for a server with neither. The client is a pre-registered one, else a
//! client ID metadata document's URL when the server supports them, else one registered
//! dynamically (RFC 7591). The authorization request carries PKCE S256, `state` and the RFC 8707
//! `resource`; its answer's `iss` is checked (RFC 9207). Tokens are refreshed before they expire
//! and after a `401`; a refresh that fails, or a `403 insufficient_scope`, marks the sign-in as
//! needed (audited once, shown by `ephyr status` and the console).
//!
//! What runs here: the executor thread; HTTP through `upstream::conn` with the policy's network
//! rules (https, or http to a loopback address only); sealing through the [`Vault`] (the broker's
//! is `secrets::SealedFiles` under `state/remote-tokens/`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::broker::Error;
use crate::broker::audit::{Event, Kind};
use crate::broker::policy::{Policy, Remote, RemoteOAuth, Transport};
use crate::broker::ports::{Local, Ports};
use crate::broker::upstream::conn::{self, Conns};
use crate::broker::upstream::plan::percent_encode;
use crate::secret::{SecretBytes, SecretString};

/// The broker's own redirect endpoint (on its TCP listener), where a sign-in ends when the
/// redirect URI points at the broker.
pub const CALLBACK_PATH: &str = "/oauth/remote-callback";
/// Each request to an authorization server or for metadata.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest metadata or token answer read.
const MAX_BODY: usize = 64 * 1024;
/// How long a sign-in may take from its authorization URL to the redirect.
pub const PENDING_TTL: Duration = Duration::from_secs(600);
/// Sign-ins waiting at once.
const MAX_PENDING: usize = 16;
/// An access token is refreshed this long before it expires.
const EARLY: u64 = 60;
/// Longest token accepted (it goes into a header).
const MAX_TOKEN: usize = 8192;

/// Where sealed sign-ins are kept.
pub trait Vault {
    /// The sealed record under `key`, opened; `None` when there is none.
    fn load<'a>(&'a self, key: &'a str) -> Local<'a, Result<Option<SecretBytes>, Error>>;
    /// Seals and stores `value` under `key` (replacing it); `None` removes it.
    fn store<'a>(&'a self, key: &'a str, value: Option<SecretBytes>) -> Local<'a, Result<(), Error>>;
}

/// A vault that keeps nothing (the federation client run on its own).
pub struct NoVault;

impl Vault for NoVault {
    fn load<'a>(&'a self, _key: &'a str) -> Local<'a, Result<Option<SecretBytes>, Error>> {
        Box::pin(async { Ok(None) })
    }
    fn store<'a>(&'a self, _key: &'a str, _value: Option<SecretBytes>) -> Local<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
}

/// The vault key of a sign-in: the remote, or `remote@agent` for an agent's own.
pub fn key(remote: &str, subject: Option<&str>) -> String {
    match subject {
        Some(a) => format!("{remote}@{a}"),
        None => remote.to_owned(),
    }
}

/// The parameters of a `WWW-Authenticate: Bearer ...` challenge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Challenge {
    /// `resource_metadata`: where the protected resource metadata is.
    pub resource_metadata: Option<String>,
    /// `scope`: what the request needs.
    pub scope: Option<String>,
    /// `error` (`invalid_token`, `insufficient_scope`).
    pub error: Option<String>,
}

/// Parses a Bearer challenge (auth-params, quoted or not); other schemes give an empty one.
pub fn parse_challenge(h: &str) -> Challenge {
    let mut c = Challenge::default();
    if h.len() > 4096 {
        return c;
    }
    let t = h.trim_start();
    let Some(rest) = t.get(..6).filter(|s| s.eq_ignore_ascii_case("bearer")).map(|_| &t[6..]) else { return c };
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b' ' || b[i] == b',' || b[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' && b[i] != b' ' {
            i += 1;
        }
        let name = rest[start..i].to_ascii_lowercase();
        if i >= b.len() || b[i] != b'=' {
            continue;
        }
        i += 1;
        let mut value = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let ch = rest[i..].chars().next().unwrap_or(' ');
                value.push(ch);
                i += ch.len_utf8();
            }
            i += 1;
        } else {
            let s = i;
            while i < b.len() && b[i] != b',' && b[i] != b' ' {
                i += 1;
            }
            value.push_str(&rest[s..i]);
        }
        match name.as_str() {
            "resource_metadata" => c.resource_metadata = Some(value),
            "scope" => c.scope = Some(value),
            "error" => c.error = Some(value),
            _ => {}
        }
    }
    c
}

/// What the broker uses of an authorization server's metadata.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Server {
    /// Its issuer identifier.
    pub issuer: String,
    /// `authorization_endpoint`.
    pub authorization_endpoint: String,
    /// `token_endpoint`.
    pub token_endpoint: String,
    /// `registration_endpoint`.
    #[serde(default)]
    pub registration_endpoint: Option<String>,
    /// `scopes_supported`.
    #[serde(default)]
    pub scopes_supported: Vec<String>,
    /// `token_endpoint_auth_methods_supported`.
    #[serde(default)]
    pub auth_methods: Vec<String>,
    /// `client_id_metadata_document_supported`.
    #[serde(default)]
    pub cimd: bool,
    /// `authorization_response_iss_parameter_supported` (RFC 9207).
    #[serde(default)]
    pub iss_parameter: bool,
}

/// How the client authenticates at the token endpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Client {
    /// `client_id`.
    pub id: String,
    /// `client_secret`, for a confidential client.
    pub secret: Option<SecretString>,
    /// `none`, `client_secret_basic` or `client_secret_post`.
    pub method: String,
    /// The redirect URI it was registered with.
    pub redirect_uri: String,
}

/// One sign-in: the tokens and what refreshing them needs. Sealed at rest as a whole.
#[derive(Serialize, Deserialize)]
pub struct Grant {
    /// The authorization server.
    pub server: Server,
    /// The client.
    pub client: Client,
    /// The RFC 8707 resource the tokens are for.
    pub resource: String,
    /// The scope granted (or asked for).
    pub scope: Option<String>,
    /// The access token.
    pub access_token: SecretString,
    /// The refresh token, if one was issued.
    pub refresh_token: Option<SecretString>,
    /// When the access token expires (Unix seconds), if the server said.
    pub expires_at: Option<u64>,
    /// Who signed in.
    pub by: String,
    /// When (Unix seconds).
    pub at: u64,
}

/// A sign-in waiting for its redirect.
struct Pending {
    remote: String,
    subject: Option<String>,
    state: SecretString,
    verifier: SecretString,
    client: Client,
    server: Server,
    resource: String,
    scope: Option<String>,
    by: String,
    started: Instant,
}

/// A sign-in that was started: where to send the browser.
#[derive(Debug)]
pub struct Begun {
    /// The authorization URL.
    pub url: String,
    /// The redirect URI the browser comes back to.
    pub redirect_uri: String,
}

/// What a remote's sign-in(s) look like, for status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginState {
    /// Signed in; when the access token expires (Unix seconds), who signed in and when.
    SignedIn { expires_at: Option<u64>, by: String, at: u64 },
    /// An operator must sign in (again): why.
    Needed(String),
}

/// Per remote (and per agent), the sign-ins of one broker.
pub struct RemoteAuth {
    vault: Box<dyn Vault>,
    /// Opened grants by vault key (`Rc`: a request holds one while it is refreshed elsewhere).
    grants: RefCell<HashMap<String, Rc<Grant>>>,
    /// Keys looked up in the vault (found or not).
    loaded: RefCell<std::collections::HashSet<String>>,
    pending: RefCell<Vec<Pending>>,
    /// Keys whose sign-in is needed, with why.
    needed: RefCell<BTreeMap<String, String>>,
    /// Per remote, the last challenge it answered with (scopes to ask for at the next sign-in).
    challenges: RefCell<HashMap<String, Challenge>>,
    /// One refresh at a time per key.
    locks: RefCell<HashMap<String, Rc<smol::lock::Mutex<()>>>>,
}

impl Default for RemoteAuth {
    fn default() -> Self {
        RemoteAuth::new(Box::new(NoVault))
    }
}

/// One remote as the OAuth code needs it.
#[derive(Clone, Copy)]
pub struct Cx<'a> {
    /// Connections (TLS, pool).
    pub conns: &'a Conns,
    /// Audit, DNS, secrets.
    pub ports: Ports<'a>,
    /// The snapshot (network rules).
    pub policy: &'a Policy,
    /// The remote's name.
    pub name: &'a str,
    /// Its settings.
    pub remote: &'a Remote,
    /// Its `oauth` settings.
    pub settings: &'a RemoteOAuth,
}

impl<'a> Cx<'a> {
    /// The context of remote `name`, if it signs in with OAuth.
    pub fn of(conns: &'a Conns, ports: Ports<'a>, policy: &'a Policy, name: &'a str) -> Option<Cx<'a>> {
        let remote = policy.remotes.get(name)?;
        let settings = remote.oauth.as_ref()?;
        Some(Cx { conns, ports, policy, name, remote, settings })
    }

    fn url(&self) -> String {
        match &self.remote.transport {
            Transport::Http(u) => canonical(&u.to_string()),
            Transport::Stdio(_) => String::new(),
        }
    }
}

/// `url` without a default port (`https://h:443/p` → `https://h/p`).
pub(crate) fn canonical(url: &str) -> String {
    for (scheme, port) in [("https://", ":443"), ("http://", ":80")] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let at = rest.find('/').unwrap_or(rest.len());
            let host = rest[..at].strip_suffix(port).unwrap_or(&rest[..at]);
            return format!("{scheme}{host}{}", &rest[at..]);
        }
    }
    url.to_owned()
}

/// An HTTP answer from a metadata, registration or token endpoint.
struct Answer {
    status: u16,
    location: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice::<Value>(&self.body).ok().filter(Value::is_object)
    }
}

/// Whether `host` is a loopback name or address.
fn loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a redirect URI is `http` on a loopback host.
pub(crate) fn redirect_is_loopback(uri: &str) -> bool {
    uri.strip_prefix("http://").is_some_and(|rest| {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        loopback(host.trim_start_matches('[').trim_end_matches(']'))
    })
}

/// One request to `url` (`body`: a form or JSON with its type), checked against the policy's
/// network rules; https, or http to a loopback address.
async fn send(
    cx: Cx<'_>,
    method: http::Method,
    url: &str,
    auth: Option<String>,
    body: Option<(&'static str, Vec<u8>)>,
) -> Result<Answer, String> {
    let u: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let host = u.host().ok_or_else(|| format!("{url:?} has no host"))?.trim_start_matches('[').trim_end_matches(']');
    let https = match u.scheme_str() {
        Some("https") => true,
        Some("http") if loopback(host) => false,
        _ => return Err(format!("{url}: OAuth endpoints must use https (plain http only on a loopback address)")),
    };
    let port = u.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addrs = conn::resolve(cx.ports.pool, host, port, TIMEOUT).await?;
    for ip in &addrs {
        cx.policy.network.check(*ip).map_err(|why| format!("{host}: {why}"))?;
    }
    let tls = if https {
        let key = format!("{}/remote-oauth/{}", cx.policy.digest, cx.name);
        Some(cx.conns.tls_config(cx.ports.pool, &key, cx.remote.tls.ca_file.as_deref(), None, None).await?)
    } else {
        None
    };
    let dest = conn::Dest { host, port, addrs: &addrs, tls, timeout: TIMEOUT };
    let exchange = async {
        let mut sender = cx.conns.connect(&dest).await.map_err(|e| e.to_string())?;
        let mut b = http::Request::builder()
            .method(method)
            .uri(u.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, u.authority().map_or(host, |a| a.as_str()))
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, concat!("ephyr/", env!("CARGO_PKG_VERSION")));
        if let Some(a) = auth {
            b = b.header(http::header::AUTHORIZATION, a);
        }
        let payload = match body {
            Some((kind, bytes)) => {
                b = b.header(http::header::CONTENT_TYPE, kind);
                bytes
            }
            None => Vec::new(),
        };
        let req = b.body(Full::new(Bytes::from(payload))).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let location = resp.headers().get(http::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|_| format!("{url}: the answer is larger than {MAX_BODY} bytes or was cut off"))?
            .to_bytes()
            .to_vec();
        Ok::<_, String>(Answer { status, location, body })
    };
    crate::broker::deadline::before(Instant::now() + TIMEOUT, exchange)
        .await
        .unwrap_or_else(|| Err(format!("{url} did not answer within {}s", TIMEOUT.as_secs())))
}

/// `application/x-www-form-urlencoded`.
fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k.as_bytes()), percent_encode(v.as_bytes())))
        .collect::<Vec<_>>()
        .join("&")
        .into_bytes()
}

/// `scheme://authority` of `url`.
pub(crate) fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let at = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(format!("{scheme}://{}", &rest[..at]))
}

/// The path of `url` without a trailing `/` (`""` for the root).
pub(crate) fn path_of(url: &str) -> String {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let at = rest.find('/').unwrap_or(rest.len());
    let p = &rest[at..];
    let p = p.split(['?', '#']).next().unwrap_or("");
    p.trim_end_matches('/').to_owned()
}

/// What discovery found for a remote.
struct Found {
    resource: String,
    /// `scopes_supported` of the protected resource metadata.
    prm_scopes: Vec<String>,
    server: Server,
}

/// The protected resource metadata's `resource` must name the remote: the same origin and a
/// path that is the remote's or a parent of it.
pub(crate) fn resource_covers(resource: &str, url: &str) -> bool {
    let (r, u) = (canonical(resource), canonical(url));
    if origin(&r).map(|o| o.to_ascii_lowercase()) != origin(&u).map(|o| o.to_ascii_lowercase()) {
        return false;
    }
    let (rp, up) = (path_of(&r), path_of(&u));
    rp.is_empty() || up == rp || up.starts_with(&format!("{rp}/"))
}

/// Where an issuer's metadata may be (RFC 8414 §3, OpenID discovery, both for issuers with a
/// path), in the order the MCP spec gives.
pub(crate) fn metadata_urls(issuer: &str) -> Vec<String> {
    let Some(o) = origin(issuer) else { return Vec::new() };
    let p = path_of(issuer);
    if p.is_empty() {
        vec![format!("{o}/.well-known/oauth-authorization-server"), format!("{o}/.well-known/openid-configuration")]
    } else {
        vec![
            format!("{o}/.well-known/oauth-authorization-server{p}"),
            format!("{o}/.well-known/openid-configuration{p}"),
            format!("{o}{p}/.well-known/openid-configuration"),
        ]
    }
}

/// Whether two issuer identifiers are the same: identical strings, no normalization (RFC 8414
/// §3.3, RFC 9207 §2.4; a trailing `/` or another case is another issuer).
fn same_issuer(a: &str, b: &str) -> bool {
    a == b
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
}

/// The authorization server's metadata, from its issuer identifier.
async fn server_metadata(cx: Cx<'_>, issuer: &str) -> Result<Option<Server>, String> {
    for url in metadata_urls(issuer) {
        let a = send(cx, http::Method::GET, &url, None, None).await?;
        if a.status != 200 {
            continue;
        }
        let m = a.json().ok_or_else(|| format!("{url}: the metadata is not a JSON object"))?;
        return server_from(&url, issuer, &m).map(Some);
    }
    Ok(None)
}

/// An authorization server's metadata document (`m`, read from `url`) checked against the issuer
/// it was looked up for: the same issuer exactly, both endpoints, PKCE S256.
pub(crate) fn server_from(url: &str, issuer: &str, m: &Value) -> Result<Server, String> {
    let named = m["issuer"].as_str().unwrap_or_default();
    if !same_issuer(named, issuer) {
        return Err(format!("{url}: the metadata names issuer {named:?}, not {issuer:?} (refused: RFC 8414 §3.3)"));
    }
    let endpoint = |k: &str| m[k].as_str().map(str::to_owned);
    let (Some(authorization_endpoint), Some(token_endpoint)) =
        (endpoint("authorization_endpoint"), endpoint("token_endpoint"))
    else {
        return Err(format!("{url}: the metadata has no authorization_endpoint or token_endpoint"));
    };
    let pkce = strings(&m["code_challenge_methods_supported"]);
    if !pkce.iter().any(|x| x == "S256") {
        return Err(format!(
            "{url}: the authorization server does not list PKCE S256 in code_challenge_methods_supported (refused: the MCP spec requires it)"
        ));
    }
    Ok(Server {
        issuer: named.to_owned(),
        authorization_endpoint,
        token_endpoint,
        registration_endpoint: endpoint("registration_endpoint"),
        scopes_supported: strings(&m["scopes_supported"]),
        auth_methods: strings(&m["token_endpoint_auth_methods_supported"]),
        cimd: m["client_id_metadata_document_supported"] == Value::Bool(true),
        iss_parameter: m["authorization_response_iss_parameter_supported"] == Value::Bool(true),
    })
}

/// Protected resource metadata, then the authorization server's.
async fn discover(cx: Cx<'_>, challenge: &Challenge) -> Result<Found, String> {
    let url = cx.url();
    let o = origin(&url).ok_or("the remote has no origin")?;
    let mut prm_urls = Vec::new();
    if let Some(m) = &challenge.resource_metadata {
        prm_urls.push(m.clone());
    } else {
        let p = path_of(&url);
        if !p.is_empty() {
            prm_urls.push(format!("{o}/.well-known/oauth-protected-resource{p}"));
        }
        prm_urls.push(format!("{o}/.well-known/oauth-protected-resource"));
    }
    let mut prm = None;
    for u in &prm_urls {
        // The metadata must come from the remote's own origin (a challenge cannot send the
        // broker elsewhere for it).
        if origin(u).map(|x| x.to_ascii_lowercase()) != Some(o.to_ascii_lowercase()) {
            return Err(format!("the remote's challenge points at metadata on another origin ({u})"));
        }
        let a = send(cx, http::Method::GET, u, None, None).await?;
        if a.status == 200 {
            prm = Some(a.json().ok_or_else(|| format!("{u}: the resource metadata is not a JSON object"))?);
            break;
        }
    }
    let Some(prm) = prm else {
        // 2025-03-26: no resource metadata; the server's origin is the authorization server,
        // with default endpoints when it publishes no metadata either.
        let server = match server_metadata(cx, &o).await? {
            Some(s) => s,
            None => Server {
                issuer: o.clone(),
                authorization_endpoint: format!("{o}/authorize"),
                token_endpoint: format!("{o}/token"),
                registration_endpoint: Some(format!("{o}/register")),
                ..Default::default()
            },
        };
        return Ok(Found { resource: url, prm_scopes: Vec::new(), server });
    };
    let resource = prm["resource"].as_str().unwrap_or_default().to_owned();
    if !resource_covers(&resource, &url) {
        return Err(format!(
            "the remote's resource metadata names resource {resource:?}, which is not {url} (refused: RFC 9728 §3.3)"
        ));
    }
    let issuer = prm["authorization_servers"][0]
        .as_str()
        .ok_or("the remote's resource metadata names no authorization server")?
        .to_owned();
    let server = server_metadata(cx, &issuer)
        .await?
        .ok_or_else(|| format!("authorization server {issuer}: no metadata at its well-known addresses"))?;
    Ok(Found { resource, prm_scopes: strings(&prm["scopes_supported"]), server })
}

/// The scope to ask for: the policy's, else the challenge's, else the resource's
/// `scopes_supported`; plus `offline_access` when the server offers it (for a refresh token).
fn scope_for(settings: &RemoteOAuth, challenge: &Challenge, found: &Found) -> Option<String> {
    let mut scopes: Vec<String> = match (&settings.scopes, &challenge.scope) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => c.split_whitespace().map(str::to_owned).collect(),
        (None, None) => found.prm_scopes.clone(),
    };
    if found.server.scopes_supported.iter().any(|s| s == "offline_access")
        && !scopes.iter().any(|s| s == "offline_access")
    {
        scopes.push("offline_access".into());
    }
    (!scopes.is_empty()).then(|| scopes.join(" "))
}

/// The scopes of `before` and `now` together, in order, each once.
fn union(before: Option<&str>, now: Option<String>) -> Option<String> {
    let mut all: Vec<&str> = Vec::new();
    for s in before.into_iter().chain(now.as_deref()).flat_map(str::split_whitespace) {
        if !all.contains(&s) {
            all.push(s);
        }
    }
    (!all.is_empty()).then(|| all.join(" "))
}

fn failed(name: &str, why: impl std::fmt::Display) -> Error {
    Error::Upstream { code: "remote_login_failed", message: format!("remote {name:?}: {why}") }
}

/// A token from a token answer: printable ASCII (it goes into a header), not too long.
fn token_ok(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_TOKEN && t.bytes().all(|b| b.is_ascii_graphic())
}

/// What a token endpoint granted: the access token, the refresh token, when the access token
/// expires (Unix seconds) and the scope.
pub(crate) type Granted = (SecretString, Option<SecretString>, Option<u64>, Option<String>);

/// A token endpoint's answer (`status`, `body`) read: a Bearer access token that can go into a
/// header, an optional usable refresh token, the lifetime (capped at ten years) and the scope.
pub(crate) fn token_answer(status: u16, body: &[u8]) -> Result<Granted, String> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if status != 200 {
        let err = v["error"].as_str().unwrap_or("no error code");
        return Err(format!("the token endpoint answered {status} ({err})"));
    }
    let access = v["access_token"]
        .as_str()
        .filter(|t| token_ok(t))
        .ok_or("the token endpoint's answer has no usable access_token")?;
    if !v["token_type"].as_str().is_some_and(|t| t.eq_ignore_ascii_case("bearer")) {
        return Err("the token endpoint issued a token that is not a Bearer token".into());
    }
    let refresh = match v.get("refresh_token") {
        None | Some(Value::Null) => None,
        Some(r) => Some(SecretString::new(
            r.as_str().filter(|t| token_ok(t)).ok_or("its refresh_token is not usable")?.to_owned(),
        )),
    };
    let now = crate::time::now().secs().max(0) as u64;
    let expires_at = v["expires_in"].as_u64().map(|s| now + s.min(10 * 365 * 86_400));
    let scope = v["scope"].as_str().map(str::to_owned);
    Ok((SecretString::new(access.to_owned()), refresh, expires_at, scope))
}

impl RemoteAuth {
    /// Sign-ins kept in `vault`.
    pub fn new(vault: Box<dyn Vault>) -> Self {
        RemoteAuth {
            vault,
            grants: RefCell::default(),
            loaded: RefCell::default(),
            pending: RefCell::default(),
            needed: RefCell::default(),
            challenges: RefCell::default(),
            locks: RefCell::default(),
        }
    }

    /// Remembers the challenge of a remote's refusal (the scope the next sign-in asks for).
    pub fn challenged(&self, remote: &str, c: Challenge) {
        self.challenges.borrow_mut().insert(remote.to_owned(), c);
    }

    /// The grant under `key`, from memory or the vault.
    async fn grant(&self, key: &str) -> Result<Option<Rc<Grant>>, Error> {
        if let Some(g) = self.grants.borrow().get(key) {
            return Ok(Some(g.clone()));
        }
        if self.loaded.borrow().contains(key) {
            return Ok(None);
        }
        let opened = self.vault.load(key).await?;
        self.loaded.borrow_mut().insert(key.to_owned());
        let Some(bytes) = opened else { return Ok(None) };
        let g: Grant = serde_json::from_slice(bytes.expose())
            .map_err(|e| Error::Unavailable(format!("the sealed sign-in {key:?} does not parse: {e}")))?;
        let g = Rc::new(g);
        self.grants.borrow_mut().insert(key.to_owned(), g.clone());
        Ok(Some(g))
    }

    async fn keep(&self, key: &str, g: Grant) -> Result<Rc<Grant>, Error> {
        let bytes = SecretBytes::new(serde_json::to_vec(&g).map_err(|e| Error::Unavailable(e.to_string()))?);
        self.vault.store(key, Some(bytes)).await?;
        let g = Rc::new(g);
        self.grants.borrow_mut().insert(key.to_owned(), g.clone());
        self.loaded.borrow_mut().insert(key.to_owned());
        self.needed.borrow_mut().remove(key);
        Ok(g)
    }

    /// Marks `key`'s sign-in as needed, with why; audited the first time.
    async fn need(&self, cx: Cx<'_>, key: &str, why: String) {
        let first = self.needed.borrow_mut().insert(key.to_owned(), why.clone()).is_none();
        if first {
            log::warn!("remote {:?}: an operator must sign in again ({why}): ephyr remote login {}", cx.name, cx.name);
            cx.ports
                .audit_now(
                    Event::new(Kind::Federation, "remote_login_needed")
                        .action(json!({ "remote": cx.name, "login": key }))
                        .error("remote_login_needed", why),
                )
                .await;
        }
    }

    /// The access token for a request to the remote of `cx` on behalf of `subject` (per-agent
    /// remotes), refreshed first when it is about to expire. `Ok(None)` when the remote does not
    /// use OAuth. `Err`: no usable sign-in (the operator is told; the agent gets this error).
    pub async fn bearer(&self, cx: Option<Cx<'_>>, subject: Option<&str>) -> Result<Option<SecretString>, Error> {
        let Some(cx) = cx else { return Ok(None) };
        let subject = subject.filter(|_| cx.settings.per_agent);
        let key = match subject {
            Some(a) => key(cx.name, Some(a)),
            None => self.any_key(cx).await?,
        };
        let Some(g) = self.grant(&key).await? else {
            let why = match subject {
                Some(a) => format!("agent {a:?} has not been signed in to it"),
                None => "no operator has signed in to it".to_owned(),
            };
            self.need(cx, &key, why).await;
            return Err(self.login_error(cx, subject));
        };
        if let Some(why) = self.needed.borrow().get(&key) {
            log::debug!("remote {:?}: sign-in {key:?} needed: {why}", cx.name);
            return Err(self.login_error(cx, subject));
        }
        let now = crate::time::now().secs().max(0) as u64;
        if g.expires_at.is_some_and(|e| e <= now + EARLY) {
            if g.refresh_token.is_some() {
                return self.refresh(cx, &key, &g).await.map(Some);
            }
            if g.expires_at.is_some_and(|e| e <= now) {
                self.need(cx, &key, "its access token expired and there is no refresh token".into()).await;
                return Err(self.login_error(cx, subject));
            }
        }
        Ok(Some(g.access_token.clone()))
    }

    /// The shared sign-in's key, or (a per-agent remote read for its tool list) any agent's.
    async fn any_key(&self, cx: Cx<'_>) -> Result<String, Error> {
        let shared = key(cx.name, None);
        if !cx.settings.per_agent || self.grant(&shared).await?.is_some() {
            return Ok(shared);
        }
        let prefix = format!("{}@", cx.name);
        let found = self.grants.borrow().keys().filter(|k| k.starts_with(&prefix)).min().cloned();
        Ok(found.unwrap_or(shared))
    }

    fn login_error(&self, cx: Cx<'_>, subject: Option<&str>) -> Error {
        let whom = subject.map_or(String::new(), |a| format!(" for agent {a}"));
        Error::Unavailable(format!(
            "remote {:?} needs an operator to sign in to it{whom}; the operator has been told",
            cx.name
        ))
    }

    /// The remote refused the token it was sent (`401`, or `403 insufficient_scope`):
    /// `Ok(true)` when a refreshed token is worth one more try, else the sign-in is marked as
    /// needed and the error says so (without the remote's words).
    pub async fn refused(
        &self,
        cx: Cx<'_>,
        subject: Option<&str>,
        status: u16,
        challenge: Challenge,
        sent: &SecretString,
    ) -> Result<bool, Error> {
        let subject = subject.filter(|_| cx.settings.per_agent);
        let key = match subject {
            Some(a) => key(cx.name, Some(a)),
            None => self.any_key(cx).await?,
        };
        let why = if status == 403 {
            format!("the remote needs more scope ({})", challenge.scope.clone().unwrap_or_else(|| "unnamed".into()))
        } else {
            "the remote refused its access token (401)".to_owned()
        };
        self.challenged(cx.name, challenge);
        if status == 401
            && let Some(g) = self.grant(&key).await?
            && g.refresh_token.is_some()
        {
            // Refreshed once (unless another request already did).
            if !g.access_token.expose().as_bytes().eq(sent.expose().as_bytes()) {
                return Ok(true);
            }
            if self.refresh(cx, &key, &g).await.is_ok() {
                return Ok(true);
            }
            return Err(self.login_error(cx, subject));
        }
        self.need(cx, &key, why).await;
        Err(self.login_error(cx, subject))
    }

    /// Refreshes the grant under `key` (one refresh at a time); a refusal marks it as needed.
    async fn refresh(&self, cx: Cx<'_>, key: &str, g: &Rc<Grant>) -> Result<SecretString, Error> {
        let lock = self.locks.borrow_mut().entry(key.to_owned()).or_default().clone();
        let _held = lock.lock().await;
        // Another request may have refreshed it meanwhile.
        if let Some(now) = self.grants.borrow().get(key)
            && !Rc::ptr_eq(now, g)
        {
            return Ok(now.access_token.clone());
        }
        let Some(refresh) = &g.refresh_token else { return Err(self.login_error(cx, None)) };
        let mut pairs = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.expose()),
            ("resource", g.resource.as_str()),
        ];
        let answer = self.token_request(cx, &g.server, &g.client, &mut pairs).await;
        match answer {
            Ok((access, new_refresh, expires_at, scope)) => {
                let next = Grant {
                    server: g.server.clone(),
                    client: g.client.clone(),
                    resource: g.resource.clone(),
                    scope: scope.or_else(|| g.scope.clone()),
                    access_token: access.clone(),
                    // RFC 6749 §6: a server that rotates sends a new one; else the old stays.
                    refresh_token: new_refresh.or_else(|| g.refresh_token.clone()),
                    expires_at,
                    by: g.by.clone(),
                    at: g.at,
                };
                self.keep(key, next).await?;
                log::info!("remote {:?}: access token refreshed", cx.name);
                Ok(access)
            }
            Err(e) => {
                self.need(cx, key, format!("refreshing its token failed: {}", e.message())).await;
                Err(e)
            }
        }
    }

    /// POSTs to the token endpoint with the client's authentication; the access token, the
    /// refresh token, when the access token expires and the scope.
    async fn token_request<'p>(
        &self,
        cx: Cx<'_>,
        server: &Server,
        client: &'p Client,
        pairs: &mut Vec<(&'p str, &'p str)>,
    ) -> Result<Granted, Error> {
        let mut auth = None;
        match (client.method.as_str(), &client.secret) {
            ("client_secret_basic", Some(s)) => {
                // RFC 6749 §2.3.1: each form-encoded, then joined and base64ed.
                let joined = SecretString::new(format!(
                    "{}:{}",
                    percent_encode(client.id.as_bytes()),
                    percent_encode(s.expose().as_bytes())
                ));
                auth = Some(format!("Basic {}", data_encoding::BASE64.encode(joined.expose().as_bytes())));
            }
            ("client_secret_post", Some(s)) => {
                pairs.push(("client_id", client.id.as_str()));
                pairs.push(("client_secret", s.expose()));
            }
            _ => pairs.push(("client_id", client.id.as_str())),
        }
        let body = zeroize::Zeroizing::new(form(pairs));
        let a = send(
            cx,
            http::Method::POST,
            &server.token_endpoint,
            auth,
            Some(("application/x-www-form-urlencoded", body.to_vec())),
        )
        .await
        .map_err(|e| failed(cx.name, e))?;
        token_answer(a.status, &zeroize::Zeroizing::new(a.body)).map_err(|e| failed(cx.name, e))
    }

    /// Starts a sign-in to the remote of `cx` (for `subject` on a per-agent remote): discovery,
    /// the client, and the authorization URL to open. `by`: the operator.
    /// `challenge`: the remote's answer to a request without a token, when none was kept.
    pub async fn begin(
        &self,
        cx: Cx<'_>,
        subject: Option<&str>,
        by: &str,
        challenge: Option<Challenge>,
    ) -> Result<Begun, Error> {
        if subject.is_some() && !cx.settings.per_agent {
            return Err(Error::Invalid(format!(
                "remote {:?} has one sign-in for all agents (oauth.per_agent is not set): sign in without --agent",
                cx.name
            )));
        }
        if subject.is_none() && cx.settings.per_agent {
            log::info!("remote {:?}: a shared sign-in of a per-agent remote is used to read its tools", cx.name);
        }
        let challenge = challenge.or_else(|| self.challenges.borrow().get(cx.name).cloned()).unwrap_or_default();
        let found = discover(cx, &challenge).await.map_err(|e| failed(cx.name, e))?;
        let key = key(cx.name, subject);
        let kept = self.grant(&key).await.ok().flatten();
        // Stepping up keeps what was granted before (SEP-2350: the union of the scopes).
        let scope = union(kept.as_ref().and_then(|g| g.scope.as_deref()), scope_for(cx.settings, &challenge, &found));
        let client = self.client(cx, &found.server, scope.as_deref(), kept.as_deref()).await?;
        // 32 random bytes each, base64url (43 characters: a valid PKCE verifier).
        let (state, verifier) = (crate::broker::oauth::fresh("")?, crate::broker::oauth::fresh("")?);
        let mut q = vec![
            ("response_type", "code".to_owned()),
            ("client_id", client.id.clone()),
            ("redirect_uri", cx.settings.redirect_uri.clone()),
            ("state", state.expose().to_owned()),
            ("code_challenge", crate::broker::oauth::pkce_s256(verifier.expose())),
            ("code_challenge_method", "S256".to_owned()),
            ("resource", found.resource.clone()),
        ];
        if let Some(s) = &scope {
            q.push(("scope", s.clone()));
        }
        let query: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let endpoint = &found.server.authorization_endpoint;
        let sep = if endpoint.contains('?') { '&' } else { '?' };
        let url = format!("{endpoint}{sep}{}", String::from_utf8_lossy(&form(&query)));
        let mut pending = self.pending.borrow_mut();
        pending
            .retain(|p| p.started.elapsed() < PENDING_TTL && !(p.remote == cx.name && p.subject.as_deref() == subject));
        if pending.len() >= MAX_PENDING {
            return Err(Error::Unavailable(format!(
                "{MAX_PENDING} sign-ins are waiting already; finish or wait 10 minutes"
            )));
        }
        pending.push(Pending {
            remote: cx.name.to_owned(),
            subject: subject.map(str::to_owned),
            state,
            verifier,
            client,
            server: found.server,
            resource: found.resource,
            scope,
            by: by.to_owned(),
            started: Instant::now(),
        });
        Ok(Begun { url, redirect_uri: cx.settings.redirect_uri.clone() })
    }

    /// The client to sign in with: the policy's pre-registered one, the one registered before
    /// with this server, a client ID metadata document's URL, or a new registration.
    async fn client(
        &self,
        cx: Cx<'_>,
        server: &Server,
        scope: Option<&str>,
        kept: Option<&Grant>,
    ) -> Result<Client, Error> {
        let s = cx.settings;
        let redirect_uri = s.redirect_uri.clone();
        if let Some(id) = &s.client_id {
            let secret = match &s.client_secret {
                Some(r) => Some(SecretString::new(
                    String::from_utf8(cx.ports.secrets.resolve(r).await?.expose().to_vec())
                        .map_err(|_| Error::Invalid(format!("remote {:?}: the client secret is not UTF-8", cx.name)))?,
                )),
                None => None,
            };
            let method = match &secret {
                None => "none",
                Some(_)
                    if server.auth_methods.is_empty()
                        || server.auth_methods.iter().any(|m| m == "client_secret_basic") =>
                {
                    "client_secret_basic"
                }
                Some(_) => "client_secret_post",
            };
            return Ok(Client { id: id.clone(), secret, method: method.into(), redirect_uri });
        }
        if let Some(g) = kept
            && same_issuer(&g.server.issuer, &server.issuer)
            && g.client.redirect_uri == redirect_uri
        {
            return Ok(g.client.clone());
        }
        if server.cimd
            && let Some(url) = &s.client_id_url
        {
            return Ok(Client { id: url.clone(), secret: None, method: "none".into(), redirect_uri });
        }
        let Some(endpoint) = &server.registration_endpoint else {
            return Err(failed(
                cx.name,
                "the authorization server offers no dynamic registration and no client ID metadata documents: register a client there and set oauth.client_id",
            ));
        };
        // Ask for the first method the server takes, of the ones this client can do.
        let method = ["client_secret_basic", "client_secret_post", "none"]
            .into_iter()
            .find(|m| server.auth_methods.is_empty() || server.auth_methods.iter().any(|x| x == m))
            .unwrap_or("none");
        let mut doc = json!({
            "client_name": "ephyr",
            "redirect_uris": [redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": method,
            // SEP-837: a loopback redirect is a native application's; else the broker is a web one.
            "application_type": if redirect_is_loopback(&redirect_uri) { "native" } else { "web" },
        });
        if let Some(sc) = scope {
            doc["scope"] = Value::from(sc);
        }
        let a = send(cx, http::Method::POST, endpoint, None, Some(("application/json", doc.to_string().into_bytes())))
            .await
            .map_err(|e| failed(cx.name, e))?;
        let body = zeroize::Zeroizing::new(a.body);
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !(200..300).contains(&a.status) {
            return Err(failed(
                cx.name,
                format!(
                    "registering a client answered {} ({})",
                    a.status,
                    v["error"].as_str().unwrap_or("no error code")
                ),
            ));
        }
        let id = v["client_id"]
            .as_str()
            .filter(|i| !i.is_empty() && i.len() <= 512)
            .ok_or_else(|| failed(cx.name, "the registration answer has no client_id"))?;
        let secret = v["client_secret"].as_str().map(|x| SecretString::new(x.to_owned()));
        let method = match (v["token_endpoint_auth_method"].as_str(), &secret) {
            (Some(m), _) => m.to_owned(),
            (None, Some(_)) if method != "none" => method.to_owned(),
            _ => "none".to_owned(),
        };
        log::info!("remote {:?}: registered client {id} with {}", cx.name, server.issuer);
        Ok(Client { id: id.to_owned(), secret, method, redirect_uri })
    }

    /// The remote and subject of the waiting sign-in that `state` names, if any.
    pub fn waiting(&self, state: &str) -> Option<(String, Option<String>)> {
        let pending = self.pending.borrow();
        pending
            .iter()
            .find(|p| crate::secret::constant_time_eq(p.state.expose().as_bytes(), state.as_bytes()))
            .map(|p| (p.remote.clone(), p.subject.clone()))
    }

    /// Finishes the sign-in that the redirect's `query` (`code`, `state`, `iss` or `error`)
    /// answers: checks it, redeems the code, seals the tokens. Returns the remote and subject.
    pub async fn complete(
        &self,
        conns: &Conns,
        ports: Ports<'_>,
        policy: &Policy,
        query: &str,
    ) -> Result<(String, Option<String>), Error> {
        let q = crate::broker::console::actions::form(query.as_bytes());
        let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        let state = get("state").ok_or_else(|| Error::Invalid("the redirect carries no state".into()))?;
        let p = {
            let mut pending = self.pending.borrow_mut();
            let at = pending
                .iter()
                .position(|p| crate::secret::constant_time_eq(p.state.expose().as_bytes(), state.as_bytes()))
                .ok_or_else(|| {
                    Error::Invalid("no sign-in is waiting for this redirect (expired, used, or not ours)".into())
                })?;
            // Single use, whatever follows.
            pending.remove(at)
        };
        if p.started.elapsed() >= PENDING_TTL {
            return Err(Error::Invalid(format!(
                "the sign-in to remote {:?} took longer than 10 minutes: start it again",
                p.remote
            )));
        }
        let cx = Cx::of(conns, ports, policy, &p.remote)
            .ok_or_else(|| Error::NotFound(format!("remote {:?} no longer signs in with OAuth", p.remote)))?;
        let outcome = async {
            if let Some(e) = get("error") {
                let d = get("error_description").unwrap_or("");
                return Err(failed(
                    cx.name,
                    format!("the authorization server refused: {e} {d}").trim_end().to_owned(),
                ));
            }
            // RFC 9207: an `iss` must be the issuer's; a server that says it sends one must.
            match get("iss") {
                Some(iss) if !same_issuer(iss, &p.server.issuer) => {
                    return Err(failed(
                        cx.name,
                        format!(
                            "the redirect's iss {iss:?} is not the authorization server's ({:?}): refused (mix-up)",
                            p.server.issuer
                        ),
                    ));
                }
                None if p.server.iss_parameter => {
                    return Err(failed(
                        cx.name,
                        "the authorization server promises an iss parameter and the redirect has none: refused",
                    ));
                }
                _ => {}
            }
            let code =
                get("code").filter(|c| !c.is_empty()).ok_or_else(|| failed(cx.name, "the redirect carries no code"))?;
            let mut pairs = vec![
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", p.client.redirect_uri.as_str()),
                ("code_verifier", p.verifier.expose()),
                ("resource", p.resource.as_str()),
            ];
            let (access, refresh, expires_at, scope) = self.token_request(cx, &p.server, &p.client, &mut pairs).await?;
            let g = Grant {
                server: p.server.clone(),
                client: p.client.clone(),
                resource: p.resource.clone(),
                scope: scope.or_else(|| p.scope.clone()),
                access_token: access,
                refresh_token: refresh,
                expires_at,
                by: p.by.clone(),
                at: crate::time::now().secs().max(0) as u64,
            };
            self.keep(&key(cx.name, p.subject.as_deref()), g).await?;
            Ok(())
        };
        let result = outcome.await;
        let mut ev = Event::new(Kind::Federation, "remote_login")
            .agent(p.by.clone())
            .action(json!({ "remote": p.remote, "for": p.subject, "issuer": p.server.issuer, "scope": p.scope }));
        ev = match &result {
            Ok(()) => ev.allow(),
            Err(e) => ev.error("remote_login_failed", e.message()),
        };
        cx.ports.audit_now(ev).await;
        result.map(|()| (p.remote, p.subject))
    }

    /// Forgets the sign-in under (`remote`, `subject`); whether there was one.
    pub async fn logout(&self, remote: &str, subject: Option<&str>) -> Result<bool, Error> {
        let k = key(remote, subject);
        // A record that does not open (forged, another data dir's) is removed all the same.
        let had = self.grant(&k).await.map_or(true, |g| g.is_some());
        self.vault.store(&k, None).await?;
        self.grants.borrow_mut().remove(&k);
        self.needed.borrow_mut().remove(&k);
        Ok(had)
    }

    /// The sign-ins of `remote` known in memory, and the ones needed, by subject (`*`: shared).
    pub fn status(&self, remote: &str) -> BTreeMap<String, LoginState> {
        let mut out = BTreeMap::new();
        let subject = |k: &str| -> Option<String> {
            if k == remote {
                Some("*".into())
            } else {
                k.strip_prefix(remote).and_then(|r| r.strip_prefix('@')).map(str::to_owned)
            }
        };
        for (k, g) in self.grants.borrow().iter() {
            if let Some(s) = subject(k) {
                out.insert(s, LoginState::SignedIn { expires_at: g.expires_at, by: g.by.clone(), at: g.at });
            }
        }
        for (k, why) in self.needed.borrow().iter() {
            if let Some(s) = subject(k) {
                out.insert(s, LoginState::Needed(why.clone()));
            }
        }
        out
    }

    /// Opens the authorization URL as a browser would, without following its redirect, and
    /// returns where it sends the browser: for the federation client run on its own, whose
    /// authorization servers (the conformance suite's) approve at once.
    pub async fn visit(cx: Cx<'_>, url: &str) -> Result<String, Error> {
        let a = send(cx, http::Method::GET, url, None, None).await.map_err(|e| failed(cx.name, e))?;
        a.location.filter(|_| (300..400).contains(&a.status)).ok_or_else(|| {
            failed(cx.name, format!("the authorization endpoint answered {} without a redirect", a.status))
        })
    }

    /// Clears the needed marks of `remote`'s sign-ins (a new sign-in is under way).
    pub fn forget_need(&self, remote: &str) {
        let prefix = format!("{remote}@");
        self.needed.borrow_mut().retain(|k, _| k != remote && !k.starts_with(&prefix));
    }

    /// Whether a challenge of `remote` is kept (else a sign-in asks the remote for one).
    pub fn has_challenge(&self, remote: &str) -> bool {
        self.challenges.borrow().contains_key(remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_parsed_with_quotes_and_escapes() {
        let c = parse_challenge(
            r#"Bearer realm="mcp", error="insufficient_scope", scope="files:read files:write", resource_metadata="https://x/.well-known/oauth-protected-resource/mcp""#,
        );
        assert_eq!(c.scope.as_deref(), Some("files:read files:write"));
        assert_eq!(c.error.as_deref(), Some("insufficient_scope"));
        assert_eq!(c.resource_metadata.as_deref(), Some("https://x/.well-known/oauth-protected-resource/mcp"));
        let c = parse_challenge(r#"bearer scope=a,error="x\"y""#);
        assert_eq!((c.scope.as_deref(), c.error.as_deref()), (Some("a"), Some("x\"y")));
        assert_eq!(parse_challenge("Basic realm=\"x\""), Challenge::default());
        assert_eq!(parse_challenge("Bearer"), Challenge::default());
        assert_eq!(parse_challenge(r#"Bearer scope=""#).scope.as_deref(), Some(""));
        assert_eq!(parse_challenge(&"Bearer scope=".repeat(1000)), Challenge::default());
    }

    #[test]
    fn metadata_addresses_and_resources() {
        assert_eq!(
            metadata_urls("https://as.example/tenant1"),
            [
                "https://as.example/.well-known/oauth-authorization-server/tenant1",
                "https://as.example/.well-known/openid-configuration/tenant1",
                "https://as.example/tenant1/.well-known/openid-configuration",
            ]
        );
        assert_eq!(metadata_urls("https://as.example/").len(), 2);
        assert!(resource_covers("https://r.example/mcp", "https://r.example:443/mcp"));
        assert!(resource_covers("https://r.example", "https://r.example/mcp"));
        assert!(!resource_covers("https://r.example/other", "https://r.example/mcp"));
        assert!(!resource_covers("https://r.example/mc", "https://r.example/mcp"));
        assert!(!resource_covers("https://evil.example/mcp", "https://r.example/mcp"));
        assert!(!same_issuer("https://as.example/", "https://as.example"));
        assert!(!same_issuer("https://AS.example", "https://as.example"));
        assert!(!same_issuer("https://as.example/a", "https://as.example/b"));
        assert_eq!(canonical("https://h:443/p"), "https://h/p");
        assert_eq!(canonical("http://h:8080/p"), "http://h:8080/p");
        assert_eq!(union(Some("a b"), Some("b c".into())).as_deref(), Some("a b c"));
        assert_eq!(union(None, None), None);
    }
}
