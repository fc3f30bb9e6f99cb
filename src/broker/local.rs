//! The local API on the Unix socket (`<data-dir>/ephyr.sock` or `--socket`).
//!
//! What runs here: HTTP/1.1 over the Unix socket; the caller's identity is the kernel's
//! `SO_PEERCRED` (no passwords on this path). Operators are uid 0 and the broker's own uid.
//! Routes:
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /v1/status` | operator | broker and signer state (pids, sandbox, limits, CA key) |
//! | `POST /v1/certs` | operator | break-glass operator certificate for a public key |
//! | `POST /v1/policy/reload` | operator | re-read the policy; keep the current one if the new one is invalid |
//! | `POST /v1/certs/<serial>/revoke` | operator | put a certificate on the KRL (`/v1/ssh/krl`) |
//! | `GET /v1/secrets` | operator | stored secret names (never values) and the policy's `store:` references |
//! | `PUT /v1/secrets/<name>` | operator | seal the body (the value) and store it (`ephyr secret set`) |
//! | `DELETE /v1/secrets/<name>` | operator | remove a stored secret |
//! | `GET /v1/freezes` | operator | what is frozen, by whom, when, why |
//! | `POST /v1/freeze` | operator | `{kind, name, reason}`: the kill switch (`ephyr freeze`) |
//! | `POST /v1/unfreeze` | operator | `{kind, name}`: lift a freeze (`ephyr unfreeze`) |
//! | `GET /v1/approvals` | operator | approval requests: open ones and a day of closed ones |
//! | `POST /v1/approvals/decide` | operator | `{id, approve, reason, waiver}`: answer one (`ephyr approve`, `ephyr deny`) |
//! | `POST /v1/tools/call` | an agent whose `uid` is the caller's | call an MCP tool as that agent (`ephyr exec`) |
//! | `/v1/runs`, `/v1/keys` | see `runs::api` | `ephyr run` and its disposable keys |
//! | `/v1/agents…` | operators (see `agents::api`) | the agent directory: list, enroll, suspend, resume, revoke, reap |
//!
//! A uid mapped to an agent acts with that agent's whole policy, like its API key.

use std::rc::Rc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde::Deserialize;

use super::Broker;
use super::audit::{AuditSink, Event, Kind};
use super::http::{Body, Handler, Peer, error, json, read_body};
use super::signer_client::CallError;
use crate::signer::protocol::{CertRequest, ErrorCode, Request, Response, SignerLimits};
use crate::time::{now, parse_duration};

const MAX_BODY: usize = 16 * 1024;

fn is_operator(broker: &Broker, peer: Peer) -> bool {
    match peer {
        Peer::Unix(c) => c.uid == 0 || c.uid == broker.identity.uid,
        Peer::Tcp(_) => false,
    }
}

fn limits_json(l: &SignerLimits) -> serde_json::Value {
    serde_json::json!({
        "max_cert_ttl_secs": l.max_cert_ttl_secs,
        "principals": l.principals,
        "rate_limit": l.rate_limit,
        "rate_window_secs": l.rate_window_secs,
    })
}

/// Full status for operators.
pub fn status_json(broker: &Broker) -> serde_json::Value {
    let h = broker.signer.health();
    let sandbox = h.status.as_ref().map(|s| {
        let b = &s.sandbox;
        serde_json::json!({
            "enforced": b.enforced,
            "insecure_override": b.insecure_override,
            "uid": b.uid,
            "gid": b.gid,
            "no_new_privs": b.no_new_privs,
            "dumpable": b.dumpable,
            "caps_cleared": b.caps_cleared,
            "landlock_abi": b.landlock_abi,
            "landlock": format!("{:?}", b.landlock),
            "seccomp": format!("{:?}", b.seccomp),
            "problems": b.problems,
        })
    });
    let (seq, head) = broker.audit.durable_head();
    let eras = broker.federation.eras();
    let pids = broker.federation.pids();
    let remotes: serde_json::Map<String, serde_json::Value> = broker
        .federation
        .status()
        .into_iter()
        .map(|(name, (health, tools, quarantined, error))| {
            let era = eras.get(&name).copied().unwrap_or("-");
            let pid = pids.get(&name).copied();
            let login = logins_json(broker, &name);
            (
                name,
                serde_json::json!({ "health": health, "tools": tools, "quarantined": quarantined, "error": error, "protocol": era, "pid": pid, "login": login }),
            )
        })
        .collect();
    serde_json::json!({
        "tls": broker.tls.as_ref().map(|t| t.describe()),
        "frozen": freezes_json(broker)["frozen"],
        "approvals_pending": broker.approvals.pending(),
        "remotes": remotes,
        "audit": {
            "seq": seq,
            "head": data_encoding::HEXLOWER.encode(&head),
            "failure": broker.audit.failure(),
            "checkpoint_public_key": h.status.as_ref().map(|s| data_encoding::BASE64.encode(&s.checkpoint_public_key)),
        },
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uid": broker.identity.uid,
        "gid": broker.identity.gid,
        "uptime_secs": broker.started.elapsed().as_secs(),
        "policy_digest": broker.policy().digest,
        "data_dir": broker.data_dir.root,
        "listen": broker.listen.to_string(),
        "dashboard_listen": broker.dashboard_listen.to_string(),
        "signer": {
            "available": h.available,
            "keeper_pid": h.keeper_pid,
            "worker_pid": h.worker_pid,
            "restarts": h.restarts,
            "problem": h.problem,
            "ca_public_key": h.status.as_ref().map(|s| s.ca_public_key.clone()),
            "limits": h.status.as_ref().map(|s| limits_json(&s.limits)),
            "sandbox": sandbox,
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorCertRequest {
    public_key: String,
    principals: Vec<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    key_id: Option<String>,
    #[serde(default)]
    force_command: Option<String>,
    #[serde(default)]
    source_address: Option<String>,
    #[serde(default)]
    extensions: Option<Vec<String>>,
}

/// Maps a signer call error to an HTTP answer.
pub fn signer_error_response(e: &CallError) -> http::Response<Body> {
    match e {
        CallError::Refused(r) => {
            let status = match r.code {
                ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::FORBIDDEN,
            };
            error(status, r.code.as_str(), r.message.clone())
        }
        CallError::Unavailable(_) | CallError::WorkerDied | CallError::Timeout => {
            error(StatusCode::SERVICE_UNAVAILABLE, "signer_unavailable", e.to_string())
        }
        CallError::Protocol(_) => error(StatusCode::BAD_GATEWAY, "signer_protocol", e.to_string()),
    }
}

async fn operator_cert(broker: &Broker, peer: Peer, req: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
    let body = match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let r: OperatorCertRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, "invalid_json", format!("request body: {e}"));
        }
    };
    let ttl = match r.ttl.as_deref().map(parse_duration).transpose() {
        Ok(t) => t.unwrap_or(Duration::from_secs(300)),
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_ttl", format!("ttl: {e}")),
    };
    let cap = broker.policy().limits.cert_ttl_max;
    if ttl > cap {
        return error(
            StatusCode::FORBIDDEN,
            "ttl_too_long",
            format!("ttl {}s exceeds the policy cap of {}s", ttl.as_secs(), cap.as_secs()),
        );
    }
    let t = now().secs().max(0) as u64;
    let uid = match peer {
        Peer::Unix(c) => c.uid,
        Peer::Tcp(_) => u32::MAX,
    };
    let key_id = r.key_id.unwrap_or_else(|| format!("ephyr:operator:uid{uid}:{t}"));
    let principals = r.principals.clone();
    let request = Request::SignUserCert(CertRequest {
        public_key: r.public_key,
        principals: r.principals,
        key_id: key_id.clone(),
        valid_after: t.saturating_sub(30),
        valid_before: t + ttl.as_secs(),
        force_command: r.force_command,
        source_address: r.source_address,
        extensions: r.extensions.unwrap_or_else(|| vec!["permit-pty".into()]),
    });
    let action = serde_json::json!({ "operator_cert": { "principals": principals, "ttl_secs": ttl.as_secs() } });
    match broker.signer.call(request).await {
        Ok(Response::Certificate { serial, certificate }) => {
            // The certificate leaves the broker only once its issuance is on disk.
            let ev = Event::new(Kind::Cert, "cert_issued")
                .agent(format!("operator:uid{uid}"))
                .action(action)
                .allow()
                .outcome(serde_json::json!({ "serial": format!("{serial:016x}"), "key_id": key_id, "valid_after": t.saturating_sub(30), "valid_before": t + ttl.as_secs() }));
            let durable = match broker.audit.record(ev) {
                Ok(ticket) => ticket.durable().await,
                Err(e) => Err(e),
            };
            if let Err(e) = durable {
                return error(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", e.to_string());
            }
            broker.metrics.inc("ephyr_certificates_issued_total", &[("requester", "operator")]);
            // Registered so an operator can put it on the KRL; the broker never holds its key.
            let issued = super::ssh::registry::Issued {
                serial,
                key_id: key_id.clone(),
                agent: format!("operator:uid{uid}"),
                task: None,
                lineage: Vec::new(),
                target: String::new(),
                role: String::new(),
                principal: principals.join(","),
                valid_after: t.saturating_sub(30),
                valid_before: t + ttl.as_secs(),
                session: None,
            };
            match broker.ssh.registry.add(issued) {
                Ok(Some(d)) => {
                    if let Err(e) = d.wait().await {
                        return error(StatusCode::SERVICE_UNAVAILABLE, "state_unavailable", e.message());
                    }
                }
                Ok(None) => {}
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "state_unavailable", e.message()),
            }
            log::info!("operator certificate issued to uid {uid}: serial {serial:016x} key_id {key_id}");
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "serial": format!("{serial:016x}"),
                    "key_id": key_id,
                    "valid_after": t.saturating_sub(30),
                    "valid_before": t + ttl.as_secs(),
                    "certificate": certificate,
                }),
            )
        }
        Ok(other) => error(StatusCode::BAD_GATEWAY, "signer_protocol", format!("unexpected answer {other:?}")),
        Err(e) => {
            let (code, reason) = match &e {
                CallError::Refused(r) => (r.code.as_str().to_owned(), r.message.clone()),
                other => ("signer_unavailable".to_owned(), other.to_string()),
            };
            broker
                .audit_now(
                    Event::new(Kind::Cert, "cert_refused")
                        .agent(format!("operator:uid{uid}"))
                        .action(action)
                        .deny(code, reason),
                )
                .await;
            signer_error_response(&e)
        }
    }
}

/// The serial in `/v1/certs/<serial>/revoke` (`None` for any other path, `/v1/certs/revoke`
/// included: the prefix and suffix must not overlap).
fn cert_revoke_serial(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/certs/")?.strip_suffix("/revoke")
}

async fn revoke_cert(broker: &Broker, peer: Peer, serial: &str) -> http::Response<Body> {
    use crate::broker::{Error, ops};
    let Ok(n) = u64::from_str_radix(serial, 16) else {
        return error(StatusCode::BAD_REQUEST, "invalid_serial", format!("{serial:?} is not a hexadecimal serial"));
    };
    match ops::revoke_cert(broker, &operator(peer), n).await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({ "serial": format!("{n:016x}"), "revoked": true })),
        // `unknown_certificate` is the documented code of `ephyr cert revoke` (docs/cli.md).
        Err(e @ Error::NotFound(_)) => error(StatusCode::NOT_FOUND, "unknown_certificate", e.message()),
        Err(e) => crate::broker::http::error_response(&e),
    }
}

/// The operations-layer actor for a local peer.
fn operator(peer: Peer) -> crate::broker::ops::Actor {
    crate::broker::ops::Actor::Operator {
        uid: match peer {
            Peer::Unix(c) => c.uid,
            Peer::Tcp(_) => u32::MAX,
        },
    }
}

fn operator_name(peer: Peer) -> String {
    match peer {
        Peer::Unix(c) => format!("operator:uid{}", c.uid),
        Peer::Tcp(_) => "operator".into(),
    }
}

/// After a secret changed: TLS settings built with the old value go, and the change is audited
/// (the name, never the value).
async fn secret_changed(broker: &Broker, peer: Peer, event: &'static str, name: &str) {
    broker.proxy.clear();
    let ev =
        Event::new(Kind::Policy, event).agent(operator_name(peer)).action(serde_json::json!({ "name": name })).allow();
    broker.audit_now(ev).await;
}

/// `GET /v1/secrets`: names and times only.
fn list_secrets(broker: &Broker) -> http::Response<Body> {
    let stored = broker.secrets.list();
    let policy = broker.policy();
    let referenced = policy.store_refs();
    let names: Vec<serde_json::Value> = stored
        .iter()
        .map(|(n, t)| serde_json::json!({ "name": n, "updated": t, "used_by": referenced.get(n).cloned().unwrap_or_default() }))
        .collect();
    let missing: Vec<&String> = referenced.keys().filter(|n| !stored.iter().any(|(s, _)| s == *n)).collect();
    json(StatusCode::OK, &serde_json::json!({ "secrets": names, "missing": missing }))
}

/// `PUT /v1/secrets/<name>`: the body is the value.
async fn set_secret(
    broker: &Broker,
    peer: Peer,
    name: &str,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    let body = match read_body(req, super::secrets::MAX_SECRET + 2, Duration::from_secs(10)).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let value = crate::secret::SecretBytes::new(super::secrets::trim_newline(body.to_vec()));
    match broker.secrets.set(&broker.pool, &broker.signer, name, value).await {
        Ok(()) => {
            secret_changed(broker, peer, "secret_set", name).await;
            json(StatusCode::OK, &serde_json::json!({ "name": name, "stored": true }))
        }
        Err(e @ super::Error::Invalid(_)) => error(StatusCode::BAD_REQUEST, "invalid_secret", e.message()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "secret_not_stored", e.message()),
    }
}

/// `DELETE /v1/secrets/<name>`.
async fn remove_secret(broker: &Broker, peer: Peer, name: &str) -> http::Response<Body> {
    match broker.secrets.remove(&broker.pool, name).await {
        Ok(true) => {
            secret_changed(broker, peer, "secret_removed", name).await;
            json(StatusCode::OK, &serde_json::json!({ "name": name, "removed": true }))
        }
        Ok(false) => error(StatusCode::NOT_FOUND, "unknown_secret", format!("no stored secret {name:?}")),
        Err(e @ super::Error::Invalid(_)) => error(StatusCode::BAD_REQUEST, "invalid_secret", e.message()),
        Err(e) => error(e.status(), e.code(), e.message()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolCall {
    name: String,
    #[serde(default)]
    arguments: serde_json::Map<String, serde_json::Value>,
}

/// `POST /v1/tools/call` for a uid mapped to an agent.
async fn agent_tool_call(
    broker: &Rc<Broker>,
    policy: &Rc<crate::broker::policy::Policy>,
    agent: String,
    uid: u32,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    let body = match read_body(req, 256 * 1024, Duration::from_secs(10)).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let call: ToolCall = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", format!("request body: {e}")),
    };
    let mut fp = [0u8; 32];
    fp[..4].copy_from_slice(&uid.to_be_bytes());
    let caller = super::auth::Caller { agent, via: super::auth::Via::ApiKey, fingerprint: fp, source: None };
    // The same dispatcher as the MCP endpoint (newest protocol revision); the answer is reshaped
    // for the CLI.
    let name = call.name.clone();
    let request = crate::mcp::server::Call::ToolsCall { name: call.name, arguments: call.arguments };
    let v = crate::mcp::version::Version::V2026_07_28;
    match super::dispatch::dispatch(broker, policy, &caller, v, request, None).await {
        Ok(super::dispatch::Reply::Result(result)) => {
            let (text, is_error) = super::dispatch::tool_text(&result);
            json(StatusCode::OK, &serde_json::json!({ "agent": caller.agent, "is_error": is_error, "text": text }))
        }
        _ => error(StatusCode::NOT_FOUND, "unknown_tool", format!("no tool {name:?}")),
    }
}

/// `/v1/runs` (`runs::api`): starting one needs an agent for the caller's uid; the rest, who
/// started the run or an operator.
async fn runs_route(
    broker: &Rc<Broker>,
    peer: Peer,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    let policy = broker.policy();
    let Peer::Unix(c) = peer else { return error(StatusCode::FORBIDDEN, "forbidden", "local socket only") };
    let operator = is_operator(broker, peer);
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let body = match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    use crate::broker::runs::api;
    let who = api::Who::Local { uid: c.uid, operator };
    match (method, path.strip_prefix("/v1/runs").unwrap_or("")) {
        (Method::GET, "") => api::list(broker, &who),
        (Method::POST, "") => match agent_for(&policy, peer) {
            Some((agent, uid)) => api::start(broker, &policy, agent, uid, None, &body).await,
            None => error(
                StatusCode::FORBIDDEN,
                "no_agent_for_uid",
                "a run acts as the agent whose uid is yours; no enabled agent in the policy has it (set `uid:` on the agent)",
            ),
        },
        (Method::POST, rest) => match rest.trim_start_matches('/').split_once('/') {
            Some((id, what)) => api::act(broker, id, what, &who, &body).await,
            None => error(StatusCode::NOT_FOUND, "not_found", "POST /v1/runs/<id>/renew or /end"),
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", "GET or POST /v1/runs"),
    }
}

/// The enabled agent whose `uid` is the caller's.
fn agent_for(policy: &crate::broker::policy::Policy, peer: Peer) -> Option<(String, u32)> {
    let Peer::Unix(c) = peer else { return None };
    policy
        .agents
        .values()
        .find(|a| a.uid == Some(c.uid) && a.enabled && a.state.serves())
        .map(|a| (a.name.clone(), c.uid))
}

/// Who the caller is to this broker: its uid, whether it is an operator, the agent its uid maps
/// to (and what that agent may reach).
fn whoami(broker: &Broker, peer: Peer) -> serde_json::Value {
    let policy = broker.policy();
    let uid = match peer {
        Peer::Unix(c) => Some(c.uid),
        Peer::Tcp(_) => None,
    };
    let agent = agent_for(&policy, peer).and_then(|(name, _)| policy.agents.get(&name).cloned());
    serde_json::json!({
        "uid": uid,
        "operator": is_operator(broker, peer),
        "agent": agent.as_ref().map(|a| a.name.clone()),
        "ssh": agent.as_ref().map(|a| {
            policy.targets.keys().filter_map(|t| {
                let roles: Vec<&String> = policy.targets[t].allowed_roles.iter()
                    .filter(|r| crate::broker::ssh::policy_allows(&policy, &a.name, t, r)).collect();
                (!roles.is_empty()).then(|| serde_json::json!({ "target": t, "roles": roles }))
            }).collect::<Vec<_>>()
        }),
        "broker": { "version": env!("CARGO_PKG_VERSION"), "listen": broker.listen.to_string(), "socket": broker.socket },
    })
}

/// Every target with its roles (and principals), how its host key is checked, and which agents
/// may use it.
pub fn targets_json(broker: &Broker) -> serde_json::Value {
    let policy = broker.policy();
    let targets: Vec<serde_json::Value> = policy
        .targets
        .iter()
        .map(|(name, t)| {
            let pin = &t.host_key;
            let host_key = if let Some(f) = &pin.fingerprint {
                format!("pinned fingerprint {f}")
            } else if pin.key.is_some() {
                "pinned key".to_owned()
            } else if pin.ca.is_some() {
                "host CA".to_owned()
            } else {
                match broker.ssh.known.get(name, &format!("{}:{}", t.host, t.port)) {
                    Some(f) => format!("trusted on first use: {f} (pin it)"),
                    None => "not pinned, not seen yet (pin it: ephyr target scan)".to_owned(),
                }
            };
            let roles: Vec<serde_json::Value> = t
                .allowed_roles
                .iter()
                .map(|r| {
                    let principal = policy.roles.get(r).map(|x| x.principal.clone());
                    let agents: Vec<&String> = policy
                        .agents
                        .keys()
                        .filter(|a| crate::broker::ssh::policy_allows(&policy, a, name, r))
                        .collect();
                    serde_json::json!({ "role": r, "principal": principal, "agents": agents })
                })
                .collect();
            serde_json::json!({
                "name": name, "host": t.host, "port": t.port, "host_key": host_key,
                "pinned": pin.is_set(), "enabled": t.enabled, "roles": roles,
            })
        })
        .collect();
    serde_json::json!({ "targets": targets })
}

/// `POST /v1/targets/<name>/verify`: every role of the target tried with a fresh certificate;
/// one audit record with the outcome.
async fn verify_target(broker: &Broker, peer: Peer, name: &str) -> http::Response<Body> {
    let policy = broker.policy();
    let actor = operator(peer);
    match broker.ssh.verify_target(broker.ports(), &policy, &actor.name(), name).await {
        Ok(roles) => {
            let ok = roles.iter().all(|r| r.ok);
            let report: Vec<serde_json::Value> = roles.iter().map(|r| r.to_json()).collect();
            broker
                .audit_now(
                    crate::broker::audit::Event::new(crate::broker::audit::Kind::Ssh, "target_verify")
                        .agent(actor.name())
                        .action(serde_json::json!({ "target": name }))
                        .outcome(serde_json::json!({ "ok": ok, "roles": report })),
                )
                .await;
            json(StatusCode::OK, &serde_json::json!({ "target": name, "ok": ok, "roles": report }))
        }
        Err(e) => error(e.status(), e.code(), e.message()),
    }
}

/// `GET /v1/remotes/<name>/review`: each quarantined tool with a diff against its pin and flags.
fn review_remote(broker: &Broker, name: &str) -> http::Response<Body> {
    if !broker.policy().remotes.contains_key(name) {
        return error(StatusCode::NOT_FOUND, "not_found", format!("no remote {name:?} in the policy"));
    }
    use crate::broker::federation::pins;
    let list: Vec<serde_json::Value> = broker
        .federation
        .review(name)
        .iter()
        .map(|(tool, old, new)| {
            serde_json::json!({
                "tool": tool, "diff": pins::diff(old, new), "flags": pins::flags(new),
                "pinned": pins::Pins::hash(old).0, "new": pins::Pins::hash(new).0,
            })
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "remote": name, "quarantined": list }))
}

/// `POST /v1/remotes/<name>/approve[?tool=T]`: pins the new definitions and serves them.
async fn approve_remote(broker: &Broker, peer: Peer, name: &str, tool: Option<&str>) -> http::Response<Body> {
    match crate::broker::ops::approve_tools(broker, &operator(peer), name, tool).await {
        Ok(done) => json(StatusCode::OK, &serde_json::json!({ "remote": name, "approved": done })),
        Err(e) => error(e.status(), e.code(), e.message()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    /// The agent, for a remote with a sign-in per agent.
    #[serde(default)]
    agent: Option<String>,
    /// `login/complete`: the address the browser ended on (or its query).
    #[serde(default)]
    url: Option<String>,
}

fn login_request(body: &[u8]) -> Result<LoginRequest, Box<http::Response<Body>>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(LoginRequest::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, "invalid_json", format!("request body: {e}"))))
}

/// `POST /v1/remotes/<name>/login` (`{"agent": A}` optional): starts an operator's sign-in to a
/// remote protected by OAuth; the authorization URL to open.
async fn login_remote(broker: &Broker, peer: Peer, name: &str, body: &[u8]) -> http::Response<Body> {
    let r = match login_request(body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let policy = broker.policy();
    let by = operator(peer).name();
    match broker.federation.login(broker.ports(), &policy, name, r.agent.as_deref(), &by).await {
        Ok(b) => json(
            StatusCode::OK,
            &serde_json::json!({ "remote": name, "agent": r.agent, "url": b.url, "redirect_uri": b.redirect_uri,
                "expires_in": crate::broker::federation::auth::PENDING_TTL.as_secs() }),
        ),
        Err(e) => error(e.status(), e.code(), e.message()),
    }
}

/// `POST /v1/remotes/login/complete` (`{"url": ...}`): finishes a sign-in with the address the
/// browser was sent back to (pasted by the operator).
async fn complete_login(broker: &Broker, body: &[u8]) -> http::Response<Body> {
    let r = match login_request(body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let Some(url) = r.url.filter(|u| !u.is_empty() && u.len() <= 8192) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "give url: the address the browser ended on");
    };
    let query = url.split_once('?').map_or(url.as_str(), |(_, q)| q);
    let query = query.split('#').next().unwrap_or("");
    let policy = broker.policy();
    match broker.federation.finish_login(broker.ports(), &policy, query).await {
        Ok((remote, agent)) => {
            json(StatusCode::OK, &serde_json::json!({ "remote": remote, "agent": agent, "ok": true }))
        }
        Err(e) => error(e.status(), e.code(), e.message()),
    }
}

/// `POST /v1/remotes/<name>/logout` (`{"agent": A}` optional): forgets a sign-in.
async fn logout_remote(broker: &Broker, peer: Peer, name: &str, body: &[u8]) -> http::Response<Body> {
    let r = match login_request(body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if !broker.policy().remotes.contains_key(name) {
        return error(StatusCode::NOT_FOUND, "not_found", format!("no remote {name:?} in the policy"));
    }
    match broker.federation.logout(name, r.agent.as_deref()).await {
        Ok(had) => {
            let actor = operator(peer);
            broker
                .audit_now(
                    crate::broker::audit::Event::new(crate::broker::audit::Kind::Federation, "remote_logout")
                        .agent(actor.name())
                        .action(serde_json::json!({ "remote": name, "for": r.agent, "had": had }))
                        .allow(),
                )
                .await;
            json(StatusCode::OK, &serde_json::json!({ "remote": name, "agent": r.agent, "removed": had }))
        }
        Err(e) => error(e.status(), e.code(), e.message()),
    }
}

/// The sign-ins of a remote, for status (`null` when it does not sign in with OAuth).
pub fn logins_json(broker: &Broker, name: &str) -> serde_json::Value {
    use crate::broker::federation::auth::LoginState;
    if broker.policy().remotes.get(name).is_none_or(|r| r.oauth.is_none()) {
        return serde_json::Value::Null;
    }
    let m: serde_json::Map<String, serde_json::Value> = broker
        .federation
        .auth
        .status(name)
        .into_iter()
        .map(|(who, st)| {
            let v = match st {
                LoginState::SignedIn { expires_at, by, at } => serde_json::json!({
                    "state": "signed_in", "by": by, "at": crate::time::format_rfc3339(at as i64, None),
                    "expires_at": expires_at.map(|e| crate::time::format_rfc3339(e as i64, None)),
                }),
                LoginState::Needed(why) => serde_json::json!({ "state": "login_needed", "why": why }),
            };
            (who, v)
        })
        .collect();
    serde_json::Value::Object(m)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FreezeRequest {
    kind: String,
    name: String,
    #[serde(default)]
    reason: String,
}

/// What is frozen, for every operator view.
pub fn freezes_json(broker: &Broker) -> serde_json::Value {
    let list: Vec<serde_json::Value> = broker
        .freezes
        .list()
        .into_iter()
        .map(|(kind, name, e)| {
            serde_json::json!({
                "kind": kind.as_str(), "name": name, "by": e.by, "reason": e.reason,
                "at": crate::time::format_rfc3339(e.at, None),
            })
        })
        .collect();
    serde_json::json!({ "frozen": list })
}

/// `POST /v1/freeze` and `/v1/unfreeze`, for any operator actor (the console uses it too).
pub async fn freeze_request(
    broker: &Broker,
    actor: &crate::broker::ops::Actor,
    body: &[u8],
    on: bool,
) -> http::Response<Body> {
    use crate::broker::policy::FreezeKind;
    let r: FreezeRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", format!("request body: {e}")),
    };
    let kind = match FreezeKind::parse(&r.kind) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_kind", e),
    };
    let done = if on {
        crate::broker::ops::freeze(broker, actor, kind, &r.name, &r.reason)
            .await
            .map(|fx| serde_json::json!({ "kind": kind.as_str(), "name": r.name, "frozen": true, "effects": fx }))
    } else {
        crate::broker::ops::unfreeze(broker, actor, kind, &r.name)
            .await
            .map(|was| serde_json::json!({ "kind": kind.as_str(), "name": r.name, "frozen": false, "was_frozen": was }))
    };
    match done {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => error(e.status(), e.code(), e.message()),
    }
}

/// Approval requests as operators see them (the CLI and the console).
pub fn approvals_json(broker: &Broker) -> serde_json::Value {
    let list: Vec<serde_json::Value> = broker.approvals.list().iter().map(approval_json).collect();
    serde_json::json!({ "approvals": list, "pending": broker.approvals.pending(), "version": broker.approvals.version() })
}

/// One approval request, times as RFC 3339.
pub fn approval_json(r: &crate::broker::approvals::Request) -> serde_json::Value {
    let t = |s: i64| crate::time::format_rfc3339(s, None);
    let votes: Vec<serde_json::Value> = r
        .votes
        .iter()
        .map(|v| serde_json::json!({ "by": v.by, "approve": v.approve, "reason": v.reason, "waiver_secs": v.waiver, "at": t(v.at) }))
        .collect();
    serde_json::json!({
        "id": r.id, "state": r.state.as_str(), "agent": r.agent, "task": r.task, "lineage": r.lineage,
        "rules": r.rules, "needed": r.needed, "action": r.action, "summary": crate::broker::approvals::notify::summary(r),
        "asked_at": t(r.at), "expires": t(r.expires), "votes": votes,
        "waiver_until": r.waiver_until.map(t), "closed_at": r.closed_at.map(t),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideRequest {
    id: String,
    approve: bool,
    #[serde(default)]
    reason: String,
    waiver: Option<String>,
}

/// `POST /v1/approvals/decide`, for any operator actor (the console uses it too).
pub async fn decide_request(broker: &Broker, actor: &crate::broker::ops::Actor, body: &[u8]) -> http::Response<Body> {
    let r: DecideRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", format!("request body: {e}")),
    };
    let waiver = match r.waiver.as_deref().filter(|w| !w.is_empty()).map(parse_duration) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, "invalid_waiver", format!("waiver: {e}")),
    };
    match crate::broker::ops::decide_approval(broker, actor, &r.id, r.approve, &r.reason, waiver).await {
        Ok((decided, req)) => {
            let word = match decided {
                crate::broker::approvals::Decided::Approved => "approved",
                crate::broker::approvals::Decided::Partly => "partly",
                crate::broker::approvals::Decided::Denied => "denied",
            };
            json(StatusCode::OK, &serde_json::json!({ "decided": word, "approval": approval_json(&req) }))
        }
        Err(e) => error(e.status(), e.code(), e.message()),
    }
}

/// Every live certificate the broker issued.
fn certs_json(broker: &Broker) -> serde_json::Value {
    let now = crate::time::now().secs().max(0) as u64;
    let certs: Vec<serde_json::Value> =
        broker.ssh.registry.list(now, |_| true).iter().map(crate::broker::tools::ssh::cert_json).collect();
    serde_json::json!({ "certificates": certs })
}

/// Every live task, as the task tools show them (the CLI draws the tree).
fn tasks_json(broker: &Broker) -> serde_json::Value {
    let now = crate::time::now();
    let tasks: Vec<serde_json::Value> = broker
        .tasks
        .visible(&crate::broker::tasks::Scope::All)
        .iter()
        .map(|v| crate::broker::tools::tasks::view_json(v, now))
        .collect();
    serde_json::json!({ "tasks": tasks })
}

/// Handler for the local socket.
pub fn local_handler(broker: Rc<Broker>) -> Handler {
    Rc::new(move |req, peer| {
        let broker = broker.clone();
        Box::pin(async move {
            if req.method() == Method::POST && req.uri().path() == "/v1/tools/call" {
                // One policy snapshot for the whole request: who the caller is and what it may do.
                let policy = broker.policy();
                return match agent_for(&policy, peer) {
                    Some((agent, uid)) => agent_tool_call(&broker, &policy, agent, uid, req).await,
                    None => error(
                        StatusCode::FORBIDDEN,
                        "no_agent_for_uid",
                        "no enabled agent in the policy has this uid (set `uid:` on the agent)",
                    ),
                };
            }
            if req.method() == Method::GET && req.uri().path() == "/v1/whoami" {
                return json(StatusCode::OK, &whoami(&broker, peer));
            }
            if req.uri().path() == "/v1/runs" || req.uri().path().starts_with("/v1/runs/") {
                return runs_route(&broker, peer, req).await;
            }
            if !is_operator(&broker, peer) {
                return error(
                    StatusCode::FORBIDDEN,
                    "not_an_operator",
                    "only root and the broker's user may use this API",
                );
            }
            match (req.method().clone(), req.uri().path()) {
                (_, p) if p == "/v1/agents" || p.starts_with("/v1/agents/") => {
                    crate::broker::agents::api::local(&broker, &operator(peer), req).await
                }
                (Method::GET, "/v1/status") => json(StatusCode::OK, &status_json(&broker)),
                (Method::GET, "/v1/targets") => json(StatusCode::OK, &targets_json(&broker)),
                (Method::GET, "/v1/certs") => json(StatusCode::OK, &certs_json(&broker)),
                (Method::GET, "/v1/tasks") => json(StatusCode::OK, &tasks_json(&broker)),
                (Method::POST, "/v1/certs") => operator_cert(&broker, peer, req).await,
                (Method::GET, "/v1/freezes") => json(StatusCode::OK, &freezes_json(&broker)),
                (Method::GET, "/v1/keys") => crate::broker::runs::api::keys(&broker),
                (Method::POST, "/v1/keys/cleanup") => match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
                    Ok(b) => crate::broker::runs::api::cleanup(&broker, &b).await,
                    Err(e) => e.response(),
                },
                (Method::POST, p @ ("/v1/freeze" | "/v1/unfreeze")) => {
                    let on = p == "/v1/freeze";
                    match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
                        Ok(b) => freeze_request(&broker, &operator(peer), &b, on).await,
                        Err(e) => e.response(),
                    }
                }
                (Method::GET, "/v1/approvals") => json(StatusCode::OK, &approvals_json(&broker)),
                (Method::POST, "/v1/approvals/decide") => match read_body(req, MAX_BODY, Duration::from_secs(10)).await
                {
                    Ok(b) => decide_request(&broker, &operator(peer), &b).await,
                    Err(e) => e.response(),
                },
                (Method::GET, "/v1/secrets") => list_secrets(&broker),
                (Method::PUT, path) if let Some(name) = path.strip_prefix("/v1/secrets/") => {
                    let name = name.to_owned();
                    set_secret(&broker, peer, &name, req).await
                }
                (Method::DELETE, path) if let Some(name) = path.strip_prefix("/v1/secrets/") => {
                    remove_secret(&broker, peer, name).await
                }
                (Method::POST, path)
                    if let Some(name) = path.strip_prefix("/v1/targets/").and_then(|p| p.strip_suffix("/verify")) =>
                {
                    let name = name.to_owned();
                    verify_target(&broker, peer, &name).await
                }
                (Method::GET, path)
                    if let Some(name) = path.strip_prefix("/v1/remotes/").and_then(|p| p.strip_suffix("/review")) =>
                {
                    review_remote(&broker, name)
                }
                (Method::POST, "/v1/remotes/login/complete") => {
                    match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
                        Ok(b) => complete_login(&broker, &b).await,
                        Err(e) => e.response(),
                    }
                }
                (Method::POST, path)
                    if let Some(name) = path.strip_prefix("/v1/remotes/").and_then(|p| p.strip_suffix("/login")) =>
                {
                    let name = name.to_owned();
                    match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
                        Ok(b) => login_remote(&broker, peer, &name, &b).await,
                        Err(e) => e.response(),
                    }
                }
                (Method::POST, path)
                    if let Some(name) = path.strip_prefix("/v1/remotes/").and_then(|p| p.strip_suffix("/logout")) =>
                {
                    let name = name.to_owned();
                    match read_body(req, MAX_BODY, Duration::from_secs(10)).await {
                        Ok(b) => logout_remote(&broker, peer, &name, &b).await,
                        Err(e) => e.response(),
                    }
                }
                (Method::POST, path)
                    if let Some(rest) = path.strip_prefix("/v1/remotes/").and_then(|p| p.strip_suffix("/approve")) =>
                {
                    let rest = rest.to_owned();
                    let tool = req.uri().query().and_then(|q| q.strip_prefix("tool=")).map(str::to_owned);
                    approve_remote(&broker, peer, &rest, tool.as_deref()).await
                }
                (Method::POST, path) if let Some(serial) = cert_revoke_serial(path) => {
                    revoke_cert(&broker, peer, serial).await
                }
                (Method::POST, "/v1/policy/reload") => match crate::broker::ops::reload(&broker, &operator(peer)).await
                {
                    Ok(r) => json(
                        StatusCode::OK,
                        &serde_json::json!({ "ok": true, "digest": r.digest, "warnings": r.warnings }),
                    ),
                    Err(e) => json(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &serde_json::json!({
                            "ok": false,
                            "error": "invalid_policy",
                            "message": "the new policy is invalid; the previous policy stays in force",
                            "problems": e.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                        }),
                    ),
                },
                (_, path) => error(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}")),
            }
        })
    })
}
