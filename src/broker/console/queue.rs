//! The approval queue: the page where operators see what agents wait for — the full action, who
//! asks, the task lineage, what that agent did lately — and answer it (approve, with an optional
//! waiver; deny, with a reason the agent is told). Answers go through `ops::decide_approval`,
//! which checks that this operator is an approver of every rule behind the request; a viewer
//! whom a rule names may answer too (the rule says who approves, not the console role).
//!
//! What runs here: the executor thread (the agent's recent activity is read from the audit tail
//! on the blocking pool).

use std::fmt::Write as _;

use http::{Response, StatusCode};

use super::auth::Operator;
use super::html::{audit_link, badge, csrf_field, esc, notice, table};
use super::{error_page, html_response};
use crate::broker::Broker;
use crate::broker::approvals::{Request, State};
use crate::broker::http::Body;
use crate::broker::ops::{self, Actor};
use crate::broker::policy::approval::{Answerer, Requirement};

/// Closed requests listed under the open ones.
const RECENT: usize = 20;
/// Audit lines of the asking agent shown with each open request.
const ACTIVITY: usize = 5;

fn when(secs: i64) -> String {
    crate::time::format_rfc3339(secs, None)
}

/// Whether `op` may answer `r` under the current policy.
fn may_answer(broker: &Broker, op: &Operator, r: &Request) -> bool {
    let p = broker.policy();
    let req = Requirement::named(&p, &r.rules);
    !req.rules.is_empty() && req.accepts(&p, &Answerer::Console(op.name.clone()))
}

/// `GET /approvals`.
pub async fn page(broker: &Broker, op: &Operator) -> Response<Body> {
    html_response(StatusCode::OK, super::html::page("Approvals", "/approvals", Some(op), &page_body(broker, op).await))
}

/// The page's body.
async fn page_body(broker: &Broker, op: &Operator) -> String {
    let all = broker.approvals.list();
    let (open, closed): (Vec<&Request>, Vec<&Request>) = all.iter().partition(|r| r.state == State::Pending);
    let mut out = String::new();
    let p = broker.policy();
    if p.approvals.rules.is_empty() {
        out.push_str(&notice(
            "ok",
            &["No approvals: rules are set in the policy's approvals: section (docs/policy.md).".into()],
        ));
    }
    let _ = write!(out, "<h2>Waiting ({})</h2>", open.len());
    if open.is_empty() {
        out.push_str("<p class=\"muted\">Nothing waits for an answer.</p>");
    }
    for r in open.iter().rev() {
        out.push_str(&request_card(broker, op, r).await);
    }
    out.push_str("<h2>Recently answered</h2>");
    let rows: Vec<Vec<String>> = closed
        .iter()
        .take(RECENT)
        .map(|r| {
            let kind = match r.state {
                State::Used | State::Approved => "ok",
                State::Denied => "bad",
                _ => "muted",
            };
            let votes: Vec<String> = r
                .votes
                .iter()
                .map(|v| {
                    let verb = if v.approve { "approved" } else { "denied" };
                    if v.reason.is_empty() {
                        format!("{verb} by {}", v.by)
                    } else {
                        format!("{verb} by {}: {}", v.by, v.reason)
                    }
                })
                .collect();
            vec![
                esc(&r.id),
                badge(kind, r.state.as_str()),
                esc(&crate::broker::approvals::notify::summary(r)),
                esc(&votes.join("; ")),
                esc(&r.closed_at.map(when).unwrap_or_default()),
            ]
        })
        .collect();
    out.push_str(&table(&["request", "state", "action", "answers", "closed"], &rows, "None in the last day."));
    out
}

async fn request_card(broker: &Broker, op: &Operator, r: &Request) -> String {
    let mut out = format!("<article class=\"card\" id=\"{}\" aria-labelledby=\"h-{0}\">", esc(&r.id));
    let _ = write!(
        out,
        "<h3 id=\"h-{}\">{}</h3><dl><dt>Request</dt><dd>{}</dd><dt>Agent</dt><dd>{} {}</dd>",
        esc(&r.id),
        esc(&crate::broker::approvals::notify::summary(r)),
        esc(&r.id),
        esc(&r.agent),
        audit_link("agent", &r.agent)
    );
    if !r.lineage.is_empty() {
        let _ = write!(out, "<dt>Task lineage</dt><dd>{}</dd>", esc(&r.lineage.join(" → ")));
    }
    let approvals = r.votes.iter().filter(|v| v.approve).count();
    let _ = write!(
        out,
        "<dt>Rules</dt><dd>{}</dd><dt>Needs</dt><dd>{} approval(s), {approvals} so far{}</dd>\
         <dt>Asked</dt><dd>{}</dd><dt>Expires</dt><dd>{}</dd></dl>",
        esc(&r.rules.join(", ")),
        r.needed,
        if r.votes.is_empty() {
            String::new()
        } else {
            esc(&format!(" ({})", r.votes.iter().map(|v| v.by.clone()).collect::<Vec<_>>().join(", ")))
        },
        esc(&when(r.at)),
        esc(&when(r.expires)),
    );
    let action = serde_json::to_string_pretty(&r.action).unwrap_or_default();
    let _ = write!(out, "<details open><summary>The exact action</summary><pre>{}</pre></details>", esc(&action));
    let f = crate::broker::audit::query::Filter { agent: Some(r.agent.clone()), ..Default::default() };
    let recent =
        super::activity::recent_events(broker, f, ACTIVITY, super::activity::ACTIVITY_READ).await.unwrap_or_default();
    let rows: Vec<Vec<String>> = recent
        .iter()
        .rev()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("").to_owned();
            vec![
                esc(&crate::time::UnixMicros(e["ts"].as_i64().unwrap_or(0)).to_rfc3339()),
                esc(&s("event")),
                esc(&s("decision")),
                esc(format!("{} {}", s("code"), s("reason")).trim()),
            ]
        })
        .collect();
    out.push_str("<h4>Recent activity of this agent</h4>");
    out.push_str(&table(&["time", "event", "decision", "why"], &rows, "No recent audit lines."));
    if may_answer(broker, op, r) {
        let p = broker.policy();
        let req = Requirement::named(&p, &r.rules);
        let waiver = match req.waiver() {
            Some(max) => format!(
                "<label>Waiver <input name=\"waiver\" size=\"6\" placeholder=\"none\" aria-describedby=\"w-{id}\"></label> \
                 <small id=\"w-{id}\" class=\"muted\">up to {}: the same action runs again without asking</small> ",
                esc(&crate::time::format_duration(max)),
                id = esc(&r.id)
            ),
            None => String::new(),
        };
        let _ = write!(
            out,
            "<div class=\"answer\"><form method=\"post\" action=\"/approvals/decide\">{csrf}\
             <input type=\"hidden\" name=\"id\" value=\"{id}\"><input type=\"hidden\" name=\"decision\" value=\"approve\">\
             <label>Note <input name=\"reason\" maxlength=\"500\"></label> {waiver}\
             <button type=\"submit\">Approve</button></form>\
             <form method=\"post\" action=\"/approvals/decide\">{csrf}\
             <input type=\"hidden\" name=\"id\" value=\"{id}\"><input type=\"hidden\" name=\"decision\" value=\"deny\">\
             <label>Reason <input name=\"reason\" required maxlength=\"500\"></label> \
             <button type=\"submit\" class=\"danger\">Deny</button></form></div>",
            csrf = csrf_field(op),
            id = esc(&r.id)
        );
    } else {
        out.push_str("<p class=\"muted\">You are not an approver of this request's rules.</p>");
    }
    out.push_str("</article>");
    out
}

/// `POST /approvals/decide`: `id`, `decision` (approve or deny), `reason`, `waiver`.
pub async fn decide(broker: &Broker, op: &Operator, f: &[(String, String)]) -> Response<Body> {
    let field = |k: &str| f.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str()).unwrap_or("");
    let id = field("id");
    let approve = match field("decision") {
        "approve" => true,
        "deny" => false,
        other => return error_page(StatusCode::BAD_REQUEST, Some(op), &format!("unknown decision {other:?}")),
    };
    let waiver = match field("waiver").trim() {
        "" => None,
        w => match crate::time::parse_duration(w) {
            Ok(d) => Some(d),
            Err(e) => return error_page(StatusCode::BAD_REQUEST, Some(op), &format!("waiver: {e}")),
        },
    };
    let actor = Actor::Console { name: op.name.clone() };
    match ops::decide_approval(broker, &actor, id, approve, field("reason"), waiver).await {
        Ok((decided, r)) => {
            let line = match decided {
                crate::broker::approvals::Decided::Approved => format!(
                    "Request {id} is approved: the agent's next identical call runs{}.",
                    r.waiver_until.map(|w| format!(" (and again until {})", when(w))).unwrap_or_default()
                ),
                crate::broker::approvals::Decided::Partly => {
                    format!("Your approval of {id} is recorded; four eyes: another approver must approve too.")
                }
                crate::broker::approvals::Decided::Denied => {
                    format!("Request {id} is denied; the agent is told your reason.")
                }
            };
            let body = format!("{}<p><a href=\"/approvals\">Back to the queue</a></p>", notice("ok", &[line]));
            html_response(StatusCode::OK, super::html::page("Approvals", "/approvals", Some(op), &body))
        }
        Err(e) => error_page(e.status(), Some(op), &e.message()),
    }
}
