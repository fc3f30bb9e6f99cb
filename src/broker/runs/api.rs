//! The local API's `/v1/runs` and `/v1/keys` routes (`ephyr run`, `ephyr keys`).
//!
//! | route | who | what |
//! |---|---|---|
//! | `POST /v1/runs` | an agent whose `uid` is the caller's | start a run: task, certificate, keys |
//! | `GET /v1/runs` | that agent (its own runs), operators (all) | runs, live and ended within a day |
//! | `POST /v1/runs/<id>/renew` | who started it, operators | renew the lease |
//! | `POST /v1/runs/<id>/end` | who started it, operators | end it: the task is revoked |
//! | `GET /v1/keys` | operators | disposable keys (never their values) |
//! | `POST /v1/keys/cleanup` | operators | revoke keys of runs that are over (`{"all": true}`: every key) |
//!
//! The `/v1/runs` routes also answer on the MCP/API listener ([`tcp`], `ephyr run --url`), for
//! an agent with its API key: its own runs only.
//!
//! What runs here: the executor thread. A start is all or nothing: a step that fails after the
//! task exists revokes it (and a key already minted is revoked by the sweeper, its run over).

use std::rc::Rc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use ulid::Ulid;

use super::Started;
use crate::broker::audit::{AuditSink as _, Event, Kind};
use crate::broker::http::{Body, Peer, error, json, read_body};
use crate::broker::ops::Actor;
use crate::broker::policy::{Policy, RunTemplate};
use crate::broker::{Broker, Error};

#[cfg(test)]
mod tests {
    use super::narrow;
    use serde_json::json;

    #[test]
    fn a_request_only_narrows_the_template() {
        let t = json!({ "targets": ["lab", "db"], "services": ["openai"], "args": { "path": { "prefix": "/srv" } } });
        let n = narrow(&t, Some(&json!({ "targets": ["lab"], "tools": ["exec"] }))).unwrap();
        assert_eq!(n["targets"], json!(["lab"]));
        assert_eq!(n["services"], json!(["openai"]), "kept from the template");
        assert_eq!(n["tools"], json!(["exec"]), "a dimension the template leaves open can be narrowed");
        for (asked, why) in [
            (json!({ "targets": ["web"] }), "outside the run template's envelope"),
            (json!({ "targets": [] }), "non-empty list"),
            (json!({ "args": { "path": { "prefix": "/" } } }), "constrains it already"),
            (json!({ "hosts": ["x"] }), "unknown field"),
            (json!(["targets"]), "give a JSON object"),
        ] {
            let e = narrow(&t, Some(&asked)).unwrap_err();
            assert!(e.contains(why), "{asked}: {e}");
        }
        assert_eq!(narrow(&t, None).unwrap(), t);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    host: String,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    envelope: Option<Value>,
    label: String,
    public_key: String,
}

fn fail(e: &Error) -> http::Response<Body> {
    error(e.status(), e.code(), e.message())
}

/// The template's envelope narrowed by the request's: each list the intersection, `args` from
/// both (an argument the template constrains cannot be constrained again here).
pub fn narrow(template: &Value, asked: Option<&Value>) -> Result<Value, String> {
    let mut out = template.as_object().cloned().unwrap_or_default();
    let Some(asked) = asked else { return Ok(Value::Object(out)) };
    let asked = asked.as_object().ok_or("envelope: give a JSON object")?;
    for (k, v) in asked {
        match k.as_str() {
            "targets" | "roles" | "services" | "remotes" | "methods" | "tools" => {
                let want: Vec<&str> = v
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .ok_or_else(|| format!("envelope.{k}: give a non-empty list of names"))?;
                let kept: Vec<Value> = match out.get(k).and_then(Value::as_array) {
                    Some(have) => {
                        let have: Vec<&str> = have.iter().filter_map(Value::as_str).collect();
                        if let Some(x) = want.iter().find(|w| !have.contains(w)) {
                            return Err(format!("envelope.{k}: {x:?} is outside the run template's envelope"));
                        }
                        want.iter().map(|w| Value::from(*w)).collect()
                    }
                    None => want.iter().map(|w| Value::from(*w)).collect(),
                };
                out.insert(k.clone(), Value::Array(kept));
            }
            "args" => {
                let mine = out.entry("args").or_insert_with(|| Value::Object(Map::new()));
                for (name, rule) in v.as_object().ok_or("envelope.args: give a mapping")? {
                    let Some(m) = mine.as_object_mut() else { break };
                    if m.contains_key(name) {
                        return Err(format!("envelope.args.{name}: the run template constrains it already"));
                    }
                    m.insert(name.clone(), rule.clone());
                }
            }
            other => return Err(format!("envelope: unknown field {other:?}")),
        }
    }
    Ok(Value::Object(out))
}

fn template<'p>(policy: &'p Policy, name: Option<&str>, agent: &str) -> Result<&'p RunTemplate, Error> {
    let name = name.unwrap_or("default");
    let t = policy.runs.get(name).ok_or_else(|| {
        Error::NotFound(if policy.runs.is_empty() {
            "the policy has no run templates: add runs.default (docs/runs.md)".to_owned()
        } else {
            format!(
                "no run template {name:?}; the policy has {}",
                policy.runs.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
            )
        })
    })?;
    if !t.agents.is_empty() && !t.agents.contains(agent) {
        return Err(Error::Refused(format!("run template {name:?} is not for agent {agent:?} (runs.{name}.agents)")));
    }
    Ok(t)
}

/// What the remote agent's SDKs need for one service: the environment variables, by provider
/// shape (the services a run's task may reach).
fn service_env(policy: &Policy, base: &str, services: &[String]) -> Vec<Value> {
    services
        .iter()
        .filter_map(|name| {
            let s = policy.services.get(name)?;
            let url = format!("{base}/v1/proxy/{name}");
            let kind = match s.errors {
                crate::broker::policy::ErrorStyle::OpenAi => "openai",
                crate::broker::policy::ErrorStyle::Anthropic => "anthropic",
                _ => "other",
            };
            Some(json!({ "service": name, "kind": kind, "base_url": url }))
        })
        .collect()
}

/// The `uid` of a run started over TCP with the agent's API key (no local user started it).
pub const REMOTE: u32 = u32::MAX;

/// Who asks about a run.
pub enum Who {
    /// A local process on the socket: its uid, and whether it is an operator.
    Local {
        /// `SO_PEERCRED` uid.
        uid: u32,
        /// Root or the broker's user.
        operator: bool,
    },
    /// An agent with its API key over TCP: its own runs, wherever they were started.
    Agent(String),
}

impl Who {
    fn owns(&self, r: &super::Run) -> bool {
        match self {
            Who::Local { uid, operator } => *operator || r.about.uid == *uid,
            Who::Agent(a) => r.about.agent == *a,
        }
    }
}

/// `POST /v1/runs`, as `agent`: `uid` is the local user's ([`REMOTE`] over TCP), `caller` the
/// authenticated API-key caller over TCP (`None` on the socket).
pub async fn start(
    broker: &Rc<Broker>,
    policy: &Rc<Policy>,
    agent: String,
    uid: u32,
    caller: Option<crate::broker::auth::Caller>,
    body: &[u8],
) -> http::Response<Body> {
    let r: StartRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", format!("request body: {e}")),
    };
    let t = match template(policy, r.template.as_deref(), &agent) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    if !policy.targets.contains_key(&r.host) {
        return fail(&Error::NotFound(format!("no target {:?} in the policy (HOST is a target's name)", r.host)));
    }
    let label: String = r.label.chars().filter(|c| !c.is_control()).take(100).collect();
    let ttl = match r.ttl.as_deref().map(crate::time::parse_duration) {
        None => t.ttl,
        Some(Ok(d)) if d <= t.ttl && d >= Duration::from_secs(60) => d,
        Some(Ok(_)) => {
            return fail(&Error::Invalid(format!(
                "ttl: a run lasts 1m to {} (runs.{}.ttl)",
                crate::time::format_duration(t.ttl),
                t.name
            )));
        }
        Some(Err(e)) => return fail(&Error::Invalid(format!("ttl: {e}"))),
    };
    let envelope = match narrow(&t.envelope, r.envelope.as_ref()) {
        Ok(e) => e,
        Err(e) => return fail(&Error::Invalid(e)),
    };
    if broker.runs.live() >= super::MAX_LIVE {
        return fail(&Error::Refused(format!("{} runs are live; end one first", super::MAX_LIVE)));
    }
    // The task, through the same tool an agent uses (its checks, audit and journal).
    let key_caller = caller.unwrap_or_else(|| {
        let mut fp = [0u8; 32];
        fp[..4].copy_from_slice(&uid.to_be_bytes());
        crate::broker::auth::Caller {
            agent: agent.clone(),
            via: crate::broker::auth::Via::ApiKey,
            fingerprint: fp,
            source: None,
        }
    });
    let mut args = Map::new();
    args.insert("description".into(), Value::from(format!("run: {label} on {}", r.host)));
    args.insert("ttl".into(), Value::from(format!("{}s", ttl.as_secs())));
    args.insert("envelope".into(), envelope);
    let call = crate::mcp::server::Call::ToolsCall { name: "task_create".into(), arguments: args };
    let v = crate::mcp::version::Version::V2026_07_28;
    let created = match crate::broker::dispatch::dispatch(broker, policy, &key_caller, v, call, None).await {
        Ok(crate::broker::dispatch::Reply::Result(result)) => crate::broker::dispatch::tool_text(&result),
        _ => return fail(&Error::Unavailable("task_create did not answer".into())),
    };
    if created.1 {
        return fail(&Error::Refused(format!("the run's task: {}", created.0)));
    }
    let made: Value = serde_json::from_str(&created.0).unwrap_or(Value::Null);
    let (Some(token), Some(task)) =
        (made["token"].as_str(), made["task_id"].as_str().and_then(|t| Ulid::from_string(t).ok()))
    else {
        return fail(&Error::Unavailable("task_create answered without a token".into()));
    };
    let token = zeroize::Zeroizing::new(token.to_owned());
    match started(broker, policy, t, &r, &label, uid, task, &token, ttl).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => {
            // All or nothing: the task goes (and any key minted, by the sweeper).
            if let Some(v) = broker.tasks.view(task) {
                let _ = crate::broker::ops::revoke_task(broker, &Actor::Broker("run_start_failed"), &v).await;
            }
            if let Some(Ok(d)) = broker.runs.end(task, "start_failed") {
                let _ = d.wait().await;
            }
            let _ = broker.keys.sweep(broker, false).await;
            fail(&e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn started(
    broker: &Rc<Broker>,
    policy: &Rc<Policy>,
    t: &RunTemplate,
    r: &StartRequest,
    label: &str,
    uid: u32,
    task: Ulid,
    token: &str,
    ttl: Duration,
) -> Result<Value, Error> {
    let now = crate::time::now();
    let identity = broker
        .tasks
        .verify_token(token, &crate::broker::auth::fingerprint(token), now)
        .map_err(|e| Error::Unavailable(format!("the run's token: {e}")))?;
    let agent = identity.agent.clone();
    let caller = crate::broker::auth::Caller {
        agent: agent.clone(),
        via: crate::broker::auth::Via::Token(Box::new(identity)),
        fingerprint: crate::broker::auth::fingerprint(token),
        source: None,
    };
    let cert = broker.ssh.certify_run(broker.ports(), &caller, policy, &r.host, &t.role, &r.public_key, ttl).await?;
    let expires = broker.tasks.ends_at(&task.to_string()).unwrap_or(now.plus(ttl));
    let about = Started {
        id: task,
        agent: agent.clone(),
        uid,
        host: r.host.clone(),
        template: t.name.clone(),
        label: label.to_owned(),
        started: now.secs(),
        expires: expires.secs(),
        lease_ms: t.lease.as_millis() as u64,
        budget_requests: t.budget.requests,
        budget_tokens: t.budget.tokens,
    };
    let serial = cert.serial;
    let (_run, durable) = broker.runs.start(about, Some(cert.held))?;
    durable.wait().await?;
    // Services the task may reach: its envelope's, or every service its agent may use.
    let services: Vec<String> = match caller.token().map(|i| i.envelope().dim(crate::macaroon::SetKey::Service)) {
        Some(crate::macaroon::Dim::Only(set)) => set.iter().cloned().collect(),
        _ => policy
            .services
            .keys()
            .filter(|s| crate::broker::tools::any_service(policy, &caller.principal(), None, s))
            .cloned()
            .collect(),
    };
    let mut keys = Map::new();
    for s in &t.keys {
        if !services.contains(s) {
            continue;
        }
        let value = broker.keys.mint(broker, policy, task, s, ttl).await?;
        keys.insert(s.clone(), Value::from(String::from_utf8_lossy(value.expose()).into_owned()));
    }
    let base = match &t.broker_url {
        Some(u) => u.clone(),
        None if broker.listen.ip().is_unspecified() => {
            return Err(Error::Refused(format!(
                "the broker listens on {}, which a host cannot dial: set runs.{}.broker_url to the address the host reaches it at",
                broker.listen, t.name
            )));
        }
        None => format!("{}://{}", broker.scheme(), broker.listen),
    };
    let ev = Event::new(Kind::Task, "run_start")
        .agent(agent.clone())
        .task(task.to_string(), vec![task.to_string()])
        .allow()
        .action(json!({ "host": r.host, "template": t.name, "label": label, "uid": uid }))
        .outcome(json!({ "serial": format!("{serial:016x}"), "lease_secs": t.lease.as_secs(), "keys": t.keys,
            "expires_at": expires.to_rfc3339() }));
    let ticket = broker.audit.record(ev).map_err(|e| Error::audit(e.to_string()))?;
    ticket.durable().await.map_err(|e| Error::audit(e.to_string()))?;
    Ok(json!({
        "run_id": task.to_string(),
        "task_id": task.to_string(),
        "token": token,
        "expires_at": expires.to_rfc3339(),
        "lease_secs": t.lease.as_secs_f64(),
        "ssh": {
            "host": cert.host, "port": cert.port, "user": cert.principal,
            "certificate": cert.certificate, "host_check": cert.host_check.to_json(),
        },
        "broker_url": base,
        "mcp_url": format!("{base}/mcp"),
        "services": service_env(policy, &base, &services),
        "keys": keys,
    }))
}

/// Run `id`, if `who` may act on it (who started it, its agent over TCP, or an operator).
fn mine(broker: &Broker, id: Ulid, who: &Who) -> Result<Rc<super::Run>, Error> {
    match broker.runs.get(id) {
        Some(r) if who.owns(&r) => Ok(r),
        _ => Err(Error::NotFound(format!("no run {id}"))),
    }
}

/// Ends run `r`: its task is revoked (cascade), the run's end is journaled and audited.
pub async fn finish(
    broker: &Broker,
    r: &super::Run,
    reason: &str,
    actor: &Actor,
    exit: Option<i64>,
) -> Result<(), Error> {
    let id = r.id();
    // Marked over first: the first reason is the one kept (the revocation's own task event
    // must not end it again as `task_ended`). A revocation that fails here is retried by the
    // maintenance job (an ended run's task that is still usable).
    let ended = broker.runs.end(id, reason);
    let revoked = revoke(broker, r, actor).await;
    if let Some(d) = ended {
        d?.wait().await?;
        let u = r.usage();
        let ev = Event::new(Kind::Task, "run_end")
            .agent(r.about.agent.clone())
            .task(id.to_string(), vec![id.to_string()])
            .allow()
            .action(json!({ "host": r.about.host, "label": r.about.label, "by": actor.name() }))
            .outcome(json!({ "reason": reason, "exit_code": exit, "duration_secs": crate::time::now().secs() - r.about.started,
                "usage": u }));
        broker.audit_now(ev).await;
    }
    revoked
}

/// Revokes an ended run's task if it is still usable.
pub async fn revoke(broker: &Broker, r: &super::Run, actor: &Actor) -> Result<(), Error> {
    let id = r.id();
    match broker.tasks.view(id) {
        Some(v) if !broker.tasks.unusable(&id.to_string()) => {
            crate::broker::ops::revoke_task(broker, actor, &v).await.map(|_| ())
        }
        _ => Ok(()),
    }
}

/// `POST /v1/runs/<id>/renew` and `/end`.
pub async fn act(broker: &Rc<Broker>, id: &str, what: &str, who: &Who, body: &[u8]) -> http::Response<Body> {
    let Ok(id) = Ulid::from_string(id) else {
        return fail(&Error::Invalid(format!("{id:?} is not a run id")));
    };
    let r = match mine(broker, id, who) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    match what {
        "renew" => match broker.runs.renew(id) {
            Ok(lease) => json(StatusCode::OK, &json!({ "run_id": id.to_string(), "lease_secs": lease.as_secs_f64() })),
            Err(e) => fail(&e),
        },
        "end" => {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let reason: String =
                v["reason"].as_str().unwrap_or("ended").chars().filter(|c| !c.is_control()).take(100).collect();
            let actor = match who {
                Who::Local { uid, operator: true } if r.about.uid != *uid => Actor::Operator { uid: *uid },
                _ => Actor::Agent { name: r.about.agent.clone(), task: Some(id.to_string()) },
            };
            match finish(broker, &r, &reason, &actor, v["exit_code"].as_i64()).await {
                Ok(()) => {
                    let _ = broker.keys.sweep(broker, false).await;
                    json(StatusCode::OK, &r.view(Instant::now()))
                }
                Err(e) => fail(&e),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "POST /v1/runs/<id>/renew or /end"),
    }
}

/// `GET /v1/runs`.
pub fn list(broker: &Broker, who: &Who) -> http::Response<Body> {
    let now = Instant::now();
    let runs: Vec<Value> = broker.runs.list().iter().filter(|r| who.owns(r)).map(|r| r.view(now)).collect();
    // Every run's id (ids are not secret): `ephyr run` sweeps only the directories of runs this
    // broker knows are over (and unknown ones older than a day), never a live run's.
    let all = broker.runs.list();
    let live: Vec<String> = all.iter().filter(|r| r.ended().is_none()).map(|r| r.id().to_string()).collect();
    let ended: Vec<String> = all.iter().filter(|r| r.ended().is_some()).map(|r| r.id().to_string()).collect();
    json(StatusCode::OK, &json!({ "runs": runs, "live_ids": live, "ended_ids": ended }))
}

/// `/v1/runs` on the MCP/API listener, for `ephyr run --url` away from the broker host: the
/// agent's API key (`Authorization: Bearer`) in place of the socket's uid. A task token is
/// refused (a run is a new task tree, which only the agent may start).
pub async fn tcp(broker: &Rc<Broker>, req: http::Request<hyper::body::Incoming>, peer: Peer) -> http::Response<Body> {
    let policy = broker.policy();
    let source = match peer {
        Peer::Tcp(a) => Some(a.ip()),
        Peer::Unix(_) => None,
    };
    let caller = match crate::broker::auth::authenticate(broker, &policy, req.headers(), None, source).await {
        Ok(c) => c,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return error(status, e.code(), e.message());
        }
    };
    if caller.token().is_some() {
        return error(
            StatusCode::FORBIDDEN,
            "api_key_required",
            "runs are started, renewed and ended with the agent's API key, not a task token",
        );
    }
    if let Err(wait) = broker.take_request(&policy, &caller.agent, Instant::now()) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("rate limit exceeded for agent {:?}; retry in {}s", caller.agent, wait.as_secs().max(1)),
        );
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let body = match read_body(req, 16 * 1024, Duration::from_secs(10)).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let who = Who::Agent(caller.agent.clone());
    match (method, path.strip_prefix("/v1/runs").unwrap_or("")) {
        (http::Method::GET, "") => list(broker, &who),
        (http::Method::POST, "") => start(broker, &policy, caller.agent.clone(), REMOTE, Some(caller), &body).await,
        (http::Method::POST, rest) => match rest.trim_start_matches('/').split_once('/') {
            Some((id, what)) => act(broker, id, what, &who, &body).await,
            None => error(StatusCode::NOT_FOUND, "not_found", "POST /v1/runs/<id>/renew or /end"),
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", "GET or POST /v1/runs"),
    }
}

/// `GET /v1/keys`.
pub fn keys(broker: &Broker) -> http::Response<Body> {
    let keys: Vec<Value> = broker
        .keys
        .list()
        .iter()
        .map(|k| {
            json!({
                "id": k.id.to_string(), "run_id": k.run.to_string(), "service": k.service, "project": k.project,
                "name": k.name, "created_at": crate::time::UnixMicros::from_secs(k.at).to_rfc3339(),
                "account": k.account, "expires_at": k.expires_at,
                "revoked_at": k.revoked.as_ref().map(|(at, _)| crate::time::UnixMicros::from_secs(*at).to_rfc3339()),
                "revoked": k.revoked.as_ref().map(|(_, how)| how.clone()),
            })
        })
        .collect();
    json(StatusCode::OK, &json!({ "keys": keys }))
}

/// `POST /v1/keys/cleanup`.
pub async fn cleanup(broker: &Broker, body: &[u8]) -> http::Response<Body> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let all = v["all"].as_bool().unwrap_or(false);
    let (revoked, failures) = broker.keys.sweep(broker, all).await;
    let status = if failures.is_empty() { StatusCode::OK } else { StatusCode::BAD_GATEWAY };
    json(status, &json!({ "revoked": revoked, "failures": failures, "outstanding": broker.keys.outstanding().len() }))
}
