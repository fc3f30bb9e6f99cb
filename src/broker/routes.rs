//! The TCP endpoints: the MCP/API listener (default 127.0.0.1:8554) and the dashboard listener
//! (default 127.0.0.1:8553).
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

/// Handler for the MCP/API listener.
pub fn api_handler(broker: Rc<Broker>) -> Handler {
    Rc::new(move |req, _peer| {
        let broker = broker.clone();
        Box::pin(async move {
            match (req.method(), req.uri().path()) {
                (&Method::GET, "/healthz") => healthz(&broker),
                (_, "/healthz") => error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
                (_, path) => error(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}")),
            }
        })
    })
}

/// Handler for the dashboard listener.
pub fn dashboard_handler(broker: Rc<Broker>) -> Handler {
    Rc::new(move |req, _peer| {
        let broker = broker.clone();
        Box::pin(async move {
            match (req.method(), req.uri().path()) {
                (&Method::GET, "/healthz") => healthz(&broker),
                (_, path) => error(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}")),
            }
        })
    })
}
