//! The broker's MCP client to a remote over Streamable HTTP (session era, protocol 2025-06-18):
//! one JSON-RPC message per POST, the answer as JSON or as a server-sent-event stream, the
//! session id the server hands out at `initialize` on every later request.
//!
//! What runs here: the executor thread; connections through `upstream::conn` (the proxy's
//! resolution, network rules, TLS and pool), secrets through the ports. Every address the name
//! resolves to must pass the policy's `network` rules, as for the proxy.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt as _, Full};
use serde_json::Value;

use crate::broker::Error;
use crate::broker::policy::{CredentialKind, Policy, Remote, Transport};
use crate::broker::ports::Ports;
use crate::broker::upstream::conn::{self, Conns};
use crate::broker::upstream::plan;

/// The session-era revision the client asks for.
pub const PROTOCOL: &str = "2025-06-18";
/// The stateless-era revision it speaks when the remote supports it.
pub const STATELESS: &str = "2026-07-28";

/// How one message travels: the session it belongs to (session era), or the stateless era's
/// routing headers.
#[derive(Clone, Copy, Debug)]
pub struct Wire<'a> {
    /// `Mcp-Session-Id` (session era).
    pub session: Option<&'a str>,
    /// The stateless era: `MCP-Protocol-Version: 2026-07-28`, `Mcp-Method`, `Mcp-Name`.
    pub stateless: bool,
    /// The JSON-RPC method.
    pub method: &'a str,
    /// The tool name of a `tools/call`.
    pub name: Option<&'a str>,
    /// The OAuth access token (`federation::auth`), for a remote that signs in with OAuth.
    pub bearer: Option<&'a crate::secret::SecretString>,
}
/// Largest event on a remote's notification stream (answers: the remote's `max_response`).
pub const MAX_ANSWER: usize = 4 << 20;

/// One remote, as a request needs it.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    /// Its name in the policy.
    pub name: &'a str,
    /// Its settings.
    pub remote: &'a Remote,
    /// The policy snapshot (network rules, TLS).
    pub policy: &'a Policy,
    /// The agent a request is for, where the remote has a sign-in per agent.
    pub subject: Option<&'a str>,
}

/// What a POST returned.
#[derive(Debug)]
pub struct Posted {
    /// HTTP status.
    pub status: u16,
    /// `Mcp-Session-Id`, when the server sent one.
    pub session: Option<String>,
    /// The JSON-RPC answer to the request (`None` for a notification's 202).
    pub message: Option<Value>,
    /// Bytes of the answer as received.
    pub size: usize,
    /// `WWW-Authenticate` of a `401` or `403`.
    pub challenge: Option<String>,
}

fn failed(ep: Endpoint<'_>, what: impl std::fmt::Display) -> Error {
    Error::Upstream { code: "remote_failed", message: format!("remote {:?}: {what}", ep.name) }
}

/// A request ready to go: where, and what.
struct Prepared {
    req: http::Request<Full<Bytes>>,
    addrs: Vec<IpAddr>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pool_key: String,
}

/// Resolves and checks the remote's address, sets up TLS, and builds a request: `msg` POSTed, or
/// (with `None`) a GET for the session's notification stream. Headers: Host, the protocol
/// version, the session (session era) or routing headers (stateless era), the credential.
async fn prepare(
    conns: &Conns,
    ports: Ports<'_>,
    ep: Endpoint<'_>,
    wire: Wire<'_>,
    msg: Option<&Value>,
    last_event_id: Option<&str>,
) -> Result<Prepared, Error> {
    let r = ep.remote;
    let Transport::Http(url) = &r.transport else { return Err(failed(ep, "not an HTTP remote")) };
    let addrs: Vec<IpAddr> =
        conn::resolve(ports.pool, &url.host, url.port, Duration::from_secs(10)).await.map_err(|e| failed(ep, e))?;
    for ip in &addrs {
        if let Err(why) = ep.policy.network.check(*ip) {
            return Err(Error::Upstream {
                code: "destination_denied",
                message: format!("remote {:?}: {why}", ep.name),
            });
        }
    }
    let tls = if url.scheme == "https" {
        let client = match (&r.tls.client_cert, &r.tls.client_key) {
            (Some(c), Some(k)) => Some((c.as_str(), ports.secrets.resolve(k).await?)),
            _ => None,
        };
        let key = format!("{}/remote/{}", ep.policy.digest, ep.name);
        Some(
            conns
                .tls_config(ports.pool, &key, r.tls.ca_file.as_deref(), client, r.tls.fingerprint)
                .await
                .map_err(|e| failed(ep, e))?,
        )
    } else {
        None
    };
    let mut path = if url.base_path.is_empty() { "/".to_owned() } else { url.base_path.clone() };
    let mut b = http::Request::builder()
        .method(if msg.is_some() { http::Method::POST } else { http::Method::GET })
        .header(header::HOST, plan::host_header(&url.scheme, &url.host, url.port))
        .header(header::ACCEPT, if msg.is_some() { "application/json, text/event-stream" } else { "text/event-stream" })
        .header("mcp-protocol-version", if wire.stateless { STATELESS } else { PROTOCOL });
    if msg.is_some() {
        b = b.header(header::CONTENT_TYPE, "application/json");
    }
    for (k, v) in &r.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    if let Some(s) = wire.session {
        b = b.header("mcp-session-id", s);
    }
    if let Some(l) = last_event_id {
        b = b.header("last-event-id", l);
    }
    if wire.stateless {
        b = b.header("mcp-method", wire.method);
        if let Some(n) = wire.name {
            b = b.header("mcp-name", n);
        }
    }
    if let Some(t) = wire.bearer {
        let value = http::HeaderValue::from_str(&format!("Bearer {}", t.expose()))
            .map_err(|_| failed(ep, "its access token cannot be sent in a header"))?;
        b = b.header(header::AUTHORIZATION, value);
    }
    if let Some(c) = &r.credential {
        let secret = ports.secrets.resolve(&c.secret).await?;
        match plan::credential_header(&c.kind, &secret).map_err(|e| failed(ep, e))? {
            Some((name, value)) => b = b.header(name, value),
            None => {
                if let CredentialKind::Query { param } = &c.kind {
                    let sep = if path.contains('?') { '&' } else { '?' };
                    path = format!("{path}{sep}{param}={}", plan::percent_encode(secret.expose()));
                }
            }
        }
    }
    let body = match msg {
        Some(m) => serde_json::to_vec(m).map_err(|e| failed(ep, e))?,
        None => Vec::new(),
    };
    let req = b.uri(path).body(Full::new(Bytes::from(body))).map_err(|e| failed(ep, e))?;
    let pool_key = format!("{}/remote/{}/{}/{}", ep.policy.digest, ep.name, url.host, url.port);
    Ok(Prepared { req, addrs, tls, pool_key })
}

/// Opens a notification stream on a connection of its own: the session era's GET stream
/// (`msg` `None`), or a stateless era `subscriptions/listen` (`msg`). `Ok(None)` when the
/// remote offers none (405, or an answer that is not an event stream).
pub async fn open_stream(
    conns: &Conns,
    ports: Ports<'_>,
    ep: Endpoint<'_>,
    wire: Wire<'_>,
    msg: Option<&Value>,
) -> Result<Option<hyper::body::Incoming>, Error> {
    let Transport::Http(url) = &ep.remote.transport else { return Ok(None) };
    let p = prepare(conns, ports, ep, wire, msg, None).await?;
    let dest =
        conn::Dest { host: &url.host, port: url.port, addrs: &p.addrs, tls: p.tls, timeout: Duration::from_secs(10) };
    let mut sender = conns.connect(&dest).await.map_err(|e| failed(ep, e))?;
    let resp = sender.send_request(p.req).await.map_err(|e| failed(ep, e))?;
    let sse = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if resp.status() != http::StatusCode::OK || !sse {
        return Ok(None);
    }
    Ok(Some(resp.into_body()))
}

/// Sends one JSON-RPC message (`id` names the answer to wait for; `None` for a notification).
pub async fn post(
    conns: &std::rc::Rc<Conns>,
    ports: Ports<'_>,
    ep: Endpoint<'_>,
    wire: Wire<'_>,
    msg: &Value,
    id: Option<u64>,
) -> Result<Posted, Error> {
    post_with(conns, ports, ep, wire, msg, id, None).await
}

/// [`post`], passing on as they arrive the `notifications/progress` of an event-stream answer
/// whose token is `progress`'s request id.
pub async fn post_with(
    conns: &std::rc::Rc<Conns>,
    ports: Ports<'_>,
    ep: Endpoint<'_>,
    wire: Wire<'_>,
    msg: &Value,
    id: Option<u64>,
    progress: Option<(&crate::broker::dispatch::Progress, u64)>,
) -> Result<Posted, Error> {
    let started = Instant::now();
    let deadline = ep.remote.timeout;
    let Prepared { req, addrs, tls, pool_key } = prepare(conns, ports, ep, wire, Some(msg), None).await?;
    let Transport::Http(url) = &ep.remote.transport else { return Err(failed(ep, "not an HTTP remote")) };
    let dest = conn::Dest { host: &url.host, port: url.port, addrs: &addrs, tls, timeout: Duration::from_secs(10) };
    let exchange = async {
        // A pooled connection first; if the request could not be written on it, a new one.
        let mut req = Some(req);
        let mut reused = conns.checkout(&pool_key);
        let (sender, resp) = loop {
            let was_reused = reused.is_some();
            let mut sender = match reused.take() {
                Some(s) => s,
                None => conns.connect(&dest).await.map_err(|e| failed(ep, e))?,
            };
            let Some(r) = req.take() else { return Err(failed(ep, "request lost")) };
            match sender.try_send_request(r).await {
                Ok(resp) => break (sender, resp),
                Err(mut e) => match e.take_message() {
                    Some(r) if was_reused => req = Some(r),
                    _ => return Err(failed(ep, e.into_error())),
                },
            }
        };
        let status = resp.status().as_u16();
        let session = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .filter(|_| matches!(status, 401 | 403))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let sse =
            resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let mut answer = http_body_util::Limited::new(resp.into_body(), ep.remote.max_response);
        let mut body: Vec<u8> = Vec::new();
        let mut relayed = 0;
        while let Some(frame) = answer.frame().await {
            let frame = frame.map_err(|e| failed(ep, format!("reading its answer: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            body.extend_from_slice(&data);
            // Progress of an event stream is passed on as each event completes.
            if sse && let Some(end) = events_end(&body[relayed..]) {
                relay(progress, &body[relayed..relayed + end]);
                relayed += end;
            }
        }
        // Read to the end: the connection can carry the next request.
        conns.checkin(pool_key.clone(), sender);
        let mut message = match id {
            None => None,
            Some(_) if body.is_empty() => None,
            Some(id) if sse => pick(&events(&body), id),
            Some(_) => serde_json::from_slice(&body).ok(),
        };
        // An event stream the remote closed before the answer, having named its events: the
        // answer follows on a GET with Last-Event-ID, after the delay it asked for (session
        // era; the stateless era has no GET).
        if let (true, false, None, Some(id)) = (sse, wire.stateless, &message, id) {
            message = resume(conns, ports, ep, wire, &body, id, progress).await?;
        }
        let size = body.len();
        Ok::<_, Error>((status, session, message, size, challenge))
    };
    let (status, session, message, size, challenge) =
        crate::broker::deadline::before(started + deadline, exchange).await.unwrap_or_else(|| {
            Err(Error::Timeout(format!("remote {:?} did not answer within {}s", ep.name, deadline.as_secs())))
        })?;
    Ok(Posted { status, session, message, size, challenge })
}

/// Passes on the progress notifications among `events` (complete events).
fn relay(progress: Option<(&crate::broker::dispatch::Progress, u64)>, events_text: &[u8]) {
    let Some((p, token)) = progress else { return };
    for m in events(events_text) {
        if m["method"] == "notifications/progress" && m["params"]["progressToken"].as_u64() == Some(token) {
            p.relay(&m["params"]);
        }
    }
}

/// The last event id and the reconnection delay (`retry:`, default 1 s, at most 10 s) an event
/// stream gave.
pub(crate) fn resume_point(body: &[u8]) -> (Option<String>, Duration) {
    let text = String::from_utf8_lossy(body);
    let (mut last, mut retry) = (None, Duration::from_secs(1));
    // Lines end at CR, LF or CRLF (the event stream format): a lone CR ends a line too, so
    // it can never reach the `Last-Event-ID` header (found by the remote_answer fuzz target).
    for line in text.split(['\r', '\n']) {
        if let Some(v) = line.strip_prefix("id:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            let usable = !v.is_empty() && v.len() <= 256 && !v.chars().any(char::is_control);
            last = usable.then(|| v.to_owned());
        } else if let Some(ms) = line.strip_prefix("retry:").and_then(|v| v.trim().parse::<u64>().ok()) {
            retry = Duration::from_millis(ms).min(Duration::from_secs(10));
        }
    }
    (last, retry)
}

/// Most reconnections to one answer's stream.
const RESUMES: usize = 5;

/// Reconnects a response stream the remote closed early (GET, `Last-Event-ID`), up to
/// [`RESUMES`] times, reading until the answer to `id` arrives; `None` if it never does.
async fn resume(
    conns: &Conns,
    ports: Ports<'_>,
    ep: Endpoint<'_>,
    wire: Wire<'_>,
    first: &[u8],
    id: u64,
    progress: Option<(&crate::broker::dispatch::Progress, u64)>,
) -> Result<Option<Value>, Error> {
    let (mut last, mut retry) = resume_point(first);
    let Transport::Http(url) = &ep.remote.transport else { return Ok(None) };
    for _ in 0..RESUMES {
        let Some(l) = last.clone() else { return Ok(None) };
        crate::broker::deadline::Deadline::after(retry).await;
        let p = prepare(conns, ports, ep, wire, None, Some(&l)).await?;
        let dest = conn::Dest {
            host: &url.host,
            port: url.port,
            addrs: &p.addrs,
            tls: p.tls,
            timeout: Duration::from_secs(10),
        };
        let mut sender = conns.connect(&dest).await.map_err(|e| failed(ep, e))?;
        let resp = sender.send_request(p.req).await.map_err(|e| failed(ep, e))?;
        let sse =
            resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if resp.status() != http::StatusCode::OK || !sse {
            return Ok(None);
        }
        let mut stream = http_body_util::Limited::new(resp.into_body(), ep.remote.max_response);
        let mut body: Vec<u8> = Vec::new();
        let mut seen = 0;
        while let Some(frame) = stream.frame().await {
            let frame = frame.map_err(|e| failed(ep, format!("reading its answer: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            body.extend_from_slice(&data);
            if let Some(end) = events_end(&body[seen..]) {
                let complete = &body[seen..seen + end];
                relay(progress, complete);
                if let Some(answer) = pick(&events(complete), id) {
                    // The stream may stay open: it is dropped (closed) here.
                    return Ok(Some(answer));
                }
                seen += end;
            }
        }
        let (l2, r2) = resume_point(&body);
        if l2.is_some() {
            last = l2;
        }
        retry = r2;
    }
    Ok(None)
}

/// Where the last complete event of `buf` ends (after its blank line), if one has.
pub(crate) fn events_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).rposition(|w| w == b"\r\n\r\n").map(|i| i + 4);
    lf.max(crlf)
}

/// The JSON messages of an event stream (`data:` lines joined per event).
pub fn events(body: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(body);
    text.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> =
                ev.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
            (!data.is_empty()).then(|| serde_json::from_str(&data.join("\n")).ok()).flatten()
        })
        .collect()
}

/// The answer with `id` among `messages`.
pub(crate) fn pick(messages: &[Value], id: u64) -> Option<Value> {
    messages
        .iter()
        .find(|m| m["id"].as_u64() == Some(id) && (m.get("result").is_some() || m.get("error").is_some()))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stream_yields_the_answer_to_our_id() {
        let body = b"event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\n\n: comment\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"ok\":true}}\r\n\r\n";
        let m = events(body);
        assert_eq!(m.len(), 2, "the broken event is skipped: {m:?}");
        assert_eq!(pick(&m, 3).unwrap()["result"]["ok"], true);
        assert!(pick(&m, 4).is_none());
    }
}
