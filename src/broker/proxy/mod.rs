//! The credential-injecting HTTP proxy: one request from an agent (the `http_request` tool or the
//! `/v1/proxy/<service>/...` route) to a service's upstream, with the service's secret added.
//!
//! What runs here, on the executor thread: `authorize` for the service, method and normalised
//! path; name resolution (blocking pool) and `authorize` again for the host and **every**
//! resolved address (network rules: loopback, link-local, metadata, ULA, CGNAT, ... denied by
//! default); the secret from the store (signer unseal, cached); for methods other than GET,
//! HEAD and OPTIONS, an audit record that is durable before the request leaves; then the request
//! on a pooled or new connection to one of the checked addresses (`upstream::conn`). Redirects are
//! returned, never followed. The response streams back through `upstream::body::UpstreamBody`: bounded by the
//! service's `max_response`, `read_timeout` between chunks and `timeout` overall, scrubbed of
//! the secret (`upstream::scrub`), and cut when the caller's task is revoked or expires. Memory per
//! request is hyper's read buffer plus one chunk: nothing is buffered beyond what the client
//! has not yet taken (hyper's backpressure reaches the upstream socket).

pub(crate) mod route;
pub(crate) mod shape;

use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::broker::deadline::Deadline;
use bytes::Bytes;
use futures_lite::FutureExt as _;
use http::{HeaderMap, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::Error;
use super::audit::{Event, Kind};
use super::auth::Caller;
use super::metrics::PolicyName;
use super::policy::{Action, ActionKind, Arguments, Decision, Policy, authorize, pattern::normalise_path};
use super::ports::Ports;
use super::upstream::body::{Limits, UpstreamBody, chain};
use super::upstream::scrub::Scrubber;
use super::upstream::{conn, plan};

/// Methods that are sent without waiting for their audit record to be durable (they change
/// nothing upstream by definition; their outcome is still recorded).
pub fn safe_method(m: &str) -> bool {
    matches!(m, "GET" | "HEAD" | "OPTIONS")
}

/// One proxied request, as the agent asked for it.
pub struct Call<'a> {
    /// The MCP tool it comes through (`None` for the proxy route).
    pub tool: Option<&'a str>,
    /// Service name.
    pub service: &'a str,
    /// Destination host when a URL named one (default: the service's).
    pub host: Option<&'a str>,
    /// Method, upper case.
    pub method: &'a str,
    /// Path and query relative to the service's base path, as given.
    pub path: &'a str,
    /// The agent's headers (filtered by [`plan::request_headers`]).
    pub headers: &'a HeaderMap,
    /// Request body.
    pub body: Bytes,
    /// A shorter overall timeout than the service's.
    pub timeout: Option<Duration>,
    /// `tool` or `route`, for audit and metrics.
    pub via: &'static str,
    /// The tool call's arguments (`Arguments::None` for the route: the service, method and path
    /// are the action's own facts either way).
    pub arguments: Arguments<'a>,
}

/// The upstream's answer.
pub struct Answer {
    /// Status (3xx included: redirects are not followed).
    pub status: StatusCode,
    /// Filtered headers.
    pub headers: HeaderMap,
    /// The streaming body.
    pub body: UpstreamBody,
    /// Request id (also in `X-Ephyr-Request-Id` on both sides).
    pub request_id: String,
    /// `scheme://host[:port]/path` (no query: it may hold the credential).
    pub url: String,
    /// The normalised path relative to the service (what policy checked).
    pub path: String,
}

/// The proxy (executor thread only).
pub struct Proxy {
    conns: Rc<conn::Conns>,
}

impl Proxy {
    /// A proxy whose connections are driven on `ex`.
    pub fn new(ex: Rc<smol::LocalExecutor<'static>>) -> Self {
        Proxy { conns: Rc::new(conn::Conns::new(ex)) }
    }

    /// Forgets pooled connections and TLS settings (policy reload, secret change).
    pub fn clear(&self) {
        self.conns.clear();
    }

    /// Authorizes, resolves, checks and sends one request; the answer's body streams.
    pub async fn send(
        &self,
        ports: Ports<'_>,
        caller: &Caller,
        policy: &Policy,
        call: Call<'_>,
    ) -> Result<Answer, Error> {
        let started = Instant::now();
        let path = normalise_path(call.path).map_err(|e| Error::Invalid(format!("path: {e}")))?;
        let principal = caller.principal();
        let (service, method) = (call.service, call.method);
        let http = ActionKind::Http { service, method, path: &path.decoded };
        if let Decision::Deny(d) =
            authorize(policy, &principal, &Action { tool: call.tool, kind: http, arguments: call.arguments })
        {
            return Err(Error::Denied(d));
        }
        let Some(s) = policy.services.get(service) else {
            return Err(Error::Invalid(format!("no service {service:?}")));
        };
        if call.body.len() as u64 > s.max_request {
            return Err(Error::TooLarge(format!(
                "request body is {} bytes; service {service:?} accepts at most {} (max_request)",
                call.body.len(),
                s.max_request
            )));
        }
        if let Some(f) = ports.audit.failure() {
            return Err(Error::Unavailable(format!("the audit log is unavailable ({f}); requests are refused")));
        }
        let host = call.host.unwrap_or(&s.url.host).to_owned();
        // An approval rule may hold the request: it leaves only once an operator approved this
        // method, path, query, host and body.
        let gated = super::policy::approval::Gated::Http { service, method, path: &path.decoded };
        super::approvals::clear(ports, policy, caller, gated, || {
            let mut exact = Vec::with_capacity(call.path.len() + host.len() + call.body.len() + 2);
            exact.extend_from_slice(call.path.as_bytes());
            exact.push(0);
            exact.extend_from_slice(host.as_bytes());
            exact.push(0);
            exact.extend_from_slice(&call.body);
            let shown = json!({
                "kind": "http", "service": service, "method": method, "path": path.decoded, "host": host,
                "body_bytes": call.body.len(), "body_sha256": super::approvals::sha256_hex(&call.body), "via": call.via,
            });
            super::approvals::Subject { shown, exact }
        })
        .await?;
        let total = call.timeout.map_or(s.timeout, |t| t.min(s.timeout));
        let deadline = started + total;
        let addrs: Vec<IpAddr> =
            conn::resolve(ports.pool, &host, s.url.port, s.connect_timeout).await.map_err(Error::upstream)?;
        let upstream = ActionKind::HttpUpstream { service, method, path: &path.decoded, host: &host, addrs: &addrs };
        if let Decision::Deny(d) =
            authorize(policy, &principal, &Action { tool: call.tool, kind: upstream, arguments: call.arguments })
        {
            return Err(Error::Denied(d));
        }
        let secret = match &s.credential {
            None => None,
            Some(c) => Some(ports.secrets.resolve(&c.secret).await?),
        };
        let scrub = match (&s.credential, &secret) {
            (Some(c), Some(v)) => Scrubber::new(plan::secret_forms(&c.kind, v)),
            _ => Scrubber::default(),
        };
        let request_id = crate::ids::new_ulid(crate::time::now()).to_string();
        let headers = plan::request_headers(call.headers, s, &host, secret.as_ref(), &request_id)
            .map_err(|e| Error::Invalid(format!("service {service:?}: {e}")))?;
        let uri = plan::upstream_path(s, &path, secret.as_ref());
        drop(secret);
        let mut req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(call.body))
            .map_err(|e| Error::Invalid(format!("request: {e}")))?;
        *req.headers_mut() = headers;
        let url = format!(
            "{}://{}{}{}",
            s.url.scheme,
            plan::host_header(&s.url.scheme, &host, s.url.port),
            s.url.base_path,
            path.encoded
        );

        // A request that may change something upstream is on disk before it leaves.
        let ticket = if safe_method(method) {
            None
        } else {
            let mut ev = Event::new(Kind::Http, "http_request")
                .agent(caller.agent.clone())
                .action(json!({
                    "service": service, "method": method, "path": path.decoded, "host": host,
                    "request_id": request_id, "via": call.via,
                }))
                .allow();
            if let Some(t) = caller.token() {
                ev = ev.task(t.task.clone(), t.lineage.clone()).initiated_by(t.initiated_by.clone());
            }
            Some(ports.audit.record(ev).map_err(|e| Error::Unavailable(format!("audit: {e}")))?)
        };
        let tls = if s.url.scheme == "https" {
            let client = match (&s.tls.client_cert, &s.tls.client_key) {
                (Some(c), Some(k)) => Some((c.as_str(), ports.secrets.resolve(k).await?)),
                _ => None,
            };
            let key = format!("{}/{service}", policy.digest);
            Some(
                self.conns
                    .tls_config(ports.pool, &key, s.tls.ca_file.as_deref(), client, s.tls.fingerprint)
                    .await
                    .map_err(|e| Error::Unavailable(format!("service {service:?}: {e}")))?,
            )
        } else {
            None
        };
        let pool_key = format!("{}/{service}/{host}/{}", policy.digest, s.url.port);
        let dest = conn::Dest { host: &host, port: s.url.port, addrs: &addrs, tls, timeout: s.connect_timeout };
        let remaining = |what: &str| {
            let left = deadline.saturating_duration_since(Instant::now());
            (left, format!("{what} took longer than the {}s allowed", total.as_secs_f64()))
        };

        // A pooled connection first; if the request could not be written on it, a new one.
        let exchange = async {
            if let Some(d) = ticket {
                d.durable().await.map_err(|e| Error::Unavailable(format!("audit: {e}")))?;
            }
            let mut req = Some(req);
            let mut reused = self.conns.checkout(&pool_key);
            loop {
                let was_reused = reused.is_some();
                let mut sender = match reused.take() {
                    Some(s) => s,
                    None => self.conns.connect(&dest).await.map_err(|e| match e {
                        conn::ConnectError::Timeout(_) => Error::Timeout(format!("connecting to {host}: {e}")),
                        other => Error::upstream(format!("connecting to {host}: {other}")),
                    })?,
                };
                let Some(r) = req.take() else { return Err(Error::upstream("request lost")) };
                match sender.try_send_request(r).await {
                    Ok(resp) => return Ok((sender, resp)),
                    Err(mut e) => match e.take_message() {
                        Some(r) if was_reused => req = Some(r),
                        _ => return Err(Error::upstream(format!("{host}: {}", chain(&e.into_error())))),
                    },
                }
            }
        };
        let (left, late) = remaining("the upstream's answer");
        let head_limit = left.min(s.read_timeout);
        let (sender, resp) = exchange
            .or(async {
                Deadline::after(head_limit).await;
                Err(Error::Timeout(if head_limit < left {
                    format!("{host} sent no response headers within {}s (read_timeout)", head_limit.as_secs_f64())
                } else {
                    late
                }))
            })
            .await?;
        let (parts, incoming) = resp.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::upstream(format!("{host} switched protocols, which the proxy does not carry")));
        }
        // A transfer-coding other than chunked (`Transfer-Encoding: gzip, chunked`) reaches us
        // undecoded: it could hide the credential from the scrubber, and the agent could not
        // decode it either once the hop-by-hop header is dropped. Refused like a compressed
        // content-coding.
        if let Some(te) = plan::foreign_transfer_coding(&parts.headers) {
            return Err(Error::upstream(format!(
                "{host} sent a body with transfer-coding {te:?}; only chunked is carried (it could hide the credential from the check, and the agent could not decode it), so it is not passed on"
            )));
        }
        if scrub.is_active()
            && let Some(enc) = parts.headers.get(http::header::CONTENT_ENCODING)
            && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return Err(Error::upstream(format!(
                "{host} sent a {}-encoded body although identity was asked for; it cannot be checked for the credential, so it is not passed on",
                String::from_utf8_lossy(enc.as_bytes())
            )));
        }
        ports.metrics.inc_named(
            "ephyr_proxy_requests_total",
            ("service", PolicyName::service(policy, service)),
            &[("code", super::http::status_class(parts.status))],
        );
        let headers = plan::response_headers(&parts.headers, &scrub, service, &request_id);
        // The stream is cut when the caller's task is revoked or expires, or its token expires.
        let ended = caller.token().map(|t| ports.tasks.ended(t.task.clone(), t.envelope().expires_before));
        let body = UpstreamBody::new(
            incoming,
            scrub,
            Limits { max_bytes: s.max_response, read_timeout: s.read_timeout, total, deadline },
            ended,
            Some((self.conns.clone(), pool_key, sender)),
        );
        Ok(Answer { status: parts.status, headers, body, request_id, url, path: path.decoded })
    }
}
