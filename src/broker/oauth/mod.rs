//! The built-in OAuth 2.1 authorization server (docs/oauth.md), for MCP clients that expect
//! OAuth rather than a pasted key: authorization code with PKCE (S256 only), dynamic client
//! registration (RFC 7591), `iss` in authorization responses (RFC 9207), rotating refresh tokens
//! with reuse detection, revocation (RFC 7009) and token exchange (RFC 8693).
//!
//! An authorization request is shown to an operator on the console's consent page; approving it
//! enrolls an agent (`agents`) from the template the operator picks, owned by that operator.
//! Access tokens are that agent's task tokens (so every check of the broker applies to them:
//! the agent's state, its grants, revocation); refresh tokens are opaque and kept as SHA-256.
//!
//! What runs here: the executor thread. Clients and grants are journaled (`oauth` log, awaited
//! before answering); authorization requests waiting for consent (10 minutes) and codes (60 s,
//! single use) live in memory only: a restart loses them, and the client starts over.

pub mod cimd;
pub mod consent;
pub mod server;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Error;
use super::journal::{Backend, Durable, Store};

/// The durable log.
pub const LOG: &str = "oauth";
/// Most registered clients.
pub const MAX_CLIENTS: usize = 1000;
/// Most authorization requests waiting for consent.
const MAX_PENDING: usize = 256;
/// How long an authorization request waits for consent.
pub const PENDING_TTL: Duration = Duration::from_secs(600);
/// How long an authorization code is valid.
pub const CODE_TTL: Duration = Duration::from_secs(60);
/// Old refresh token digests remembered per grant (reuse detection).
const MAX_RETIRED: usize = 32;

/// A registered client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Client {
    /// Its id.
    pub id: String,
    /// SHA-256 (hex) of its secret; `None`: a public client (PKCE only).
    pub secret: Option<String>,
    /// Its name (shown on the consent page).
    pub name: String,
    /// Exact redirect URIs.
    pub redirect_uris: Vec<String>,
    /// When registered (Unix seconds).
    pub at: i64,
}

/// A grant: what an operator consented to, and its refresh token family.
#[derive(Clone, Debug)]
pub struct Grant {
    /// Its id.
    pub id: String,
    /// The client.
    pub client: String,
    /// The agent enrolled for it.
    pub agent: String,
    /// The resource (the broker's MCP URL).
    pub resource: String,
    /// Expiry of the family (Unix seconds).
    pub expires: i64,
    /// The current refresh token's digest.
    refresh: String,
    /// Digests of refresh tokens used before (a reuse revokes the grant).
    retired: Vec<String>,
    /// Revoked (why).
    pub revoked: Option<String>,
    /// The access token's task now.
    pub task: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Client(Client),
    Grant {
        id: String,
        client: String,
        agent: String,
        resource: String,
        expires: i64,
        refresh: String,
        #[serde(default)]
        task: Option<String>,
        at: i64,
    },
    Rotated {
        grant: String,
        refresh: String,
        task: Option<String>,
        at: i64,
    },
    Revoked {
        grant: String,
        why: String,
        at: i64,
    },
}

/// An authorization request waiting for an operator.
#[derive(Clone, Debug)]
pub struct Pending {
    /// The client.
    pub client: String,
    /// Where the answer goes.
    pub redirect_uri: String,
    /// The client's state, returned as is.
    pub state: Option<String>,
    /// The PKCE challenge (S256).
    pub challenge: String,
    /// The resource asked for.
    pub resource: String,
    /// The issuer the request came to (the answer's `iss`).
    pub issuer: String,
    /// When it came.
    pub at: Instant,
}

/// An authorization code.
#[derive(Clone, Debug)]
struct Code {
    client: String,
    redirect_uri: String,
    challenge: String,
    resource: String,
    agent: String,
    expires: Instant,
    /// The grant made with it (a second use revokes it).
    used: Option<String>,
}

/// What a code was good for.
pub struct Redeemed {
    /// The agent.
    pub agent: String,
    /// The resource.
    pub resource: String,
}

/// The authorization server's state.
pub struct OAuth {
    store: Rc<dyn Store>,
    clients: RefCell<BTreeMap<String, Client>>,
    grants: RefCell<BTreeMap<String, Grant>>,
    pending: RefCell<HashMap<String, Pending>>,
    codes: RefCell<HashMap<String, Code>>,
    /// Client assertions seen (agent, jti) until they expire: each works once.
    assertions: RefCell<HashMap<(String, String), i64>>,
    /// Clients described by metadata documents (URL client ids), as fetched, for an hour.
    documents: RefCell<HashMap<String, (Client, Instant)>>,
    /// Outbound connections (client ID metadata documents).
    conns: Rc<super::upstream::conn::Conns>,
}

/// SHA-256, hex.
pub fn digest(s: &str) -> String {
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

/// A fresh opaque value: `prefix` + 32 random bytes, base64url.
pub fn fresh(prefix: &str) -> Result<crate::secret::SecretString, Error> {
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    crate::secret::random_bytes(&mut raw[..]).map_err(|e| Error::Unavailable(e.to_string()))?;
    Ok(crate::secret::SecretString::new(format!("{prefix}{}", data_encoding::BASE64URL_NOPAD.encode(&raw[..]))))
}

fn apply(
    clients: &mut BTreeMap<String, Client>,
    grants: &mut BTreeMap<String, Grant>,
    rec: Record,
) -> Result<(), String> {
    match rec {
        Record::Client(c) => {
            clients.insert(c.id.clone(), c);
        }
        Record::Grant { id, client, agent, resource, expires, refresh, task, .. } => {
            grants.insert(
                id.clone(),
                Grant { id, client, agent, resource, expires, refresh, retired: Vec::new(), revoked: None, task },
            );
        }
        Record::Rotated { grant, refresh, task, .. } => {
            let g = grants.get_mut(&grant).ok_or_else(|| format!("refresh of unknown grant {grant}"))?;
            let old = std::mem::replace(&mut g.refresh, refresh);
            g.retired.push(old);
            if g.retired.len() > MAX_RETIRED {
                g.retired.remove(0);
            }
            g.task = task;
        }
        Record::Revoked { grant, why, .. } => {
            let g = grants.get_mut(&grant).ok_or_else(|| format!("revocation of unknown grant {grant}"))?;
            g.revoked = Some(why);
        }
    }
    Ok(())
}

impl OAuth {
    /// Replays log [`LOG`], dropping grants expired more than a day ago.
    pub async fn load(backend: &dyn Backend, conns: Rc<super::upstream::conn::Conns>) -> Result<OAuth, Error> {
        let replayed = backend.replay(LOG).await?;
        let mut clients = BTreeMap::new();
        let mut grants = BTreeMap::new();
        for (i, raw) in replayed.records.iter().enumerate() {
            let bad = |m: String| Error::Unavailable(format!("{LOG} log: record {}: {m}", i + 1));
            let rec: Record = serde_json::from_slice(raw).map_err(|e| bad(e.to_string()))?;
            apply(&mut clients, &mut grants, rec).map_err(bad)?;
        }
        let now = crate::time::now().secs();
        grants.retain(|_, g: &mut Grant| g.expires + 86_400 > now);
        let mut compacted = Vec::new();
        for c in clients.values() {
            compacted.extend(serde_json::to_vec(&Record::Client(c.clone())));
        }
        for g in grants.values() {
            let first = g.retired.first().cloned().unwrap_or_else(|| g.refresh.clone());
            compacted.extend(serde_json::to_vec(&Record::Grant {
                id: g.id.clone(),
                client: g.client.clone(),
                agent: g.agent.clone(),
                resource: g.resource.clone(),
                expires: g.expires,
                refresh: first,
                task: g.task.clone(),
                at: 0,
            }));
            for r in g.retired.iter().skip(1).chain((!g.retired.is_empty()).then_some(&g.refresh)) {
                compacted.extend(serde_json::to_vec(&Record::Rotated {
                    grant: g.id.clone(),
                    refresh: r.clone(),
                    task: g.task.clone(),
                    at: 0,
                }));
            }
            if let Some(why) = &g.revoked {
                compacted.extend(serde_json::to_vec(&Record::Revoked { grant: g.id.clone(), why: why.clone(), at: 0 }));
            }
        }
        let changed = compacted.len() != replayed.records.len() || replayed.torn_bytes > 0;
        let store = backend.open(LOG, changed.then_some(compacted)).await?;
        Ok(OAuth {
            store,
            clients: RefCell::new(clients),
            grants: RefCell::new(grants),
            pending: RefCell::default(),
            codes: RefCell::default(),
            assertions: RefCell::default(),
            documents: RefCell::default(),
            conns,
        })
    }

    fn append(&self, rec: Record) -> Result<Durable, Error> {
        let d = self.store.append(&serde_json::to_vec(&rec).map_err(|e| Error::Unavailable(e.to_string()))?)?;
        let mut c = self.clients.borrow_mut();
        let mut g = self.grants.borrow_mut();
        apply(&mut c, &mut g, rec).map_err(Error::Unavailable)?;
        Ok(d)
    }

    /// A client by id: registered, or described by a document fetched within the hour.
    pub fn client(&self, id: &str) -> Option<Client> {
        if let Some(c) = self.clients.borrow().get(id) {
            return Some(c.clone());
        }
        self.document(id)
    }

    /// A client described by a document fetched within the hour.
    pub fn document(&self, id: &str) -> Option<Client> {
        self.documents.borrow().get(id).and_then(cimd::fresh)
    }

    /// Keeps a fetched document's client (at most 256; stale ones go first).
    pub fn keep_document(&self, c: Client) {
        let mut d = self.documents.borrow_mut();
        if d.len() >= 256 {
            d.retain(|_, kept| cimd::fresh(kept).is_some());
            if d.len() >= 256 {
                d.clear();
            }
        }
        d.insert(c.id.clone(), (c, Instant::now()));
    }

    /// The outbound connections.
    pub fn conns(&self) -> Rc<super::upstream::conn::Conns> {
        self.conns.clone()
    }

    /// Registers `c`.
    pub fn register(&self, c: Client) -> Result<Durable, Error> {
        if self.clients.borrow().len() >= MAX_CLIENTS {
            return Err(Error::Refused(format!("{MAX_CLIENTS} clients are registered; registration is full")));
        }
        self.append(Record::Client(c))
    }

    /// Keeps an authorization request for consent; its id.
    pub fn hold(&self, p: Pending) -> Result<String, Error> {
        let now = Instant::now();
        let mut pending = self.pending.borrow_mut();
        pending.retain(|_, p| now.duration_since(p.at) < PENDING_TTL);
        if pending.len() >= MAX_PENDING {
            return Err(Error::Refused("too many authorization requests wait for consent; retry later".into()));
        }
        let id = fresh("")?.expose().chars().take(32).collect::<String>();
        pending.insert(id.clone(), p);
        Ok(id)
    }

    /// The authorization request `id`, if it still waits.
    pub fn pending(&self, id: &str) -> Option<Pending> {
        let p = self.pending.borrow().get(id).cloned()?;
        (p.at.elapsed() < PENDING_TTL).then_some(p)
    }

    /// Takes the authorization request `id` (consent or refusal: once).
    pub fn take(&self, id: &str) -> Option<Pending> {
        let p = self.pending.borrow_mut().remove(id)?;
        (p.at.elapsed() < PENDING_TTL).then_some(p)
    }

    /// A code for `p`, now consented for `agent`.
    pub fn code(&self, p: &Pending, agent: &str) -> Result<crate::secret::SecretString, Error> {
        let code = fresh("ephyr_ac_")?;
        let now = Instant::now();
        let mut codes = self.codes.borrow_mut();
        codes.retain(|_, c| c.expires > now);
        codes.insert(
            digest(code.expose()),
            Code {
                client: p.client.clone(),
                redirect_uri: p.redirect_uri.clone(),
                challenge: p.challenge.clone(),
                resource: p.resource.clone(),
                agent: agent.to_owned(),
                expires: now + CODE_TTL,
                used: None,
            },
        );
        Ok(code)
    }

    /// Redeems a code for `client` with `redirect_uri` and the PKCE `verifier`. A second use
    /// is refused and revokes the grant the first one made (`Err` carries its id to revoke).
    pub fn redeem(
        &self,
        code: &str,
        client: &str,
        redirect_uri: Option<&str>,
        verifier: Option<&str>,
    ) -> Result<Redeemed, (String, Option<String>)> {
        let mut codes = self.codes.borrow_mut();
        let Some(c) = codes.get_mut(&digest(code)) else {
            return Err(("the authorization code is unknown or expired".into(), None));
        };
        if let Some(g) = &c.used {
            return Err((
                "the authorization code was used already; the grant it made is revoked".into(),
                Some(g.clone()),
            ));
        }
        if c.expires <= Instant::now() {
            return Err(("the authorization code expired".into(), None));
        }
        if c.client != client {
            return Err(("the authorization code was issued to another client".into(), None));
        }
        if redirect_uri != Some(c.redirect_uri.as_str()) {
            return Err(("redirect_uri differs from the authorization request's".into(), None));
        }
        let Some(v) = verifier.filter(|v| (43..=128).contains(&v.len()) && v.bytes().all(pkce_char)) else {
            return Err(("code_verifier is missing or malformed (43-128 unreserved characters)".into(), None));
        };
        let computed = pkce_s256(v);
        if !crate::secret::constant_time_eq(computed.as_bytes(), c.challenge.as_bytes()) {
            return Err(("code_verifier does not match the code_challenge".into(), None));
        }
        c.used = Some(String::new());
        Ok(Redeemed { agent: c.agent.clone(), resource: c.resource.clone() })
    }

    /// Remembers which grant a redeemed code made (for reuse detection).
    pub fn code_made(&self, code: &str, grant: &str) {
        if let Some(c) = self.codes.borrow_mut().get_mut(&digest(code)) {
            c.used = Some(grant.to_owned());
        }
    }

    /// Starts a grant whose first access token is task `task`; its id and first refresh token.
    pub fn grant(
        &self,
        client: &str,
        agent: &str,
        resource: &str,
        expires: i64,
        task: &str,
    ) -> Result<(String, crate::secret::SecretString, Durable), Error> {
        let id = fresh("")?.expose().chars().take(26).collect::<String>();
        let refresh = fresh("ephyr_rt_")?;
        let d = self.append(Record::Grant {
            id: id.clone(),
            client: client.into(),
            agent: agent.into(),
            resource: resource.into(),
            expires,
            refresh: digest(refresh.expose()),
            task: Some(task.to_owned()),
            at: crate::time::now().secs(),
        })?;
        Ok((id, refresh, d))
    }

    /// The grant whose current refresh token is `token`; `Err(Some(id))`: a refresh token that
    /// was current before (reuse: the caller revokes the grant).
    pub fn by_refresh(&self, token: &str) -> Result<Grant, Option<String>> {
        let d = digest(token);
        let grants = self.grants.borrow();
        for g in grants.values() {
            if crate::secret::constant_time_eq(g.refresh.as_bytes(), d.as_bytes()) {
                return Ok(g.clone());
            }
            if g.retired.iter().any(|r| r == &d) {
                return Err(Some(g.id.clone()));
            }
        }
        Err(None)
    }

    /// A grant by id.
    pub fn get(&self, id: &str) -> Option<Grant> {
        self.grants.borrow().get(id).cloned()
    }

    /// Rotates grant `id`'s refresh token; the new one.
    pub fn rotate(&self, id: &str, task: Option<String>) -> Result<(crate::secret::SecretString, Durable), Error> {
        let refresh = fresh("ephyr_rt_")?;
        let d = self.append(Record::Rotated {
            grant: id.into(),
            refresh: digest(refresh.expose()),
            task,
            at: crate::time::now().secs(),
        })?;
        Ok((refresh, d))
    }

    /// Revokes grant `id` (`Ok(None)`: it was revoked already).
    pub fn revoke(&self, id: &str, why: &str) -> Result<Option<Durable>, Error> {
        match self.grants.borrow().get(id) {
            None => return Err(Error::NotFound(format!("no grant {id}"))),
            Some(g) if g.revoked.is_some() => return Ok(None),
            Some(_) => {}
        }
        self.append(Record::Revoked { grant: id.into(), why: why.into(), at: crate::time::now().secs() }).map(Some)
    }

    /// Whether the client assertion `jti` of `agent` (valid until `exp`) is new; remembers it.
    /// At most 10,000 are kept (expired ones go first; when all are live, the request is refused).
    pub fn fresh_assertion(&self, agent: &str, jti: &str, exp: i64) -> bool {
        let now = crate::time::now().secs();
        let mut seen = self.assertions.borrow_mut();
        if seen.len() >= 10_000 {
            seen.retain(|_, e| *e + 60 > now);
            if seen.len() >= 10_000 {
                return false;
            }
        }
        seen.insert((agent.to_owned(), jti.to_owned()), exp).is_none()
    }

    /// Grants of `agent`.
    pub fn grants_of(&self, agent: &str) -> Vec<Grant> {
        self.grants.borrow().values().filter(|g| g.agent == agent).cloned().collect()
    }
}

/// The PKCE S256 challenge of `verifier` (RFC 7636 §4.2): base64url(SHA-256), both sides.
pub fn pkce_s256(verifier: &str) -> String {
    data_encoding::BASE64URL_NOPAD.encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref())
}

/// RFC 7636 unreserved characters.
fn pkce_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// Whether `uri` may be a redirect URI: `https`, or `http` on a loopback host; no fragment;
/// no user info.
pub fn redirect_uri_ok(uri: &str) -> Result<(), String> {
    if uri.len() > 2000 || uri.contains('#') || uri.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!("redirect URI {uri:?} is too long or has a fragment or spaces"));
    }
    let u: http::Uri = uri.parse().map_err(|e| format!("redirect URI {uri:?}: {e}"))?;
    let host = u.host().ok_or_else(|| format!("redirect URI {uri:?} has no host"))?;
    if u.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!("redirect URI {uri:?} carries user info"));
    }
    match u.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if matches!(host, "127.0.0.1" | "[::1]" | "localhost") => Ok(()),
        _ => Err(format!("redirect URI {uri:?} must be https, or http on 127.0.0.1, [::1] or localhost")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_are_https_or_loopback() {
        for ok in
            ["https://app.example/cb", "http://127.0.0.1:3000/callback", "http://localhost/cb", "http://[::1]:9/x"]
        {
            assert!(redirect_uri_ok(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("http://evil.example/cb", "must be https"),
            ("https://app.example/cb#frag", "fragment"),
            ("https://user@app.example/cb", "user info"),
            ("javascript:alert(1)", "redirect URI"),
            ("http://127.0.0.1.evil.example/cb", "must be https"),
        ] {
            let e = redirect_uri_ok(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn pkce_verifiers_are_checked() {
        assert!(pkce_char(b'~') && !pkce_char(b'+') && !pkce_char(b'/'));
    }
}
