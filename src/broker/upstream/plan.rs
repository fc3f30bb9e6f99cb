//! What the proxy sends and returns (pure): which service a URL belongs to, the upstream
//! request's path and headers with the credential injected, and the response headers the agent
//! may see.
//!
//! Request headers from the agent pass except: hop-by-hop headers (and any the `Connection`
//! header names), framing (`Host`, `Content-Length`, `Expect`), every credential-carrying header
//! (`Authorization`, `Proxy-Authorization`, `X-API-Key`, the proof headers `DPoP` and
//! `Ephyr-PoP`, the service's own credential header), forwarding headers and anything `X-Ephyr-*`.
//! The agent therefore cannot override the injected credential or impersonate the broker.
//! Response headers lose hop-by-hop headers and everything that carries or asks for credentials
//! (`Set-Cookie`, `WWW-Authenticate`, `Authorization`, ...); a header containing the secret is
//! dropped.

use http::{HeaderMap, HeaderName, HeaderValue, header};

use super::scrub::Scrubber;
use crate::broker::policy::network::numeric_host_form;
use crate::broker::policy::pattern::{NormalPath, normalise_path, percent_decode};
use crate::broker::policy::{CredentialKind, Policy, Service, host_specificity};
use crate::secret::SecretBytes;

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the agent may not send upstream. The method-override headers would turn a
/// granted method into another on frameworks that honour them (a grant of POST becoming DELETE):
/// the method `authorize` checked is the only one the upstream sees.
const REQUEST_DROPPED: [&str; 16] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "host",
    "content-length",
    "expect",
    "authorization",
    "x-api-key",
    "dpop",
    "ephyr-pop",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "accept-encoding",
];

/// The first transfer-coding of a response other than `chunked` (and `identity`), if any.
pub fn foreign_transfer_coding(h: &HeaderMap) -> Option<String> {
    h.get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes()).split(',').map(|c| c.trim().to_ascii_lowercase()).collect::<Vec<_>>()
        })
        .find(|c| !c.is_empty() && c != "chunked" && c != "identity")
}

/// Response headers that carry or ask for credentials.
const RESPONSE_DROPPED: [&str; 8] = [
    "set-cookie",
    "set-cookie2",
    "www-authenticate",
    "authorization",
    "proxy-authorization",
    "authentication-info",
    "proxy-authentication-info",
    "x-api-key",
];

/// Header naming the proxy on both sides.
pub const PROXY_HEADER: &str = "x-ephyr-proxy";
/// Header carrying the request id on both sides.
pub const REQUEST_ID_HEADER: &str = "x-ephyr-request-id";

/// A URL resolved to a service.
#[derive(Debug, PartialEq, Eq)]
pub struct UrlMatch {
    /// The service.
    pub service: String,
    /// Destination host (lower case, no brackets).
    pub host: String,
    /// Path and query relative to the service's base path.
    pub path: String,
}

/// Finds the service a full URL belongs to: same scheme and port, a host the service allows,
/// and a path under its base path. The most specific host wins, then the longest base path.
/// A URL no service covers is an error: it is never fetched unchecked.
pub fn match_url(policy: &Policy, url: &str) -> Result<UrlMatch, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("url {url:?} is not a URL: {e}"))?;
    let scheme = match uri.scheme_str().map(str::to_ascii_lowercase) {
        Some(s) if s == "http" || s == "https" => s,
        Some(s) => return Err(format!("url {url:?}: scheme {s:?} is not supported (http or https)")),
        None => return Err(format!("url {url:?} must be absolute (http:// or https://)")),
    };
    let auth = uri.authority().ok_or_else(|| format!("url {url:?} has no host"))?;
    if auth.as_str().contains('@') {
        return Err(format!("url {url:?}: user names and passwords in URLs are not allowed"));
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if numeric_host_form(&host) {
        return Err(format!(
            "url {url:?}: host {host:?} is a number in a form resolvers disagree on; write IPv4 addresses in dotted-decimal form"
        ));
    }
    let port = auth.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    let normal = normalise_path(path).map_err(|e| format!("url {url:?}: {e}"))?;
    let best = policy
        .services
        .iter()
        .filter(|(_, s)| s.enabled && s.url.scheme == scheme && s.url.port == port)
        .filter(|(_, s)| under_base(&normal.decoded, &s.url.base_path))
        .filter_map(|(n, s)| host_specificity(&s.allowed_hosts, &host).map(|h| (h, s.url.base_path.len(), n, s)))
        .max_by_key(|(h, b, _, _)| (*h, *b));
    let Some((_, _, name, s)) = best else {
        return Err(format!(
            "no service covers {scheme}://{host}:{port}{}: a URL is fetched only through a service in the policy (one without a credential is enough)",
            normal.decoded
        ));
    };
    let rel = normal.encoded.strip_prefix(s.url.base_path.as_str()).unwrap_or(&normal.encoded);
    let mut rel = if rel.is_empty() { "/".to_owned() } else { rel.to_owned() };
    if let Some(q) = &normal.query {
        rel.push('?');
        rel.push_str(q);
    }
    Ok(UrlMatch { service: name.clone(), host, path: rel })
}

fn under_base(path: &str, base: &str) -> bool {
    base.is_empty() || path == base || (path.starts_with(base) && path.as_bytes().get(base.len()) == Some(&b'/'))
}

/// The forms of an injected secret as they can appear on the wire (for scrubbing).
pub fn secret_forms(kind: &CredentialKind, secret: &SecretBytes) -> Vec<Vec<u8>> {
    let raw = secret.expose().to_vec();
    let mut forms = vec![raw.clone()];
    match kind {
        CredentialKind::Basic { username } => {
            let mut pair = username.as_bytes().to_vec();
            pair.push(b':');
            pair.extend_from_slice(&raw);
            forms.push(data_encoding::BASE64.encode(&pair).into_bytes());
            pair.fill(0);
        }
        CredentialKind::Query { .. } => forms.push(percent_encode(&raw).into_bytes()),
        CredentialKind::Bearer | CredentialKind::Header { .. } => {}
    }
    if raw.contains(&b'/') {
        forms.push(String::from_utf8_lossy(&raw).replace('/', "\\/").into_bytes());
    }
    forms
}

/// The header that carries `secret` for a credential of `kind` (`None` for a query credential),
/// marked sensitive; the intermediate copies are wiped. The proxy and federation both inject
/// credentials this way.
pub fn credential_header(
    kind: &CredentialKind,
    secret: &SecretBytes,
) -> Result<Option<(HeaderName, HeaderValue)>, String> {
    let bad = || "the secret has characters a header cannot carry (control characters or newlines)".to_string();
    let value = |prefix: &[u8], secret: &[u8]| -> Result<HeaderValue, String> {
        let mut v = prefix.to_vec();
        v.extend_from_slice(secret);
        let hv = HeaderValue::from_bytes(&v).map_err(|_| bad());
        v.fill(0);
        let mut hv = hv?;
        hv.set_sensitive(true);
        Ok(hv)
    };
    Ok(Some(match kind {
        CredentialKind::Bearer => (header::AUTHORIZATION, value(b"Bearer ", secret.expose())?),
        CredentialKind::Basic { username } => {
            let mut pair = username.as_bytes().to_vec();
            pair.push(b':');
            pair.extend_from_slice(secret.expose());
            let encoded = zeroize::Zeroizing::new(data_encoding::BASE64.encode(&pair));
            pair.fill(0);
            (header::AUTHORIZATION, value(b"Basic ", encoded.as_bytes())?)
        }
        CredentialKind::Header { name, prefix } => {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("credential header {name:?} is invalid"))?;
            (n, value(prefix.as_bytes(), secret.expose())?)
        }
        CredentialKind::Query { .. } => return Ok(None),
    }))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            s.push(char::from(c));
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

/// The upstream path and query: the service's base path, the normalised path, the agent's query
/// without any parameter named like the credential's, then the credential's parameter.
pub fn upstream_path(service: &Service, path: &NormalPath, secret: Option<&SecretBytes>) -> String {
    let mut out = String::with_capacity(service.url.base_path.len() + path.encoded.len() + 16);
    out.push_str(&service.url.base_path);
    out.push_str(&path.encoded);
    let param = match (&service.credential, secret) {
        (Some(c), Some(s)) => match &c.kind {
            CredentialKind::Query { param } => Some((param.as_str(), s)),
            _ => None,
        },
        _ => None,
    };
    let mut pairs: Vec<&str> =
        path.query.as_deref().map(|q| q.split('&').filter(|p| !p.is_empty()).collect()).unwrap_or_default();
    if let Some((name, _)) = param {
        pairs.retain(|p| {
            let key = p.split('=').next().unwrap_or("");
            key != name && percent_decode(key).ok().as_deref() != Some(name.as_bytes())
        });
    }
    if !pairs.is_empty() || param.is_some() {
        out.push('?');
        out.push_str(&pairs.join("&"));
        if let Some((name, s)) = param {
            if !pairs.is_empty() {
                out.push('&');
            }
            out.push_str(&percent_encode(name.as_bytes()));
            out.push('=');
            out.push_str(&percent_encode(s.expose()));
        }
    }
    out
}

/// The `Host` header for a service URL (port omitted when it is the scheme's default).
pub fn host_header(scheme: &str, host: &str, port: u16) -> String {
    let h = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
    let default = if scheme == "https" { 443 } else { 80 };
    if port == default { h } else { format!("{h}:{port}") }
}

/// `headers` without hop-by-hop headers (also those the `Connection` header names), anything
/// `X-Ephyr-*`, the names in `dropped`, and whatever `drop` says.
fn pass_through(headers: &HeaderMap, dropped: &[&str], drop: impl Fn(&str, &HeaderValue) -> bool) -> HeaderMap {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len() + 4);
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || dropped.contains(&n)
            || n.starts_with("x-ephyr-")
            || listed.iter().any(|l| l == n)
            || drop(n, value)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The upstream request headers.
pub fn request_headers(
    agent: &HeaderMap,
    service: &Service,
    host: &str,
    secret: Option<&SecretBytes>,
    request_id: &str,
) -> Result<HeaderMap, String> {
    let cred_header = match service.credential.as_ref().map(|c| &c.kind) {
        Some(CredentialKind::Header { name, .. }) => Some(name.to_ascii_lowercase()),
        _ => None,
    };
    let mut out = pass_through(agent, &REQUEST_DROPPED, |n, _| cred_header.as_deref() == Some(n));
    for (k, v) in &service.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("static header {k:?} is invalid"))?;
        let value = HeaderValue::from_str(v).map_err(|_| format!("static header {k:?} has an invalid value"))?;
        out.insert(name, value);
    }
    out.insert(
        header::HOST,
        HeaderValue::from_str(&host_header(&service.url.scheme, host, service.url.port))
            .map_err(|_| format!("host {host:?} cannot be a Host header"))?,
    );
    if !out.contains_key(header::USER_AGENT) {
        out.insert(header::USER_AGENT, HeaderValue::from_static(concat!("ephyr/", env!("CARGO_PKG_VERSION"))));
    }
    if let (Some(c), Some(s)) = (&service.credential, secret) {
        // The response is scrubbed for the secret, which a compressed body would hide.
        out.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        if let Some((name, value)) = credential_header(&c.kind, s)? {
            out.insert(name, value);
        }
    }
    out.insert(PROXY_HEADER, HeaderValue::from_static(concat!("ephyr/", env!("CARGO_PKG_VERSION"))));
    out.insert(REQUEST_ID_HEADER, HeaderValue::from_str(request_id).map_err(|_| "bad request id".to_string())?);
    Ok(out)
}

/// The response headers the agent sees.
pub fn response_headers(upstream: &HeaderMap, scrub: &Scrubber, service: &str, request_id: &str) -> HeaderMap {
    let mut out = pass_through(upstream, &RESPONSE_DROPPED, |_, v| scrub.contains(v.as_bytes()));
    if let Ok(v) = HeaderValue::from_str(service) {
        out.insert(PROXY_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        out.insert(REQUEST_ID_HEADER, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::policy::{Credential, SecretRef};

    fn policy() -> Policy {
        Policy::parse(
            r#"
version: 1
services:
  api: { url: "https://api.example.com/v1", credential: { type: bearer, secret: "env:X" }, allowed_hosts: [uploads.example.com] }
  api-admin: { url: "https://api.example.com/v1/admin" }
  web: { url: "http://any.invalid", allowed_hosts: ["*"] }
  local: { url: "http://127.0.0.1:8080" }
agents:
  a: { api_key_hash: "$argon2id$v=19$m=19456,t=2,p=1$EGLPWvUDnoDhQUvjerb0Eg$eUzfssKNVqQzWz1wt4i3OthKxUWw4qY+QzwylwLkqnE", services: { "*": {} } }
"#,
            "t.yaml",
        )
        .unwrap()
    }

    #[test]
    fn urls_resolve_to_the_most_specific_service_or_are_refused() {
        let p = policy();
        let m = |u: &str| match_url(&p, u);
        assert_eq!(
            m("https://api.example.com/v1/models?limit=2").unwrap(),
            UrlMatch { service: "api".into(), host: "api.example.com".into(), path: "/models?limit=2".into() }
        );
        assert_eq!(m("https://API.example.com/v1/admin/users").unwrap().service, "api-admin");
        assert_eq!(m("https://uploads.example.com/v1/x").unwrap().service, "api");
        assert_eq!(m("https://api.example.com/v1").unwrap().path, "/");
        assert_eq!(m("https://api.example.com/v1/a/../b").unwrap().path, "/b");
        assert_eq!(m("http://127.0.0.1:8080/x").unwrap().service, "local");
        assert_eq!(
            m("http://169.254.169.254/latest/meta-data").unwrap().service,
            "web",
            "* matches; the network rules decide"
        );
        assert_eq!(m("http://api.example.com/v1/x").unwrap().service, "web", "the scheme and port decide too");
        for (u, words) in [
            ("https://api.example.com/v2/models", "no service covers"),
            ("https://api.example.com/v1/../v2", "no service covers"),
            ("https://evil.example.com/v1/x", "no service covers"),
            ("http://127.0.0.1:8081/", "no service covers"),
            ("http://2130706433/", "dotted-decimal"),
            ("http://0177.0.0.1/", "dotted-decimal"),
            ("http://0x7f.1/", "dotted-decimal"),
            ("http://user:pw@any.invalid/", "passwords"),
            ("ftp://any.invalid/", "not supported"),
            ("/relative", "absolute"),
            ("https://api.example.com/v1/%2e%2e/v2", "dot segment"),
        ] {
            let e = m(u).unwrap_err();
            assert!(e.contains(words), "{u}: {e}");
        }
    }

    #[test]
    fn credentials_are_injected_and_cannot_be_overridden() {
        let p = policy();
        let mut s = p.services["api"].clone();
        let secret = SecretBytes::new(b"sk-REAL".to_vec());
        let mut agent = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer mac_agents_token"),
            ("x-api-key", "mac_x"),
            ("connection", "close, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("host", "evil.example"),
            ("x-ephyr-proxy", "forged"),
            ("content-type", "application/json"),
            ("accept-encoding", "gzip"),
            ("x-forwarded-for", "10.0.0.1"),
            ("dpop", "proof"),
            ("x-http-method-override", "DELETE"),
            ("X-HTTP-Method", "DELETE"),
            ("x-method-override", "DELETE"),
        ] {
            agent.append(k, HeaderValue::from_static(v));
        }
        let h = request_headers(&agent, &s, "api.example.com", Some(&secret), "01J").unwrap();
        assert_eq!(h["authorization"], "Bearer sk-REAL");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h["host"], "api.example.com");
        assert_eq!(h["accept-encoding"], "identity");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h[REQUEST_ID_HEADER], "01J");
        assert!(h[PROXY_HEADER].to_str().unwrap().starts_with("ephyr/"));
        for gone in [
            "x-api-key",
            "connection",
            "x-secret-hop",
            "x-forwarded-for",
            "dpop",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        s.credential = Some(Credential {
            kind: CredentialKind::Header { name: "X-Api-Key".into(), prefix: String::new() },
            secret: SecretRef::Env("X".into()),
        });
        let mut agent = HeaderMap::new();
        agent.insert("x-api-key", HeaderValue::from_static("agent-chosen"));
        let h = request_headers(&agent, &s, "api.example.com", Some(&secret), "01J").unwrap();
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
        assert_eq!(h["x-api-key"], "sk-REAL");
        s.credential = Some(Credential {
            kind: CredentialKind::Basic { username: "ci".into() },
            secret: SecretRef::Env("X".into()),
        });
        let h = request_headers(&HeaderMap::new(), &s, "api.example.com", Some(&secret), "01J").unwrap();
        assert_eq!(h["authorization"], format!("Basic {}", data_encoding::BASE64.encode(b"ci:sk-REAL")));
        let bad = SecretBytes::new(b"a\nb".to_vec());
        let bearer = &p.services["api"];
        assert!(
            request_headers(&HeaderMap::new(), bearer, "api.example.com", Some(&bad), "01J")
                .unwrap_err()
                .contains("cannot carry")
        );
    }

    #[test]
    fn query_credentials_replace_the_agents_parameter() {
        let p = policy();
        let mut s = p.services["api"].clone();
        s.credential = Some(Credential {
            kind: CredentialKind::Query { param: "key".into() },
            secret: SecretRef::Env("X".into()),
        });
        let secret = SecretBytes::new(b"s/k&1".to_vec());
        let np = normalise_path("/search?q=1&key=mine&k%65y=also&x=2").unwrap();
        assert_eq!(upstream_path(&s, &np, Some(&secret)), "/v1/search?q=1&x=2&key=s%2Fk%261");
        let np = normalise_path("/search").unwrap();
        assert_eq!(upstream_path(&s, &np, Some(&secret)), "/v1/search?key=s%2Fk%261");
        s.credential = None;
        assert_eq!(upstream_path(&s, &normalise_path("/a/?b").unwrap(), None), "/v1/a/?b");
        let forms = secret_forms(&CredentialKind::Query { param: "key".into() }, &secret);
        assert!(forms.contains(&b"s%2Fk%261".to_vec()) && forms.contains(&b"s\\/k&1".to_vec()));
    }

    #[test]
    fn response_headers_lose_credentials_and_hops() {
        let mut up = HeaderMap::new();
        for (k, v) in [
            ("set-cookie", "sid=1"),
            ("www-authenticate", "Bearer"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/event-stream"),
            ("x-echo", "Bearer sk-REAL"),
            ("location", "http://other.example/steal"),
        ] {
            up.append(k, HeaderValue::from_static(v));
        }
        let scrub = Scrubber::new(vec![b"sk-REAL".to_vec()]);
        let h = response_headers(&up, &scrub, "api", "01J");
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert_eq!(h["content-type"], "text/event-stream");
        assert_eq!(h["location"], "http://other.example/steal");
        assert_eq!(h[PROXY_HEADER], "api");
        assert_eq!(h[REQUEST_ID_HEADER], "01J");
    }
}
