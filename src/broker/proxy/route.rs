//! `/v1/proxy/<service>/<path>`: the proxy for clients that are not MCP clients — an OpenAI or
//! Anthropic SDK configured with `base_url = http://broker:8554/v1/proxy/openai` and the task
//! token (or an API key) as its API key works unchanged.
//!
//! What runs here: authentication (`Authorization: Bearer`, or `X-API-Key` as the Anthropic SDK
//! sends it), the proof of possession for bound tasks (over the method, authority, path and
//! body), the agent's rate limit, the request body read up to the service's `max_request`, then
//! [`super::Proxy::send`]. The response streams back as it arrives (chunked and SSE included).
//! Every request's outcome is audited (`http_response`, with status, bytes and duration) when
//! its body ends; a refusal is audited as `http_request` with its reason.

use std::rc::Rc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;

use super::Call;
use crate::broker::Broker;
use crate::broker::Error;
use crate::broker::audit::{AuditSink as _, Event, Kind};
use crate::broker::auth::{self, Caller};
use crate::broker::http::{Body, Peer, read_incoming};
use crate::broker::policy::ErrorStyle;

/// The route's prefix.
pub const PREFIX: &str = "/v1/proxy/";
/// Time allowed for a request body to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Body limit before the service is known (it is checked against the service's afterwards).
const MAX_BODY_UNKNOWN: usize = 1 << 20;

/// The proxy's own error answer, in the service's error style (`shape`).
fn refuse(style: ErrorStyle, status: StatusCode, code: &str, message: String) -> Response<Body> {
    let mut r = crate::broker::http::json(status, &super::shape::body(style, status, code, &message));
    r.headers_mut().insert(crate::broker::upstream::plan::PROXY_HEADER, HeaderValue::from_static("ephyr"));
    r
}

fn audit_refusal(broker: &Broker, caller: Option<&Caller>, service: &str, method: &str, f: &Error) {
    let mut ev =
        Event::new(Kind::Http, "http_request").action(json!({ "service": service, "method": method, "via": "route" }));
    ev = match f {
        Error::Denied(d) => ev.deny(d.code.as_str(), d.reason.clone()),
        other => ev.error(other.code(), other.message()),
    };
    if let Some(c) = caller {
        ev = ev.agent(c.agent.clone());
        if let Some(t) = c.token() {
            ev = ev.task(t.task.clone(), t.lineage.clone()).initiated_by(t.initiated_by.clone());
        }
    }
    if let Err(e) = broker.audit.note(ev) {
        log::error!("audit: {e}");
    }
}

/// Handles a request under [`PREFIX`].
pub async fn handle(broker: Rc<Broker>, req: Request<Incoming>, peer: Peer) -> Response<Body> {
    let started = Instant::now();
    let policy = broker.policy();
    let full = req.uri().path().to_owned();
    let rest = full.strip_prefix(PREFIX).unwrap_or("");
    let (service, sub) = match rest.split_once('/') {
        Some((s, p)) => (s.to_owned(), format!("/{p}")),
        None => (rest.to_owned(), "/".to_owned()),
    };
    let path = match req.uri().query() {
        Some(q) => format!("{sub}?{q}"),
        None => sub,
    };
    let method = req.method().as_str().to_owned();
    let source = match peer {
        Peer::Tcp(a) => Some(a.ip()),
        Peer::Unix(_) => None,
    };
    if service.is_empty() {
        return refuse(
            ErrorStyle::Plain,
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{PREFIX}<service>/<path>: name a service"),
        );
    }
    let style = policy.services.get(&service).map_or(ErrorStyle::Plain, |s| s.errors);
    // The query belongs to the upstream here; credentials are read from the headers only.
    let caller = match auth::authenticate(&broker, &policy, req.headers(), None, source).await {
        Ok(c) => c,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut r = refuse(style, status, e.code(), e.message());
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"ephyr\""));
            }
            if let Some(s) = e.retry_after() {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
            }
            return r;
        }
    };
    let max = policy.services.get(&service).map_or(MAX_BODY_UNKNOWN, |s| s.max_request.min(usize::MAX as u64) as usize);
    let (parts, body) = req.into_parts();
    let body = match read_incoming(&parts.headers, body, max, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(e) => {
            let f = match e {
                crate::broker::http::BodyError::TooLarge(_) => {
                    Error::TooLarge(format!("request body exceeds {max} bytes (service {service:?} max_request)"))
                }
                other => Error::Invalid(other.describe()),
            };
            audit_refusal(&broker, Some(&caller), &service, &method, &f);
            return refuse(style, f.status(), f.code(), f.message());
        }
    };
    if let Err(e) = auth::prove_request(&broker, &caller, &method, &full, &parts.headers, "-", "-", &body).await {
        let status = match e {
            auth::PossessionError::Locked(_) => StatusCode::LOCKED,
            auth::PossessionError::Proof(_) => StatusCode::UNAUTHORIZED,
        };
        return refuse(style, status, e.code(), e.message());
    }
    if let Err(wait) = broker.take_request(&policy, &caller.agent, started) {
        let mut r = refuse(
            style,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("rate limit exceeded for agent {:?}", caller.agent),
        );
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
        return r;
    }
    // A run's budget (`runs.<name>.budget`): the request is counted, or refused in the
    // provider's shape.
    let run = caller.token().and_then(|t| broker.runs.of_lineage(&t.lineage));
    if let Some(r) = &run
        && let Err(why) = r.admit()
    {
        let f = Error::Refused(why);
        audit_refusal(&broker, Some(&caller), &service, &method, &f);
        return refuse(style, StatusCode::TOO_MANY_REQUESTS, "budget_exceeded", f.message());
    }
    let call = Call {
        tool: None,
        service: &service,
        host: None,
        method: &method,
        path: &path,
        headers: &parts.headers,
        body,
        timeout: None,
        via: "route",
        arguments: crate::broker::policy::Arguments::None,
    };
    let answer = match broker.proxy.send(broker.ports(), &caller, &policy, call).await {
        Ok(a) => a,
        Err(f) => {
            broker.metrics.inc_named(
                "ephyr_proxy_requests_total",
                ("service", crate::broker::metrics::PolicyName::service(&policy, &service)),
                &[("code", f.code())],
            );
            audit_refusal(&broker, Some(&caller), &service, &method, &f);
            let mut r = refuse(style, f.status(), f.code(), f.message());
            // A held request names its approval request: retry the same request once approved.
            if let Error::Pending { id, .. } = &f
                && let Ok(v) = http::HeaderValue::from_str(id)
            {
                r.headers_mut().insert("x-ephyr-approval", v);
            }
            return r;
        }
    };
    let limit = policy.services.get(&service).map_or(u64::MAX, |s| s.max_response);
    if let Some(len) = answer.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > limit
    {
        let f = Error::upstream(format!(
            "the upstream's response is {len} bytes; service {service:?} passes at most {limit} (max_response)"
        ));
        audit_refusal(&broker, Some(&caller), &service, &method, &f);
        return refuse(style, f.status(), f.code(), f.message());
    }
    let super::Answer { status, headers, mut body, request_id, path, .. } = answer;
    // A stream the broker cuts (task revoked or expired, a limit) ends with an error event the
    // agent's SDK shows, not with a broken connection.
    if headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream")) {
        body.farewell(Box::new(move |code, reason, open| super::shape::stream_end(style, code, reason, open)));
    }
    let (b, agent, task) =
        (broker.clone(), caller.agent.clone(), caller.token().map(|t| (t.task.clone(), t.lineage.clone())));
    let code = status.as_u16();
    // A run's LLM usage, read from the answer as it passes (`runs::usage`).
    let meter = run.map(|r| {
        let sse = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let m = Rc::new(std::cell::RefCell::new(crate::broker::runs::usage::Meter::new(sse)));
        let tap = m.clone();
        body.tap(Box::new(move |chunk| tap.borrow_mut().push(chunk)));
        (r, m)
    });
    body.on_end(Box::new(move |end| {
        let mut ev = Event::new(Kind::Http, "http_response").agent(agent).action(json!({
            "service": service, "method": method, "path": path, "request_id": request_id, "via": "route",
        }));
        let mut outcome = json!({
            "status": code,
            "bytes": end.bytes,
            "duration_ms": started.elapsed().as_millis() as u64,
        });
        if let Some((run, m)) = meter {
            let mut m = m.borrow_mut();
            m.finish();
            run.add(m.model.as_deref(), m.input, m.output);
            outcome["usage"] = json!({ "model": m.model, "input_tokens": m.input, "output_tokens": m.output });
        }
        ev = match &end.error {
            None => ev.allow().outcome(outcome),
            Some(e) => ev.error("stream_ended", e.clone()).outcome(outcome),
        };
        if let Some((t, lineage)) = task {
            ev = ev.task(t, lineage);
        }
        if let Err(e) = b.audit.note(ev) {
            log::error!("audit: {e}");
        }
    }));
    let mut r = Response::new(Box::pin(body) as Body);
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}
