//! MCP Streamable HTTP at `/mcp`, for both protocol eras, and the RFC 9728 protected-resource
//! metadata.
//!
//! What runs here: request handling on the executor thread (no threads of its own), async-io
//! timers for body deadlines and stream keep-alives. Per request, in order:
//!
//! 1. method (`POST`, `GET`, `DELETE`; else 405), `Host` and `Origin` (403: DNS rebinding);
//! 2. authentication (`broker::auth`; 401 with `WWW-Authenticate` and the metadata URL);
//! 3. `Content-Type` (415), `Accept` (406), body size (413) and deadline (408);
//! 4. JSON-RPC decoding (400 with -32700/-32600);
//! 5. the era: an `MCP-Protocol-Version` header naming a stateless-era (or unknown) version, or
//!    a body carrying `_meta` protocol fields without a session, is the stateless era; the rest
//!    is the session era, which needs `initialize` and then `Mcp-Session-Id` on every request;
//! 6. dispatch (`mcp::server` classifies; tools and resources answer), JSON response.
//!
//! Streams (`text/event-stream`) are used only where a response is a stream: the session era's
//! `GET` (one per session), the stateless era's `subscriptions/listen`, and a `tools/call` that
//! asks for progress (`_meta.progressToken`) from a client that accepts a stream (a federated
//! tool's progress, an approval's wait). The first two carry
//! `tools/list_changed` and `resources/list_changed` after a policy reload, keep-alive comments
//! every 15 s, and end on shutdown.

mod sessions;

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::broker::deadline::Deadline;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};

pub use sessions::{ChangeFeed, Session, Sessions, SessionsFull};

use super::{Body, Peer, body, read_incoming};
use crate::broker::Broker;
use crate::broker::audit::{AuditSink as _, Event, Kind};
use crate::broker::auth::{self, AuthError, Caller};
use crate::broker::dispatch::{self, CAPS, IDENTITY, Reply};
use crate::broker::policy::{Policy, normalize_origin};
use crate::mcp::jsonrpc::{self, Message, Request as RpcRequest, RequestId, RpcError, code};
use crate::mcp::server::{self, ListenFilter, RoutingHeaders};
use crate::mcp::version::{Era, META_PROTOCOL_VERSION, Version};

/// How long a request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive comment interval on open streams.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
const METHOD_HEADER: &str = "mcp-method";
const NAME_HEADER: &str = "mcp-name";

fn with_json(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn rpc(status: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(body(bytes));
    *r.status_mut() = status;
    with_json(r)
}

fn rpc_error(status: StatusCode, id: Option<&RequestId>, e: &RpcError) -> Response<Body> {
    rpc(status, jsonrpc::encode_error(id, e))
}

/// A refusal before dispatch: status and error (id null).
struct Refused(StatusCode, RpcError);

impl Refused {
    fn new(status: StatusCode, code: i64, message: impl Into<String>) -> Refused {
        Refused(status, RpcError::new(code, message))
    }

    fn response(self) -> Response<Body> {
        rpc_error(self.0, None, &self.1)
    }
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(body(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// HTTP status for a JSON-RPC error in revision `v`. Stateless-era errors map by code (the
/// revision requires it); session-era errors after decoding are 200 with the error in the body,
/// as the 2025 revisions and their SDKs expect.
fn status_for(v: Version, code: i64) -> StatusCode {
    if v.era() == Era::Session {
        return StatusCode::OK;
    }
    match code {
        code::PARSE_ERROR
        | code::INVALID_REQUEST
        | code::INVALID_PARAMS
        | code::HEADER_MISMATCH
        | code::MISSING_CLIENT_CAPABILITY
        | code::UNSUPPORTED_PROTOCOL_VERSION => StatusCode::BAD_REQUEST,
        code::METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    }
}

fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    host.rsplit_once(':').map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
}

fn is_loopback_name(h: &str) -> bool {
    let h = h.to_ascii_lowercase();
    h == "localhost" || h.ends_with(".localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// DNS-rebinding protection: on a loopback listener the `Host` must be a loopback name (or one
/// listed in `mcp.allowed_hosts`); a browser `Origin` must be a loopback origin or listed in
/// `mcp.allowed_origins`. Non-browser clients send no `Origin`.
pub fn check_host_origin(listen: std::net::SocketAddr, policy: &Policy, headers: &HeaderMap) -> Result<(), String> {
    check_host(listen, policy, headers)?;
    if let Some(o) = headers.get(header::ORIGIN) {
        let o = o.to_str().map_err(|_| "the Origin header is not ASCII".to_string())?;
        let allowed = normalize_origin(o).is_some_and(|n| {
            let host = n.split("://").nth(1).map(host_name).unwrap_or("");
            is_loopback_name(host) || policy.mcp.allowed_origins.contains(&n)
        });
        if !allowed {
            return Err(format!("Origin {o:?} is not allowed; add it to mcp.allowed_origins if it is yours"));
        }
    }
    Ok(())
}

/// DNS-rebinding protection alone: on a loopback listener the `Host` must be a loopback name (or
/// one listed in `mcp.allowed_hosts`). The console checks origins its own way (same-origin).
pub fn check_host(listen: std::net::SocketAddr, policy: &Policy, headers: &HeaderMap) -> Result<(), String> {
    if listen.ip().is_loopback()
        && let Some(h) = headers.get(header::HOST)
    {
        let h = h.to_str().map_err(|_| "the Host header is not ASCII".to_string())?;
        let name = host_name(h).to_ascii_lowercase();
        if !is_loopback_name(&name) && !policy.mcp.allowed_hosts.contains(&name) {
            return Err(format!(
                "Host {h:?} is not allowed on a loopback listener (DNS rebinding protection); add it to mcp.allowed_hosts if it is yours"
            ));
        }
    }
    Ok(())
}

/// The resource URL clients use (`http://<host>/mcp`), from a well-formed Host header or the
/// listener address.
/// The request's `Host` if it is a plain host[:port], else the listener's address (for URLs the
/// broker names itself by: the resource, the OAuth issuer).
pub(crate) fn request_host(broker: &Broker, headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty() && h.len() < 256 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .map_or_else(|| broker.listen.to_string(), str::to_owned)
}

fn resource_url(broker: &Broker, headers: &HeaderMap) -> String {
    format!("{}://{}/mcp", broker.scheme(), request_host(broker, headers))
}

/// `GET /.well-known/oauth-protected-resource[/mcp]` (RFC 9728).
pub fn protected_resource_metadata(broker: &Broker, headers: &HeaderMap) -> Response<Body> {
    let oauth = broker.policy().oauth.clone();
    let (resource, servers) = match &oauth {
        Some(s) => (
            crate::broker::oauth::server::resource(broker, s, headers),
            vec![crate::broker::oauth::server::issuer(broker, s, headers)],
        ),
        None => (resource_url(broker, headers), Vec::new()),
    };
    let mut v = json!({
        "resource": resource,
        "resource_name": "ephyr access broker",
        "bearer_methods_supported": ["header"],
        "authorization_servers": servers,
        "ephyr_credentials": "an agent API key (ephyr keygen agent NAME) or a task token (mac_...) as Authorization: Bearer",
    });
    if oauth.is_some() {
        v["scopes_supported"] = json!(["mcp"]);
    }
    rpc(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default())
}

fn auth_failure(broker: &Broker, headers: &HeaderMap, e: &AuthError) -> Response<Body> {
    let code = match e.status() {
        401 => code::UNAUTHENTICATED,
        403 => code::FORBIDDEN,
        429 => code::RATE_LIMITED,
        400 => code::INVALID_REQUEST,
        _ => code::INTERNAL_ERROR,
    };
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    let mut r = rpc_error(status, None, &RpcError::new(code, e.message()));
    if matches!(e.status(), 400 | 401 | 403) {
        let url = resource_url(broker, headers).replace("/mcp", "/.well-known/oauth-protected-resource/mcp");
        let mut v = format!("Bearer realm=\"ephyr\", resource_metadata=\"{url}\"");
        if broker.policy().oauth.is_some() {
            v.push_str(", scope=\"mcp\"");
        }
        if let Some(err) = e.bearer_error() {
            v.push_str(&format!(", error=\"{err}\", error_description=\"{}\"", e.message().replace(['"', '\\'], "'")));
        }
        if let Ok(hv) = HeaderValue::from_str(&v) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, hv);
        }
    }
    if let Some(secs) = e.retry_after() {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

fn accepts(headers: &HeaderMap, wanted: &str) -> bool {
    let Some(a) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        // No Accept header: anything goes (curl, simple clients).
        return true;
    };
    let major = wanted.split('/').next().unwrap_or("");
    a.split(',').any(|part| {
        let t = part.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        t == wanted || t == "*/*" || t == format!("{major}/*")
    })
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

fn method_label(m: &str) -> &'static str {
    match m {
        "initialize" => "initialize",
        "ping" => "ping",
        "server/discover" => "server/discover",
        "tools/list" => "tools/list",
        "tools/call" => "tools/call",
        "resources/list" => "resources/list",
        "resources/templates/list" => "resources/templates/list",
        "resources/read" => "resources/read",
        "logging/setLevel" => "logging/setLevel",
        "subscriptions/listen" => "subscriptions/listen",
        _ => "other",
    }
}

/// Handles a request to `/mcp`.
pub async fn handle(broker: Rc<Broker>, req: Request<Incoming>, peer: Peer) -> Response<Body> {
    let policy = broker.policy();
    let method = req.method().clone();
    if method != Method::POST && method != Method::GET && method != Method::DELETE {
        let mut r = rpc_error(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            &RpcError::new(code::INVALID_REQUEST, format!("{method} is not allowed on /mcp; use POST, GET or DELETE")),
        );
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
        return r;
    }
    if let Err(msg) = check_host_origin(broker.listen, &policy, req.headers()) {
        broker.metrics.inc("ephyr_mcp_requests_total", &[("method", "any"), ("outcome", "forbidden_origin")]);
        return rpc_error(StatusCode::FORBIDDEN, None, &RpcError::new(code::FORBIDDEN, msg));
    }
    let source = match peer {
        Peer::Tcp(a) => Some(a.ip()),
        Peer::Unix(_) => None,
    };
    let caller = match auth::authenticate(&broker, &policy, req.headers(), req.uri().query(), source).await {
        Ok(c) => c,
        Err(e) => return auth_failure(&broker, req.headers(), &e),
    };
    if method != Method::POST
        && let Err(r) = possession(&broker, &caller, req.method(), req.uri().path(), req.headers(), "-", "-", b"").await
    {
        return r;
    }
    match method {
        Method::GET => get_stream(&broker, &policy, &caller, req.headers()),
        Method::DELETE => delete_session(&broker, &policy, &caller, req.headers()),
        _ => post(&broker, &policy, &caller, req).await,
    }
}

/// Holder checks for token callers (`auth::prove_possession`): 423 while a task awaits its key,
/// 401 with the reason for a missing or bad proof.
#[allow(clippy::too_many_arguments)]
async fn possession(
    broker: &Broker,
    caller: &Caller,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    mcp_method: &str,
    tool: &str,
    body: &[u8],
) -> Result<(), Response<Body>> {
    match auth::prove_request(broker, caller, method.as_str(), path, headers, mcp_method, tool, body).await {
        Ok(()) => Ok(()),
        Err(auth::PossessionError::Locked(m)) => {
            Err(rpc_error(StatusCode::LOCKED, None, &RpcError::new(code::FORBIDDEN, m)))
        }
        Err(e) => {
            let mut r = rpc_error(StatusCode::UNAUTHORIZED, None, &RpcError::new(code::UNAUTHENTICATED, e.message()));
            let scheme = if headers.contains_key(crate::broker::tasks::pop::DPOP_HEADER) {
                "DPoP algs=\"EdDSA\", error=\"invalid_dpop_proof\""
            } else {
                "Bearer realm=\"ephyr\", error=\"invalid_token\""
            };
            let v = format!("{scheme}, error_description=\"{}\"", e.message().replace(['"', '\\'], "'"));
            if let Ok(hv) = HeaderValue::from_str(&v) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, hv);
            }
            Err(r)
        }
    }
}

/// The session named by the request.
fn session_for(broker: &Broker, policy: &Policy, caller: &Caller, headers: &HeaderMap) -> Result<Rc<Session>, Refused> {
    let sid = auth::single_header(headers, SESSION_HEADER)
        .map_err(|m| Refused::new(StatusCode::BAD_REQUEST, code::INVALID_REQUEST, m))?;
    let Some(sid) = sid else {
        return Err(Refused::new(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            "the Mcp-Session-Id header is required: send initialize first (or use protocol 2026-07-28, which needs no session)",
        ));
    };
    broker.sessions.get(sid, &caller.fingerprint, policy.mcp.session_idle_timeout).ok_or_else(|| {
        Refused::new(
            StatusCode::NOT_FOUND,
            code::SESSION_NOT_FOUND,
            "session not found or expired: send initialize again",
        )
    })
}

fn delete_session(broker: &Broker, policy: &Policy, caller: &Caller, headers: &HeaderMap) -> Response<Body> {
    match session_for(broker, policy, caller, headers) {
        Err(r) => r.response(),
        Ok(_) => {
            if let Ok(Some(sid)) = auth::single_header(headers, SESSION_HEADER) {
                broker.sessions.remove(sid);
            }
            broker.metrics.set("ephyr_mcp_sessions", &[], broker.sessions.len() as f64);
            broker.changes.wake();
            empty(StatusCode::OK)
        }
    }
}

async fn post(broker: &Rc<Broker>, policy: &Rc<Policy>, caller: &Caller, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    if !is_json(req.headers()) {
        let e = RpcError::new(code::INVALID_REQUEST, "Content-Type must be application/json");
        return rpc_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, None, &e);
    }
    if !accepts(req.headers(), "application/json") {
        let e = RpcError::new(code::INVALID_REQUEST, "Accept must include application/json (and text/event-stream)");
        return rpc_error(StatusCode::NOT_ACCEPTABLE, None, &e);
    }
    let (parts, incoming) = req.into_parts();
    let headers = parts.headers;
    let body = match read_incoming(&headers, incoming, policy.mcp.max_request_size, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(e) => {
            let status = match e {
                super::BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                super::BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
                super::BodyError::Io(_) => StatusCode::BAD_REQUEST,
            };
            return rpc_error(status, None, &RpcError::new(code::INVALID_REQUEST, e.describe()));
        }
    };
    let msg = match jsonrpc::decode(&body) {
        Ok(m) => m,
        Err(rej) => {
            broker.metrics.inc("ephyr_mcp_requests_total", &[("method", "invalid"), ("outcome", "rejected")]);
            return rpc_error(StatusCode::BAD_REQUEST, rej.id.as_ref(), &rej.error);
        }
    };
    let (mcp_method, tool) = match &msg {
        Message::Request(r) => (
            r.method.as_str(),
            if r.method == "tools/call" { r.params.get("name").and_then(Value::as_str).unwrap_or("-") } else { "-" },
        ),
        Message::Notification(n) => (n.method.as_str(), "-"),
        Message::Response => ("-", "-"),
    };
    if let Err(r) = possession(broker, caller, &parts.method, parts.uri.path(), &headers, mcp_method, tool, &body).await
    {
        return r;
    }
    let mut routing = [None; 3];
    for (i, name) in [VERSION_HEADER, METHOD_HEADER, NAME_HEADER].into_iter().enumerate() {
        match auth::single_header(&headers, name) {
            Ok(v) => routing[i] = v,
            Err(m) => {
                let id = match &msg {
                    Message::Request(r) => Some(&r.id),
                    _ => None,
                };
                return rpc_error(StatusCode::BAD_REQUEST, id, &RpcError::new(code::HEADER_MISMATCH, m));
            }
        }
    }
    let [version_header, method_header, name_header] = routing;
    let has_session = headers.contains_key(SESSION_HEADER);
    let body_is_stateless = match &msg {
        Message::Request(r) => r.params.get("_meta").and_then(|m| m.get(META_PROTOCOL_VERSION)).is_some(),
        _ => false,
    };
    let stateless = match version_header {
        Some(v) => Version::parse(v).is_none_or(|v| v.era() == Era::Stateless),
        None => !has_session && body_is_stateless,
    };
    let response = if stateless {
        let h = RoutingHeaders { protocol_version: version_header, method: method_header, name: name_header };
        post_stateless(broker, policy, caller, msg, h, &headers).await
    } else {
        post_session(broker, policy, caller, msg, version_header, &headers).await
    };
    broker.metrics.observe(
        "ephyr_mcp_request_duration_seconds",
        &[("method", "post")],
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn post_stateless(
    broker: &Rc<Broker>,
    policy: &Rc<Policy>,
    caller: &Caller,
    msg: Message,
    h: RoutingHeaders<'_>,
    headers: &HeaderMap,
) -> Response<Body> {
    match msg {
        Message::Notification(_) => {
            let requested = h.protocol_version.unwrap_or("");
            match Version::parse(requested) {
                Some(v) if v.era() == Era::Stateless => empty(StatusCode::ACCEPTED),
                _ => rpc_error(StatusCode::BAD_REQUEST, None, &server::unsupported_version(requested)),
            }
        }
        Message::Response => rpc_error(
            StatusCode::BAD_REQUEST,
            None,
            &RpcError::new(code::INVALID_REQUEST, "the body must be a single JSON-RPC request or notification"),
        ),
        Message::Request(r) => match server::check_stateless(&r.method, &r.params, h) {
            Err(e) => {
                broker
                    .metrics
                    .inc("ephyr_mcp_requests_total", &[("method", method_label(&r.method)), ("outcome", "rejected")]);
                rpc_error(StatusCode::BAD_REQUEST, Some(&r.id), &e)
            }
            Ok(st) => dispatch(broker, policy, caller, st.version, r, None, headers).await,
        },
    }
}

async fn post_session(
    broker: &Rc<Broker>,
    policy: &Rc<Policy>,
    caller: &Caller,
    msg: Message,
    version_header: Option<&str>,
    headers: &HeaderMap,
) -> Response<Body> {
    let msg = match msg {
        Message::Request(r) if r.method == "initialize" => return initialize(broker, policy, caller, r),
        other => other,
    };
    let session = match session_for(broker, policy, caller, headers) {
        Ok(s) => s,
        Err(r) => return r.response(),
    };
    if let Some(v) = version_header
        && Version::parse(v).is_none_or(|v| v.era() != Era::Session)
    {
        let e = RpcError::new(code::INVALID_REQUEST, format!("unsupported MCP-Protocol-Version {v:?}"));
        return rpc_error(StatusCode::BAD_REQUEST, None, &e);
    }
    match msg {
        Message::Notification(n) => {
            if n.method == "notifications/initialized" {
                session.initialized.set(true);
            }
            empty(StatusCode::ACCEPTED)
        }
        Message::Response => empty(StatusCode::ACCEPTED),
        Message::Request(r) => dispatch(broker, policy, caller, session.version, r, Some(&session), headers).await,
    }
}

fn initialize(broker: &Broker, policy: &Policy, caller: &Caller, r: RpcRequest) -> Response<Body> {
    let init = match server::initialize(&r.params) {
        Ok(i) => i,
        Err(e) => return rpc_error(StatusCode::BAD_REQUEST, Some(&r.id), &e),
    };
    let s = Session {
        version: init.version,
        agent: caller.agent.clone(),
        fingerprint: caller.fingerprint,
        client: init.client.clone(),
        initialized: std::cell::Cell::new(false),
        last_used: std::cell::Cell::new(Instant::now()),
        stream_open: std::cell::Cell::new(false),
        log_level: std::cell::RefCell::new("info".into()),
    };
    let sid = match broker.sessions.create(s, policy.mcp.max_sessions as usize, policy.mcp.session_idle_timeout) {
        Ok(id) => id,
        Err(SessionsFull) => {
            let e = RpcError::new(code::INTERNAL_ERROR, "no MCP sessions available (mcp.max_sessions is 0)");
            return rpc_error(StatusCode::SERVICE_UNAVAILABLE, Some(&r.id), &e);
        }
    };
    broker.metrics.set("ephyr_mcp_sessions", &[], broker.sessions.len() as f64);
    broker.metrics.inc("ephyr_mcp_requests_total", &[("method", "initialize"), ("outcome", "ok")]);
    let ev = Event::new(Kind::Auth, "mcp_session_started").agent(caller.agent.clone()).outcome(json!({
        "method": caller.method(),
        "client": init.client.name,
        "client_version": init.client.version,
        "requested_version": init.requested,
        "version": init.version.as_str(),
        "source": caller.source.map(|s| s.to_string()),
    }));
    if let Err(e) = broker.audit.note(ev) {
        log::error!("audit: {e}");
    }
    let result = server::initialize_result(init.version, &IDENTITY, CAPS);
    let mut resp = rpc(StatusCode::OK, jsonrpc::encode_result(&r.id, &result));
    if let Ok(v) = HeaderValue::from_str(&sid) {
        resp.headers_mut().insert(SESSION_HEADER, v);
    }
    resp
}

async fn dispatch(
    broker: &Rc<Broker>,
    policy: &Rc<Policy>,
    caller: &Caller,
    v: Version,
    r: RpcRequest,
    session: Option<&Rc<Session>>,
    headers: &HeaderMap,
) -> Response<Body> {
    let label = method_label(&r.method);
    // A tools/call that asks for progress, from a client that takes an event stream, is answered
    // as one: a federated tool's progress notifications, then the answer.
    let progress_token = (r.method == "tools/call"
        && headers.get(header::ACCEPT).and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("text/event-stream")))
    .then(|| r.params.get("_meta").and_then(|m| m.get("progressToken")))
    .flatten()
    .filter(|t| t.as_str().is_some_and(|s| s.len() <= 256) || t.is_i64() || t.is_u64())
    .cloned();
    let call = match server::classify(&r.method, r.params, v) {
        Ok(c) => c,
        Err(e) => {
            broker.metrics.inc("ephyr_mcp_requests_total", &[("method", label), ("outcome", "error")]);
            return rpc_error(status_for(v, e.code), Some(&r.id), &e);
        }
    };
    if let Some(token) = progress_token {
        return progress_response(broker.clone(), policy.clone(), caller.clone(), v, r.id, call, token);
    }
    let result: Result<Vec<u8>, RpcError> = match dispatch::dispatch(broker, policy, caller, v, call, None).await {
        Ok(Reply::Listen(filter)) => return listen(broker, policy, caller, r.id, filter, headers),
        Ok(Reply::SetLogLevel(level)) => {
            if let Some(s) = session {
                *s.log_level.borrow_mut() = level;
            }
            Ok(jsonrpc::encode_result(&r.id, &json!({})))
        }
        Ok(Reply::Result(value)) => Ok(jsonrpc::encode_result(&r.id, &value)),
        // The cached list is spliced in as text: no Value tree per request.
        Ok(Reply::RawMember { name, raw, rest }) => Ok(jsonrpc::encode_result_with_raw(&r.id, name, &raw, &rest)),
        Err(e) => Err(e),
    };
    let outcome = if result.is_ok() { "ok" } else { "error" };
    broker.metrics.inc("ephyr_mcp_requests_total", &[("method", label), ("outcome", outcome)]);
    match result {
        Ok(bytes) => rpc(StatusCode::OK, bytes),
        Err(e) => rpc_error(status_for(v, e.code), Some(&r.id), &e),
    }
}

/// Where a stream's notifications go.
enum StreamKind {
    /// The session era's GET stream.
    Session(String),
    /// A stateless-era subscription.
    Listen(RequestId, ListenFilter),
}

struct StreamState {
    broker: Rc<Broker>,
    kind: StreamKind,
    /// The task token the stream was opened with: (task, token expiry). The stream ends when
    /// the task is revoked or expires, or the token expires, like every proxy stream.
    token: Option<(String, Option<crate::time::UnixMicros>)>,
    seen: u64,
    started: bool,
    done: bool,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        self.broker.changes.ended();
        if let StreamKind::Session(id) = &self.kind
            && let Some(s) = self.broker.sessions.peek(id)
        {
            s.stream_open.set(false);
        }
    }
}

fn sse_event(json: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(json.len() + 24);
    b.extend_from_slice(b"event: message\ndata: ");
    b.extend_from_slice(json);
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}

impl StreamState {
    /// Whether the token the stream was opened with no longer holds.
    fn token_gone(&self) -> bool {
        self.token
            .as_ref()
            .is_some_and(|(task, exp)| self.broker.tasks.unusable(task) || exp.is_some_and(|e| crate::time::now() >= e))
    }

    /// Resolves when the token the stream was opened with stops holding (never for an API key).
    async fn token_ends(&self) {
        match &self.token {
            Some((task, exp)) => self.broker.tasks.until_unusable(task, *exp).await,
            None => futures_lite::future::pending::<()>().await,
        }
    }

    /// Ends the stream because its token no longer holds: a listen stream gets the JSON-RPC
    /// error that answers its request (401 semantics), a session stream just ends.
    fn end_for_token(&mut self) -> Option<Bytes> {
        self.done = true;
        match &self.kind {
            StreamKind::Listen(id, _) => Some(sse_event(&jsonrpc::encode_error(
                Some(id),
                &RpcError::new(code::UNAUTHENTICATED, "the task token was revoked or has expired; the stream ends"),
            ))),
            StreamKind::Session(_) => None,
        }
    }

    /// The next chunk, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if self.token_gone() {
            return self.end_for_token();
        }
        if !self.started {
            self.started = true;
            return Some(match &self.kind {
                StreamKind::Session(_) => Bytes::from_static(b": ephyr notification stream\n\n"),
                StreamKind::Listen(id, f) => sse_event(&jsonrpc::encode_notification(
                    "notifications/subscriptions/acknowledged",
                    &server::listen_acknowledged(id, *f),
                )),
            });
        }
        loop {
            let feed = &self.broker.changes;
            if feed.closed() {
                self.done = true;
                return match &self.kind {
                    StreamKind::Listen(id, _) => {
                        Some(sse_event(&jsonrpc::encode_result(id, &server::listen_ended(id, &IDENTITY))))
                    }
                    StreamKind::Session(_) => None,
                };
            }
            if let StreamKind::Session(id) = &self.kind
                && !self.broker.sessions.exists(id)
            {
                self.done = true;
                return None;
            }
            if feed.generation() != self.seen {
                self.seen = feed.generation();
                let (tools, resources, sub) = match &self.kind {
                    StreamKind::Session(_) => (true, true, None),
                    StreamKind::Listen(id, f) => (f.tools, f.resources, Some(id)),
                };
                let params = server::list_changed_params(sub);
                let mut out = Vec::new();
                if tools {
                    out.extend_from_slice(&sse_event(&jsonrpc::encode_notification(
                        "notifications/tools/list_changed",
                        &params,
                    )));
                }
                if resources {
                    out.extend_from_slice(&sse_event(&jsonrpc::encode_notification(
                        "notifications/resources/list_changed",
                        &params,
                    )));
                }
                if !out.is_empty() {
                    return Some(Bytes::from(out));
                }
                continue;
            }
            let listener = feed.listen();
            if feed.generation() != self.seen || feed.closed() {
                continue;
            }
            let woke = futures_lite::future::or(
                async {
                    listener.await;
                    Some(true)
                },
                futures_lite::future::or(
                    async {
                        Deadline::after(KEEPALIVE).await;
                        Some(false)
                    },
                    async {
                        // A revoked or expired token ends the stream at once (task events).
                        self.token_ends().await;
                        None
                    },
                ),
            )
            .await;
            match woke {
                None => return self.end_for_token(),
                Some(false) => return Some(Bytes::from_static(b": keep-alive\n\n")),
                Some(true) => {}
            }
        }
    }
}

/// The answer to a tools/call that asked for progress: an event stream carrying the progress a
/// federated tool reports, or the wait for an operator's approval (`dispatch::Progress`, under
/// the caller's token), then the answer. The call runs while the stream is read; a client that
/// goes away drops it (and so cancels a remote's work, or stops waiting, as any dropped call
/// does: the approval request stays open for the agent's retry).
fn progress_response(
    broker: Rc<Broker>,
    policy: Rc<Policy>,
    caller: Caller,
    v: Version,
    id: RequestId,
    call: server::Call,
    token: Value,
) -> Response<Body> {
    let (tx, rx) = async_channel::bounded::<Value>(32);
    let answer: std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>>>> = Box::pin(async move {
        let progress = crate::broker::dispatch::Progress { token, tx };
        let result = dispatch::dispatch(&broker, &policy, &caller, v, call, Some(&progress)).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        broker.metrics.inc("ephyr_mcp_requests_total", &[("method", "tools/call"), ("outcome", outcome)]);
        match result {
            Ok(Reply::Result(value)) => jsonrpc::encode_result(&id, &value),
            Ok(Reply::RawMember { name, raw, rest }) => jsonrpc::encode_result_with_raw(&id, name, &raw, &rest),
            Ok(_) => jsonrpc::encode_error(Some(&id), &RpcError::new(code::INTERNAL_ERROR, "unexpected reply")),
            Err(e) => jsonrpc::encode_error(Some(&id), &e),
        }
    });
    struct State {
        answer: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>>>>>,
        rx: async_channel::Receiver<Value>,
    }
    enum Step {
        Note(Value),
        Done(Vec<u8>),
    }
    let s = futures_lite::stream::unfold(State { answer: Some(answer), rx }, |mut st| async move {
        let answer = st.answer.as_mut()?;
        let rx = &st.rx;
        let step = futures_lite::future::or(
            async {
                match rx.recv().await {
                    Ok(n) => Step::Note(n),
                    Err(_) => futures_lite::future::pending().await,
                }
            },
            async { Step::Done(answer.as_mut().await) },
        )
        .await;
        let chunk = match step {
            Step::Note(n) => sse_event(n.to_string().as_bytes()),
            Step::Done(bytes) => {
                // Progress still queued goes first, then the answer; then the stream ends.
                let mut out = Vec::new();
                while let Ok(n) = st.rx.try_recv() {
                    out.extend_from_slice(&sse_event(n.to_string().as_bytes()));
                }
                out.extend_from_slice(&sse_event(&bytes));
                st.answer = None;
                Bytes::from(out)
            }
        };
        Some((Ok::<_, std::io::Error>(Frame::data(chunk)), st))
    });
    let mut r = Response::new(Box::pin(StreamBody::new(s)) as Body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-transform"));
    r
}

fn stream_response(state: StreamState) -> Response<Body> {
    let s = futures_lite::stream::unfold(state, |mut st| async move {
        let chunk = st.next().await?;
        Some((Ok::<_, std::io::Error>(Frame::data(chunk)), st))
    });
    let mut r = Response::new(Box::pin(StreamBody::new(s)) as Body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-transform"));
    r.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

fn open_stream(
    broker: &Rc<Broker>,
    policy: &Policy,
    caller: &Caller,
    kind: StreamKind,
) -> Result<Response<Body>, Refused> {
    if broker.changes.closed() {
        return Err(Refused::new(StatusCode::SERVICE_UNAVAILABLE, code::INTERNAL_ERROR, "the broker is shutting down"));
    }
    if broker.changes.streams() >= policy.mcp.max_streams as usize {
        return Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::RATE_LIMITED,
            "too many open notification streams (mcp.max_streams); retry later",
        ));
    }
    broker.changes.opened();
    let seen = broker.changes.generation();
    let token = caller.token().map(|t| (t.task.clone(), t.envelope().expires_before));
    Ok(stream_response(StreamState { broker: broker.clone(), kind, token, seen, started: false, done: false }))
}

fn get_stream(broker: &Rc<Broker>, policy: &Policy, caller: &Caller, headers: &HeaderMap) -> Response<Body> {
    if let Ok(Some(v)) = auth::single_header(headers, VERSION_HEADER)
        && Version::parse(v).is_none_or(|v| v.era() == Era::Stateless)
    {
        let mut r = rpc_error(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            &RpcError::new(code::INVALID_REQUEST, "protocol 2026-07-28 has no GET stream: use subscriptions/listen"),
        );
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    if !accepts(headers, "text/event-stream") {
        let e = RpcError::new(code::INVALID_REQUEST, "Accept must include text/event-stream");
        return rpc_error(StatusCode::NOT_ACCEPTABLE, None, &e);
    }
    let session = match session_for(broker, policy, caller, headers) {
        Ok(s) => s,
        Err(r) => return r.response(),
    };
    if session.stream_open.get() {
        let e = RpcError::new(code::INVALID_REQUEST, "a notification stream is already open for this session");
        return rpc_error(StatusCode::CONFLICT, None, &e);
    }
    let sid = auth::single_header(headers, SESSION_HEADER).ok().flatten().unwrap_or_default().to_owned();
    match open_stream(broker, policy, caller, StreamKind::Session(sid)) {
        Ok(r) => {
            session.stream_open.set(true);
            r
        }
        Err(r) => r.response(),
    }
}

fn listen(
    broker: &Rc<Broker>,
    policy: &Policy,
    caller: &Caller,
    id: RequestId,
    filter: ListenFilter,
    headers: &HeaderMap,
) -> Response<Body> {
    if !accepts(headers, "text/event-stream") {
        let e = RpcError::new(
            code::INVALID_REQUEST,
            "subscriptions/listen answers with a stream: Accept must include text/event-stream",
        );
        return rpc_error(StatusCode::NOT_ACCEPTABLE, Some(&id), &e);
    }
    broker.metrics.inc("ephyr_mcp_requests_total", &[("method", "subscriptions/listen"), ("outcome", "ok")]);
    open_stream(broker, policy, caller, StreamKind::Listen(id, filter)).unwrap_or_else(Refused::response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        m
    }

    #[test]
    fn dns_rebinding_protection() {
        let p = Policy::parse("mcp: {allowed_origins: ['https://pi.example:8554'], allowed_hosts: [pi.example]}", "t")
            .unwrap();
        let lo: std::net::SocketAddr = "127.0.0.1:8554".parse().unwrap();
        let lan: std::net::SocketAddr = "0.0.0.0:8554".parse().unwrap();
        let ok = |a, h: &[(&str, &str)]| check_host_origin(a, &p, &hm(h));
        ok(lo, &[("host", "127.0.0.1:8554")]).unwrap();
        ok(lo, &[("host", "localhost:8554"), ("origin", "http://localhost:3000")]).unwrap();
        ok(lo, &[("host", "[::1]:8554")]).unwrap();
        ok(lo, &[("host", "pi.example:8554")]).unwrap();
        ok(lo, &[]).unwrap();
        assert!(ok(lo, &[("host", "evil.example.com")]).unwrap_err().contains("DNS rebinding"));
        assert!(
            ok(lo, &[("host", "localhost"), ("origin", "http://evil.example.com")]).unwrap_err().contains("Origin")
        );
        assert!(ok(lo, &[("host", "localhost"), ("origin", "null")]).is_err());
        ok(lan, &[("host", "anything:8554")]).unwrap();
        ok(lan, &[("host", "x"), ("origin", "https://pi.example:8554")]).unwrap();
        ok(lan, &[("host", "x"), ("origin", "https://PI.example:8554/")]).unwrap();
        assert!(ok(lan, &[("host", "x"), ("origin", "http://pi.example:8554")]).is_err(), "scheme matters");
    }

    #[test]
    fn accept_and_content_type() {
        assert!(accepts(&hm(&[("accept", "application/json, text/event-stream")]), "application/json"));
        assert!(accepts(&hm(&[("accept", "text/event-stream;q=0.9, */*")]), "application/json"));
        assert!(accepts(&hm(&[]), "text/event-stream"));
        assert!(!accepts(&hm(&[("accept", "text/html")]), "application/json"));
        assert!(is_json(&hm(&[("content-type", "application/json; charset=utf-8")])));
        assert!(!is_json(&hm(&[("content-type", "text/plain")])));
        assert!(!is_json(&hm(&[])));
    }

    #[test]
    fn error_statuses_per_era() {
        assert_eq!(status_for(Version::V2026_07_28, code::METHOD_NOT_FOUND), StatusCode::NOT_FOUND);
        assert_eq!(status_for(Version::V2026_07_28, code::UNSUPPORTED_PROTOCOL_VERSION), StatusCode::BAD_REQUEST);
        assert_eq!(status_for(Version::V2026_07_28, code::INTERNAL_ERROR), StatusCode::OK);
        assert_eq!(status_for(Version::V2025_11_25, code::METHOD_NOT_FOUND), StatusCode::OK);
    }
}
