//! The console's pages (GET): each reads the broker's live state and renders it; nothing here
//! changes state. Audit reads, chain verification and the policy file on disk go to the blocking
//! pool; everything else is in memory.

use std::fmt::Write as _;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use super::activity::{ACTIVITY_READ, recent_events};
use super::auth::Operator;
use super::html::{audit_link, badge, button, csrf_field, esc, notice, page, q, table};
use super::{error_page, html_response};
use crate::broker::Broker;
use crate::broker::http::{Body, json};
use crate::broker::policy::{FreezeKind, OperatorRole};

/// Events the audit view shows at most.
pub const AUDIT_ROWS: usize = 200;
/// Bytes at the end of the audit log the audit view searches.
pub const AUDIT_READ: u64 = 4 << 20;
/// Largest log the console verifies in place (larger: `ephyr audit verify`).
pub const VERIFY_MAX: u64 = 64 << 20;

/// The sign-in form (`message`: why the last attempt failed).
pub fn login(broker: &Broker, message: Option<&str>, status: StatusCode) -> Response<Body> {
    login_then(broker, message, status, None)
}

/// The sign-in form that goes on to `next` (a page `actions::next_page` accepted).
pub fn login_then(broker: &Broker, message: Option<&str>, status: StatusCode, next: Option<&str>) -> Response<Body> {
    let mut body = String::new();
    if let Some(m) = message {
        body.push_str(&notice("bad", &[m.to_owned()]));
    }
    if broker.policy().operators.is_empty() {
        body.push_str(&notice(
            "bad",
            &["No operator accounts exist yet: run `ephyr operator add NAME --role admin`, paste its lines into policy.yaml and reload.".into()],
        ));
    }
    let next = next.map_or_else(String::new, |n| format!("<input type=\"hidden\" name=\"next\" value=\"{}\">", esc(n)));
    body.push_str(&format!(
        "<form class=\"login\" method=\"post\" action=\"/login\">{next}\
         <label for=\"name\">Operator</label><input id=\"name\" name=\"name\" autocomplete=\"username\" required maxlength=\"64\">\
         <label for=\"password\">Password</label><input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required maxlength=\"1024\">\
         <button type=\"submit\">Sign in</button></form>"
    ));
    html_response(status, page("Sign in", "/login", None, &body))
}

/// Serves a GET for a signed-in operator.
pub async fn get(broker: &std::rc::Rc<Broker>, op: &Operator, path: &str, query: &str) -> Response<Body> {
    let params = super::actions::form(query.as_bytes());
    let param = |k: &str| params.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty());
    match path {
        "/" => html_response(StatusCode::OK, page("Overview", "/", Some(op), &overview(broker, op))),
        "/agents" => html_response(StatusCode::OK, page("Agents", "/agents", Some(op), &agents(broker, op).await)),
        "/tasks" => html_response(StatusCode::OK, page("Tasks", "/tasks", Some(op), &tasks(broker, op))),
        "/ssh" => html_response(StatusCode::OK, page("SSH", "/ssh", Some(op), &ssh(broker, op))),
        "/remotes" => {
            html_response(StatusCode::OK, page("Services & remotes", "/remotes", Some(op), &remotes(broker, op).await))
        }
        "/audit" => {
            let f = crate::broker::audit::query::Filter {
                agent: param("agent").map(str::to_owned),
                task: param("task").map(str::to_owned),
                target: param("target").map(str::to_owned),
                kind: param("kind").map(str::to_owned),
                decision: param("decision").map(str::to_owned),
                event: param("event").map(str::to_owned),
                ..Default::default()
            };
            html_response(StatusCode::OK, page("Audit", "/audit", Some(op), &audit(broker, &f).await))
        }
        "/audit/verify" => {
            html_response(StatusCode::OK, page("Audit chain", "/audit", Some(op), &verify(broker).await))
        }
        "/events/audit" => super::actions::audit_feed(broker),
        "/graphs" => html_response(StatusCode::OK, page("Metrics", "/graphs", Some(op), &graphs(broker))),
        "/api/graphs" => json(StatusCode::OK, &broker.console.graphs.json()),
        "/policy" => {
            html_response(StatusCode::OK, page("Policy", "/policy", Some(op), &policy(broker, op, None).await))
        }
        "/inspect" => {
            html_response(StatusCode::OK, page("Token inspector", "/inspect", Some(op), &inspect_form(op, "")))
        }
        p if let Some(name) = p.strip_prefix("/api/reach/") => reach(broker, name).await,
        p if let Some(id) = p.strip_prefix("/tasks/").and_then(|r| r.strip_suffix("/revoke")) => {
            revoke_preview(broker, op, id)
        }
        _ => error_page(StatusCode::NOT_FOUND, Some(op), &format!("no page {path}")),
    }
}

fn since(secs: u64) -> String {
    crate::time::format_duration(Duration::from_secs(secs))
}

/// What `doctor` would warn about, from the running broker's side.
pub fn warnings(broker: &Broker) -> Vec<String> {
    let p = broker.policy();
    let mut w: Vec<String> = p.warnings.clone();
    let h = broker.signer.health();
    if let Some(s) = &h.status {
        w.extend(crate::broker::signer_mismatches(&p, &s.limits));
        if !s.sandbox.enforced {
            w.push(format!("the signer's sandbox is not fully enforced: {}", s.sandbox.problems.join("; ")));
        }
        if s.sandbox.insecure_override {
            w.push("the signer runs with --insecure-no-sandbox".into());
        }
    }
    if !h.available {
        w.push(format!("the signer is not available: {}", h.problem.unwrap_or_default()));
    }
    if let Some(f) = broker.audit.failure() {
        w.push(format!("the audit log has failed: {f} (state-changing requests are refused)"));
    }
    if broker.exposed() && broker.tls.is_none() {
        w.push(
            "a listener serves plain HTTP on a non-loopback address: credentials cross the network in clear text"
                .into(),
        );
    }
    if !p.operators.values().any(|o| o.role == OperatorRole::Admin) {
        w.push("no operator has the admin role: nobody can act from the console".into());
    }
    w
}

fn freeze_form(op: &Operator) -> String {
    if op.role != OperatorRole::Admin {
        return String::new();
    }
    let mut kinds = String::new();
    for k in FreezeKind::ALL {
        let _ = write!(kinds, "<option value=\"{0}\">{0}</option>", k.as_str());
    }
    format!(
        "<form class=\"freeze\" method=\"post\" action=\"/freeze\">{}<label for=\"fk\">Freeze</label>\
         <select id=\"fk\" name=\"kind\">{kinds}</select><label for=\"fn\">Name</label>\
         <input id=\"fn\" name=\"name\" required maxlength=\"128\"><label for=\"fr\">Reason</label>\
         <input id=\"fr\" name=\"reason\" maxlength=\"500\"><button type=\"submit\" class=\"danger\">Freeze</button></form>",
        csrf_field(op)
    )
}

fn frozen_table(broker: &Broker, op: &Operator) -> String {
    let rows: Vec<Vec<String>> = broker
        .freezes
        .list()
        .into_iter()
        .map(|(k, n, e)| {
            vec![
                esc(k.as_str()),
                esc(&n),
                esc(&e.by),
                esc(&crate::time::format_rfc3339(e.at, None)),
                esc(&e.reason),
                button(op, "/unfreeze", &[("kind", k.as_str()), ("name", &n)], "Unfreeze", false),
            ]
        })
        .collect();
    table(&["kind", "name", "by", "at", "reason", ""], &rows, "Nothing is frozen.")
}

fn overview(broker: &Broker, op: &Operator) -> String {
    let h = broker.signer.health();
    let sandbox = h.status.as_ref().map(|s| &s.sandbox);
    let enforced = sandbox.is_some_and(|s| s.enforced);
    let p = broker.policy();
    let remotes = broker.federation.status();
    let down = remotes.values().filter(|(h, ..)| *h != "connected").count();
    let now = crate::time::now().secs().max(0) as u64;
    let certs = broker.ssh.registry.list(now, |_| true);
    let (seq, _) = broker.audit.durable_head();
    let mut out = String::from("<section class=\"cards\">");
    let card = |title: &str, value: String, detail: String| {
        format!("<div class=\"card\"><h2>{}</h2><p class=\"big\">{value}</p><p>{detail}</p></div>", esc(title))
    };
    out.push_str(&card(
        "Signer",
        if h.available && enforced {
            badge("ok", "sandboxed")
        } else if h.available {
            badge("bad", "not sandboxed")
        } else {
            badge("bad", "down")
        },
        format!(
            "{} restart(s); Landlock ABI {}; seccomp {}",
            h.restarts,
            sandbox.map_or("?".into(), |s| s.landlock_abi.to_string()),
            esc(&sandbox.map_or("?".into(), |s| format!("{:?}", s.seccomp)))
        ),
    ));
    out.push_str(&card(
        "Broker",
        esc(env!("CARGO_PKG_VERSION")),
        format!(
            "up {}; policy {}",
            esc(&since(broker.started.elapsed().as_secs())),
            esc(&p.digest[..12.min(p.digest.len())])
        ),
    ));
    out.push_str(&card("Agents", p.agents.len().to_string(), format!("{} MCP session(s)", broker.sessions.len())));
    out.push_str(&card("Tasks", broker.tasks.len().to_string(), format!("in {} tree(s)", broker.tasks.trees())));
    out.push_str(&card(
        "SSH",
        broker.ssh.session_count().to_string(),
        format!("session(s); {} live certificate(s), {} target(s)", certs.len(), p.targets.len()),
    ));
    out.push_str(&card(
        "Remotes",
        remotes.len().to_string(),
        if down == 0 { "all connected".into() } else { format!("{down} not connected") },
    ));
    let exposed = broker.exposed();
    out.push_str(&match &broker.tls {
        Some(t) => {
            let d = t.describe();
            let what = match d["ca_file"].as_str() {
                Some(f) => format!("local CA {} — clients trust <code>{}</code>", esc(&t.fingerprint()), esc(f)),
                None => format!("certificate {}", esc(&t.fingerprint())),
            };
            card("TLS", badge("ok", "on"), what)
        }
        None if exposed => {
            card("TLS", badge("bad", "plain HTTP"), "on a non-loopback address (--insecure-plain-http)".into())
        }
        None => card("TLS", badge("muted", "off"), "loopback listeners only".into()),
    });
    out.push_str(&card(
        "Audit",
        if broker.audit.failure().is_none() { badge("ok", "writing") } else { badge("bad", "failed") },
        format!("{seq} event(s) durable; <a href=\"/audit/verify\">verify the chain</a>"),
    ));
    out.push_str("</section>");
    let w = warnings(broker);
    out.push_str("<h2>Warnings</h2>");
    if w.is_empty() {
        out.push_str("<p class=\"muted\">None.</p>");
    } else {
        out.push_str(&notice("warn", &w));
    }
    out.push_str("<h2>Kill switch</h2>");
    out.push_str(&frozen_table(broker, op));
    out.push_str(&freeze_form(op));
    out
}

async fn agents(broker: &Broker, op: &Operator) -> String {
    let p = broker.policy();
    let events = recent_events(broker, Default::default(), usize::MAX, ACTIVITY_READ).await.unwrap_or_default();
    let last = |a: &str| {
        events
            .iter()
            .rev()
            .find(|e| e["agent"].as_str() == Some(a))
            .and_then(|e| e["ts"].as_i64())
            .map_or_else(|| "none recently".to_owned(), |t| crate::time::UnixMicros(t).to_rfc3339())
    };
    let tasks = broker.tasks.visible(&crate::broker::tasks::Scope::All);
    let mut out =
        String::from("<p>Each cell is what the agent's policy grants there (its tasks can only narrow it).</p>");
    let mut head: Vec<String> = vec!["agent".into(), "state".into(), "last activity".into(), "live tasks".into()];
    head.extend(p.targets.keys().map(|t| format!("ssh {t}")));
    head.extend(p.services.keys().map(|s| format!("http {s}")));
    head.extend(p.remotes.keys().map(|r| format!("mcp {r}")));
    head.push(String::new());
    let rows: Vec<Vec<String>> = p
        .agents
        .values()
        .map(|a| {
            use crate::broker::agents::AgentState;
            let frozen = p.frozen.has(FreezeKind::Agent, &a.name);
            let state = if frozen {
                badge("bad", "frozen")
            } else if !a.enabled {
                badge("muted", "disabled")
            } else {
                let class = match a.state {
                    AgentState::Active => "ok",
                    AgentState::Idle | AgentState::Provisioned => "muted",
                    _ => "bad",
                };
                badge(class, a.state.as_str())
            };
            let state = match (&a.owner, &a.template) {
                (Some(o), Some(t)) => format!("{state} <small>{} · owner {}</small>", esc(t), esc(o)),
                _ => state,
            };
            let live = tasks.iter().filter(|v| v.task.agent == a.name && v.revoked.is_none()).count();
            let mut row = vec![
                format!("{} {}", esc(&a.name), audit_link("agent", &a.name)),
                state,
                esc(&last(&a.name)),
                format!("<a href=\"/tasks#agent-{}\">{live}</a>", esc(&a.name)),
            ];
            for (tn, t) in &p.targets {
                let roles: Vec<&str> = t
                    .allowed_roles
                    .iter()
                    .filter(|r| crate::broker::ssh::policy_allows(&p, &a.name, tn, r))
                    .map(String::as_str)
                    .collect();
                row.push(if roles.is_empty() {
                    "<span class=\"no\">–</span>".into()
                } else {
                    esc(&roles.join(", "))
                });
            }
            for s in p.services.keys() {
                row.push(match a.services.lookup(s) {
                    Some(g) => {
                        let m = g
                            .value
                            .methods
                            .as_ref()
                            .map_or("any method".to_owned(), |m| m.iter().cloned().collect::<Vec<_>>().join(","));
                        esc(&m)
                    }
                    None => "<span class=\"no\">–</span>".into(),
                });
            }
            for r in p.remotes.keys() {
                row.push(match a.remotes.lookup(r) {
                    Some(g) => {
                        esc(&g.value.tools.as_ref().map_or("all tools".to_owned(), |t| format!("{} tool(s)", t.len())))
                    }
                    None => "<span class=\"no\">–</span>".into(),
                });
            }
            let mut actions = if frozen {
                button(op, "/unfreeze", &[("kind", "agent"), ("name", &a.name)], "Unfreeze", false)
            } else {
                button(op, "/freeze", &[("kind", "agent"), ("name", &a.name)], "Freeze", true)
            };
            let path = |verb: &str| format!("/agents/{}/{verb}", a.name);
            if a.state.serves() {
                actions.push_str(&button(op, &path("suspend"), &[], "Suspend", true));
            } else if a.state == AgentState::Suspended {
                actions.push_str(&button(op, &path("resume"), &[], "Resume", false));
            }
            if a.state.can_become(AgentState::Revoked) {
                actions.push_str(&button(op, &path("revoke"), &[], "Revoke", true));
            }
            row.push(actions);
            row
        })
        .collect();
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    out.push_str(&table(&head, &rows, "No agents in the policy."));
    out.push_str(&lifecycle(broker, &p));
    out
}

/// The reaper's plan as of now (a dry run) and each agent's unused grants (docs/agents.md).
fn lifecycle(broker: &Broker, p: &crate::broker::policy::Policy) -> String {
    let plan = crate::broker::agents::reaper::plan(p, |n| broker.agents.get(n), crate::time::now().secs());
    let mut out = String::from(
        "<h2>Lifecycle</h2><p>What the reaper would do now (<code>ephyr agent reap --apply</code> does it",
    );
    out.push_str(if p.lifecycle.reaper_apply {
        "; this broker applies it hourly"
    } else {
        "; this broker only reports it"
    });
    out.push_str(").</p>");
    let rows: Vec<Vec<String>> = plan
        .steps
        .iter()
        .map(|s| vec![esc(&s.agent), format!("{} → {}", s.from.as_str(), s.to.as_str()), esc(&s.why)])
        .collect();
    out.push_str(&table(&["agent", "step", "why"], &rows, "No agent is due a lifecycle step."));
    out.push_str("<h3>Grants not used</h3>");
    let rows: Vec<Vec<String>> =
        plan.drift.iter().map(|d| vec![esc(&d.agent), esc(&d.unused.join(", ")), esc(&d.suggestion)]).collect();
    out.push_str(&table(&["agent", "unused", "suggested"], &rows, "Every agent used what it holds."));
    out
}

/// `ephyr run` runs of the last day (each is a task): host, what ran, state, duration, LLM usage
/// per model.
fn runs_table(broker: &Broker) -> String {
    let now = std::time::Instant::now();
    let rows: Vec<Vec<String>> = broker
        .runs
        .list()
        .iter()
        .map(|r| {
            let v = r.view(now);
            let state = match v["end_reason"].as_str() {
                Some(why) => badge("muted", why),
                None => badge("ok", &format!("live, lease {}s", v["lease_left_ms"].as_u64().unwrap_or(0) / 1000)),
            };
            let u = r.usage();
            let models: Vec<String> =
                u.models.iter().map(|(m, [n, i, o])| format!("{}: {n} req, {i} in, {o} out", esc(m))).collect();
            let id = r.id().to_string();
            vec![
                format!("<code>{}</code> {}", esc(&id), audit_link("task", &id)),
                esc(&r.about.host),
                format!("{} <span class=\"muted\">as {}</span>", esc(&r.about.label), esc(&r.about.agent)),
                state,
                esc(&since(v["duration_secs"].as_u64().unwrap_or(0))),
                format!(
                    "{} req, {} tokens<br><span class=\"muted\">{}</span>",
                    u.requests,
                    u.tokens(),
                    models.join("<br>")
                ),
                format!("{} ({} commands)", u.tool_calls, u.commands),
            ]
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "<h2>Runs (ephyr run)</h2>{}",
        table(&["run", "host", "agent", "state", "duration", "LLM usage", "tool calls"], &rows, "")
    )
}

fn tasks(broker: &Broker, op: &Operator) -> String {
    let now = crate::time::now();
    let mut views = broker.tasks.visible(&crate::broker::tasks::Scope::All);
    // Trees together, parents before children.
    views.sort_by_key(|v| (v.task.root, v.task.depth, v.task.id));
    let runs = runs_table(broker);
    if views.is_empty() {
        return format!("{runs}<p class=\"muted\">No live tasks.</p>");
    }
    let mut out = runs;
    out.push_str("<ul class=\"tree\">");
    for v in &views {
        let j = crate::broker::tools::tasks::view_json(v, now);
        let id = v.task.id.to_string();
        let s = |k: &str| j[k].as_str().unwrap_or("").to_owned();
        let holder = match (j["holder_bound"].as_bool(), j["bind_deadline"].as_str()) {
            (Some(true), _) => badge("ok", "holder-bound"),
            (_, Some(d)) => badge("warn", &format!("unbound until {d}")),
            _ => badge("muted", "bearer"),
        };
        let state = if v.revoked.is_some() {
            badge("bad", "revoked")
        } else {
            badge("ok", &format!("{} left", since(j["remaining_ttl"].as_u64().unwrap_or(0))))
        };
        let _ = write!(
            out,
            "<li class=\"depth-{}\" id=\"agent-{}\"><div class=\"task\"><strong>{}</strong> <code>{}</code> {state} {holder} {}<br>\
             <span class=\"muted\">agent {}{}; lineage {}; expires {}</span>\
             <details><summary>envelope</summary><pre>{}</pre></details>{}</div></li>",
            v.task.depth.min(8),
            esc(&v.task.agent),
            esc(&s("description")),
            esc(&id),
            audit_link("task", &id),
            esc(&v.task.agent),
            v.task.delegated_by.as_ref().map_or(String::new(), |d| format!(", delegated by {}", esc(d))),
            esc(&broker.tasks.lineage(v.task.id).join(" › ")),
            esc(&s("expires_at")),
            esc(&serde_json::to_string_pretty(&j["envelope"]).unwrap_or_default()),
            if v.revoked.is_none() && op.role == OperatorRole::Admin {
                format!("<a class=\"button danger\" href=\"/tasks/{}/revoke\">Revoke…</a>", esc(&id))
            } else {
                String::new()
            },
        );
    }
    out.push_str("</ul>");
    out
}

/// What revoking task `id` takes with it: the task, its live descendants, their SSH sessions.
pub fn doomed(broker: &Broker, id: ulid::Ulid) -> (Vec<crate::broker::tasks::TaskView>, Vec<String>) {
    let ids = id.to_string();
    let tasks: Vec<_> = broker
        .tasks
        .visible(&crate::broker::tasks::Scope::Task(id))
        .into_iter()
        .filter(|v| v.revoked.is_none())
        .collect();
    let sessions: Vec<String> = broker
        .ssh
        .sessions()
        .iter()
        .filter(|s| s.task.as_deref().is_some_and(|t| t == ids || tasks.iter().any(|v| v.task.id.to_string() == t)))
        .map(|s| format!("{} on {} as {}", s.id, s.target, s.role))
        .collect();
    (tasks, sessions)
}

fn revoke_preview(broker: &Broker, op: &Operator, id: &str) -> Response<Body> {
    let Ok(uid) = ulid::Ulid::from_string(id) else {
        return error_page(StatusCode::BAD_REQUEST, Some(op), &format!("{id:?} is not a task id"));
    };
    if broker.tasks.view(uid).is_none() {
        return error_page(StatusCode::NOT_FOUND, Some(op), &format!("no live task {id}"));
    }
    let (tasks, sessions) = doomed(broker, uid);
    let mut body = format!(
        "<p>Revoking <code>{}</code> ends these at once (tokens refused, streams closed, certificates on the KRL):</p><ul>",
        esc(id)
    );
    for v in &tasks {
        let _ = write!(
            body,
            "<li><code>{}</code> {} (agent {})</li>",
            v.task.id,
            esc(&v.task.description),
            esc(&v.task.agent)
        );
    }
    for s in &sessions {
        let _ = write!(body, "<li>SSH session {}</li>", esc(s));
    }
    body.push_str("</ul>");
    body.push_str(&button(op, &format!("/tasks/{id}/revoke"), &[], &format!("Revoke {} task(s)", tasks.len()), true));
    body.push_str(" <a href=\"/tasks\">Cancel</a>");
    html_response(StatusCode::OK, page("Revoke a task", "/tasks", Some(op), &body))
}

fn ssh(broker: &Broker, op: &Operator) -> String {
    let p = broker.policy();
    let targets = crate::broker::local::targets_json(broker);
    let mut out = String::from("<h2>Targets</h2>");
    let rows: Vec<Vec<String>> = targets["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let name = t["name"].as_str().unwrap_or("");
            let frozen = p.frozen.has(FreezeKind::Target, name);
            let roles: Vec<String> = t["roles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["role"].as_str().map(str::to_owned))
                .collect();
            vec![
                format!("{} {}", esc(name), audit_link("target", name)),
                format!("{}:{}", esc(t["host"].as_str().unwrap_or("")), t["port"]),
                format!("<span class=\"reach\" data-target=\"{}\">checking…</span>", esc(name)),
                esc(t["host_key"].as_str().unwrap_or("")),
                esc(&roles.join(", ")),
                if frozen {
                    badge("bad", "frozen")
                } else if t["enabled"] == false {
                    badge("muted", "disabled")
                } else {
                    badge("ok", "enabled")
                },
                if frozen {
                    button(op, "/unfreeze", &[("kind", "target"), ("name", name)], "Unfreeze", false)
                } else {
                    button(op, "/freeze", &[("kind", "target"), ("name", name)], "Freeze", true)
                },
            ]
        })
        .collect();
    out.push_str(&table(&["target", "address", "reachable", "host key", "roles", "state", ""], &rows, "No targets."));
    out.push_str("<h2>Live sessions</h2>");
    let rows: Vec<Vec<String>> = broker
        .ssh
        .sessions()
        .iter()
        .map(|s| {
            let v = s.view();
            vec![
                esc(&s.id),
                esc(&s.agent),
                esc(&s.target),
                esc(&s.role),
                esc(v["cert_serial"].as_str().unwrap_or("")),
                format!("{}s", v["idle_secs"]),
                v["commands"].to_string(),
                button(op, &format!("/ssh/sessions/{}/close", s.id), &[], "Close", true),
            ]
        })
        .collect();
    out.push_str(&table(
        &["session", "agent", "target", "role", "certificate", "idle", "commands", ""],
        &rows,
        "No open sessions.",
    ));
    out.push_str("<h2>Certificates</h2>");
    let now = crate::time::now().secs().max(0) as u64;
    let certs = broker.ssh.registry.list(now, |_| true);
    let revoked = certs.iter().filter(|c| c.revoked_at.is_some()).count();
    let rows: Vec<Vec<String>> = certs
        .iter()
        .map(|c| {
            let serial = format!("{:016x}", c.cert.serial);
            vec![
                format!("<code>{serial}</code>"),
                esc(&c.cert.agent),
                esc(&c.cert.target),
                esc(&c.cert.principal),
                esc(&crate::time::format_rfc3339(c.cert.valid_before as i64, None)),
                if c.revoked_at.is_some() {
                    badge("bad", "revoked")
                } else if c.in_use {
                    badge("ok", "in use")
                } else {
                    badge("muted", "issued")
                },
                if c.revoked_at.is_none() {
                    button(op, &format!("/ssh/certs/{serial}/revoke"), &[], "Revoke", true)
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &["serial", "agent", "target", "principal", "valid until", "state", ""],
        &rows,
        "No live certificates.",
    ));
    let _ = write!(
        out,
        "<h2>Revocation list</h2><p>{revoked} operator-revoked certificate(s) still valid, plus those of revoked tasks; targets fetch it from <code>/v1/ssh/krl</code>.</p>"
    );
    out
}

/// The sign-in cell of a remote protected by OAuth: its state and a button that starts one.
fn signin(broker: &Broker, op: &Operator, name: &str) -> String {
    use crate::broker::federation::auth::LoginState;
    if broker.policy().remotes.get(name).is_none_or(|r| r.oauth.is_none()) {
        return "-".into();
    }
    let mut out = String::new();
    let logins = broker.federation.auth.status(name);
    if logins.is_empty() {
        out = badge("warn", "not signed in") + " ";
    }
    for (who, st) in logins {
        let who = if who == "*" { String::new() } else { format!("{who}: ") };
        match st {
            LoginState::SignedIn { by, .. } => {
                let _ = write!(out, "{}{} ", esc(&who), badge("ok", &format!("signed in by {by}")));
            }
            LoginState::Needed(why) => {
                let _ = write!(out, "{}{} ", esc(&who), badge("bad", "sign-in needed"));
                let _ = write!(out, "<small>{}</small> ", esc(&why));
            }
        }
    }
    out + &button(op, &format!("/remotes/{name}/login"), &[], "Sign in", false)
}

async fn remotes(broker: &Broker, op: &Operator) -> String {
    let p = broker.policy();
    let mut out = String::from("<h2>Remote MCP servers</h2>");
    let status = broker.federation.status();
    let eras = broker.federation.eras();
    let rows: Vec<Vec<String>> = p
        .remotes
        .keys()
        .map(|name| {
            let (health, tools, quarantined, err) = status.get(name).cloned().unwrap_or(("down", 0, 0, None));
            let frozen = p.frozen.has(FreezeKind::Remote, name);
            let kind = match health {
                "connected" => "ok",
                "degraded" | "quarantined" => "warn",
                _ => "bad",
            };
            vec![
                format!("{} {}", esc(name), audit_link("kind", "federation")),
                if frozen { badge("bad", "frozen") } else { badge(kind, health) },
                esc(eras.get(name).copied().unwrap_or("-")),
                tools.to_string(),
                if quarantined > 0 {
                    format!(
                        "{quarantined} {}",
                        button(op, &format!("/remotes/{name}/approve"), &[], "Approve all", false)
                    )
                } else {
                    "0".into()
                },
                esc(err.as_deref().unwrap_or("")),
                signin(broker, op, name),
                if frozen {
                    button(op, "/unfreeze", &[("kind", "remote"), ("name", name)], "Unfreeze", false)
                } else {
                    button(op, "/freeze", &[("kind", "remote"), ("name", name)], "Freeze", true)
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &["remote", "health", "protocol", "tools", "quarantined", "last error", "sign-in", ""],
        &rows,
        "No remotes.",
    ));
    for name in p.remotes.keys() {
        let review = broker.federation.review(name);
        if review.is_empty() {
            continue;
        }
        let _ = write!(out, "<h3>Changed tools of {}</h3>", esc(name));
        for (tool, old, new) in review {
            let diff = crate::broker::federation::pins::diff(&old, &new).join("\n");
            let flags = crate::broker::federation::pins::flags(&new);
            let _ = write!(out, "<details open><summary>{}</summary>", esc(&tool));
            if !flags.is_empty() {
                out.push_str(&notice("bad", &flags));
            }
            let _ = write!(
                out,
                "<pre class=\"diff\">{}</pre>{}</details>",
                esc(&diff),
                button(op, &format!("/remotes/{name}/approve"), &[("tool", &tool)], "Approve this definition", false)
            );
        }
    }
    out.push_str("<h2>HTTP services</h2>");
    // A service's last error: its newest proxied request that failed, from the audit trail.
    let recent = recent_events(
        broker,
        crate::broker::audit::query::Filter { kind: Some("http".into()), ..Default::default() },
        usize::MAX,
        ACTIVITY_READ,
    )
    .await
    .unwrap_or_default();
    let last_error = |name: &str| {
        recent
            .iter()
            .rev()
            .find(|e| e["action"]["service"].as_str() == Some(name) && e["code"].is_string())
            .map(|e| {
                format!(
                    "{} {}: {}",
                    crate::time::UnixMicros(e["ts"].as_i64().unwrap_or(0)).to_rfc3339(),
                    e["code"].as_str().unwrap_or(""),
                    e["reason"].as_str().or(e["message"].as_str()).unwrap_or("")
                )
            })
            .unwrap_or_default()
    };
    let rows: Vec<Vec<String>> = p
        .services
        .iter()
        .map(|(name, s)| {
            let frozen = p.frozen.has(FreezeKind::Service, name);
            let all = broker.metrics.sum("ephyr_proxy_requests_total", &[("service", name)]);
            let failed = broker.metrics.sum("ephyr_proxy_requests_total", &[("service", name), ("code", "5xx")]);
            vec![
                format!("{} {}", esc(name), audit_link("kind", "http")),
                esc(&format!("{}://{}:{}{}", s.url.scheme, s.url.host, s.url.port, s.url.base_path)),
                if frozen {
                    badge("bad", "frozen")
                } else if s.enabled {
                    badge("ok", "enabled")
                } else {
                    badge("muted", "disabled")
                },
                format!("{all} answered, {failed} with 5xx"),
                esc(&last_error(name)),
                if frozen {
                    button(op, "/unfreeze", &[("kind", "service"), ("name", name)], "Unfreeze", false)
                } else {
                    button(op, "/freeze", &[("kind", "service"), ("name", name)], "Freeze", true)
                },
            ]
        })
        .collect();
    out.push_str(&table(&["service", "upstream", "state", "requests", "last error", ""], &rows, "No services."));
    out
}

async fn audit(broker: &Broker, f: &crate::broker::audit::query::Filter) -> String {
    let mut out = String::from("<form class=\"filters\" method=\"get\" action=\"/audit\">");
    for (k, v) in [
        ("agent", &f.agent),
        ("task", &f.task),
        ("target", &f.target),
        ("kind", &f.kind),
        ("event", &f.event),
        ("decision", &f.decision),
    ] {
        let _ = write!(
            out,
            "<label for=\"f-{k}\">{k}</label><input id=\"f-{k}\" name=\"{k}\" value=\"{}\" maxlength=\"128\">",
            esc(v.as_deref().unwrap_or(""))
        );
    }
    out.push_str("<button type=\"submit\">Filter</button> <a href=\"/audit\">Clear</a></form>");
    out.push_str("<h2>Live</h2><p class=\"muted\" id=\"feed-state\">Connecting to the live feed…</p><ol class=\"feed\" id=\"feed\" aria-live=\"polite\"></ol>");
    let _ = write!(out, "<h2>Recent</h2>");
    let _ = write!(
        out,
        "<p class=\"muted\">The newest {AUDIT_ROWS} matching events among the last {} MiB of the log (<code>ephyr audit query</code> searches all of it).</p>",
        AUDIT_READ >> 20
    );
    match recent_events(broker, f.clone(), AUDIT_ROWS, AUDIT_READ).await {
        Ok(events) => {
            let rows: Vec<Vec<String>> = events
                .iter()
                .rev()
                .map(|e| {
                    let s = |k: &str| e[k].as_str().unwrap_or("").to_owned();
                    let decision = if s("decision").is_empty() { s("code") } else { s("decision") };
                    vec![
                        esc(&crate::time::UnixMicros(e["ts"].as_i64().unwrap_or(0)).to_rfc3339()),
                        e["seq"].to_string(),
                        esc(&format!("{}/{}", s("kind"), s("event"))),
                        if s("agent").is_empty() {
                            String::new()
                        } else {
                            format!("<a href=\"/audit?agent={}\">{}</a>", q(&s("agent")), esc(&s("agent")))
                        },
                        esc(&decision),
                        esc(&crate::broker::audit::query::summary(e)),
                        if s("task").is_empty() {
                            String::new()
                        } else {
                            format!("<a href=\"/audit?task={}\">{}</a>", q(&s("task")), esc(&s("task")))
                        },
                    ]
                })
                .collect();
            out.push_str(&table(
                &["time", "seq", "event", "agent", "decision", "what", "task"],
                &rows,
                "No matching events.",
            ));
        }
        Err(e) => out.push_str(&notice("bad", &[format!("the audit log could not be read: {e}")])),
    }
    out
}

async fn verify(broker: &Broker) -> String {
    let dir = broker.data_dir.audit();
    let key = broker.signer.health().status.map(|s| s.checkpoint_public_key.clone());
    let report = broker
        .pool
        .run(move || {
            let paths = crate::broker::audit::log_files(&dir).unwrap_or_default();
            let total: u64 = paths.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
            if total > VERIFY_MAX {
                return Err(total);
            }
            let files: Vec<(String, Vec<u8>)> = paths
                .into_iter()
                .filter_map(|p| std::fs::read(&p).ok().map(|b| (p.display().to_string(), b)))
                .collect();
            let witnesses: Vec<_> = crate::broker::audit::read_head(&dir).into_iter().collect();
            Ok(crate::broker::audit::verify::verify(&files, key.as_deref(), &witnesses))
        })
        .await;
    let r = match report {
        None => return notice("bad", &["the blocking pool is gone".into()]),
        Some(Err(total)) => {
            return notice(
                "warn",
                &[format!(
                    "The log is {} MiB, more than the console verifies in place ({} MiB): run `ephyr audit verify` on the appliance.",
                    total >> 20,
                    VERIFY_MAX >> 20
                )],
            );
        }
        Some(Ok(r)) => r,
    };
    let mut out = if r.ok() {
        notice(
            "ok",
            &[format!(
                "The chain verifies: {} line(s), {} checkpoint(s), signed through seq {}.",
                r.lines,
                r.checkpoints,
                r.signed_through.map_or("-".into(), |s| s.to_string())
            )],
        )
    } else {
        notice("bad", &r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>())
    };
    if !r.warnings.is_empty() {
        out.push_str(&notice("warn", &r.warnings.iter().map(|e| e.to_string()).collect::<Vec<_>>()));
    }
    out
}

fn graphs(broker: &Broker) -> String {
    let mut out = format!(
        "<p>Sampled every {}s for the last {} minutes; counters as the change per interval.</p><div class=\"graphs\">",
        super::graphs::EVERY.as_secs(),
        super::graphs::EVERY.as_secs() * super::graphs::KEEP as u64 / 60
    );
    let data = broker.console.graphs.json();
    for s in data["series"].as_array().into_iter().flatten() {
        let points: Vec<String> = s["points"].as_array().into_iter().flatten().map(|p| p.to_string()).collect();
        let _ = write!(
            out,
            "<figure class=\"spark\" data-key=\"{}\" data-points=\"{}\"><figcaption>{} <span class=\"now\">{}</span></figcaption>\
             <svg viewBox=\"0 0 300 60\" role=\"img\" aria-label=\"{}\"><polyline points=\"\"></polyline></svg></figure>",
            esc(s["key"].as_str().unwrap_or("")),
            esc(&points.join(",")),
            esc(s["label"].as_str().unwrap_or("")),
            esc(points.last().map_or("-", String::as_str)),
            esc(s["label"].as_str().unwrap_or("")),
        );
    }
    out.push_str("</div>");
    out
}

/// The loaded policy with every password and key hash and every static header value replaced.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut header_indent: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(h) = header_indent {
            if line.trim().is_empty() || indent > h {
                if let Some((k, _)) = line.split_once(':') {
                    let _ = writeln!(out, "{k}: (redacted)");
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
                continue;
            }
            header_indent = None;
        }
        let mut l = line.to_owned();
        for key in ["api_key_hash:", "password_hash:", "headers:"] {
            if let Some(at) = l.find(key) {
                let after = &l[at + key.len()..];
                if key == "headers:" && after.trim().is_empty() {
                    header_indent = Some(indent);
                    continue;
                }
                let t = after.trim_start();
                let len = if key == "headers:" && t.starts_with('{') {
                    t.find('}').map_or(t.len(), |e| e + 1)
                } else if let Some(rest) = t.strip_prefix('"') {
                    rest.find('"').map_or(t.len(), |e| e + 2)
                } else {
                    t.find([',', '}']).unwrap_or(t.len())
                };
                let start = at + key.len() + (after.len() - t.len());
                l.replace_range(start..start + len, "\"(redacted)\"");
            }
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// The policy view: the loaded policy (hashes redacted), a diff against the file on disk, and
/// reload (with the problems of a failed one shown here).
pub async fn policy(broker: &Broker, op: &Operator, problems: Option<&[String]>) -> String {
    let p = broker.policy();
    let mut out = String::new();
    if let Some(pr) = problems {
        out.push_str(&notice(
            "bad",
            &std::iter::once("The policy on disk is invalid; the loaded policy stays in force:".to_owned())
                .chain(pr.iter().cloned())
                .collect::<Vec<_>>(),
        ));
    }
    let loaded = redact(&p.text);
    let disk = match &broker.policy_source {
        crate::broker::PolicySource::File(path) => {
            let path = path.clone();
            let read = broker
                .pool
                .run(move || std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display())))
                .await;
            Some(read.unwrap_or_else(|| Err("the blocking pool is gone".into())))
        }
        crate::broker::PolicySource::BuiltinDev { .. } => None,
    };
    let _ = write!(out, "<p>Loaded policy <code>{}</code>; {} warning(s).</p>", esc(&p.digest), p.warnings.len());
    match disk {
        None => out.push_str("<p class=\"muted\">This broker runs the built-in dev policy (no file to compare).</p>"),
        Some(Err(e)) => out.push_str(&notice("bad", &[format!("the policy file cannot be read: {e}")])),
        Some(Ok(d)) => {
            let d = redact(&d);
            if d == loaded {
                out.push_str(&notice("ok", &["The file on disk is the loaded policy.".into()]));
            } else {
                let (a, b): (Vec<&str>, Vec<&str>) = (loaded.lines().collect(), d.lines().collect());
                let diff = crate::broker::textdiff::lines(&a, &b)
                    .unwrap_or_else(|| vec!["(too large to compare line by line)".into()]);
                out.push_str("<h2>Changes on disk, not loaded yet</h2><pre class=\"diff\">");
                for l in diff.iter().filter(|l| !l.starts_with("  ")) {
                    let class = if l.starts_with('+') { "add" } else { "del" };
                    let _ = writeln!(out, "<span class=\"{class}\">{}</span>", esc(l));
                }
                out.push_str("</pre>");
            }
        }
    }
    out.push_str(&button(op, "/policy/reload", &[], "Reload the policy from disk", false));
    let _ = write!(out, "<h2>Loaded</h2><pre class=\"policy\">{}</pre>", esc(&loaded));
    out
}

/// The token inspector's form (the token is posted, never put in a URL).
pub fn inspect_form(op: &Operator, result: &str) -> String {
    format!(
        "<p>Paste a task token to see what it allows. It is decoded here, verified against the broker's task trees, and not stored or logged.</p>\
         <form class=\"inspect\" method=\"post\" action=\"/inspect\">{}<label for=\"token\">Token</label>\
         <textarea id=\"token\" name=\"token\" rows=\"4\" required maxlength=\"16384\" autocomplete=\"off\" spellcheck=\"false\"></textarea>\
         <button type=\"submit\">Inspect</button></form>{result}",
        csrf_field(op)
    )
}

/// `GET /api/reach/<target>`: whether a TCP connection to the target opens within 2 s.
async fn reach(broker: &Broker, name: &str) -> Response<Body> {
    let p = broker.policy();
    let Some(t) = p.targets.get(name) else {
        return json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "unknown_target"}));
    };
    let addr = format!("{}:{}", t.host, t.port);
    let started = std::time::Instant::now();
    let connect = async {
        let addrs = broker
            .pool
            .run({
                let a = addr.clone();
                move || std::net::ToSocketAddrs::to_socket_addrs(&a).map(|i| i.collect::<Vec<_>>())
            })
            .await;
        let Some(Ok(addrs)) = addrs else { return Err("name not resolved".to_owned()) };
        let first = addrs.first().copied().ok_or("no address")?;
        crate::broker::reactor::Io::<std::net::TcpStream>::connect(first).await.map(drop).map_err(|e| e.to_string())
    };
    let r = futures_lite::future::or(connect, async {
        crate::broker::deadline::Deadline::after(Duration::from_secs(2)).await;
        Err("no answer within 2s".to_owned())
    })
    .await;
    let mut resp = json(
        StatusCode::OK,
        &match r {
            Ok(()) => serde_json::json!({"reachable": true, "ms": started.elapsed().as_millis() as u64}),
            Err(e) => serde_json::json!({"reachable": false, "error": e}),
        },
    );
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_hashes_and_headers() {
        let text = "agents:\n  a: { api_key_hash: \"ephyr-sha256$x$y\", uid: 5 }\n  b:\n    password_hash: $argon2id$v=19$z\n\
                    remotes:\n  r:\n    headers:\n      X-Key: hunter2\n    url: https://x\n  s: { url: https://y, headers: { A: b } }\n";
        let r = redact(text);
        for secret in ["ephyr-sha256", "argon2id", "hunter2", "A: b"] {
            assert!(!r.contains(secret), "{secret} in {r}");
        }
        assert!(r.contains("uid: 5") && r.contains("url: https://x") && r.contains("X-Key: (redacted)"), "{r}");
    }
}
