//! `http_request`: one HTTP request through a service, with the service's credential injected by
//! the broker (`broker::proxy`). The result is the Go project's shape (status, headers, body,
//! service, url, method, duration) plus `truncated`, `bytes_read`, `request_id`, and
//! `body_base64` for a body that is not UTF-8.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt as _;
use serde_json::{Map, Value, json};

use super::{Ctx, Needs, Output, OutputShape, Param, ParamType, ToolDef};
use crate::broker::proxy::Call;
use crate::broker::upstream::plan;
use crate::mcp::types::Annotations;

/// Most of a response body returned to the model (less if the service's `max_response` is lower).
pub const MAX_TOOL_BODY: u64 = 1 << 20;

/// Methods the tool takes.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// `http_request`.
pub static HTTP_REQUEST: ToolDef = ToolDef {
    name: "http_request",
    title: "Call an HTTP API",
    description: "Send an HTTP request to a service from list_services; the broker adds the service's credential \
                  (you never see it) and returns the response. Name the service and a path relative to its \
                  url_prefix, or give a full url that belongs to a service. Redirects are returned, not followed. \
                  Bodies over 1 MiB are cut (truncated: true).",
    params: &[
        Param {
            name: "service",
            ty: ParamType::String,
            required: false,
            description: "Service name from list_services",
        },
        Param {
            name: "url",
            ty: ParamType::String,
            required: false,
            description: "Full URL instead of service and path; it must belong to a service",
        },
        Param {
            name: "method",
            ty: ParamType::Enum(METHODS),
            required: false,
            description: "HTTP method (default GET)",
        },
        Param {
            name: "path",
            ty: ParamType::String,
            required: false,
            description: "Path (and ?query) relative to the service's url_prefix (default /)",
        },
        Param {
            name: "headers",
            ty: ParamType::StringMap,
            required: false,
            description: "Request headers (credential headers are set by the broker and cannot be overridden)",
        },
        Param { name: "body", ty: ParamType::String, required: false, description: "Request body (text)" },
        Param {
            name: "timeout",
            ty: ParamType::Integer { min: 1, max: 600 },
            required: false,
            description: "Seconds for the whole request (at most the service's timeout)",
        },
    ],
    annotations: Annotations { read_only: false, destructive: true, idempotent: false, open_world: true },
    output: OutputShape::Object(&[
        ("status_code", "integer"),
        ("headers", "object"),
        ("service", "string"),
        ("request_id", "string"),
        ("truncated", "boolean"),
    ]),
    needs: Needs::AnyService,
    run: |cx| Box::pin(http_request(cx)),
};

fn headers_from(args: &Map<String, Value>) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    for (k, v) in args.get("headers").and_then(Value::as_object).into_iter().flatten() {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("header name {k:?} is invalid"))?;
        let value = HeaderValue::from_str(v.as_str().unwrap_or(""))
            .map_err(|_| format!("header {k:?} has an invalid value"))?;
        h.append(name, value);
    }
    Ok(h)
}

async fn http_request(cx: Ctx<'_>) -> Output {
    let started = Instant::now();
    let a = cx.args;
    let s = |k: &str| a.get(k).and_then(Value::as_str);
    let method = s("method").unwrap_or("GET");
    let matched = match (s("service"), s("url")) {
        (Some(_), Some(_)) => return Output::error("give either service (with path) or url, not both"),
        (None, None) => return Output::error("service (with path) or url is required"),
        (Some(svc), None) => (svc.to_owned(), None, s("path").unwrap_or("/").to_owned()),
        (None, Some(url)) => {
            if s("path").is_some() {
                return Output::error("path goes with service; a url already has its path");
            }
            match plan::match_url(cx.policy, url) {
                Ok(m) => (m.service, Some(m.host), m.path),
                Err(e) => {
                    return Output::denied(crate::broker::policy::Denial {
                        code: crate::broker::policy::DenyCode::UnknownService,
                        reason: e,
                    });
                }
            }
        }
    };
    let (service, host, path) = matched;
    let path = if path.starts_with('/') { path } else { format!("/{path}") };
    let headers = match headers_from(a) {
        Ok(h) => h,
        Err(e) => return Output::error(format!("invalid arguments: {e}")),
    };
    let body = bytes::Bytes::from(s("body").unwrap_or("").to_owned());
    let timeout = a.get("timeout").and_then(Value::as_u64).map(Duration::from_secs);
    let call = Call {
        tool: Some("http_request"),
        service: &service,
        host: host.as_deref(),
        method,
        path: &path,
        headers: &headers,
        body,
        timeout,
        via: "tool",
        arguments: cx.arguments(),
    };
    let mut action = Map::new();
    action.insert("service".into(), json!(service));
    action.insert("method".into(), json!(method));
    // A run's budget counts this path too (`runs.<name>.budget`).
    if let Some(r) = cx.caller.token().and_then(|t| cx.runs.of_lineage(&t.lineage))
        && let Err(why) = r.admit()
    {
        return Output::error(format!("refused (budget_exceeded): {why}"));
    }
    let answer = match cx.proxy.send(cx.ports, cx.caller, cx.policy, call).await {
        Ok(a) => a,
        Err(f) => {
            let mut out = Output::failed(f);
            action.insert("path".into(), json!(path.split('?').next().unwrap_or("")));
            out.action = action;
            return out;
        }
    };
    let limit = cx.policy.services.get(&service).map_or(MAX_TOOL_BODY, |s| s.max_response.min(MAX_TOOL_BODY));
    let crate::broker::proxy::Answer { status, headers, mut body, request_id, url, path, .. } = answer;
    let mut buf = BytesMut::new();
    let mut truncated = false;
    let mut failed = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    let room = (limit as usize).saturating_sub(buf.len());
                    buf.extend_from_slice(&d[..d.len().min(room)]);
                    if d.len() > room {
                        truncated = true;
                        break;
                    }
                }
            }
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    let read = body.bytes();
    drop(body);
    let mut hs = Map::new();
    for name in headers.keys() {
        let vals: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        hs.insert(name.as_str().to_owned(), json!(vals.join(", ")));
    }
    let mut v = json!({
        "status_code": status.as_u16(),
        "headers": hs,
        "service": service,
        "url": url,
        "method": method,
        "duration_ms": started.elapsed().as_millis() as u64,
        "bytes_read": read,
        "truncated": truncated,
        "request_id": request_id,
    });
    match std::str::from_utf8(&buf) {
        Ok(t) => v["body"] = json!(t),
        Err(_) => v["body_base64"] = json!(data_encoding::BASE64.encode(&buf)),
    }
    if let Some(e) = &failed {
        v["error"] = json!(e);
    }
    let mut out = if failed.is_some() && buf.is_empty() {
        Output::error(format!("the response body failed: {}", failed.unwrap_or_default()))
    } else {
        Output::data(&v)
    };
    action.insert("path".into(), json!(path));
    action.insert("request_id".into(), json!(request_id));
    out.action = action;
    out.outcome.insert("status".into(), json!(status.as_u16()));
    out.outcome.insert("bytes".into(), json!(read));
    out
}
