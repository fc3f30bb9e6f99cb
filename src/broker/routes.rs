//! The TCP endpoints: the MCP/API listener (default 127.0.0.1:8554) and the dashboard listener
//! (default 127.0.0.1:8553), which serves the operator console (`console`) besides health,
//! metrics and the KRL.
//!
//! What runs here: request routing only; handlers live with their features.

use std::rc::Rc;

use http::{Method, StatusCode};

use super::Broker;
use super::http::{Handler, error, json};

/// Public health summary: no process ids or paths (this port may face the LAN).
fn healthz(broker: &Broker) -> http::Response<super::http::Body> {
    let h = broker.signer.health();
    let sandbox_ok = h.status.as_ref().is_some_and(|s| s.sandbox.enforced);
    let ok = h.available && sandbox_ok;
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "degraded" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": broker.started.elapsed().as_secs(),
        "signer": {
            "available": h.available,
            "sandbox_enforced": sandbox_ok,
            "restarts": h.restarts,
        },
    });
    // A broker whose signer is down or unsandboxed is not healthy for load balancers and probes.
    json(if h.available { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

fn count(broker: &Broker, listener: &'static str, r: &http::Response<super::http::Body>) {
    let class = super::http::status_class(r.status());
    broker.metrics.inc("ephyr_http_requests_total", &[("listener", listener), ("code", class)]);
}

/// `GET /metrics`: Prometheus text format. Gauges are refreshed at scrape time.
pub fn metrics(broker: &Broker) -> http::Response<super::http::Body> {
    let m = &broker.metrics;
    let h = broker.signer.health();
    let sandbox = h.status.as_ref().map(|s| &s.sandbox);
    m.set("ephyr_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    m.set("ephyr_uptime_seconds", &[], broker.started.elapsed().as_secs_f64());
    if let Some(rss) = super::metrics::rss_bytes() {
        m.set("process_resident_memory_bytes", &[], rss as f64);
    }
    m.set("ephyr_signer_available", &[], f64::from(u8::from(h.available)));
    m.set("ephyr_signer_sandbox_enforced", &[], f64::from(u8::from(sandbox.is_some_and(|s| s.enforced))));
    m.set("ephyr_signer_insecure", &[], f64::from(u8::from(sandbox.is_some_and(|s| s.insecure_override))));
    m.set("ephyr_audit_available", &[], f64::from(u8::from(broker.audit.failure().is_none())));
    m.set("ephyr_mcp_sessions", &[], broker.sessions.len() as f64);
    m.set("ephyr_mcp_streams", &[], broker.changes.streams() as f64);
    super::http::text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", m.render())
}

/// `GET /v1/ssh/krl`: the OpenSSH revocation list for targets' `RevokedKeys` (public: serials
/// only). Targets fetch it on a timer (docs/target-setup.md).
fn krl(broker: &Broker) -> http::Response<super::http::Body> {
    match broker.ssh.krl(broker.ports()) {
        Some(bytes) => super::http::text(StatusCode::OK, "application/octet-stream", bytes),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "signer_unavailable", "the CA key is not known yet; retry"),
    }
}

/// Handler for the MCP/API listener.
pub fn api_handler(broker: Rc<Broker>) -> Handler {
    Rc::new(move |req, peer| {
        let broker = broker.clone();
        Box::pin(async move {
            let r = match (req.method(), req.uri().path()) {
                (_, "/mcp") => super::http::mcp::handle(broker.clone(), req, peer).await,
                (_, p) if p.starts_with(super::proxy::route::PREFIX) => {
                    super::proxy::route::handle(broker.clone(), req, peer).await
                }
                (
                    &Method::GET,
                    "/.well-known/oauth-protected-resource" | "/.well-known/oauth-protected-resource/mcp",
                ) => super::http::mcp::protected_resource_metadata(&broker, req.headers()),
                (&Method::GET, "/healthz") => healthz(&broker),
                (_, "/healthz") => error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
                (_, "/v1/agents/join") => super::agents::api::join(&broker, req, peer).await,
                (&Method::POST, "/v1/agents/attest") => super::agents::api::reattest(&broker, req, peer).await,
                (&Method::GET, "/.well-known/oauth-authorization-server") => {
                    super::oauth::server::metadata(&broker, req.headers())
                }
                (_, p) if p.starts_with("/oauth/") => super::oauth::server::handle(&broker, req, peer).await,
                (_, p) if p == "/v1/runs" || p.starts_with("/v1/runs/") => {
                    super::runs::api::tcp(&broker, req, peer).await
                }
                (&Method::GET, "/v1/ssh/krl") => krl(&broker),
                (_, "/v1/ssh/krl") => error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
                (_, path) => error(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}")),
            };
            count(&broker, "api", &r);
            r
        })
    })
}

/// Handler for the dashboard listener.
pub fn dashboard_handler(broker: Rc<Broker>) -> Handler {
    Rc::new(move |req, peer| {
        let broker = broker.clone();
        Box::pin(async move {
            let r = match (req.method(), req.uri().path()) {
                (&Method::GET, "/healthz") => healthz(&broker),
                // Metrics name agents, services and remotes: on a listener that faces the network
                // they are for local scrapers and signed-in operators only.
                (&Method::GET, "/metrics")
                    if broker.dashboard_listen.ip().is_loopback()
                        || matches!(peer, super::http::Peer::Tcp(a) if a.ip().is_loopback())
                        || super::console::signed_in(&broker, req.headers()).is_some() =>
                {
                    metrics(&broker)
                }
                (&Method::GET, "/metrics") => error(
                    StatusCode::UNAUTHORIZED,
                    "sign_in_required",
                    "metrics on a non-loopback listener: scrape from this host, or sign in to the console",
                ),
                (&Method::GET, "/v1/ssh/krl") => krl(&broker),
                (_, path) if super::console::is_console_path(path) => {
                    let tls = broker.tls.is_some();
                    super::console::handle(broker.clone(), req, peer, tls).await
                }
                (_, path) => error(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}")),
            };
            count(&broker, "dashboard", &r);
            r
        })
    })
}
