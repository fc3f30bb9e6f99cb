//! The consent page on the operator console (`/oauth/consent?request=ID`): an admin operator,
//! signed in, sees which client asks, where the answer goes and for which resource, picks the
//! template the new agent gets, and approves or denies. Approving enrolls the agent (owned by
//! that operator) and sends the browser back to the client with a code; denying sends it back
//! with `access_denied`. Each request is answered once.

use http::StatusCode;

use super::server::{back_code, back_error};
use crate::broker::Broker;
use crate::broker::audit::{Event, Kind};
use crate::broker::console::auth::Operator;
use crate::broker::console::html::{esc, notice, page};
use crate::broker::console::html_response;
use crate::broker::http::Body;
use crate::broker::ops::Actor;
use crate::broker::policy::OperatorRole;

fn request_id(query: &str) -> String {
    crate::broker::console::actions::form(query.as_bytes())
        .into_iter()
        .find(|(k, _)| k == "request")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

fn gone(op: &Operator) -> http::Response<Body> {
    let body = notice(
        "bad",
        &["This authorization request is unknown, expired (10 minutes) or answered already: start again from the client.".into()],
    );
    html_response(StatusCode::NOT_FOUND, page("Authorize a client", "/oauth/consent", Some(op), &body))
}

/// `GET /oauth/consent?request=ID`.
pub fn show(broker: &Broker, op: &Operator, query: &str) -> http::Response<Body> {
    let id = request_id(query);
    let Some(p) = broker.oauth.pending(&id) else { return gone(op) };
    let client = broker.oauth.client(&p.client);
    let name = client.as_ref().map_or("(unknown client)", |c| c.name.as_str());
    let policy = broker.policy();
    let mut body = format!(
        "<p>The client <strong>{}</strong> (<code>{}</code>) asks for access to <code>{}</code>. \
         The answer goes to <code>{}</code>.</p>\
         <p>Approving makes a new agent owned by you, with the grants of the template you pick; \
         the client gets that agent's tokens (access {}, refresh until {}).</p>",
        esc(name),
        esc(&p.client),
        esc(&p.resource),
        esc(&p.redirect_uri),
        crate::time::format_duration(policy.oauth.as_ref().map_or_else(Default::default, |s| s.access_ttl)),
        crate::time::format_duration(policy.oauth.as_ref().map_or_else(Default::default, |s| s.refresh_ttl)),
    );
    if op.role != OperatorRole::Admin {
        body.push_str(&notice("bad", &[format!("Operator {} is a viewer: only an admin can answer.", op.name)]));
        return html_response(StatusCode::OK, page("Authorize a client", "/oauth/consent", Some(op), &body));
    }
    if policy.templates.is_empty() {
        body.push_str(&notice(
            "bad",
            &["The policy has no templates: add a `templates:` entry, reload, and reload this page.".into()],
        ));
    }
    let csrf = crate::broker::console::html::csrf_field(op);
    let options: String = policy
        .templates
        .iter()
        .map(|(n, t)| {
            let d = if t.description.is_empty() { String::new() } else { format!(" — {}", t.description) };
            format!("<option value=\"{}\">{}{}</option>", esc(n), esc(n), esc(&d))
        })
        .collect();
    body.push_str(&format!(
        "<form method=\"post\" action=\"/oauth/consent\">{csrf}\
         <input type=\"hidden\" name=\"request\" value=\"{id}\">\
         <label for=\"template\">Template</label><select id=\"template\" name=\"template\">{options}</select>\
         <button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button> \
         <button type=\"submit\" name=\"decision\" value=\"deny\" class=\"danger\">Deny</button></form>",
        id = esc(&id)
    ));
    html_response(StatusCode::OK, page("Authorize a client", "/oauth/consent", Some(op), &body))
}

/// `POST /oauth/consent` (CSRF and the admin role checked by the caller).
pub async fn answer(broker: &Broker, op: &Operator, f: &[(String, String)]) -> http::Response<Body> {
    let field = |k: &str| f.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str()).unwrap_or("");
    let Some(p) = broker.oauth.take(field("request")) else { return gone(op) };
    let actor = Actor::Console { name: op.name.clone() };
    let client = broker.oauth.client(&p.client).map_or_else(|| p.client.clone(), |c| c.name);
    if field("decision") != "approve" {
        let ev = Event::new(Kind::Agent, "oauth_consent")
            .agent(actor.name())
            .deny("access_denied", "the operator denied the request")
            .action(serde_json::json!({ "client_id": p.client, "client_name": client }));
        broker.audit_now(ev).await;
        return back_error(&p, "access_denied", "the operator denied the request");
    }
    let template = field("template");
    let agent = match crate::broker::agents::api::enroll_consented(broker, &actor, template, &op.name, &client).await {
        Ok(a) => a,
        Err(e) => return back_error(&p, "server_error", &e.message()),
    };
    let code = match broker.oauth.code(&p, &agent) {
        Ok(c) => c,
        Err(e) => return back_error(&p, "server_error", &e.message()),
    };
    let ev = Event::new(Kind::Agent, "oauth_consent").agent(actor.name()).allow().action(
        serde_json::json!({ "client_id": p.client, "client_name": client, "agent": agent, "template": template }),
    );
    broker.audit_now(ev).await;
    back_code(&p, code.expose())
}
