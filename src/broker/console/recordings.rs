//! The console's view of SSH command recordings: the newest ones from their audit lines, and one
//! recording's output, shown only after its SHA-256 matches the audit line (as `ephyr recording
//! show` does). Read-only for every operator role.
//!
//! What runs here: the executor thread; the audit tail and the file read run on the blocking pool.

use std::fmt::Write as _;

use http::{Response, StatusCode};
use serde_json::Value;

use super::auth::Operator;
use super::html::{audit_link, badge, esc, notice, page, table};
use super::{error_page, html_response};
use crate::broker::Broker;
use crate::broker::audit::query::Filter;
use crate::broker::http::Body;
use crate::broker::ssh::recording;

/// Recordings listed.
const LISTED: usize = 100;
/// Bytes of the audit log searched for a recording's line (older ones: `ephyr recording show`).
const SEARCHED: u64 = 16 << 20;

async fn lines(broker: &Broker, max: usize) -> Result<Vec<Value>, String> {
    let f = Filter { event: Some("ssh_recording".into()), ..Default::default() };
    super::activity::recent_events(broker, f, max, SEARCHED).await
}

/// `GET /recordings`.
pub async fn list(broker: &Broker, op: &Operator) -> Response<Body> {
    let events = match lines(broker, LISTED).await {
        Ok(e) => e,
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, Some(op), &e),
    };
    let rows: Vec<Vec<String>> = events
        .iter()
        .rev()
        .filter_map(|e| {
            let id = e["outcome"]["recording"].as_str()?;
            let a = &e["action"];
            let s = |v: &Value| esc(v.as_str().unwrap_or("-"));
            Some(vec![
                format!("<a href=\"/recordings/{}\"><code>{}</code></a>", esc(id), esc(id)),
                s(&e["ts"]),
                s(&e["agent"]),
                format!("{}/{}", s(&a["target"]), s(&a["role"])),
                format!("<code>{}</code>", s(&a["command"])),
                esc(&e["outcome"]["exit_code"].to_string()),
                esc(&e["outcome"]["bytes"].to_string()),
            ])
        })
        .collect();
    let mut body = String::from(
        "<p class=\"muted\">Every SSH command an agent ran, newest first. Opening one checks its SHA-256 against its audit line.</p>",
    );
    body.push_str(&table(
        &["recording", "time", "agent", "target/role", "command", "exit", "bytes"],
        &rows,
        "No recordings yet.",
    ));
    html_response(StatusCode::OK, page("Recordings", "/recordings", Some(op), &body))
}

/// `GET /recordings/<ID>`.
pub async fn show(broker: &Broker, op: &Operator, id: &str) -> Response<Body> {
    if !recording::id_ok(id) {
        return error_page(StatusCode::NOT_FOUND, Some(op), &format!("{id:?} is not a recording id"));
    }
    let dir = broker.data_dir.recordings();
    let name = id.to_owned();
    let bytes = match broker.pool.run(move || recording::load(&dir, &name)).await {
        Some(Ok(b)) => b,
        Some(Err(e)) => return error_page(StatusCode::NOT_FOUND, Some(op), &e),
        None => return error_page(StatusCode::SERVICE_UNAVAILABLE, Some(op), "the blocking pool is gone"),
    };
    let line = match lines(broker, usize::MAX).await {
        Ok(events) => events.into_iter().find(|e| e["outcome"]["recording"] == id),
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, Some(op), &e),
    };
    let title = format!("Recording {id}");
    let Some(line) = line else {
        let body = notice(
            "bad",
            &[format!(
                "No audit line for this recording in the recent log: it was not written by this broker, or it is older (check it with `ephyr recording show {id}`)."
            )],
        );
        return html_response(StatusCode::OK, page(&title, "/recordings", Some(op), &body));
    };
    let got = recording::digest(&bytes);
    if line["outcome"]["sha256"].as_str() != Some(got.as_str()) {
        let body = notice(
            "bad",
            &[format!(
                "This recording was changed after it was written: its SHA-256 is {got}, its audit line (seq {}) says {}. It is not shown.",
                line["seq"], line["outcome"]["sha256"]
            )],
        );
        return html_response(StatusCode::CONFLICT, page(&title, "/recordings", Some(op), &body));
    }
    let (header, events) = match recording::events(&bytes) {
        Ok(x) => x,
        Err(e) => return error_page(StatusCode::UNPROCESSABLE_ENTITY, Some(op), &e),
    };
    let mut body = String::new();
    let _ = write!(
        body,
        "<p>{} {} · {} · {} {}</p><p><code>$ {}</code></p><pre class=\"recording\">",
        badge("ok", "sha256 verified"),
        esc(header["title"].as_str().unwrap_or("")),
        esc(line["ts"].as_str().unwrap_or("")),
        audit_link("event", "ssh_recording"),
        esc(&format!("seq {}", line["seq"])),
        esc(header["command"].as_str().unwrap_or(""))
    );
    for (_, kind, text) in &events {
        match kind.as_str() {
            "o" => body.push_str(&esc(text)),
            "m" => {
                let _ = write!(body, "\n<span class=\"muted\">[{}]</span>", esc(text));
            }
            "i" => {
                let keys = serde_json::Value::from(text.as_str()).to_string();
                let _ = writeln!(body, "<span class=\"muted\">[input {}]</span>", esc(&keys));
            }
            _ => {}
        }
    }
    body.push_str("</pre>");
    html_response(StatusCode::OK, page(&title, "/recordings", Some(op), &body))
}
