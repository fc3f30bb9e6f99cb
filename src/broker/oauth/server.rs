//! The authorization server's endpoints on the MCP/API listener:
//!
//! | route | what |
//! |---|---|
//! | `GET /.well-known/oauth-authorization-server` | RFC 8414 metadata |
//! | `POST /oauth/register` | RFC 7591 dynamic client registration (`oauth.registration`) |
//! | `GET /oauth/authorize` | an authorization request: checked, then the browser goes to the console's consent page |
//! | `POST /oauth/token` | `authorization_code` (PKCE S256), `refresh_token` (rotating), RFC 8693 token exchange |
//! | `POST /oauth/revoke` | RFC 7009: a refresh token (its grant) or an access token (its task) |
//!
//! Errors before the client's redirect URI is known to be registered are shown, never
//! redirected (an open redirector is what an attacker wants); after, they go back to it with
//! `error`, `state` and `iss`.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};

use super::{Client, Pending};
use crate::broker::Broker;
use crate::broker::audit::{Event, Kind};
use crate::broker::http::{Body, Peer, error, json, read_body};
use crate::broker::ops::Actor;
use crate::broker::policy::OAuthSettings;
use crate::broker::upstream::plan::percent_encode;
use crate::secret::SecretString;
use std::rc::Rc;

const MAX_BODY: usize = 16 * 1024;
/// RFC 8693 token type of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 8693 grant type.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

fn host(broker: &Broker, headers: &HeaderMap) -> String {
    crate::broker::http::mcp::request_host(broker, headers)
}

/// The issuer: `oauth.issuer`, or this listener's scheme and the request's `Host`.
pub fn issuer(broker: &Broker, s: &OAuthSettings, headers: &HeaderMap) -> String {
    s.issuer.clone().unwrap_or_else(|| format!("{}://{}", broker.scheme(), host(broker, headers)))
}

/// The resource a token is for: the issuer's `/mcp`.
pub fn resource(broker: &Broker, s: &OAuthSettings, headers: &HeaderMap) -> String {
    format!("{}/mcp", issuer(broker, s, headers))
}

fn settings(broker: &Broker) -> Option<OAuthSettings> {
    broker.policy().oauth.clone()
}

fn no_store(mut r: http::Response<Body>) -> http::Response<Body> {
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An RFC 6749 §5.2 error.
fn oauth_error(status: StatusCode, code: &str, description: impl Into<String>) -> http::Response<Body> {
    no_store(json(status, &json!({ "error": code, "error_description": description.into() })))
}

fn off() -> http::Response<Body> {
    error(StatusCode::NOT_FOUND, "oauth_disabled", "this broker runs no authorization server (policy `oauth:`)")
}

/// `GET /.well-known/oauth-authorization-server`.
pub fn metadata(broker: &Broker, headers: &HeaderMap) -> http::Response<Body> {
    let Some(s) = settings(broker) else { return off() };
    let iss = issuer(broker, &s, headers);
    let mut v = json!({
        "issuer": iss,
        "authorization_endpoint": format!("{iss}/oauth/authorize"),
        "token_endpoint": format!("{iss}/oauth/token"),
        "revocation_endpoint": format!("{iss}/oauth/revoke"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials", TOKEN_EXCHANGE],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256", "EdDSA", "RS256"],
        "revocation_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
        "scopes_supported": ["mcp"],
        "authorization_response_iss_parameter_supported": true,
        "service_documentation": "https://github.com/ephyr/ephyr/blob/main/docs/oauth.md",
    });
    if s.registration {
        v["registration_endpoint"] = json!(format!("{iss}/oauth/register"));
    }
    if !s.client_id_domains.is_empty() {
        v["client_id_metadata_document_supported"] = json!(true);
    }
    json(StatusCode::OK, &v)
}

/// Routes `/oauth/*`.
pub async fn handle(
    broker: &Rc<Broker>,
    req: http::Request<hyper::body::Incoming>,
    peer: Peer,
) -> http::Response<Body> {
    if req.method() == http::Method::GET && req.uri().path() == crate::broker::federation::auth::CALLBACK_PATH {
        return remote_callback(broker, req.uri().query().unwrap_or("")).await;
    }
    let Some(s) = settings(broker) else { return off() };
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (http::Method::GET, "/oauth/authorize") => authorize(broker, &s, &req).await,
        (http::Method::POST, "/oauth/register") => register(broker, &s, req).await,
        (http::Method::POST, "/oauth/token") => token(broker, &s, req, peer).await,
        (http::Method::POST, "/oauth/revoke") => revoke(broker, req).await,
        (_, p) => error(StatusCode::NOT_FOUND, "not_found", format!("no route for {p}")),
    }
}

/// `GET /oauth/remote-callback`: where a remote's authorization server sends the operator's
/// browser back when a remote's `oauth.redirect_uri` points at the broker (`federation::auth`).
/// The `state` it carries is the only key: single use, ten minutes, known to the sign-in only.
async fn remote_callback(broker: &Broker, query: &str) -> http::Response<Body> {
    use crate::broker::console::html::{esc, page};
    let policy = broker.policy();
    let (status, title, text) = match broker.federation.finish_login(broker.ports(), &policy, query).await {
        Ok((remote, agent)) => {
            let whom = agent.map_or(String::new(), |a| format!(" for agent {a}"));
            (
                StatusCode::OK,
                "Signed in",
                format!("The broker is signed in to remote {remote}{whom}. You can close this page."),
            )
        }
        Err(e) => (e.status(), "Sign-in failed", e.message()),
    };
    let body = format!("<h1>{}</h1><p>{}</p>", esc(title), esc(&text));
    let mut r = crate::broker::console::html_response(status, page(title, "", None, &body));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r.headers_mut().insert(http::header::REFERRER_POLICY, http::HeaderValue::from_static("no-referrer"));
    r
}

async fn body_json(req: http::Request<hyper::body::Incoming>) -> Result<Value, http::Response<Body>> {
    let b = read_body(req, MAX_BODY, Duration::from_secs(10)).await.map_err(|e| e.response())?;
    serde_json::from_slice(&b)
        .map_err(|e| oauth_error(StatusCode::BAD_REQUEST, "invalid_client_metadata", format!("request body: {e}")))
}

/// `POST /oauth/register` (RFC 7591).
async fn register(
    broker: &Broker,
    s: &OAuthSettings,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    if !s.registration {
        return oauth_error(StatusCode::FORBIDDEN, "access_denied", "dynamic registration is off (oauth.registration)");
    }
    let v = match body_json(req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let bad = |m: String| oauth_error(StatusCode::BAD_REQUEST, "invalid_client_metadata", m);
    let uris: Vec<String> = match v["redirect_uris"].as_array() {
        Some(a) if !a.is_empty() && a.len() <= 10 => a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect(),
        _ => return oauth_error(StatusCode::BAD_REQUEST, "invalid_redirect_uri", "redirect_uris: give 1-10 URIs"),
    };
    for u in &uris {
        if let Err(e) = super::redirect_uri_ok(u) {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_redirect_uri", e);
        }
    }
    let method = v["token_endpoint_auth_method"].as_str().unwrap_or("client_secret_basic");
    if !["none", "client_secret_post", "client_secret_basic"].contains(&method) {
        return bad(format!("token_endpoint_auth_method {method:?} is not supported"));
    }
    for (field, allowed) in [
        ("grant_types", &["authorization_code", "refresh_token", TOKEN_EXCHANGE][..]),
        ("response_types", &["code"][..]),
    ] {
        if let Some(list) = v[field].as_array()
            && let Some(x) = list.iter().find(|g| !g.as_str().is_some_and(|g| allowed.contains(&g)))
        {
            return bad(format!("{field}: {x} is not supported"));
        }
    }
    let name: String =
        v["client_name"].as_str().unwrap_or("unnamed client").chars().filter(|c| !c.is_control()).take(100).collect();
    let id = match super::fresh("ephyr_client_") {
        Ok(i) => i.expose().chars().take(40).collect::<String>(),
        Err(e) => return error(e.status(), e.code(), e.message()),
    };
    let secret = if method == "none" {
        None
    } else {
        match super::fresh("ephyr_cs_") {
            Ok(s) => Some(s),
            Err(e) => return error(e.status(), e.code(), e.message()),
        }
    };
    let now = crate::time::now().secs();
    let client = Client {
        id: id.clone(),
        secret: secret.as_ref().map(|s| super::digest(s.expose())),
        name: name.clone(),
        redirect_uris: uris.clone(),
        at: now,
    };
    let d = match broker.oauth.register(client) {
        Ok(d) => d,
        Err(e) => return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", e.message()),
    };
    if let Err(e) = d.wait().await {
        return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", e.message());
    }
    let ev = Event::new(Kind::Agent, "oauth_client_registered")
        .action(json!({ "client_id": id, "client_name": name, "redirect_uris": uris, "auth": method }))
        .allow();
    broker.audit_now(ev).await;
    let mut out = json!({
        "client_id": id,
        "client_id_issued_at": now,
        "client_name": name,
        "redirect_uris": uris,
        "token_endpoint_auth_method": method,
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    });
    if let Some(s) = &secret {
        out["client_secret"] = json!(s.expose());
        out["client_secret_expires_at"] = json!(0);
    }
    no_store(json(StatusCode::CREATED, &out))
}

fn query(req: &http::Request<hyper::body::Incoming>) -> Vec<(String, String)> {
    crate::broker::console::actions::form(req.uri().query().unwrap_or("").as_bytes())
}

fn one<'a>(q: &'a [(String, String)], k: &str) -> Result<Option<&'a str>, String> {
    let mut it = q.iter().filter(|(a, _)| a == k);
    let first = it.next().map(|(_, v)| v.as_str());
    if it.next().is_some() {
        return Err(format!("{k} appears more than once"));
    }
    Ok(first)
}

/// `redirect_uri?error=…&state=…&iss=…` (or `code=…`).
fn back(redirect_uri: &str, params: &[(&str, &str)]) -> http::Response<Body> {
    let mut url = redirect_uri.to_owned();
    url.push(if url.contains('?') { '&' } else { '?' });
    let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", percent_encode(v.as_bytes()))).collect();
    url.push_str(&q.join("&"));
    let mut r = http::Response::new(crate::broker::http::body(Vec::new()));
    *r.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    no_store(r)
}

/// Sends the browser back to the client with an error.
pub fn back_error(p: &Pending, code: &str, description: &str) -> http::Response<Body> {
    let mut params = vec![("error", code), ("error_description", description)];
    if let Some(s) = &p.state {
        params.push(("state", s));
    }
    params.push(("iss", &p.issuer));
    back(&p.redirect_uri, &params)
}

/// Sends the browser back to the client with a code.
pub fn back_code(p: &Pending, code: &str) -> http::Response<Body> {
    let mut params = vec![("code", code)];
    if let Some(s) = &p.state {
        params.push(("state", s));
    }
    params.push(("iss", &p.issuer));
    back(&p.redirect_uri, &params)
}

/// The console's base URL: `oauth.console_url`, or the request's host with the dashboard port.
fn console_base(broker: &Broker, s: &OAuthSettings, headers: &HeaderMap) -> String {
    if let Some(c) = &s.console_url {
        return c.clone();
    }
    let h = host(broker, headers);
    let name = match h.rfind(':') {
        Some(i) if !h[i..].contains(']') => &h[..i],
        _ => h.as_str(),
    };
    format!("{}://{name}:{}", broker.scheme(), broker.dashboard_listen.port())
}

/// `GET /oauth/authorize`.
async fn authorize(
    broker: &Broker,
    s: &OAuthSettings,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    let q = query(req);
    let shown = |m: String| {
        broker.metrics.inc("ephyr_oauth_requests_total", &[("endpoint", "authorize"), ("outcome", "invalid")]);
        error(StatusCode::BAD_REQUEST, "invalid_request", m)
    };
    let get = |k: &str| one(&q, k);
    let (client_id, redirect) = match (get("client_id"), get("redirect_uri")) {
        (Ok(Some(c)), Ok(r)) => (c, r),
        (Ok(None), _) => return shown("client_id is required".into()),
        (Err(e), _) | (_, Err(e)) => return shown(e),
    };
    let client = match broker.oauth.client(client_id) {
        Some(c) => c,
        None if client_id.starts_with("https://") => match super::cimd::client(broker, s, client_id).await {
            Ok(c) => c,
            Err(e) => return shown(format!("client {client_id:?}: {e}")),
        },
        None => return shown(format!("no client {client_id:?} is registered here")),
    };
    let redirect_uri = match redirect {
        Some(r) if client.redirect_uris.iter().any(|u| u == r) => r.to_owned(),
        Some(r) => return shown(format!("redirect_uri {r:?} is not registered for this client")),
        None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
        None => return shown("redirect_uri is required (the client registered several)".into()),
    };
    let iss = issuer(broker, s, req.headers());
    let state = get("state").ok().flatten().map(str::to_owned);
    let mut pending = Pending {
        client: client.id.clone(),
        redirect_uri,
        state,
        challenge: String::new(),
        resource: resource(broker, s, req.headers()),
        issuer: iss,
        at: std::time::Instant::now(),
    };
    let fail = |p: &Pending, code: &str, m: &str| {
        broker.metrics.inc("ephyr_oauth_requests_total", &[("endpoint", "authorize"), ("outcome", "invalid")]);
        back_error(p, code, m)
    };
    for k in ["response_type", "code_challenge", "code_challenge_method", "scope", "resource", "state"] {
        if let Err(e) = get(k) {
            return fail(&pending, "invalid_request", &e);
        }
    }
    if get("response_type").ok().flatten() != Some("code") {
        return fail(&pending, "unsupported_response_type", "response_type must be code");
    }
    match (get("code_challenge").ok().flatten(), get("code_challenge_method").ok().flatten()) {
        (Some(c), Some("S256"))
            if c.len() == 43 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            pending.challenge = c.to_owned();
        }
        (Some(_), Some("S256")) => {
            return fail(&pending, "invalid_request", "code_challenge is not a base64url SHA-256");
        }
        (None, _) => return fail(&pending, "invalid_request", "PKCE is required: send code_challenge with S256"),
        (Some(_), _) => return fail(&pending, "invalid_request", "code_challenge_method must be S256"),
    }
    if let Some(r) = get("resource").ok().flatten()
        && r.trim_end_matches('/') != pending.resource
    {
        return fail(&pending, "invalid_target", &format!("this server issues tokens for {} only", pending.resource));
    }
    if let Some(sc) = get("scope").ok().flatten()
        && let Some(x) = sc.split(' ').find(|x| !x.is_empty() && !["mcp", "offline_access"].contains(x))
    {
        return fail(&pending, "invalid_scope", &format!("unknown scope {x:?}; this server knows mcp"));
    }
    let id = match broker.oauth.hold(pending.clone()) {
        Ok(id) => id,
        Err(e) => return fail(&pending, "temporarily_unavailable", &e.message()),
    };
    broker.metrics.inc("ephyr_oauth_requests_total", &[("endpoint", "authorize"), ("outcome", "consent")]);
    let url = format!("{}/oauth/consent?request={id}", console_base(broker, s, req.headers()));
    let mut r = http::Response::new(crate::broker::http::body(Vec::new()));
    *r.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    no_store(r)
}

/// The client a token or revocation request authenticates as: `Ok(None)` for no client at all.
fn client_auth(headers: &HeaderMap, f: &[(String, String)], broker: &Broker) -> Result<Option<Client>, String> {
    let field = |k: &str| one(f, k);
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic ").or_else(|| h.strip_prefix("basic ")))
        .map(|b| -> Result<(String, SecretString), String> {
            let raw =
                data_encoding::BASE64.decode(b.trim().as_bytes()).map_err(|_| "Basic credentials are not base64")?;
            let text = String::from_utf8(raw).map_err(|_| "Basic credentials are not UTF-8")?;
            let (id, secret) = text.split_once(':').ok_or("Basic credentials have no ':'")?;
            let dec = |s: &str| {
                crate::broker::policy::pattern::percent_decode(s)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default()
            };
            Ok((dec(id), SecretString::new(dec(secret))))
        })
        .transpose()?;
    let (id, secret) = match basic {
        Some((id, s)) => (Some(id), Some(s)),
        None => {
            (field("client_id")?.map(str::to_owned), field("client_secret")?.map(|s| SecretString::new(s.to_owned())))
        }
    };
    let Some(id) = id else { return Ok(None) };
    let client = broker.oauth.client(&id).ok_or_else(|| format!("no client {id:?}"))?;
    match (&client.secret, secret) {
        (None, None) => Ok(Some(client)),
        (None, Some(_)) => Err("this client is public: it has no secret".into()),
        (Some(_), None) => Err("this client must authenticate with its secret".into()),
        (Some(want), Some(got)) => {
            let d = super::digest(got.expose());
            if crate::secret::constant_time_eq(d.as_bytes(), want.as_bytes()) {
                Ok(Some(client))
            } else {
                Err("wrong client secret".into())
            }
        }
    }
}

/// A task for `agent`, through `task_create` (its checks, audit and journal): (task id, token,
/// seconds to expiry).
async fn access_task(
    broker: &Rc<Broker>,
    agent: &str,
    client: &str,
    ttl: Duration,
) -> Result<(String, SecretString, u64), String> {
    let policy = broker.policy();
    let a = policy.agents.get(agent).ok_or_else(|| format!("agent {agent:?} is gone"))?;
    if !a.state.serves() {
        return Err(format!("agent {agent:?} is {}", a.state.as_str()));
    }
    let ttl = ttl.min(a.max_task_ttl);
    let mut fp = [0u8; 32];
    let _ = crate::secret::random_bytes(&mut fp);
    let caller = crate::broker::auth::Caller {
        agent: agent.to_owned(),
        via: crate::broker::auth::Via::ApiKey,
        fingerprint: fp,
        source: None,
    };
    let mut args = Map::new();
    args.insert("description".into(), Value::from(format!("OAuth access token for client {client}")));
    args.insert("ttl".into(), Value::from(format!("{}s", ttl.as_secs())));
    // Delegable (token exchange) when the agent may delegate; the tool ANDs the two.
    args.insert("can_delegate".into(), Value::from(a.can_delegate));
    let call = crate::mcp::server::Call::ToolsCall { name: "task_create".into(), arguments: args };
    let v = crate::mcp::version::Version::V2026_07_28;
    let (text, is_error) = match crate::broker::dispatch::dispatch(broker, &policy, &caller, v, call, None).await {
        Ok(crate::broker::dispatch::Reply::Result(result)) => crate::broker::dispatch::tool_text(&result),
        _ => return Err("task_create did not answer".into()),
    };
    if is_error {
        return Err(text);
    }
    let made: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    match (made["task_id"].as_str(), made["token"].as_str()) {
        (Some(id), Some(t)) => Ok((id.to_owned(), SecretString::new(t.to_owned()), ttl.as_secs())),
        _ => Err("task_create answered without a token".into()),
    }
}

async fn revoke_task(broker: &Broker, id: &str, why: &'static str) {
    if let Some(v) = ulid::Ulid::from_string(id).ok().and_then(|u| broker.tasks.view(u))
        && v.revoked.is_none()
    {
        let _ = crate::broker::ops::revoke_task(broker, &Actor::Broker(why), &v).await;
    }
}

/// Revokes grant `id` and its access token's task (reuse, revocation, the agent's end).
pub async fn end_grant(broker: &Broker, id: &str, why: &'static str) {
    let task = broker.oauth.get(id).and_then(|g| g.task);
    match broker.oauth.revoke(id, why) {
        Ok(Some(d)) => {
            let _ = d.wait().await;
        }
        Ok(None) => {}
        Err(e) => log::warn!("oauth: grant {id} not revoked: {}", e.message()),
    }
    if let Some(t) = task {
        revoke_task(broker, &t, why).await;
    }
}

fn tokens(access: &SecretString, expires_in: u64, refresh: Option<&SecretString>) -> http::Response<Body> {
    let mut v = json!({
        "access_token": access.expose(),
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": "mcp",
    });
    if let Some(r) = refresh {
        v["refresh_token"] = json!(r.expose());
    }
    no_store(json(StatusCode::OK, &v))
}

/// `POST /oauth/token`.
async fn token(
    broker: &Rc<Broker>,
    s: &OAuthSettings,
    req: http::Request<hyper::body::Incoming>,
    peer: Peer,
) -> http::Response<Body> {
    let headers = req.headers().clone();
    let body = match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
        Ok(b) => zeroize::Zeroizing::new(b.to_vec()),
        Err(e) => return e.response(),
    };
    let f = crate::broker::console::actions::form(&body);
    let field = |k: &str| one(&f, k);
    let outcome =
        |o: &'static str| broker.metrics.inc("ephyr_oauth_requests_total", &[("endpoint", "token"), ("outcome", o)]);
    let invalid = |code: &str, m: String| {
        outcome("invalid");
        oauth_error(StatusCode::BAD_REQUEST, code, m)
    };
    let grant_type = match field("grant_type") {
        Ok(Some(g)) => g.to_owned(),
        Ok(None) => return invalid("invalid_request", "grant_type is required".into()),
        Err(e) => return invalid("invalid_request", e),
    };
    let res = resource(broker, s, &headers);
    if grant_type == "client_credentials" {
        return client_credentials(broker, s, &f, &headers, &res).await;
    }
    let client = match client_auth(&headers, &f, broker) {
        Ok(c) => c,
        Err(e) => {
            outcome("invalid");
            return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", e);
        }
    };
    if let Ok(Some(r)) = field("resource")
        && r.trim_end_matches('/') != res
    {
        return invalid("invalid_target", format!("this server issues tokens for {res} only"));
    }
    match grant_type.as_str() {
        "authorization_code" => {
            let Some(client) = client else {
                return invalid("invalid_client", "client_id is required".into());
            };
            let Ok(Some(code)) = field("code") else { return invalid("invalid_request", "code is required".into()) };
            let redeemed = broker.oauth.redeem(
                code,
                &client.id,
                field("redirect_uri").ok().flatten(),
                field("code_verifier").ok().flatten(),
            );
            let r = match redeemed {
                Ok(r) => r,
                Err((m, reused)) => {
                    if let Some(g) = reused.filter(|g| !g.is_empty()) {
                        end_grant(broker, &g, "oauth_code_reused").await;
                    }
                    return invalid("invalid_grant", m);
                }
            };
            let (task, access, expires_in) = match access_task(broker, &r.agent, &client.name, s.access_ttl).await {
                Ok(t) => t,
                Err(e) => return invalid("invalid_grant", e),
            };
            let expires = crate::time::now().secs() + i64::try_from(s.refresh_ttl.as_secs()).unwrap_or(i64::MAX / 2);
            let (gid, refresh, d) = match broker.oauth.grant(&client.id, &r.agent, &r.resource, expires, &task) {
                Ok(x) => x,
                Err(e) => {
                    revoke_task(broker, &task, "oauth_grant_failed").await;
                    return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", e.message());
                }
            };
            broker.oauth.code_made(code, &gid);
            if let Err(e) = d.wait().await {
                revoke_task(broker, &task, "oauth_grant_failed").await;
                return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", e.message());
            }
            let ev = Event::new(Kind::Agent, "oauth_token_issued")
                .agent(r.agent.clone())
                .task(task.clone(), vec![task.clone()])
                .action(json!({ "grant_type": "authorization_code", "client_id": client.id, "grant": gid, "resource": r.resource }))
                .allow();
            broker.audit_now(ev).await;
            outcome("ok");
            tokens(&access, expires_in, Some(&refresh))
        }
        "refresh_token" => {
            let Ok(Some(rt)) = field("refresh_token") else {
                return invalid("invalid_request", "refresh_token is required".into());
            };
            let g = match broker.oauth.by_refresh(rt) {
                Ok(g) => g,
                Err(Some(reused)) => {
                    end_grant(broker, &reused, "oauth_refresh_reused").await;
                    let ev = Event::new(Kind::Agent, "oauth_refresh_reused")
                        .deny("refresh_token_reused", "a refresh token was used twice: its grant is revoked")
                        .action(json!({ "grant": reused }));
                    broker.audit_now(ev).await;
                    return invalid("invalid_grant", "the refresh token was used before: the grant is revoked".into());
                }
                Err(None) => return invalid("invalid_grant", "unknown refresh token".into()),
            };
            if client.as_ref().map(|c| c.id.as_str()) != Some(g.client.as_str()) {
                return invalid("invalid_grant", "the refresh token was issued to another client".into());
            }
            if let Some(why) = &g.revoked {
                return invalid("invalid_grant", format!("the grant is revoked ({why})"));
            }
            if g.expires <= crate::time::now().secs() {
                return invalid("invalid_grant", "the grant expired: authorize again".into());
            }
            let (task, access, expires_in) = match access_task(broker, &g.agent, &g.client, s.access_ttl).await {
                Ok(t) => t,
                Err(e) => return invalid("invalid_grant", e),
            };
            let (refresh, d) = match broker.oauth.rotate(&g.id, Some(task.clone())) {
                Ok(x) => x,
                Err(e) => {
                    revoke_task(broker, &task, "oauth_grant_failed").await;
                    return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", e.message());
                }
            };
            if let Err(e) = d.wait().await {
                return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", e.message());
            }
            // One live access token per grant: the one before goes.
            if let Some(old) = &g.task {
                revoke_task(broker, old, "oauth_refreshed").await;
            }
            let ev = Event::new(Kind::Agent, "oauth_token_issued")
                .agent(g.agent.clone())
                .task(task.clone(), vec![task.clone()])
                .action(json!({ "grant_type": "refresh_token", "client_id": g.client, "grant": g.id }))
                .allow();
            broker.audit_now(ev).await;
            outcome("ok");
            tokens(&access, expires_in, Some(&refresh))
        }
        TOKEN_EXCHANGE => exchange(broker, &f, peer).await,
        other => invalid("unsupported_grant_type", format!("grant_type {other:?} is not supported")),
    }
}

/// RFC 7523 client authentication assertion type.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The `client_credentials` grant for key-bound agents (the `oauth-client-credentials`
/// extension with a JWT assertion, RFC 7523 §2.2): the agent proves possession of the key it
/// joined with on every token request; the answer is an access token (a task token), no
/// refresh token.
async fn client_credentials(
    broker: &Rc<Broker>,
    s: &OAuthSettings,
    f: &[(String, String)],
    headers: &HeaderMap,
    res: &str,
) -> http::Response<Body> {
    let field = |k: &str| one(f, k);
    let invalid = |status: StatusCode, code: &str, m: String| {
        broker.metrics.inc("ephyr_oauth_requests_total", &[("endpoint", "token"), ("outcome", "invalid")]);
        oauth_error(status, code, m)
    };
    if field("client_assertion_type").ok().flatten() != Some(JWT_BEARER) {
        return invalid(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            format!(
                "client_credentials needs client_assertion_type {JWT_BEARER} (private_key_jwt); secrets are not accepted for it"
            ),
        );
    }
    let Ok(Some(assertion)) = field("client_assertion") else {
        return invalid(StatusCode::UNAUTHORIZED, "invalid_client", "client_assertion is required".into());
    };
    // Whose key: the client_id, else the assertion's (unverified) sub; then verified with it.
    let claimed = match field("client_id").ok().flatten() {
        Some(c) => c.to_owned(),
        None => unverified_sub(assertion).unwrap_or_default(),
    };
    let Some(jwk) = broker.agents.jwk(&claimed) else {
        return invalid(StatusCode::UNAUTHORIZED, "invalid_client", format!("no key-bound agent {claimed:?}"));
    };
    let key = match crate::broker::jose::key(&jwk) {
        Ok(k) => k,
        Err(e) => return invalid(StatusCode::UNAUTHORIZED, "invalid_client", e),
    };
    let iss = issuer(broker, s, headers);
    let audiences = [iss.clone(), format!("{iss}/"), format!("{iss}/oauth/token")];
    let expect = crate::broker::jose::Expect {
        issuers: std::slice::from_ref(&claimed),
        audiences: &audiences,
        subject: Some(&claimed),
        max_lifetime: Some(600),
    };
    let claims = match crate::broker::jose::verify(assertion, &[key], &expect) {
        Ok(c) => c,
        Err(e) => {
            broker.auth.failed(None, std::time::Instant::now());
            return invalid(StatusCode::UNAUTHORIZED, "invalid_client", format!("client_assertion: {e}"));
        }
    };
    let Some(jti) = claims["jti"].as_str().filter(|j| !j.is_empty() && j.len() <= 256) else {
        return invalid(StatusCode::UNAUTHORIZED, "invalid_client", "client_assertion: no jti".into());
    };
    let exp = claims["exp"].as_i64().unwrap_or(0);
    if !broker.oauth.fresh_assertion(&claimed, jti, exp) {
        return invalid(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client_assertion: this jti was used before".into(),
        );
    }
    let (task, access, expires_in) = match access_task(broker, &claimed, &claimed, s.access_ttl).await {
        Ok(t) => t,
        Err(e) => return invalid(StatusCode::BAD_REQUEST, "invalid_grant", e),
    };
    let ev = Event::new(Kind::Agent, "oauth_token_issued")
        .agent(claimed.clone())
        .task(task.clone(), vec![task.clone()])
        .action(json!({ "grant_type": "client_credentials", "client_id": claimed, "resource": res }))
        .allow();
    broker.audit_now(ev).await;
    broker.metrics.inc("ephyr_oauth_requests_total", &[("endpoint", "token"), ("outcome", "ok")]);
    tokens(&access, expires_in, None)
}

/// The `sub` of a JWT, unverified (only to pick the key that then verifies it).
fn unverified_sub(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = data_encoding::BASE64URL_NOPAD.decode(payload.trim_end_matches('=').as_bytes()).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?["sub"].as_str().map(str::to_owned)
}

/// Authenticates a token as the MCP endpoint would (its agent's state included).
async fn caller_of(broker: &Broker, token: &str, peer: Peer) -> Result<crate::broker::auth::Caller, String> {
    let mut h = HeaderMap::new();
    let v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| "the token has invalid characters")?;
    h.insert(header::AUTHORIZATION, v);
    let source = match peer {
        Peer::Tcp(a) => Some(a.ip()),
        Peer::Unix(_) => None,
    };
    let policy = broker.policy();
    crate::broker::auth::authenticate(broker, &policy, &h, None, source).await.map_err(|e| e.message())
}

/// Scope tokens of a token exchange → a task envelope (`tool:exec target:web service:github
/// remote:fs`); `mcp` adds nothing.
fn envelope_of(scope: &str) -> Result<Option<Value>, String> {
    let mut env: Map<String, Value> = Map::new();
    for s in scope.split(' ').filter(|s| !s.is_empty() && *s != "mcp") {
        let (kind, name) = s.split_once(':').ok_or_else(|| format!("scope {s:?} is not KIND:NAME"))?;
        let key = match kind {
            "tool" => "tools",
            "target" => "targets",
            "service" => "services",
            "remote" => "remotes",
            _ => return Err(format!("scope {s:?}: KIND is tool, target, service or remote")),
        };
        if name.is_empty() {
            return Err(format!("scope {s:?} names nothing"));
        }
        if let Some(a) = env.entry(key).or_insert_with(|| Value::Array(Vec::new())).as_array_mut() {
            a.push(Value::from(name));
        }
    }
    Ok((!env.is_empty()).then_some(Value::Object(env)))
}

/// RFC 8693: a subject token (a task token, which OAuth access tokens are) and an optional
/// actor token in; a child task of the subject's out, narrowed by `scope`, handed to the
/// actor's agent when there is one (recorded in the lineage). Never wider: it is a delegation.
async fn exchange(broker: &Rc<Broker>, f: &[(String, String)], peer: Peer) -> http::Response<Body> {
    let field = |k: &str| one(f, k);
    let invalid = |code: &str, m: String| {
        broker.metrics.inc("ephyr_oauth_requests_total", &[("endpoint", "token"), ("outcome", "invalid")]);
        oauth_error(StatusCode::BAD_REQUEST, code, m)
    };
    let (Ok(Some(subject)), Ok(Some(subject_type))) = (field("subject_token"), field("subject_token_type")) else {
        return invalid("invalid_request", "subject_token and subject_token_type are required".into());
    };
    if subject_type != ACCESS_TOKEN_TYPE {
        return invalid("invalid_request", format!("subject_token_type must be {ACCESS_TOKEN_TYPE}"));
    }
    if let Ok(Some(t)) = field("requested_token_type")
        && t != ACCESS_TOKEN_TYPE
    {
        return invalid("invalid_request", format!("requested_token_type must be {ACCESS_TOKEN_TYPE}"));
    }
    let caller = match caller_of(broker, subject, peer).await {
        Ok(c) => c,
        Err(e) => return invalid("invalid_grant", format!("subject_token: {e}")),
    };
    let Some(t) = caller.token() else {
        return invalid(
            "invalid_request",
            "subject_token must be a task token or an access token of this server, not an API key".into(),
        );
    };
    if !matches!(t.holder, crate::broker::tasks::Holder::Bearer) {
        return invalid(
            "invalid_grant",
            "subject_token is bound to a holder key: delegate it with task_delegate and a proof instead".into(),
        );
    }
    let actor = match (field("actor_token"), field("actor_token_type")) {
        (Ok(Some(a)), Ok(Some(ty))) if ty == ACCESS_TOKEN_TYPE || ty == "urn:ietf:params:oauth:token-type:jwt" => {
            match caller_of(broker, a, peer).await {
                Ok(c) => Some(c),
                Err(e) => return invalid("invalid_grant", format!("actor_token: {e}")),
            }
        }
        (Ok(Some(_)), _) => return invalid("invalid_request", "actor_token needs actor_token_type".into()),
        (Ok(None), Ok(Some(_))) => return invalid("invalid_request", "actor_token_type without actor_token".into()),
        _ => None,
    };
    let envelope = match envelope_of(field("scope").ok().flatten().unwrap_or("")) {
        Ok(e) => e,
        Err(e) => return invalid("invalid_scope", e),
    };
    let mut args = Map::new();
    args.insert("description".into(), Value::from("RFC 8693 token exchange"));
    if let Some(e) = envelope {
        args.insert("envelope".into(), e);
    }
    if let Some(a) = &actor
        && a.agent != caller.agent
    {
        args.insert("agent".into(), Value::from(a.agent.clone()));
    }
    let policy = broker.policy();
    let call = crate::mcp::server::Call::ToolsCall { name: "task_delegate".into(), arguments: args };
    let v = crate::mcp::version::Version::V2026_07_28;
    let (text, is_error) = match crate::broker::dispatch::dispatch(broker, &policy, &caller, v, call, None).await {
        Ok(crate::broker::dispatch::Reply::Result(result)) => crate::broker::dispatch::tool_text(&result),
        _ => {
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "task_delegate did not answer",
            );
        }
    };
    if is_error {
        return invalid("invalid_grant", text);
    }
    let made: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let Some(token) = made["token"].as_str() else {
        return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "no token was made");
    };
    let token = SecretString::new(token.to_owned());
    let expires_in = made["expires_at"]
        .as_str()
        .and_then(|e| crate::time::parse_rfc3339(e).ok())
        .map_or(0, |e| (e.secs() - crate::time::now().secs()).max(0));
    let ev = Event::new(Kind::Agent, "oauth_token_exchanged")
        .agent(caller.agent.clone())
        .action(json!({
            "subject_task": t.task, "actor": actor.as_ref().map(|a| a.agent.clone()),
            "child_task": made["task_id"], "child_agent": made["agent"],
        }))
        .allow();
    broker.audit_now(ev).await;
    broker.metrics.inc("ephyr_oauth_requests_total", &[("endpoint", "token"), ("outcome", "exchanged")]);
    no_store(json(
        StatusCode::OK,
        &json!({
            "access_token": token.expose(),
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": expires_in,
        }),
    ))
}

/// `POST /oauth/revoke` (RFC 7009: 200 whatever the token was).
async fn revoke(broker: &Broker, req: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
    let headers = req.headers().clone();
    let body = match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
        Ok(b) => zeroize::Zeroizing::new(b.to_vec()),
        Err(e) => return e.response(),
    };
    let f = crate::broker::console::actions::form(&body);
    let client = match client_auth(&headers, &f, broker) {
        Ok(c) => c,
        Err(e) => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", e),
    };
    let Ok(Some(token)) = one(&f, "token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "token is required");
    };
    if token.starts_with("ephyr_rt_") {
        if let Ok(g) = broker.oauth.by_refresh(token)
            && client.as_ref().is_some_and(|c| c.id == g.client)
        {
            end_grant(broker, &g.id, "oauth_revoked").await;
        }
    } else if token.starts_with("mac_")
        && let Ok(id) = broker.tasks.verify_token(token, &crate::broker::auth::fingerprint(token), crate::time::now())
    {
        revoke_task(broker, &id.task, "oauth_revoked").await;
    }
    no_store(json(StatusCode::OK, &json!({})))
}

#[cfg(test)]
mod tests {
    use super::{envelope_of, unverified_sub};
    use serde_json::json;

    #[test]
    fn exchange_scopes_become_an_envelope() {
        assert_eq!(envelope_of("mcp").unwrap(), None);
        assert_eq!(
            envelope_of("tool:exec service:api service:git target:web").unwrap(),
            Some(json!({"tools": ["exec"], "services": ["api", "git"], "targets": ["web"]}))
        );
        for (bad, why) in [("planet:mars", "KIND is"), ("service:", "names nothing"), ("service", "not KIND:NAME")] {
            assert!(envelope_of(bad).unwrap_err().contains(why), "{bad}");
        }
    }

    #[test]
    fn the_unverified_subject_only_picks_a_key() {
        let enc = |v: &[u8]| data_encoding::BASE64URL_NOPAD.encode(v);
        let jwt = format!("{}.{}.sig", enc(b"{}"), enc(br#"{"sub":"keyed"}"#));
        assert_eq!(unverified_sub(&jwt).as_deref(), Some("keyed"));
        assert_eq!(unverified_sub("garbage"), None);
    }
}
