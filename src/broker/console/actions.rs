//! The console's state changes (POST) and its live audit feed. Each action is checked here
//! (session, CSRF token, admin role) and carried out by `ops`, which audits it with the
//! operator's name (`console:<name>`). Sign-in checks the password on the blocking pool.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::StreamBody;
use hyper::body::Incoming;
use serde_json::json;

use super::auth::{self, Operator};
use super::html::{esc, notice, page};
use super::{error_page, html_response, redirect, views};
use crate::broker::Broker;
use crate::broker::audit::{Event, Kind};
use crate::broker::http::{Body, Peer, read_body};
use crate::broker::ops::{self, Actor};
use crate::broker::policy::{FreezeKind, OperatorRole};
use crate::secret::SecretString;

/// Largest form accepted (a pasted token is the biggest).
const MAX_FORM: usize = 32 * 1024;
/// Time a form body may take to arrive.
const FORM_TIMEOUT: Duration = Duration::from_secs(10);
/// A valid Argon2id hash of a random password, checked when the name is unknown so both cases
/// take the same time.
const DECOY: &str = "$argon2id$v=19$m=19456,t=2,p=1$24Wz7G4Hdoct+0nCMQr1Qw$Ru3xtCXpCGAhelGDTIfhIH9C+ZmJKlU0UfPHIJV8UOc";

/// How often the live feed sends what was recorded meanwhile.
const FEED_EVERY: Duration = Duration::from_millis(100);

/// Decodes `application/x-www-form-urlencoded` (`+` is a space); a pair that does not decode
/// to UTF-8 is left out.
pub fn form(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &[u8]| -> Option<String> {
        let s = String::from_utf8(s.iter().map(|b| if *b == b'+' { b' ' } else { *b }).collect()).ok()?;
        String::from_utf8(crate::broker::policy::pattern::percent_decode(&s).ok()?).ok()
    };
    body.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let mut it = p.splitn(2, |b| *b == b'=');
            let k = decode(it.next()?)?;
            let v = decode(it.next().unwrap_or(b""))?;
            Some((k, v))
        })
        .collect()
}

/// The page to go to after sign-in, from a query or form (`next`): only the consent page of
/// an authorization request, so a link cannot send an operator anywhere else.
pub fn next_page(query: &str) -> Option<String> {
    let f = form(query.as_bytes());
    let n = field(&f, "next")?;
    let id = n.strip_prefix("/oauth/consent?request=")?;
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .then(|| n.to_owned())
}

fn field<'a>(f: &'a [(String, String)], k: &str) -> Option<&'a str> {
    f.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

fn source(peer: Peer) -> IpAddr {
    match peer {
        Peer::Tcp(a) => a.ip(),
        Peer::Unix(_) => IpAddr::from([127, 0, 0, 1]),
    }
}

/// `POST /login`: name and password → a session cookie, or the form again with why.
pub async fn login(broker: &Broker, req: Request<Incoming>, peer: Peer, tls: bool) -> Response<Body> {
    let body = match read_body(req, 4096, FORM_TIMEOUT).await {
        Ok(b) => zeroize::Zeroizing::new(b.to_vec()),
        Err(e) => return views::login(broker, Some(&e.describe()), StatusCode::BAD_REQUEST),
    };
    let f = form(&body);
    let name = field(&f, "name").unwrap_or("").to_owned();
    let next = next_page(std::str::from_utf8(&body).unwrap_or(""));
    let password = SecretString::new(field(&f, "password").unwrap_or("").to_owned());
    drop(f);
    let ip = source(peer);
    let now = Instant::now();
    if let Some(wait) = broker.console.limiter.check(ip, &name, now) {
        broker.metrics.inc("ephyr_console_logins_total", &[("outcome", "throttled")]);
        let mut r = views::login(
            broker,
            Some(&format!("Too many failed sign-ins: try again in {}s.", wait.as_secs().max(1))),
            StatusCode::TOO_MANY_REQUESTS,
        );
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let policy = broker.policy();
    let known = policy.operators.get(&name).map(|o| o.password_hash.clone());
    let hash = known.clone().unwrap_or_else(|| DECOY.to_owned());
    let ok = password.expose().len() <= crate::cli::policy::MAX_PASSWORD
        && broker
            .pool
            .run(move || crate::broker::auth::api_key::argon2_verify(password.expose(), &hash))
            .await
            .unwrap_or(false)
        && known.is_some();
    let who = if known.is_some() { format!("console:{name}") } else { "console:(unknown operator)".to_owned() };
    if !ok {
        broker.console.limiter.failed(ip, known.is_some().then_some(name.as_str()), Instant::now());
        broker.metrics.inc("ephyr_console_logins_total", &[("outcome", "failed")]);
        broker
            .audit_now(
                Event::new(Kind::Operator, "console_login")
                    .agent(who)
                    .deny("bad_credentials", "wrong operator name or password")
                    .action(json!({ "source": ip.to_string() })),
            )
            .await;
        return views::login(broker, Some("Wrong operator name or password."), StatusCode::UNAUTHORIZED);
    }
    broker.console.limiter.succeeded(ip, &name);
    let Some(cookie) = broker.console.sessions.create(&policy, &name, Instant::now()) else {
        return views::login(
            broker,
            Some("No session could be started (no randomness?)."),
            StatusCode::SERVICE_UNAVAILABLE,
        );
    };
    broker.metrics.inc("ephyr_console_logins_total", &[("outcome", "ok")]);
    broker.metrics.set("ephyr_console_sessions", &[], broker.console.sessions.len() as f64);
    broker
        .audit_now(
            Event::new(Kind::Operator, "console_login").agent(who).allow().action(json!({ "source": ip.to_string() })),
        )
        .await;
    let mut r = redirect(next.as_deref().unwrap_or("/"));
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(cookie.expose(), tls)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn done(op: &Operator, title: &str, back: &str, lines: &[String]) -> Response<Body> {
    let body = format!("{}<p><a href=\"{back}\">Back</a></p>", notice("ok", lines));
    html_response(StatusCode::OK, page(title, back, Some(op), &body))
}

fn failed(op: &Operator, e: &crate::broker::Error) -> Response<Body> {
    error_page(e.status(), Some(op), &e.message())
}

/// Serves a POST for a signed-in operator.
pub async fn post(broker: &Broker, op: &Operator, req: Request<Incoming>, path: &str, tls: bool) -> Response<Body> {
    let header_token = req.headers().get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let cookie = auth::cookie(req.headers());
    let body = match read_body(req, MAX_FORM, FORM_TIMEOUT).await {
        Ok(b) => zeroize::Zeroizing::new(b.to_vec()),
        Err(e) => return error_page(StatusCode::BAD_REQUEST, Some(op), &e.describe()),
    };
    let f = form(&body);
    if !auth::csrf_ok(op, header_token.as_deref().or(field(&f, "csrf"))) {
        return error_page(
            StatusCode::FORBIDDEN,
            Some(op),
            "the form's CSRF token is missing or wrong: reload the page and try again",
        );
    }
    let actor = Actor::Console { name: op.name.clone() };
    if path == "/logout" {
        if let Some(c) = cookie {
            broker.console.sessions.remove(&c);
        }
        broker.metrics.set("ephyr_console_sessions", &[], broker.console.sessions.len() as f64);
        broker.audit_now(Event::new(Kind::Operator, "console_logout").agent(actor.name()).allow()).await;
        let mut r = redirect("/login");
        if let Ok(v) = HeaderValue::from_str(&auth::clear_cookie(tls)) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return r;
    }
    if path == "/inspect" {
        return inspect(broker, op, field(&f, "token").unwrap_or(""));
    }
    if path == "/oauth/consent" {
        if op.role != OperatorRole::Admin {
            return error_page(StatusCode::FORBIDDEN, Some(op), "only an admin can answer an authorization request");
        }
        return crate::broker::oauth::consent::answer(broker, op, &f).await;
    }
    if path == "/approvals/decide" {
        // The rules behind the request say who answers (a viewer they name too).
        return super::queue::decide(broker, op, &f).await;
    }
    if op.role != OperatorRole::Admin {
        return error_page(
            StatusCode::FORBIDDEN,
            Some(op),
            &format!("operator {:?} is a viewer: only admins may act", op.name),
        );
    }
    match path {
        "/freeze" | "/unfreeze" => {
            let (kind, name) = (field(&f, "kind").unwrap_or(""), field(&f, "name").unwrap_or("").trim());
            let k = match FreezeKind::parse(kind) {
                Ok(k) => k,
                Err(e) => return error_page(StatusCode::BAD_REQUEST, Some(op), &e),
            };
            if path == "/freeze" {
                match ops::freeze(broker, &actor, k, name, field(&f, "reason").unwrap_or("").trim()).await {
                    Ok(fx) if fx.already => done(op, "Frozen", "/", &[format!("{kind} {name} was frozen already.")]),
                    Ok(fx) => done(
                        op,
                        "Frozen",
                        "/",
                        &[format!(
                            "{kind} {name} is frozen: {} task(s) revoked, {} certificate(s) revoked, {} SSH session(s) closed, {} MCP session(s) ended.",
                            fx.tasks_revoked, fx.certs_revoked, fx.ssh_sessions_closed, fx.mcp_sessions_ended
                        )],
                    ),
                    Err(e) => failed(op, &e),
                }
            } else {
                match ops::unfreeze(broker, &actor, k, name).await {
                    Ok(true) => done(
                        op,
                        "Unfrozen",
                        "/",
                        &[format!("{kind} {name} is no longer frozen; what was revoked stays revoked.")],
                    ),
                    Ok(false) => done(op, "Unfrozen", "/", &[format!("{kind} {name} was not frozen.")]),
                    Err(e) => failed(op, &e),
                }
            }
        }
        p if let Some((name, verb)) = p.strip_prefix("/agents/").and_then(|r| r.split_once('/')) => {
            let to = match verb {
                "suspend" => crate::broker::agents::AgentState::Suspended,
                "resume" => crate::broker::agents::AgentState::Active,
                "revoke" => crate::broker::agents::AgentState::Revoked,
                _ => return error_page(StatusCode::NOT_FOUND, Some(op), &format!("no action {verb:?} for agents")),
            };
            let reason = field(&f, "reason").unwrap_or("").trim();
            match crate::broker::agents::api::transition(broker, &actor, name, to, reason).await {
                Ok(v) => done(
                    op,
                    "Agent",
                    "/agents",
                    &[format!(
                        "agent {name}: {} → {} ({} task(s) revoked, {} certificate(s) revoked, {} MCP session(s) ended).",
                        v["from"].as_str().unwrap_or(""),
                        v["to"].as_str().unwrap_or(""),
                        v["effects"]["tasks_revoked"],
                        v["effects"]["certs_revoked"],
                        v["effects"]["mcp_sessions_ended"]
                    )],
                ),
                Err(e) => failed(op, &e),
            }
        }
        "/policy/reload" => match ops::reload(broker, &actor).await {
            Ok(r) => {
                let mut lines = vec![format!("Policy {} loaded.", r.digest)];
                lines.extend(r.warnings.iter().map(|w| format!("warning: {w}")));
                done(op, "Policy reloaded", "/policy", &lines)
            }
            Err(e) => {
                let problems: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
                // The form's answer is the policy view with the problems in place (200: the
                // request was served; the reload it asked for is what failed, and says so).
                let body = views::policy(broker, op, Some(&problems)).await;
                html_response(StatusCode::OK, page("Policy", "/policy", Some(op), &body))
            }
        },
        p if let Some(id) = p.strip_prefix("/tasks/").and_then(|r| r.strip_suffix("/revoke")) => {
            let Some(v) = ulid::Ulid::from_string(id).ok().and_then(|u| broker.tasks.view(u)) else {
                return error_page(StatusCode::NOT_FOUND, Some(op), &format!("no live task {id:?}"));
            };
            match ops::revoke_task(broker, &actor, &v).await {
                Ok(n) => done(
                    op,
                    "Task revoked",
                    "/tasks",
                    &[format!("Task {id} is revoked, and {n} descendant(s) with it.")],
                ),
                Err(e) => failed(op, &e),
            }
        }
        p if let Some(id) = p.strip_prefix("/ssh/sessions/").and_then(|r| r.strip_suffix("/close")) => {
            match broker.ssh.session(id) {
                Some(s) => {
                    ops::close_session(broker, &actor, &s).await;
                    done(op, "Session closed", "/ssh", &[format!("SSH session {id} is closed.")])
                }
                None => error_page(StatusCode::NOT_FOUND, Some(op), &format!("no open SSH session {id:?}")),
            }
        }
        p if let Some(serial) = p.strip_prefix("/ssh/certs/").and_then(|r| r.strip_suffix("/revoke")) => {
            let Ok(n) = u64::from_str_radix(serial, 16) else {
                return error_page(
                    StatusCode::BAD_REQUEST,
                    Some(op),
                    &format!("{serial:?} is not a serial (16 hex digits)"),
                );
            };
            match ops::revoke_cert(broker, &actor, n).await {
                Ok(()) => done(
                    op,
                    "Certificate revoked",
                    "/ssh",
                    &[format!("Certificate {n:016x} is on the KRL; its session, if any, is closed.")],
                ),
                Err(e) => failed(op, &e),
            }
        }
        "/remotes/login/complete" => {
            let url = field(&f, "url").unwrap_or("").trim();
            let query = url.split_once('?').map_or(url, |(_, q)| q).split('#').next().unwrap_or("");
            let policy = broker.policy();
            match broker.federation.finish_login(broker.ports(), &policy, query).await {
                Ok((remote, agent)) => {
                    let whom = agent.map_or(String::new(), |a| format!(" for agent {a}"));
                    done(op, "Signed in", "/remotes", &[format!("The broker is signed in to remote {remote}{whom}.")])
                }
                Err(e) => failed(op, &e),
            }
        }
        p if let Some(name) = p.strip_prefix("/remotes/").and_then(|r| r.strip_suffix("/login")) => {
            let policy = broker.policy();
            let agent = field(&f, "agent").filter(|a| !a.is_empty());
            match broker.federation.login(broker.ports(), &policy, name, agent, &actor.name()).await {
                Ok(b) => {
                    // The authorization URL opens in a new tab; the redirect comes back to the
                    // broker, or its address is pasted here.
                    let body = format!(
                        "<h2>Sign in to remote {}</h2><p><a href=\"{}\" target=\"_blank\" rel=\"noopener noreferrer\">Open the sign-in page of its authorization server</a> (within 10 minutes).</p>\
                         <p>The browser is then sent to <code>{}</code>. If that page does not say \"Signed in\", paste the whole address it ended on:</p>\
                         <form method=\"post\" action=\"/remotes/login/complete\">{}<input name=\"url\" size=\"80\" autocomplete=\"off\"> <button type=\"submit\">Finish</button></form>",
                        esc(name),
                        esc(&b.url),
                        esc(&b.redirect_uri),
                        super::html::csrf_field(op)
                    );
                    html_response(StatusCode::OK, page("Sign in to a remote", "/remotes", Some(op), &body))
                }
                Err(e) => failed(op, &e),
            }
        }
        p if let Some(name) = p.strip_prefix("/remotes/").and_then(|r| r.strip_suffix("/approve")) => {
            match ops::approve_tools(broker, &actor, name, field(&f, "tool")).await {
                Ok(t) => done(
                    op,
                    "Tools approved",
                    "/remotes",
                    &[format!(
                        "Approved for {name}: {}.",
                        if t.is_empty() { "nothing was quarantined".into() } else { t.join(", ") }
                    )],
                ),
                Err(e) => failed(op, &e),
            }
        }
        _ => error_page(StatusCode::NOT_FOUND, Some(op), &format!("no action {path}")),
    }
}

/// The token inspector: decoded, explained, and verified against the broker's task trees.
fn inspect(broker: &Broker, op: &Operator, token: &str) -> Response<Body> {
    let token = SecretString::new(token.trim().to_owned());
    let result = match crate::macaroon::Macaroon::decode(token.expose()) {
        Err(e) => notice("bad", &[format!("not a task token: {e}")]),
        Ok(m) => {
            let fp = {
                let d = ring::digest::digest(&ring::digest::SHA256, token.expose().as_bytes());
                let mut a = [0u8; 32];
                a.copy_from_slice(d.as_ref());
                a
            };
            let verified = broker.tasks.verify_token(token.expose(), &fp, crate::time::now()).map(drop);
            let d = crate::inspect::describe(&m, token.expose().len(), Some(verified.clone()));
            let head = match verified {
                Ok(()) => notice(
                    "ok",
                    &["This broker minted it and it is live: every task of its lineage exists and none is revoked."
                        .into()],
                ),
                Err(e) => notice("bad", &[format!("Not usable here: {e}")]),
            };
            format!("{head}<pre class=\"inspect\">{}</pre>", esc(&d.text))
        }
    };
    html_response(StatusCode::OK, page("Token inspector", "/inspect", Some(op), &views::inspect_form(op, &result)))
}

/// `GET /events/audit`: every audit line from now on, as server-sent events, in batches at most
/// every [`FEED_EVERY`] (a person reads it; a busy broker is not woken per line per feed), a
/// `skipped` event when the reader fell [`crate::broker::audit::TAP_BYTES`] behind, and a comment
/// every 20 s when idle; it ends when the broker stops.
pub fn audit_feed(broker: &std::rc::Rc<Broker>) -> Response<Body> {
    let Some(tap) = broker.audit.tap() else {
        return crate::broker::http::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_feeds",
            format!("{} live feeds are open already", crate::broker::audit::MAX_TAPS),
        );
    };
    let s = futures_lite::stream::unfold((tap, broker.clone(), true), |(tap, b, first)| async move {
        if first {
            return Some((
                Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b": connected\n\n"))),
                (tap, b, false),
            ));
        }
        if b.changes.closed() {
            return None;
        }
        let woke = futures_lite::future::or(
            async {
                tap.ready().await;
                true
            },
            futures_lite::future::or(
                async {
                    crate::broker::deadline::Deadline::after(Duration::from_secs(20)).await;
                    false
                },
                async {
                    b.changes.listen().await;
                    false
                },
            ),
        )
        .await;
        if !woke {
            return Some((Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))), (tap, b, false)));
        }
        // Let a burst gather: one chunk for everything recorded in the next moment.
        crate::broker::deadline::Deadline::after(FEED_EVERY).await;
        let (lines, skipped) = tap.take();
        let mut out = Vec::with_capacity(lines.len() + lines.len() / 8 + 64);
        for l in lines.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(l);
            out.extend_from_slice(b"\n\n");
        }
        if skipped > 0 {
            out.extend_from_slice(format!("event: skipped\ndata: {skipped}\n\n").as_bytes());
        }
        Some((Ok(Frame::data(Bytes::from(out))), (tap, b, false)))
    });
    let mut r = Response::new(Box::pin(StreamBody::new(s)) as Body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store, no-transform"));
    r.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

#[cfg(test)]
mod tests {
    use super::next_page;

    #[test]
    fn sign_in_goes_on_only_to_a_consent_page() {
        assert_eq!(
            next_page("next=%2Foauth%2Fconsent%3Frequest%3DAbc_-9").as_deref(),
            Some("/oauth/consent?request=Abc_-9")
        );
        for bad in [
            "next=https%3A%2F%2Fevil.example%2F",
            "next=%2F%2Fevil.example",
            "next=%2Foauth%2Fconsent%3Frequest%3D",
            "next=%2Foauth%2Fconsent%3Frequest%3Da%26x%3D1",
            "next=%2Fagents",
            "next=%2Foauth%2Fconsent%3Frequest%3D%0d%0aSet-Cookie",
            "",
        ] {
            assert_eq!(next_page(bad), None, "{bad}");
        }
    }
}
