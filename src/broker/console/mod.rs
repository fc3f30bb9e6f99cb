//! The operator console on the dashboard listener: server-rendered HTML views of the broker's
//! live state, with a little JavaScript (the live audit feed, sparklines, reachability), and the
//! operator's actions (revoke, close, freeze, approve, reload), each carried out by `ops` and
//! audited with the operator's name.
//!
//! What runs here: the executor thread (views read in-memory state; audit reads, policy reads
//! and password checks go to the blocking pool). Sign-in and sessions are in [`auth`]; pages in
//! [`views`]; state changes in [`actions`]; the approval queue in [`queue`]; the audit tail they
//! read in [`activity`]; the sampler behind the sparklines in [`graphs`].
//!
//! Every console response carries a strict Content-Security-Policy (no inline script or style,
//! nothing from elsewhere), frame denial, `nosniff`, same-origin referrers, `no-store`; there are no
//! CORS headers. Every state change is a POST that needs the session cookie, the session's CSRF
//! token, and a same-origin `Origin` (or `Sec-Fetch-Site`), and an admin for anything but
//! signing out. Credentials never appear in a URL. Assets are compiled in (`include_str!`).

use std::rc::Rc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::Broker;
use super::http::{Body, Peer, body};

pub(crate) mod actions;
pub(crate) mod activity;
pub(crate) mod auth;
pub(crate) mod graphs;
pub(crate) mod html;
pub(crate) mod queue;
pub(crate) mod recordings;
pub(crate) mod views;

/// The console's stylesheet.
const CSS: &str = include_str!("assets/console.css");
/// The console's script.
const JS: &str = include_str!("assets/console.js");
/// The console's icon.
const ICON: &str = include_str!("assets/icon.svg");

/// The console's Content-Security-Policy.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Console state: sessions, the login limiter, the metric samples.
#[derive(Default)]
pub struct Console {
    /// Signed-in operators.
    pub sessions: auth::Sessions,
    /// Failed sign-ins.
    pub limiter: auth::Limiter,
    /// Samples for the sparklines.
    pub graphs: graphs::Samples,
}

/// Adds the console's security headers.
pub fn harden(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // `same-origin`, not `no-referrer`: with the latter, browsers send `Origin: null` on form
    // posts, and the same-origin check could not tell our forms from anyone's.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    h.insert("permissions-policy", HeaderValue::from_static("camera=(), microphone=(), geolocation=()"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// An HTML response.
pub fn html_response(status: StatusCode, page: String) -> Response<Body> {
    let mut r = Response::new(body(page));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

/// A `303 See Other` to `to` (a path of ours).
pub fn redirect(to: &str) -> Response<Body> {
    let mut r = Response::new(body(""));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn asset(content_type: &'static str, text: &'static str) -> Response<Body> {
    let mut r = Response::new(body(text));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// An error page (or, signed out, a bare one).
pub fn error_page(status: StatusCode, op: Option<&auth::Operator>, message: &str) -> Response<Body> {
    let body = format!("{}<p><a href=\"/\">Back to the overview</a></p>", html::notice("bad", &[message.to_owned()]));
    html_response(status, html::page(status.canonical_reason().unwrap_or("Error"), "", op, &body))
}

/// The signed-in operator behind a request's session cookie, if any.
pub fn signed_in(broker: &Broker, headers: &http::HeaderMap) -> Option<auth::Operator> {
    let cookie = auth::cookie(headers)?;
    broker.console.sessions.get(&broker.policy(), &cookie, Instant::now())
}

/// Whether a path is the console's (the dashboard listener's other routes stay as they are).
pub fn is_console_path(path: &str) -> bool {
    matches!(path, "/" | "/login" | "/logout")
        || html::VIEWS.iter().any(|(p, _)| *p == path)
        || [
            "/assets/",
            "/tasks/",
            "/ssh/",
            "/remotes/",
            "/audit/",
            "/events/",
            "/api/",
            "/freeze",
            "/unfreeze",
            "/agents/",
            "/oauth/",
            "/policy/",
            "/approvals/",
            "/recordings/",
        ]
        .iter()
        .any(|p| path.starts_with(p))
}

/// A same-origin check for a state change: the browser's `Origin` must be this console's own
/// (scheme and `Host`), or, without one, `Sec-Fetch-Site` must say `same-origin`. A client that
/// sends neither (not a browser) still needs the cookie and the CSRF token.
fn same_origin(headers: &http::HeaderMap, tls: bool) -> Result<(), String> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let ours = format!("{}://{host}", if tls { "https" } else { "http" });
    if let Some(o) = headers.get(header::ORIGIN) {
        let o = o.to_str().unwrap_or("");
        if !o.eq_ignore_ascii_case(&ours) {
            return Err(format!("cross-origin request refused (Origin {o:?} is not {ours:?})"));
        }
        return Ok(());
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        None | Some("same-origin") => Ok(()),
        Some(other) => Err(format!("cross-site request refused (Sec-Fetch-Site: {other})")),
    }
}

/// Serves a console request on the dashboard listener.
pub async fn handle(broker: Rc<Broker>, req: Request<Incoming>, peer: Peer, tls: bool) -> Response<Body> {
    harden(route(broker, req, peer, tls).await)
}

async fn route(broker: Rc<Broker>, req: Request<Incoming>, peer: Peer, tls: bool) -> Response<Body> {
    let policy = broker.policy();
    // DNS rebinding: the Host check. Origins are checked per state change (`same_origin`): the
    // console's own origin on a LAN name is not one the MCP endpoint's allow-list would know.
    if let Err(e) = super::http::mcp::check_host(broker.dashboard_listen, &policy, req.headers()) {
        return error_page(StatusCode::FORBIDDEN, None, &e);
    }
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/assets/console.css") => return asset("text/css; charset=utf-8", CSS),
        (&Method::GET, "/assets/console.js") => return asset("text/javascript; charset=utf-8", JS),
        (&Method::GET, "/assets/icon.svg") => return asset("image/svg+xml", ICON),
        (&Method::GET, "/login") => {
            let next = actions::next_page(req.uri().query().unwrap_or(""));
            return views::login_then(&broker, None, StatusCode::OK, next.as_deref());
        }
        _ => {}
    }
    if method == Method::POST
        && let Err(e) = same_origin(req.headers(), tls)
    {
        return error_page(StatusCode::FORBIDDEN, None, &e);
    }
    if (&method, path.as_str()) == (&Method::POST, "/login") {
        return actions::login(&broker, req, peer, tls).await;
    }
    let now = Instant::now();
    let op = auth::cookie(req.headers()).and_then(|c| broker.console.sessions.get(&policy, &c, now));
    let Some(op) = op else {
        return match method {
            // The consent page comes back after sign-in (a client's authorization request).
            Method::GET if path == "/oauth/consent" => {
                let back = format!("/oauth/consent?{}", req.uri().query().unwrap_or(""));
                redirect(&format!("/login?next={}", crate::broker::upstream::plan::percent_encode(back.as_bytes())))
            }
            Method::GET if !path.starts_with("/events/") && !path.starts_with("/api/") => redirect("/login"),
            _ => error_page(StatusCode::UNAUTHORIZED, None, "sign in first: this session has ended or never began"),
        };
    };
    match method {
        Method::GET | Method::HEAD if path == "/approvals" => queue::page(&broker, &op).await,
        Method::GET | Method::HEAD if path == "/oauth/consent" => {
            crate::broker::oauth::consent::show(&broker, &op, req.uri().query().unwrap_or(""))
        }
        Method::GET | Method::HEAD if path == "/recordings" => recordings::list(&broker, &op).await,
        Method::GET | Method::HEAD if path.starts_with("/recordings/") => {
            recordings::show(&broker, &op, &path["/recordings/".len()..]).await
        }
        Method::GET | Method::HEAD => views::get(&broker, &op, &path, req.uri().query().unwrap_or("")).await,
        Method::POST => actions::post(&broker, &op, req, &path, tls).await,
        _ => error_page(StatusCode::METHOD_NOT_ALLOWED, Some(&op), "use GET or POST"),
    }
}
