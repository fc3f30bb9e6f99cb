//! Who is calling: API keys and task tokens from request headers, to a [`Caller`].
//!
//! What runs here: header parsing, key lookups and SHA-256 on the executor thread; Argon2id (only
//! for keys stored as Argon2id hashes: foreign-format keys and hashes from earlier versions) on
//! the blocking pool, one run at a time. Credentials are accepted only in headers:
//! `Authorization: Bearer <key or mac_…>` or `X-API-Key: <key>` (Go Ephyr clients); a credential
//! in the query string is refused.
//!
//! Costs are bounded:
//! - a key in ephyr's format stored in the fast form costs one SHA-256 and a constant-time
//!   compare, right or wrong (see [`api_key`]); nothing is queued for it;
//! - Argon2 work per request is bounded (one hash for an ephyr-format key, at most
//!   [`api_key::MAX_FOREIGN_CANDIDATES`] for a foreign one), runs one at a time, and waits in one
//!   of two lanes of [`MAX_PENDING_HASHES`]: strangers' keys, and keys that verified before, so
//!   strangers' wrong keys cannot lock out an agent whose key worked;
//! - a key verified by Argon2 is cached for `ttl` under SHA-256 of the key (the key itself is not
//!   kept), valid only for the policy it was verified against; concurrent first uses of one key
//!   share a single run, and a run whose request goes away is undone by a guard (waiters start
//!   over);
//! - failures are rate-limited per [`Source`] (10, then one per 6 s; IPv6 by /64): a source over
//!   its limit gets 429 for any key that does not verify at once (a wrong key, or one that would
//!   need Argon2; a valid fast-form or cached key keeps working), and its further failures are
//!   counted in metrics but not audited, so neither the CPU nor the audit log can be flooded.

pub mod api_key;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use http::HeaderMap;

use super::policy::{Policy, Principal, Rate};
use super::rate::{RateLimiter, Source};
use super::tasks::TokenIdentity;

/// Failed attempts allowed per source address before it is slowed down.
pub const FAILURE_RATE: Rate = Rate { count: 10, window: Duration::from_secs(60) };
/// Most Argon2 verifications queued or running at once, per lane (strangers, known keys).
const MAX_PENDING_HASHES: usize = 8;
/// Largest credential accepted (a task token is at most 8 KiB encoded).
const MAX_CREDENTIAL: usize = 12 * 1024;

/// How the caller authenticated.
#[derive(Clone, Debug)]
pub enum Via {
    /// An agent API key.
    ApiKey,
    /// A task token.
    Token(Box<TokenIdentity>),
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The agent.
    pub agent: String,
    /// How.
    pub via: Via,
    /// SHA-256 of the credential (binds sessions to it; never logged).
    pub fingerprint: [u8; 32],
    /// Source address (TCP).
    pub source: Option<IpAddr>,
}

impl Caller {
    /// The task token, if authenticated with one.
    pub fn token(&self) -> Option<&TokenIdentity> {
        match &self.via {
            Via::Token(t) => Some(t),
            Via::ApiKey => None,
        }
    }

    /// As `authorize` sees it.
    pub fn principal(&self) -> Principal<'_> {
        match self.token() {
            Some(t) => Principal { agent: &self.agent, token: Some(t.envelope()), delegators: &t.delegators },
            None => Principal { agent: &self.agent, token: None, delegators: &[] },
        }
    }

    /// `api_key` or `task_token` (metrics, audit).
    pub fn method(&self) -> &'static str {
        match self.via {
            Via::ApiKey => "api_key",
            Via::Token(_) => "task_token",
        }
    }
}

/// Whether an enrolled agent whose template asks for attestation every so often is past it.
fn attestation_due(broker: &super::Broker, policy: &Policy, a: &super::policy::Agent) -> bool {
    let Some(every) = a.template.as_ref().and_then(|t| policy.attest.get(t)).and_then(|x| x.every) else {
        return false;
    };
    let every = i64::try_from(every.as_secs()).unwrap_or(i64::MAX);
    broker.agents.attested_at(&a.name).is_none_or(|at| crate::time::now().secs().saturating_sub(at) > every)
}

/// Why a request is not authenticated. Each maps to an HTTP status and an RFC 6750 error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No credential at all.
    Missing,
    /// A credential header is malformed, repeated or contradicted.
    Malformed(String),
    /// A credential in the query string (never accepted: URLs end up in logs).
    InQuery,
    /// No agent holds this API key.
    InvalidKey,
    /// The task token failed verification.
    InvalidToken(String),
    /// The agent is disabled in the policy.
    AgentDisabled(String),
    /// The agent is suspended, revoked or decommissioned (the directory's reason).
    AgentInactive(String, crate::broker::agents::AgentState, String),
    /// The agent's template asks for attestation again (`attest.every`), and it has not.
    AttestationExpired(String),
    /// Too many failures from this source; retry after the duration.
    RateLimited(Duration),
    /// Too many key verifications in flight; retry shortly.
    Busy,
}

impl AuthError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing
            | AuthError::InvalidKey
            | AuthError::InvalidToken(_)
            | AuthError::AttestationExpired(_) => 401,
            AuthError::Malformed(_) | AuthError::InQuery => 400,
            AuthError::AgentDisabled(_) | AuthError::AgentInactive(..) => 403,
            AuthError::RateLimited(_) => 429,
            AuthError::Busy => 503,
        }
    }

    /// Stable code (audit, metrics).
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_credential",
            AuthError::Malformed(_) => "malformed_credential",
            AuthError::InQuery => "credential_in_query",
            AuthError::InvalidKey => "invalid_api_key",
            AuthError::InvalidToken(_) => "invalid_token",
            AuthError::AgentDisabled(_) => "agent_disabled",
            AuthError::AttestationExpired(_) => "attestation_expired",
            AuthError::AgentInactive(_, s, _) => match s {
                crate::broker::agents::AgentState::Suspended => "agent_suspended",
                crate::broker::agents::AgentState::Revoked => "agent_revoked",
                _ => "agent_decommissioned",
            },
            AuthError::RateLimited(_) => "rate_limited",
            AuthError::Busy => "busy",
        }
    }

    /// The RFC 6750 `error` parameter, if any (none when no credential was sent).
    pub fn bearer_error(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing | AuthError::RateLimited(_) | AuthError::Busy => None,
            AuthError::Malformed(_) | AuthError::InQuery => Some("invalid_request"),
            AuthError::InvalidKey | AuthError::InvalidToken(_) => Some("invalid_token"),
            AuthError::AgentDisabled(_) => Some("insufficient_scope"),
            AuthError::AgentInactive(..) | AuthError::AttestationExpired(_) => Some("invalid_token"),
        }
    }

    /// Human text (never contains the credential).
    pub fn message(&self) -> String {
        match self {
            AuthError::Missing => {
                "authentication required: send Authorization: Bearer <API key or task token> (or X-API-Key)".into()
            }
            AuthError::Malformed(m) => m.clone(),
            AuthError::InQuery => "credentials are accepted only in headers, never in the URL".into(),
            AuthError::InvalidKey => "invalid API key".into(),
            AuthError::InvalidToken(r) => format!("invalid task token: {r}"),
            AuthError::AgentDisabled(a) => format!("agent {a:?} is disabled"),
            AuthError::AttestationExpired(a) => {
                format!("agent {a:?} must attest again: POST /v1/agents/attest with a fresh service-account token")
            }
            AuthError::AgentInactive(a, s, why) => {
                let why = if why.is_empty() { String::new() } else { format!(": {why}") };
                format!("agent {a:?} is {}{why}", s.as_str())
            }
            AuthError::RateLimited(d) => format!("too many failed attempts; retry in {}s", d.as_secs().max(1)),
            AuthError::Busy => "too many authentications in progress; retry in 1s".into(),
        }
    }

    /// Seconds for `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            AuthError::RateLimited(d) => Some(d.as_secs().max(1)),
            AuthError::Busy => Some(1),
            _ => None,
        }
    }
}

/// The credential found in the headers (never printed: its `Debug` says only which kind).
pub enum Credential<'a> {
    /// An API key.
    ApiKey(&'a str),
    /// A task token (`mac_…`).
    Token(&'a str),
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::ApiKey(_) => "ApiKey([redacted])",
            Credential::Token(_) => "Token([redacted])",
        })
    }
}

/// The one value of a header that must not repeat: `Ok(None)` if absent, `Err` (naming the
/// header) if repeated or not ASCII. Every single-valued header the broker reads goes through here.
pub fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, String> {
    let mut it = headers.get_all(name).iter();
    let Some(v) = it.next() else { return Ok(None) };
    if it.next().is_some() {
        return Err(format!("the {name} header appears more than once"));
    }
    v.to_str().map(Some).map_err(|_| format!("the {name} header is not ASCII"))
}

fn one_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, AuthError> {
    single_header(headers, name).map_err(AuthError::Malformed)
}

const QUERY_CREDENTIALS: [&str; 5] = ["access_token", "api_key", "apikey", "token", "key"];

/// Extracts the credential from the headers (and refuses one in the query).
pub fn credential<'a>(headers: &'a HeaderMap, query: Option<&str>) -> Result<Credential<'a>, AuthError> {
    if let Some(q) = query
        && q.split('&')
            .any(|kv| QUERY_CREDENTIALS.contains(&kv.split('=').next().unwrap_or("").to_ascii_lowercase().as_str()))
    {
        return Err(AuthError::InQuery);
    }
    let bearer = match one_header(headers, "authorization")? {
        None => None,
        Some(v) => {
            let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
            let dpop = scheme.eq_ignore_ascii_case("dpop");
            if !scheme.eq_ignore_ascii_case("bearer") && !dpop {
                return Err(AuthError::Malformed(format!(
                    "Authorization scheme {scheme:?} is not supported; use Bearer (or DPoP with a task token)"
                )));
            }
            let t = rest.trim_matches(' ');
            if t.is_empty() {
                return Err(AuthError::Malformed(format!("Authorization: {scheme} has no credential")));
            }
            if dpop && !t.starts_with("mac_") {
                return Err(AuthError::Malformed("the DPoP scheme is for task tokens only".into()));
            }
            Some(t)
        }
    };
    let x_key = one_header(headers, "x-api-key")?.map(str::trim);
    let cred = match (bearer, x_key) {
        (Some(a), Some(b)) if a != b => {
            return Err(AuthError::Malformed("Authorization and X-API-Key carry different credentials".into()));
        }
        (Some(a), _) => a,
        (None, Some(b)) if !b.is_empty() => b,
        _ => return Err(AuthError::Missing),
    };
    if cred.len() > MAX_CREDENTIAL || !cred.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::Malformed("the credential is too long or has invalid characters".into()));
    }
    Ok(if cred.starts_with("mac_") { Credential::Token(cred) } else { Credential::ApiKey(cred) })
}

/// SHA-256 of a credential.
pub fn fingerprint(cred: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, cred.as_bytes());
    d.as_ref().try_into().unwrap_or([0; 32])
}

struct Cached {
    agent: String,
    policy: String,
    expires: Instant,
}

/// How a shared Argon2 run ended.
#[derive(Clone)]
enum FlightEnd {
    /// It ran: the agent, or none.
    Done(Option<String>),
    /// The request that started it went away first: whoever waited starts over.
    Abandoned,
}

#[derive(Default)]
struct Inflight {
    done: event_listener::Event,
    end: RefCell<Option<FlightEnd>>,
}

/// The authenticator (one per broker, executor thread only).
pub struct Authenticator {
    cache: RefCell<super::rate::Bounded<[u8; 32], Cached>>,
    inflight: RefCell<HashMap<[u8; 32], Rc<Inflight>>>,
    /// Argon2 runs queued or running for keys never verified before, and for keys that were.
    waiting: [std::cell::Cell<usize>; 2],
    /// One Argon2 run at a time (19 MiB each with the default cost on a 512 MB box).
    argon2_busy: std::cell::Cell<bool>,
    argon2_free: event_listener::Event,
    /// Fingerprints of keys that verified before (bounded, oldest forgotten first): their
    /// Argon2 runs have a lane of their own that strangers' wrong keys cannot fill.
    known: RefCell<super::rate::Bounded<[u8; 32], ()>>,
    failures: RateLimiter<Source>,
    index: RefCell<Option<(String, u64, Rc<api_key::KeyIndex>)>>,
}

/// Most cached keys.
const MAX_CACHED: usize = 4096;
/// Lanes of [`Authenticator::waiting`].
const STRANGER: usize = 0;
const KNOWN: usize = 1;

/// Undoes an Argon2 run's bookkeeping however the request ends, including by being dropped
/// (DESIGN.md invariant 13): the lane count, the one-at-a-time lock if taken, the in-flight
/// entry (waiters are woken and start over when no answer was stored).
struct FlightGuard<'a> {
    auth: &'a Authenticator,
    fp: [u8; 32],
    flight: Rc<Inflight>,
    lane: usize,
    holds_argon2: bool,
}

impl FlightGuard<'_> {
    async fn lock_argon2(&mut self) {
        loop {
            if !self.auth.argon2_busy.get() {
                self.auth.argon2_busy.set(true);
                self.holds_argon2 = true;
                return;
            }
            let l = self.auth.argon2_free.listen();
            if !self.auth.argon2_busy.get() {
                continue;
            }
            l.await;
        }
    }

    fn finish(self, found: Option<String>) {
        *self.flight.end.borrow_mut() = Some(FlightEnd::Done(found));
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let lane = &self.auth.waiting[self.lane];
        lane.set(lane.get().saturating_sub(1));
        if self.holds_argon2 {
            self.auth.argon2_busy.set(false);
            self.auth.argon2_free.notify(1);
        }
        {
            let mut inflight = self.auth.inflight.borrow_mut();
            if inflight.get(&self.fp).is_some_and(|f| Rc::ptr_eq(f, &self.flight)) {
                inflight.remove(&self.fp);
            }
        }
        self.flight.end.borrow_mut().get_or_insert(FlightEnd::Abandoned);
        self.flight.done.notify(usize::MAX);
    }
}

impl Default for Authenticator {
    fn default() -> Self {
        Self::new()
    }
}

impl Authenticator {
    /// An authenticator with an empty cache.
    pub fn new() -> Self {
        Authenticator {
            cache: RefCell::new(super::rate::Bounded::new(MAX_CACHED)),
            inflight: RefCell::default(),
            waiting: Default::default(),
            argon2_busy: std::cell::Cell::new(false),
            argon2_free: event_listener::Event::new(),
            known: RefCell::new(super::rate::Bounded::new(MAX_CACHED)),
            failures: RateLimiter::new(10_000),
            index: RefCell::default(),
        }
    }

    /// Refuses early if `source` has failed too often.
    pub fn check_source(&self, source: Option<IpAddr>, now: Instant) -> Result<(), AuthError> {
        match source {
            Some(ip) => self.failures.check(&Source::of(ip), FAILURE_RATE, now).map_err(AuthError::RateLimited),
            None => Ok(()),
        }
    }

    /// Counts a failure against `source`.
    pub fn failed(&self, source: Option<IpAddr>, now: Instant) {
        if let Some(ip) = source {
            let _ = self.failures.take(&Source::of(ip), FAILURE_RATE, now);
        }
    }

    /// The key index for `policy` (built once per policy digest and agent directory generation).
    pub fn key_index(&self, policy: &Policy) -> Rc<api_key::KeyIndex> {
        let mut ix = self.index.borrow_mut();
        match &*ix {
            Some((digest, generation, index)) if *digest == policy.digest && *generation == policy.directory => {
                index.clone()
            }
            _ => {
                let index = Rc::new(api_key::KeyIndex::build(policy));
                *ix = Some((policy.digest.clone(), policy.directory, index.clone()));
                index
            }
        }
    }

    /// The agent a cached key belongs to, if the cache holds it for this policy.
    pub fn cached_agent(&self, policy: &Policy, fp: &[u8; 32], now: Instant) -> Option<String> {
        let cache = self.cache.borrow();
        let c = cache.get(fp)?;
        (c.policy == policy.digest && c.expires > now).then(|| c.agent.clone())
    }

    /// The agent holding `key` under `policy`. A key in the fast stored form is verified here,
    /// at once. A key that needs Argon2 comes from the cache, or is verified on the pool (one
    /// run at a time; concurrent first uses of one key share the run; a source over its failure
    /// budget is refused first) and then cached for `policy.mcp.auth_cache_ttl`.
    pub async fn api_key_agent(
        &self,
        pool: &super::blocking::BlockingPool,
        policy: &Policy,
        key: &str,
        fp: [u8; 32],
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<String, AuthError> {
        let candidates = match self.key_index(policy).lookup(key, &fp) {
            api_key::Lookup::Agent(a) => return Ok(a),
            api_key::Lookup::NoAgent => {
                // Costs nothing to tell, but a source that keeps failing is told to slow down.
                self.check_source(source, now)?;
                return Err(AuthError::InvalidKey);
            }
            api_key::Lookup::Argon2(c) => c,
        };
        loop {
            if let Some(a) = self.cached_agent(policy, &fp, now) {
                return Ok(a);
            }
            // Another request is verifying this key right now: wait for its answer.
            let existing = self.inflight.borrow().get(&fp).cloned();
            if let Some(f) = existing {
                let end = loop {
                    let listener = f.done.listen();
                    if let Some(end) = f.end.borrow().clone() {
                        break end;
                    }
                    listener.await;
                };
                match end {
                    FlightEnd::Done(r) => return r.ok_or(AuthError::InvalidKey),
                    FlightEnd::Abandoned => continue,
                }
            }
            // Only an uncached key costs Argon2: refuse it early for a source that keeps failing.
            self.check_source(source, now)?;
            let lane = if self.known.borrow().contains(&fp) { KNOWN } else { STRANGER };
            if self.waiting[lane].get() >= MAX_PENDING_HASHES {
                return Err(AuthError::Busy);
            }
            self.waiting[lane].set(self.waiting[lane].get() + 1);
            let flight = Rc::new(Inflight::default());
            self.inflight.borrow_mut().insert(fp, flight.clone());
            let mut guard = FlightGuard { auth: self, fp, flight, lane, holds_argon2: false };
            guard.lock_argon2().await;
            let secret = crate::secret::SecretString::new(key.to_owned());
            let found = pool
                .run(move || {
                    candidates.into_iter().find(|(_, phc)| api_key::argon2_verify(secret.expose(), phc)).map(|c| c.0)
                })
                .await
                .flatten();
            guard.finish(found.clone());
            let agent = found.ok_or(AuthError::InvalidKey)?;
            let first_use = lane == STRANGER;
            self.known.borrow_mut().insert(fp, ());
            if first_use && let Some(line) = api_key::fast_hash(key) {
                log::warn!(
                    "agent {agent:?}: its api_key_hash is Argon2id, which costs ~25 ms and 19 MiB per check; replace it with api_key_hash: \"{line}\" (not a secret; see docs/policy.md)"
                );
            }
            let ttl = policy.mcp.auth_cache_ttl;
            if !ttl.is_zero() {
                // Bounded: a full cache forgets its oldest entry, never everyone's.
                let entry = Cached { agent: agent.clone(), policy: policy.digest.clone(), expires: now + ttl };
                self.cache.borrow_mut().insert(fp, entry);
            }
            return Ok(agent);
        }
    }

    /// Cached keys (tests, metrics).
    pub fn cached(&self) -> usize {
        self.cache.borrow().len()
    }

    /// Argon2 runs queued or running (tests, metrics).
    pub fn pending(&self) -> usize {
        self.waiting.iter().map(std::cell::Cell::get).sum()
    }
}

/// Authenticates a request against `policy`: the credential from the headers, then the task
/// store (tokens) or the key cache and Argon2 (API keys), then the agent's state. Failures are
/// counted against the source, audited (except a missing credential and refusals before any
/// check), and reported without the credential.
pub async fn authenticate(
    broker: &super::Broker,
    policy: &Policy,
    headers: &HeaderMap,
    query: Option<&str>,
    source: Option<IpAddr>,
) -> Result<Caller, AuthError> {
    let now = Instant::now();
    let auth = &broker.auth;
    let mut method = "none";
    let result = async {
        let cred = credential(headers, query)?;
        let (agent, via, fp) = match cred {
            Credential::Token(t) => {
                method = "task_token";
                let fp = fingerprint(t);
                let id = broker.tasks.verify_token(t, &fp, crate::time::now()).map_err(AuthError::InvalidToken)?;
                (id.agent.clone(), Via::Token(Box::new(id)), fp)
            }
            Credential::ApiKey(k) => {
                method = "api_key";
                let fp = fingerprint(k);
                let agent = auth.api_key_agent(&broker.pool, policy, k, fp, source, now).await?;
                (agent, Via::ApiKey, fp)
            }
        };
        match policy.agents.get(&agent) {
            Some(a) if !a.state.serves() => {
                let why = broker.agents.get(&agent).map(|e| e.reason).unwrap_or_default();
                Err(AuthError::AgentInactive(agent, a.state, why))
            }
            Some(a) if a.enabled && attestation_due(broker, policy, a) => Err(AuthError::AttestationExpired(agent)),
            Some(a) if a.enabled => {
                if let Some(ip) = source {
                    broker.admission.vouch(ip);
                }
                crate::broker::agents::api::used(broker, &agent, a.state).await;
                Ok(Caller { agent, via, fingerprint: fp, source })
            }
            Some(_) => Err(AuthError::AgentDisabled(agent)),
            None => Err(AuthError::InvalidToken(format!("agent {agent:?} is not in the policy"))),
        }
    }
    .await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    broker.metrics.inc("ephyr_auth_total", &[("method", method), ("outcome", outcome)]);
    if let Err(e) = &result {
        match e {
            AuthError::Missing | AuthError::RateLimited(_) | AuthError::Busy => {}
            _ => {
                // Audit while the source is within its failure budget; beyond it only the
                // metrics count (an attacker cannot flood the audit log).
                let audit = auth.check_source(source, now).is_ok();
                auth.failed(source, now);
                if !audit {
                    return result;
                }
                let mut ev = super::audit::Event::new(super::audit::Kind::Auth, "auth_failed")
                    .error(e.code(), e.message())
                    .action(serde_json::json!({ "method": method, "source": source.map(|s| s.to_string()) }));
                if let AuthError::AgentDisabled(a)
                | AuthError::AgentInactive(a, ..)
                | AuthError::AttestationExpired(a) = e
                {
                    ev = ev.agent(a.clone());
                }
                use super::audit::AuditSink as _;
                if let Err(err) = broker.audit.note(ev) {
                    log::error!("audit: {err}");
                }
            }
        }
    }
    result
}

/// Why a token caller's request is held back after authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PossessionError {
    /// The task awaits a holder key (423): only `task_bind` (and session set-up) is served.
    Locked(String),
    /// The proof of possession is missing or wrong (401).
    Proof(super::tasks::pop::PopError),
}

impl PossessionError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            PossessionError::Locked(_) => "task_locked",
            PossessionError::Proof(p) => p.code(),
        }
    }

    /// Human text.
    pub fn message(&self) -> String {
        match self {
            PossessionError::Locked(m) => m.clone(),
            PossessionError::Proof(p) => p.message(),
        }
    }
}

fn proof_headers(headers: &HeaderMap) -> Result<(Option<&str>, Option<&str>), super::tasks::pop::PopError> {
    use super::tasks::pop::{DPOP_HEADER, HEADER, PopError};
    let ours = single_header(headers, HEADER).map_err(PopError::Malformed)?;
    let dpop = single_header(headers, DPOP_HEADER).map_err(PopError::Malformed)?;
    Ok((ours, dpop))
}

/// MCP methods an unbound task that awaits its key may still use (to reach `task_bind`).
const WHILE_AWAITING_BIND: [&str; 3] = ["initialize", "ping", "notifications/initialized"];

/// [`prove_possession`] for one HTTP request: the token as sent, the `Host` header as the
/// authority. Nothing to prove for an API-key caller.
#[allow(clippy::too_many_arguments)]
pub async fn prove_request(
    broker: &super::Broker,
    caller: &Caller,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    mcp_method: &str,
    tool: &str,
    body: &[u8],
) -> Result<(), PossessionError> {
    if caller.token().is_none() {
        return Ok(());
    }
    let Ok(Credential::Token(token)) = credential(headers, None) else { return Ok(()) };
    let authority = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let facts = super::tasks::pop::Facts { http_method: method, authority, path, mcp_method, tool, body, token };
    prove_possession(broker, caller, headers, &facts).await
}

/// Holder checks for a token caller (DESIGN.md invariant 3), after authentication and before
/// anything is served: a bound task's request must carry a valid proof, signed by its holder
/// key, whose nonce is then consumed and journaled (this waits until the nonce is durable, so a
/// restart cannot reopen the replay window); a task awaiting its key is locked except for
/// `task_bind`. Failures are counted and audited like authentication failures.
pub async fn prove_possession(
    broker: &super::Broker,
    caller: &Caller,
    headers: &HeaderMap,
    facts: &super::tasks::pop::Facts<'_>,
) -> Result<(), PossessionError> {
    use super::tasks::Holder;
    let Some(t) = caller.token() else { return Ok(()) };
    let now = crate::time::now();
    let result = match t.holder {
        Holder::Bearer => return Ok(()),
        Holder::AwaitingBind { deadline } => {
            let binding = facts.mcp_method == "tools/call" && facts.tool == "task_bind";
            if deadline <= now {
                Err(PossessionError::Locked(format!(
                    "task {} required a holder key by {} and was not bound: it can no longer be used",
                    t.task,
                    deadline.to_rfc3339()
                )))
            } else if binding || WHILE_AWAITING_BIND.contains(&facts.mcp_method) {
                return Ok(());
            } else {
                Err(PossessionError::Locked(format!(
                    "task {} must be bound to a holder key first: call task_bind before {}",
                    t.task,
                    deadline.to_rfc3339()
                )))
            }
        }
        Holder::Key(key) => match proof_headers(headers)
            .and_then(|(ours, dpop)| super::tasks::pop::check(ours, dpop, facts, &key, now))
        {
            Err(e) => Err(PossessionError::Proof(e)),
            Ok(c) => {
                broker.metrics.inc("ephyr_pop_total", &[("form", c.form.as_str()), ("outcome", "ok")]);
                match broker.tasks.consume_nonce(&c, now) {
                    Err(e) => Err(PossessionError::Proof(e)),
                    Ok(None) => return Ok(()),
                    Ok(Some(durable)) => {
                        return durable
                            .wait()
                            .await
                            .map_err(|_| PossessionError::Proof(super::tasks::pop::PopError::CacheFull));
                    }
                }
            }
        },
    };
    if let Err(e) = &result {
        broker.metrics.inc("ephyr_pop_total", &[("form", "any"), ("outcome", e.code())]);
        let source = caller.source;
        let auth = &broker.auth;
        let instant = Instant::now();
        if auth.check_source(source, instant).is_ok() {
            auth.failed(source, instant);
            let ev = super::audit::Event::new(super::audit::Kind::Auth, "pop_rejected")
                .agent(caller.agent.clone())
                .task(t.task.clone(), t.lineage.clone())
                .error(e.code(), e.message())
                .action(serde_json::json!({ "mcp_method": facts.mcp_method, "tool": facts.tool }));
            use super::audit::AuditSink as _;
            if let Err(err) = broker.audit.note(ev) {
                log::error!("audit: {err}");
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        m
    }

    #[test]
    fn credentials_come_from_headers_only() {
        assert!(matches!(credential(&h(&[("authorization", "Bearer abc")]), None), Ok(Credential::ApiKey("abc"))));
        assert!(matches!(credential(&h(&[("authorization", "bearer mac_x")]), None), Ok(Credential::Token("mac_x"))));
        assert!(matches!(credential(&h(&[("x-api-key", "abc")]), None), Ok(Credential::ApiKey("abc"))));
        assert!(matches!(
            credential(&h(&[("authorization", "Bearer abc"), ("x-api-key", "abc")]), None),
            Ok(Credential::ApiKey("abc"))
        ));
        for (headers, query, code) in [
            (h(&[]), None, "missing_credential"),
            (h(&[("authorization", "Basic Zm9vOmJhcg==")]), None, "malformed_credential"),
            (h(&[("authorization", "Bearer ")]), None, "malformed_credential"),
            (h(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]), None, "malformed_credential"),
            (h(&[("authorization", "Bearer a"), ("x-api-key", "b")]), None, "malformed_credential"),
            (h(&[("authorization", "Bearer abc")]), Some("x=1&api_key=abc"), "credential_in_query"),
            (h(&[]), Some("access_token=abc"), "credential_in_query"),
        ] {
            let e = credential(&headers, query).unwrap_err();
            assert_eq!(e.code(), code, "{headers:?} {query:?}");
            assert!(!e.message().contains("abc"), "the credential is never echoed");
        }
        let long = format!("Bearer {}", "a".repeat(MAX_CREDENTIAL + 1));
        assert_eq!(credential(&h(&[("authorization", &long)]), None).unwrap_err().code(), "malformed_credential");
    }

    fn cheap() -> argon2::Params {
        argon2::Params::new(256, 1, 1, None).unwrap()
    }

    fn policy_with(agents: &[(&str, &str)]) -> Policy {
        let mut text = String::from("agents:\n");
        for (name, h) in agents {
            text.push_str(&format!("  {name}: {{api_key_hash: '{h}'}}\n"));
        }
        Policy::parse(&text, "t").unwrap()
    }

    #[test]
    fn fast_keys_verify_on_the_spot_without_the_pool() {
        let (key, stored) = api_key::generate().unwrap();
        let policy = policy_with(&[("a", &stored)]);
        let auth = Authenticator::new();
        let pool = super::super::blocking::BlockingPool::new(1, 4);
        let now = Instant::now();
        crate::broker::reactor::block_on(async {
            let fp = fingerprint(key.expose());
            assert_eq!(auth.api_key_agent(&pool, &policy, key.expose(), fp, None, now).await.unwrap(), "a");
            let (wrong, _) = api_key::generate().unwrap();
            let e = auth.api_key_agent(&pool, &policy, wrong.expose(), fingerprint(wrong.expose()), None, now).await;
            assert_eq!(e.unwrap_err(), AuthError::InvalidKey);
        });
        assert_eq!(pool.threads_started(), 0, "no Argon2, no blocking thread");
        assert_eq!(auth.pending(), 0);
    }

    #[test]
    fn argon2_keys_verify_once_then_hit_the_cache_and_wrong_keys_fail() {
        let (key, _) = api_key::generate().unwrap();
        let phc = api_key::argon2_hash(key.expose(), cheap()).unwrap();
        let policy = policy_with(&[("a", &phc)]);
        let auth = Authenticator::new();
        let pool = super::super::blocking::BlockingPool::new(1, 4);
        let now = Instant::now();
        crate::broker::reactor::block_on(async {
            let fp = fingerprint(key.expose());
            assert_eq!(auth.api_key_agent(&pool, &policy, key.expose(), fp, None, now).await.unwrap(), "a");
            assert_eq!(auth.cached(), 1);
            assert_eq!(auth.api_key_agent(&pool, &policy, key.expose(), fp, None, now).await.unwrap(), "a");
            // A changed policy invalidates the entry: the key is verified again (and still valid).
            let mut p2 = policy.clone();
            p2.digest = "other".into();
            assert_eq!(auth.api_key_agent(&pool, &p2, key.expose(), fp, None, now).await.unwrap(), "a");
            let (wrong, _) = api_key::generate().unwrap();
            let e = auth.api_key_agent(&pool, &policy, wrong.expose(), fingerprint(wrong.expose()), None, now).await;
            assert_eq!(e.unwrap_err(), AuthError::InvalidKey);
        });
        assert_eq!(auth.pending(), 0);
    }

    /// DESIGN.md invariant 13: a verification future dropped at any await (client gone, timeout,
    /// shutdown) leaves no count, lock or in-flight entry behind.
    #[test]
    fn dropped_verifications_leave_nothing_behind() {
        // ~20 ms a run in a debug build: a run cannot finish within one poll.
        let params = argon2::Params::new(1024, 1, 1, None).unwrap();
        let (key, _) = api_key::generate().unwrap();
        let phc = api_key::argon2_hash(key.expose(), params.clone()).unwrap();
        let foreign = api_key::argon2_hash("custom-key", params).unwrap();
        let policy = policy_with(&[("a", &phc), ("c", &foreign)]);
        let auth = Authenticator::new();
        let pool = super::super::blocking::BlockingPool::new(1, 64);
        let now = Instant::now();
        let fp = fingerprint(key.expose());
        crate::broker::reactor::block_on(async {
            for i in 0..50 {
                // Alone, or behind a leader that is dropped while its follower waits.
                let mut leader = Box::pin(auth.api_key_agent(&pool, &policy, key.expose(), fp, None, now));
                assert!(futures_lite::future::poll_once(&mut leader).await.is_none(), "round {i}: waits on Argon2");
                if i % 2 == 0 {
                    let mut follower = Box::pin(auth.api_key_agent(&pool, &policy, key.expose(), fp, None, now));
                    assert!(futures_lite::future::poll_once(&mut follower).await.is_none());
                    drop(leader);
                    // The follower starts over as the new leader and finishes.
                    assert_eq!(follower.await.unwrap(), "a", "round {i}");
                    *auth.cache.borrow_mut() = super::super::rate::Bounded::new(MAX_CACHED);
                } else {
                    drop(leader);
                }
                assert_eq!(auth.pending(), 0, "round {i}: lane count restored");
                assert!(auth.inflight.borrow().is_empty(), "round {i}: no in-flight entry left");
                assert!(!auth.argon2_busy.get(), "round {i}: Argon2 lock released");
            }
            // Strangers with wrong keys fill their lane; 503 for the next stranger, while a key
            // that verified before has its own lane.
            let strangers: Vec<String> = (0..MAX_PENDING_HASHES).map(|i| format!("wrong-{i}")).collect();
            let mut futs = Vec::new();
            for w in &strangers {
                let mut f = Box::pin(auth.api_key_agent(&pool, &policy, w, fingerprint(w), None, now));
                assert!(futures_lite::future::poll_once(&mut f).await.is_none());
                futs.push(f);
            }
            let e = auth.api_key_agent(&pool, &policy, "wrong-x", fingerprint("wrong-x"), None, now).await;
            assert_eq!(e.unwrap_err(), AuthError::Busy);
            let mut known = Box::pin(auth.api_key_agent(&pool, &policy, key.expose(), fp, None, now));
            assert!(futures_lite::future::poll_once(&mut known).await.is_none(), "queued, not refused");
            drop(futs);
            assert_eq!(known.await.unwrap(), "a");
            assert_eq!(auth.pending(), 0);
        });
    }

    #[test]
    fn failures_are_rate_limited_per_source() {
        let auth = Authenticator::new();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..FAILURE_RATE.count {
            auth.check_source(Some(ip), now).unwrap();
            auth.failed(Some(ip), now);
        }
        assert!(matches!(auth.check_source(Some(ip), now), Err(AuthError::RateLimited(_))));
        auth.check_source(Some("192.0.2.2".parse().unwrap()), now).unwrap();
        auth.check_source(Some(ip), now + Duration::from_secs(7)).unwrap();
    }
}
