//! Announcing new approval requests: a generic JSON webhook and ntfy (a push to a phone), each a
//! POST to the URL in `approvals.notify`, with a link to the console (which still asks the
//! operator to sign in). What is sent: the request's id, agent, rules, a one-line summary, when it
//! expires and the link — never a secret: no credential, no key, no argument values of a
//! federated call (their names only), a command as the audit log keeps it.
//!
//! What runs here: one task on the executor ([`run`]) that takes new requests from the store and
//! sends one POST per target (10 s timeout, no retry; a failure is logged and counted, and never
//! holds the request).

use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};

use super::Request;
use crate::broker::Broker;
use crate::broker::policy::approval::{Notifier, NotifyKind};
use crate::broker::upstream::conn::{self, Conns};

/// How long one notification may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// One line for a phone: what the agent wants to do.
pub fn summary(r: &Request) -> String {
    let a = &r.action;
    let s = |k: &str| a[k].as_str().unwrap_or("?").to_owned();
    let line = match a["kind"].as_str() {
        Some("ssh") => match a["command"].as_str() {
            Some(c) => format!("run `{c}` on {} as {}", s("target"), s("role")),
            None => format!("open an SSH session on {} as {}", s("target"), s("role")),
        },
        Some("http") => format!("{} {}{} (service {})", s("method"), s("path"), "", s("service")),
        Some("remote") => {
            let names: Vec<&str> =
                a["arguments"].as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
            format!("call {}.{} with arguments [{}]", s("remote"), s("tool"), names.join(", "))
        }
        Some("delegate") => format!("hand a task to agent {}", s("to")),
        _ => "an action".into(),
    };
    let mut out = format!("{} wants to {line}", r.agent);
    if out.chars().count() > 300 {
        out = out.chars().take(299).collect::<String>() + "…";
    }
    out
}

/// The console's page for request `r`, if the console's URL is known.
pub fn link(console_url: Option<&str>, r: &Request) -> Option<String> {
    console_url.map(|u| format!("{u}/approvals#{}", r.id))
}

/// The JSON body of a webhook.
pub fn webhook_body(r: &Request, link: Option<&str>) -> Value {
    json!({
        "type": "approval_requested",
        "id": r.id,
        "agent": r.agent,
        "task": r.task,
        "rules": r.rules,
        "needed": r.needed,
        "summary": summary(r),
        "expires": crate::time::format_rfc3339(r.expires, None),
        "url": link,
        "approve_with": format!("ephyr approve {}", r.id),
    })
}

/// Sends every new request to every target of the current policy, until the broker goes.
pub async fn run(broker: Weak<Broker>, conns: Rc<Conns>) {
    let Some(rx) = broker.upgrade().map(|b| b.approvals.notices()) else { return };
    while let Ok(r) = rx.recv().await {
        let Some(b) = broker.upgrade() else { return };
        let policy = b.policy();
        for n in policy.approvals.notify.values() {
            let outcome = match send(&b, &conns, n, policy.approvals.console_url.as_deref(), &r).await {
                Ok(()) => "sent",
                Err(e) => {
                    log::warn!("approval notification {:?} for request {}: {e}", n.name, r.id);
                    "failed"
                }
            };
            b.metrics.inc("ephyr_approval_notifications_total", &[("outcome", outcome)]);
        }
    }
}

async fn send(b: &Broker, conns: &Conns, n: &Notifier, console_url: Option<&str>, r: &Request) -> Result<(), String> {
    let link = link(console_url, r);
    let (body, mut headers) = match n.kind {
        NotifyKind::Webhook => (webhook_body(r, link.as_deref()).to_string(), http::HeaderMap::new()),
        NotifyKind::Ntfy => {
            let mut h = http::HeaderMap::new();
            h.insert("title", http::HeaderValue::from_static("ephyr: approval requested"));
            h.insert("tags", http::HeaderValue::from_static("lock"));
            if let Some(l) = &link
                && let Ok(v) = http::HeaderValue::from_str(&format!("view, Review, {l}"))
            {
                h.insert("actions", v.clone());
                if let Ok(c) = http::HeaderValue::from_str(l) {
                    h.insert("click", c);
                }
            }
            let text = format!(
                "{}\nRequest {} ({}), expires {}.\nApprove: ephyr approve {}",
                summary(r),
                r.id,
                r.rules.join(", "),
                crate::time::format_rfc3339(r.expires, None),
                r.id
            );
            (text, h)
        }
    };
    if let Some(t) = &n.token {
        let secret = crate::broker::ports::SecretSource::resolve(b, t).await.map_err(|e| e.message())?;
        let value = zeroize::Zeroizing::new(format!("Bearer {}", String::from_utf8_lossy(secret.expose())));
        let mut v = http::HeaderValue::from_str(&value).map_err(|_| "the token is not a header value".to_string())?;
        v.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let url = &n.url;
    let content_type = if n.kind == NotifyKind::Webhook { "application/json" } else { "text/plain; charset=utf-8" };
    let mut req = http::Request::builder()
        .method("POST")
        .uri(if url.base_path.is_empty() { "/".to_owned() } else { url.base_path.clone() })
        .header(http::header::HOST, crate::broker::upstream::plan::host_header(&url.scheme, &url.host, url.port))
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::USER_AGENT, concat!("ephyr/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    req.headers_mut().extend(headers);
    let attempt = async {
        let addrs = conn::resolve(&b.pool, &url.host, url.port, TIMEOUT).await.map_err(|e| e.to_string())?;
        let tls = if url.scheme == "https" {
            Some(conns.tls_config(&b.pool, &format!("notify/{}", n.name), None, None, None).await?)
        } else {
            None
        };
        let dest = conn::Dest { host: &url.host, port: url.port, addrs: &addrs, tls, timeout: TIMEOUT };
        let mut sender = conns.connect(&dest).await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let _ = http_body_util::Limited::new(resp.into_body(), 64 << 10).collect().await;
        if status.is_success() { Ok(()) } else { Err(format!("the receiver answered {status}")) }
    };
    futures_lite::future::or(attempt, async {
        crate::broker::deadline::Deadline::after(TIMEOUT).await;
        Err(format!("no answer within {}s", TIMEOUT.as_secs()))
    })
    .await
}
