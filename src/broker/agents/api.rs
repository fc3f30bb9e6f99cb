//! The agent directory's operations and routes: enrollment, joining, transitions, the reaper.
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /v1/agents` | operators (local socket) | every agent: state, owner, template, last use, grants used |
//! | `GET /v1/agents/<name>` | operators | one agent |
//! | `POST /v1/agents/enroll` | operators | `{template, owner, name?, ttl?}` → a join token, shown once |
//! | `POST /v1/agents/<name>/suspend\|resume\|revoke` | operators | `{reason?}`: a transition |
//! | `POST /v1/agents/reap` | operators | `{apply?}`: the reaper's plan (carried out with `apply`) |
//! | `POST /v1/agents/join` | anyone with a join token (MCP/API listener) | `{join_token}` → the agent's API key, once |
//!
//! What runs here: the executor thread. A transition that refuses an agent takes effect in the
//! policy snapshot before anything is cleaned up (tasks, certificates, sessions, approvals) and
//! is journaled and audited before it is acknowledged. A join spends the token durably before
//! the key is handed out: a crash in between leaves a spent token and no key (enroll again),
//! never a token that works twice.

use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AgentState, Entry, reaper};
use crate::broker::audit::{AuditSink as _, Event, Kind};
use crate::broker::http::{Body, Peer, error, json, read_body};
use crate::broker::ops::{self, Actor};
use crate::broker::policy::FreezeKind;
use crate::broker::{Broker, Error};

const MAX_BODY: usize = 16 * 1024;

fn now_secs() -> i64 {
    crate::time::now().secs()
}

fn date(secs: i64) -> String {
    crate::time::UnixMicros::from_secs(secs).to_rfc3339()
}

async fn record(broker: &Broker, ev: Event) -> Result<(), Error> {
    let t = broker.audit.record(ev).map_err(|e| Error::Unavailable(e.to_string()))?;
    t.durable().await.map_err(|e| Error::Unavailable(e.to_string()))
}

/// A successful authentication of `agent` (in state `state`): its use is noted, and an idle
/// agent becomes active again.
pub async fn used(broker: &Broker, agent: &str, state: AgentState) {
    broker.agents.touch(agent, None, now_secs());
    if state == AgentState::Idle
        && let Err(e) = transition(broker, &Actor::Broker("use"), agent, AgentState::Active, "used again").await
    {
        log::warn!("agent {agent:?}: idle → active not recorded: {}", e.message());
    }
}

/// Notes which grant an audited event exercised (the audit log's observer): `ssh:<target>` for
/// an issued certificate, `service:<name>` for a proxied request, `remote:<name>` for a
/// federated call.
pub fn exercised(broker: &Broker, e: &Event) {
    let (Some(agent), Some(action)) = (&e.agent, &e.action) else { return };
    if e.decision == Some(crate::broker::audit::Verdict::Deny) || e.code.is_some() {
        return;
    }
    let grant = match (e.kind, e.name) {
        (Kind::Cert, "cert_issued") => action["target"].as_str().map(|t| format!("ssh:{t}")),
        (Kind::Http, _) => action["service"].as_str().map(|s| format!("service:{s}")),
        (Kind::Federation, _) => action["remote"].as_str().map(|r| format!("remote:{r}")),
        _ => None,
    };
    if let Some(g) = grant
        && broker.policy().agents.contains_key(agent)
    {
        broker.agents.touch(agent, Some(&g), now_secs());
    }
}

/// Moves `name` to `to` if the lifecycle allows it: the snapshot refuses the agent at once when
/// `to` does not serve, then what it holds ends, then the change is journaled and audited.
pub async fn transition(
    broker: &Broker,
    actor: &Actor,
    name: &str,
    to: AgentState,
    reason: &str,
) -> Result<Value, Error> {
    super::check_reason(reason)?;
    let known = broker.policy().agents.contains_key(name) || broker.agents.get(name).is_some();
    if !known {
        return Err(Error::NotFound(format!("no agent {name:?} (in the policy or enrolled)")));
    }
    let from = broker.agents.state(name);
    if from == to {
        return Err(Error::Refused(format!("agent {name:?} is {} already", to.as_str())));
    }
    if !from.can_become(to) {
        return Err(Error::Refused(format!(
            "agent {name:?} is {}: it cannot become {} (docs/agents.md has the lifecycle)",
            from.as_str(),
            to.as_str()
        )));
    }
    let durable = broker.agents.transition(name, to, &actor.name(), reason, now_secs())?;
    ops::refresh_policy(broker);
    let mut effects = ops::FreezeEffects::default();
    if !to.serves() && from.serves() {
        let why = format!("agent {name} is {} by {}", to.as_str(), actor.name());
        effects = ops::end_covered(broker, actor, FreezeKind::Agent, name, None, &why).await?;
    }
    let journaled = durable.wait().await;
    let ev = Event::new(Kind::Agent, "agent_state")
        .agent(actor.name())
        .action(json!({ "agent": name, "from": from.as_str(), "to": to.as_str(), "reason": reason }))
        .allow()
        .outcome(serde_json::to_value(&effects).unwrap_or_default());
    let recorded = record(broker, ev).await;
    broker.metrics.inc("ephyr_agent_transitions_total", &[("to", to.as_str())]);
    journaled.map_err(|e| {
        Error::Unavailable(format!(
            "agent {name:?} is {} now, but the change was not journaled and will not survive a restart: {}",
            to.as_str(),
            e.message()
        ))
    })?;
    recorded.map_err(|e| {
        Error::Unavailable(format!("agent {name:?} is {}, but its audit record failed: {}", to.as_str(), e.message()))
    })?;
    Ok(json!({ "agent": name, "from": from.as_str(), "to": to.as_str(), "effects": effects }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    template: String,
    owner: String,
    name: Option<String>,
    ttl: Option<String>,
}

/// Enrolls an agent: a name (given or `<template>-<8 random>`), a join token (shown once).
pub async fn enroll(broker: &Broker, actor: &Actor, body: &[u8]) -> Result<Value, Error> {
    let r: EnrollRequest = serde_json::from_slice(body).map_err(|e| Error::Invalid(format!("request body: {e}")))?;
    let policy = broker.policy();
    if !policy.templates.contains_key(&r.template) {
        let known: Vec<&str> = policy.templates.keys().map(String::as_str).collect();
        return Err(Error::Invalid(format!(
            "no template {:?} in the policy (templates: {})",
            r.template,
            if known.is_empty() { "none; add a `templates:` section".into() } else { known.join(", ") }
        )));
    }
    if !policy.operators.contains_key(&r.owner) {
        return Err(Error::Invalid(format!(
            "the owner must be an operator of the policy (`operators:`); {:?} is not one",
            r.owner
        )));
    }
    let l = &policy.lifecycle;
    let ttl = match r.ttl.as_deref().map(crate::time::parse_duration) {
        None => l.join_ttl,
        Some(Ok(d)) if !d.is_zero() && d <= l.join_ttl_max => d,
        Some(Ok(_)) => {
            return Err(Error::Invalid(format!(
                "ttl must be longer than 0s and at most lifecycle.join_ttl_max ({})",
                crate::time::format_duration(l.join_ttl_max)
            )));
        }
        Some(Err(e)) => return Err(Error::Invalid(format!("ttl: {e}"))),
    };
    let name = match r.name {
        Some(n) => n,
        None => {
            let mut b = [0u8; 5];
            crate::secret::random_bytes(&mut b).map_err(|e| Error::Unavailable(e.to_string()))?;
            format!("{}-{}", r.template, data_encoding::BASE32_NOPAD.encode(&b).to_ascii_lowercase())
        }
    };
    if !crate::broker::policy::name_ok(&name) {
        return Err(Error::Invalid(format!("agent names are 1-64 of [A-Za-z0-9_.-]; {name:?} is not one")));
    }
    if policy.agents.contains_key(&name) {
        return Err(Error::Refused(format!("an agent named {name:?} exists already")));
    }
    let now = now_secs();
    let expires = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    let en = broker.agents.enroll(&name, &r.template, &r.owner, &actor.name(), now, expires)?;
    ops::refresh_policy(broker);
    en.durable.wait().await?;
    let ev = Event::new(Kind::Agent, "agent_enrolled")
        .agent(actor.name())
        .action(json!({ "agent": name, "template": r.template, "owner": r.owner, "join_expires": date(expires) }))
        .allow();
    record(broker, ev).await?;
    broker.metrics.inc("ephyr_agent_enrollments_total", &[]);
    Ok(json!({
        "agent": name,
        "template": r.template,
        "owner": r.owner,
        "join_token": en.token.expose(),
        "expires": date(expires),
    }))
}

/// An agent for an OAuth client an operator consented to (docs/oauth.md): enrolled from
/// `template`, owned by `owner`, active at once; its credentials are the OAuth grant's tokens
/// (no join token is ever shown, no API key made).
pub async fn enroll_consented(
    broker: &Broker,
    actor: &Actor,
    template: &str,
    owner: &str,
    client: &str,
) -> Result<String, Error> {
    let policy = broker.policy();
    if !policy.templates.contains_key(template) {
        return Err(Error::Invalid(format!("no template {template:?} in the policy")));
    }
    let base: String = client
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(24)
        .collect::<String>()
        .trim_matches('-')
        .to_owned();
    let mut b = [0u8; 5];
    crate::secret::random_bytes(&mut b).map_err(|e| Error::Unavailable(e.to_string()))?;
    let suffix = data_encoding::BASE32_NOPAD.encode(&b).to_ascii_lowercase();
    let name = if base.is_empty() { format!("oauth-{suffix}") } else { format!("oauth-{base}-{suffix}") };
    let now = now_secs();
    // The join token is never shown: it expires as it is made.
    let en = broker.agents.enroll(&name, template, owner, &actor.name(), now, now)?;
    drop(en.token);
    en.durable.wait().await?;
    let d = broker.agents.transition(
        &name,
        AgentState::Active,
        &actor.name(),
        &format!("OAuth consent for {client}"),
        now,
    )?;
    ops::refresh_policy(broker);
    d.wait().await?;
    let ev = Event::new(Kind::Agent, "agent_enrolled")
        .agent(actor.name())
        .action(json!({ "agent": name, "template": template, "owner": owner, "via": "oauth", "client": client }))
        .allow();
    record(broker, ev).await?;
    broker.metrics.inc("ephyr_agent_enrollments_total", &[]);
    Ok(name)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinRequest {
    join_token: String,
    /// A public key (JWK) to authenticate with instead of an API key (`private_key_jwt`).
    jwk: Option<Value>,
    /// What the template's `attest:` asks for: a Kubernetes service-account token.
    attestation: Option<String>,
}

/// Checks a Kubernetes service-account token against a template's `attest:`: the subject it
/// names (`system:serviceaccount:NS:NAME`).
pub fn attest(a: &crate::broker::policy::Attestation, jwt: &str) -> Result<String, String> {
    let expect = crate::broker::jose::Expect {
        issuers: std::slice::from_ref(&a.issuer),
        audiences: std::slice::from_ref(&a.audience),
        subject: None,
        max_lifetime: None,
    };
    let claims = crate::broker::jose::verify(jwt, &a.keys, &expect)?;
    let k8s = &claims["kubernetes.io"];
    let ns = k8s["namespace"].as_str().ok_or("no kubernetes.io.namespace claim")?;
    let sa = k8s["serviceaccount"]["name"].as_str().ok_or("no kubernetes.io.serviceaccount.name claim")?;
    let subject = format!("system:serviceaccount:{ns}:{sa}");
    if claims["sub"].as_str() != Some(subject.as_str()) {
        return Err(format!("sub {:?} does not match the namespace and service account claims", claims["sub"]));
    }
    if !a.namespaces.is_empty() && !a.namespaces.iter().any(|n| n == ns) {
        return Err(format!("namespace {ns:?} is not one the template accepts"));
    }
    if !a.service_accounts.is_empty() && !a.service_accounts.iter().any(|n| n == sa) {
        return Err(format!("service account {sa:?} is not one the template accepts"));
    }
    Ok(subject)
}

fn refused(
    broker: &Broker,
    source: Option<std::net::IpAddr>,
    code: &'static str,
    message: String,
) -> http::Response<Body> {
    broker.auth.failed(source, std::time::Instant::now());
    broker.metrics.inc("ephyr_agent_joins_total", &[("outcome", code)]);
    let ev = Event::new(Kind::Agent, "agent_join_failed")
        .error(code, message.clone())
        .action(json!({ "source": source.map(|s| s.to_string()) }));
    if let Err(err) = broker.audit.note(ev) {
        log::error!("audit: {err}");
    }
    error(StatusCode::UNAUTHORIZED, code, message)
}

/// `POST /v1/agents/join` on the MCP/API listener: a join token (and, when the template asks,
/// an attestation) in; the agent's API key out once, or, with `jwk`, nothing secret: the agent
/// authenticates with that key from then on (`private_key_jwt` at `/oauth/token`). Failures
/// count against the source like failed authentications.
pub async fn join(broker: &Broker, req: http::Request<hyper::body::Incoming>, peer: Peer) -> http::Response<Body> {
    let source = match peer {
        Peer::Tcp(a) => Some(a.ip()),
        Peer::Unix(_) => None,
    };
    let instant = std::time::Instant::now();
    if let Err(e) = broker.auth.check_source(source, instant) {
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, e.code(), e.message());
        if let Some(s) = e.retry_after().and_then(|s| http::HeaderValue::from_str(&s.to_string()).ok()) {
            r.headers_mut().insert(http::header::RETRY_AFTER, s);
        }
        return r;
    }
    if req.method() != http::Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "POST a JSON body {\"join_token\": \"…\"}");
    }
    let body = match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
        Ok(b) => zeroize::Zeroizing::new(b.to_vec()),
        Err(e) => return e.response(),
    };
    let (token, jwk, attestation) = match serde_json::from_slice::<JoinRequest>(&body) {
        // Moved into a zeroizing wrapper at once.
        Ok(r) => (crate::secret::SecretString::new(r.join_token), r.jwk, r.attestation),
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", format!("request body: {e}")),
    };
    let now = now_secs();
    let name = match broker.agents.check_join(token.expose(), now) {
        Ok(n) => n,
        Err(e) => return refused(broker, source, e.code(), e.message()),
    };
    let policy = broker.policy();
    let template = broker.agents.get(&name).and_then(|e| e.enrollment).map(|en| en.template).unwrap_or_default();
    // What the template asks to be proved; a failure leaves the token unspent (a real workload
    // may retry until it expires).
    let subject = match (policy.attest.get(&template), attestation.as_deref()) {
        (None, None) => None,
        (None, Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "unexpected_attestation",
                format!("template {template:?} asks for no attestation"),
            );
        }
        (Some(_), None) => {
            return refused(
                broker,
                source,
                "attestation_required",
                format!("template {template:?} asks for a Kubernetes service-account token (attestation)"),
            );
        }
        (Some(a), Some(jwt)) => match attest(a, jwt) {
            Ok(s) => Some(s),
            Err(e) => return refused(broker, source, "attestation_failed", format!("attestation refused: {e}")),
        },
    };
    let key = match &jwk {
        None => None,
        Some(_) if policy.oauth.is_none() => {
            return error(
                StatusCode::BAD_REQUEST,
                "oauth_disabled",
                "a key-bound agent gets its tokens from /oauth/token: the policy needs an `oauth:` section",
            );
        }
        Some(v) => match crate::broker::jose::key(&v.to_string()) {
            Ok(k) => Some(k),
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_jwk", format!("jwk: {e}")),
        },
    };
    let api_key = if key.is_none() {
        match crate::broker::auth::api_key::generate() {
            Ok(k) => Some(k),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
        }
    } else {
        None
    };
    let stored = api_key.as_ref().map(|(_, h)| h.as_str());
    let jwk_json = key.as_ref().map(crate::broker::jose::Key::to_json);
    let durable = match broker.agents.join(&name, stored, jwk_json.as_deref(), subject.as_deref(), now) {
        Ok(d) => d,
        Err(e) => return error(e.status(), e.code(), e.message()),
    };
    ops::refresh_policy(broker);
    if let Err(e) = durable.wait().await {
        return error(StatusCode::SERVICE_UNAVAILABLE, "state_unavailable", e.message());
    }
    let ev = Event::new(Kind::Agent, "agent_joined")
        .agent(name.clone())
        .action(json!({
            "source": source.map(|s| s.to_string()),
            "credential": if key.is_some() { "public_key" } else { "api_key" },
            "attested": subject,
        }))
        .allow();
    if let Err(e) = record(broker, ev).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", e.message());
    }
    broker.metrics.inc("ephyr_agent_joins_total", &[("outcome", "ok")]);
    let mut out = json!({ "agent": name, "template": template });
    match (&api_key, &key) {
        (Some((k, _)), _) => out["api_key"] = json!(k.expose()),
        (None, Some(k)) => {
            out["client_id"] = json!(name);
            out["token_endpoint_auth_method"] = json!("private_key_jwt");
            out["token_endpoint_auth_signing_alg"] = json!(k.algorithm());
        }
        (None, None) => {}
    }
    json(StatusCode::OK, &out)
}

/// `POST /v1/agents/attest` on the MCP/API listener: an enrolled agent, with its credential,
/// proves its template's `attest:` again (`{"attestation": JWT}`) before `every` runs out.
pub async fn reattest(broker: &Broker, req: http::Request<hyper::body::Incoming>, peer: Peer) -> http::Response<Body> {
    let source = match peer {
        Peer::Tcp(a) => Some(a.ip()),
        Peer::Unix(_) => None,
    };
    let policy = broker.policy();
    let agent = match crate::broker::auth::authenticate(broker, &policy, req.headers(), req.uri().query(), source).await
    {
        Ok(c) => c.agent,
        Err(crate::broker::auth::AuthError::AttestationExpired(a)) => a,
        Err(e) => {
            return error(StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED), e.code(), e.message());
        }
    };
    let body = match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let jwt = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => match v["attestation"].as_str() {
            Some(j) => j.to_owned(),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    "give {\"attestation\": \"<service-account token>\"}",
                );
            }
        },
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", format!("request body: {e}")),
    };
    let Some(template) = policy.agents.get(&agent).and_then(|a| a.template.clone()) else {
        return error(StatusCode::BAD_REQUEST, "not_enrolled", format!("agent {agent:?} is not an enrolled agent"));
    };
    let Some(a) = policy.attest.get(&template) else {
        return error(
            StatusCode::BAD_REQUEST,
            "unexpected_attestation",
            format!("template {template:?} asks for no attestation"),
        );
    };
    let subject = match attest(a, &jwt) {
        Ok(s) => s,
        Err(e) => return refused(broker, source, "attestation_failed", format!("attestation refused: {e}")),
    };
    let was = broker.agents.get(&agent).and_then(|e| e.enrollment).and_then(|en| en.attested).map(|a| a.1);
    if was.as_deref().is_some_and(|w| w != subject) {
        return refused(
            broker,
            source,
            "attestation_failed",
            format!("attestation refused: it names {subject}, the agent joined as {}", was.unwrap_or_default()),
        );
    }
    match broker.agents.attested(&agent, &subject, now_secs()) {
        Ok(d) => {
            if let Err(e) = d.wait().await {
                return error(StatusCode::SERVICE_UNAVAILABLE, "state_unavailable", e.message());
            }
        }
        Err(e) => return error(e.status(), e.code(), e.message()),
    }
    let ev =
        Event::new(Kind::Agent, "agent_attested").agent(agent.clone()).action(json!({ "subject": subject })).allow();
    broker.audit_now(ev).await;
    json(StatusCode::OK, &json!({ "agent": agent, "attested": subject }))
}

/// One agent as operators see it.
fn agent_json(broker: &Broker, name: &str, e: Option<&Entry>) -> Value {
    let policy = broker.policy();
    let a = policy.agents.get(name);
    let state = e.map_or(AgentState::Active, |e| e.state);
    let mut grants = Vec::new();
    if let Some(a) = a {
        grants.extend(a.ssh.entries().iter().map(|g| format!("ssh:{}", g.pattern)));
        grants.extend(a.services.entries().iter().map(|g| format!("service:{}", g.pattern)));
        grants.extend(a.remotes.entries().iter().map(|g| format!("remote:{}", g.pattern)));
    }
    let en = e.and_then(|e| e.enrollment.as_ref());
    json!({
        "name": name,
        "source": if en.is_some() { "enrolled" } else { "policy" },
        "state": state.as_str(),
        "since": e.filter(|e| e.since > 0).map(|e| date(e.since)),
        "by": e.map(|e| e.by.clone()).filter(|s| !s.is_empty()),
        "reason": e.map(|e| e.reason.clone()).filter(|s| !s.is_empty()),
        "owner": en.map(|en| en.owner.clone()),
        "template": en.map(|en| en.template.clone()),
        "enrolled": en.map(|en| date(en.at)),
        "join_expires": en.filter(|en| en.joined.is_none()).map(|en| date(en.join_expires)),
        "joined": en.and_then(|en| en.joined).map(date),
        "last_used": e.and_then(|e| e.last_used).map(date),
        "grants": grants,
        "exercised": e.map(|e| e.exercised.iter().map(|(g, t)| (g.clone(), json!(date(*t)))).collect::<serde_json::Map<_, _>>()),
        "frozen": policy.frozen.has(FreezeKind::Agent, name),
    })
}

/// Every agent: the policy's and the enrolled ones (decommissioned included).
pub fn list(broker: &Broker) -> Value {
    let policy = broker.policy();
    let entries: std::collections::BTreeMap<String, Entry> = broker.agents.list().into_iter().collect();
    let mut names: std::collections::BTreeSet<&String> = policy.agents.keys().collect();
    names.extend(entries.keys());
    let agents: Vec<Value> = names.into_iter().map(|n| agent_json(broker, n, entries.get(n))).collect();
    json!({ "agents": agents })
}

/// The reaper's plan at this moment; with `apply`, carried out (each step a transition by
/// `broker:reaper`, audited; a step that fails is reported and the rest go on).
pub async fn reap(broker: &Broker, apply: bool) -> Value {
    let policy = broker.policy();
    let plan = reaper::plan(&policy, |n| broker.agents.get(n), now_secs());
    let mut applied = Vec::new();
    if apply {
        for s in &plan.steps {
            let r = transition(broker, &Actor::Broker("reaper"), &s.agent, s.to, &s.why).await;
            applied.push(match r {
                Ok(_) => json!({ "agent": s.agent, "to": s.to.as_str(), "ok": true }),
                Err(e) => json!({ "agent": s.agent, "to": s.to.as_str(), "ok": false, "error": e.message() }),
            });
        }
        let ev = Event::new(Kind::Agent, "reaper_run")
            .agent("broker:reaper")
            .allow()
            .outcome(json!({ "steps": plan.steps.len(), "drift": plan.drift.len() }));
        if let Err(e) = record(broker, ev).await {
            log::error!("audit: {}", e.message());
        }
    }
    broker.metrics.set("ephyr_reaper_pending", &[], if apply { 0.0 } else { plan.steps.len() as f64 });
    json!({ "applied": apply, "steps": plan.steps, "drift": plan.drift, "results": applied })
}

fn respond(r: Result<Value, Error>) -> http::Response<Body> {
    match r {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => error(e.status(), e.code(), e.message()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReapBody {
    #[serde(default)]
    apply: bool,
}

fn parse<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| Error::Invalid(format!("request body: {e}")))
}

/// The local socket's `/v1/agents` routes (the caller is an operator).
pub async fn local(broker: &Broker, actor: &Actor, req: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/v1/agents").unwrap_or("").trim_start_matches('/').to_owned();
    let body = if method == http::Method::POST {
        match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
            Ok(b) => b,
            Err(e) => return e.response(),
        }
    } else {
        Default::default()
    };
    match (method, rest.as_str()) {
        (http::Method::GET, "") => json(StatusCode::OK, &list(broker)),
        (http::Method::POST, "enroll") => respond(enroll(broker, actor, &body).await),
        (http::Method::POST, "reap") => match parse::<ReapBody>(&body) {
            Ok(b) => json(StatusCode::OK, &reap(broker, b.apply).await),
            Err(e) => error(e.status(), e.code(), e.message()),
        },
        (http::Method::GET, name) if !name.contains('/') => {
            let e = broker.agents.get(name);
            if e.is_none() && !broker.policy().agents.contains_key(name) {
                return error(StatusCode::NOT_FOUND, "unknown_agent", format!("no agent {name:?}"));
            }
            json(StatusCode::OK, &agent_json(broker, name, e.as_ref()))
        }
        (http::Method::POST, path) => {
            let Some((name, verb)) = path.split_once('/') else {
                return error(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}"));
            };
            let to = match verb {
                "suspend" => AgentState::Suspended,
                "resume" => AgentState::Active,
                "revoke" => AgentState::Revoked,
                _ => return error(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}")),
            };
            match parse::<ReasonBody>(&body) {
                Ok(b) => respond(transition(broker, actor, name, to, &b.reason).await),
                Err(e) => error(e.status(), e.code(), e.message()),
            }
        }
        (_, path) => error(StatusCode::NOT_FOUND, "not_found", format!("no route for /v1/agents/{path}")),
    }
}
