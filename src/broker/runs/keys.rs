//! Disposable provider keys: for a tool that cannot take a base URL, a run can get a real key
//! of its own, made through the provider's admin API when the run starts and revoked when it
//! ends (OpenAI: a project service account per run, its key expiring server-side at the run's
//! end; deleting the account revokes the key). The admin key stays in the broker (a secret
//! reference, sealed in the store).
//!
//! What runs here: the executor thread; HTTP/1.1 to the admin API on connections of its own.
//! Every key is journaled (`keys` log) **before** it is asked for (`intent`, with the unique
//! name it will carry), when it exists (`minted`, the account's id) and when it is gone
//! (`revoked`). The sweeper (`maintenance`, every 10 s and on every task event) revokes every
//! key whose run is over: by its account id, or, for an intent whose answer was lost (the
//! broker died between asking and hearing), by finding its name in the project's accounts. So a
//! crash can leave no live key behind; `ephyr keys list|cleanup` shows and forces the same.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use ulid::Ulid;

use crate::broker::deadline::Deadline;
use crate::broker::journal::{Backend, Durable, Store};
use crate::broker::policy::{Mint, Policy};
use crate::broker::upstream::conn::{self, Conns};
use crate::broker::upstream::plan;
use crate::broker::{Broker, Error};
use crate::secret::SecretBytes;

/// The durable log of disposable keys.
pub const LOG: &str = "keys";
/// One admin API exchange.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest admin API answer read.
const MAX_ANSWER: usize = 1 << 20;
/// Pages of accounts read when looking for a lost one.
const MAX_PAGES: usize = 50;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Intent {
        #[serde(with = "crate::broker::tasks::ulid_text")]
        id: Ulid,
        #[serde(with = "crate::broker::tasks::ulid_text")]
        run: Ulid,
        service: String,
        project: String,
        name: String,
        at: i64,
    },
    Minted {
        #[serde(with = "crate::broker::tasks::ulid_text")]
        id: Ulid,
        account: String,
        expires_at: Option<i64>,
    },
    Revoked {
        #[serde(with = "crate::broker::tasks::ulid_text")]
        id: Ulid,
        at: i64,
        how: String,
    },
}

/// One key, as the journal knows it.
#[derive(Clone, Debug)]
pub struct Key {
    /// Ours.
    pub id: Ulid,
    /// The run it is for.
    pub run: Ulid,
    /// The service whose `mint:` made it.
    pub service: String,
    /// The provider's project.
    pub project: String,
    /// The account's name (`ephyr-run-<run>-<id>`).
    pub name: String,
    /// Unix seconds.
    pub at: i64,
    /// The provider's account id, once known.
    pub account: Option<String>,
    /// When the provider expires it.
    pub expires_at: Option<i64>,
    /// When and how it was revoked.
    pub revoked: Option<(i64, String)>,
}

/// The disposable keys of one broker.
pub struct Keys {
    store: Rc<dyn Store>,
    keys: RefCell<BTreeMap<Ulid, Key>>,
    conns: Rc<Conns>,
    /// Keys being revoked now (two sweeps never revoke one key twice).
    busy: Rc<RefCell<std::collections::BTreeSet<Ulid>>>,
}

/// Marks a key busy while it is being revoked; unmarked on every way out (a dropped sweep too).
struct Busy(Rc<RefCell<std::collections::BTreeSet<Ulid>>>, Ulid);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.borrow_mut().remove(&self.1);
    }
}

impl Keys {
    /// Replays log [`LOG`]; keys revoked more than a day ago are dropped from it.
    pub async fn load(backend: &dyn Backend, conns: Rc<Conns>) -> Result<Keys, Error> {
        let replayed = backend.replay(LOG).await?;
        let mut keys: BTreeMap<Ulid, Key> = BTreeMap::new();
        for (i, raw) in replayed.records.iter().enumerate() {
            let rec: Record = serde_json::from_slice(raw)
                .map_err(|e| Error::Unavailable(format!("{LOG} log: record {}: {e}", i + 1)))?;
            apply(&mut keys, rec);
        }
        let now = crate::time::now().secs();
        keys.retain(|_, k| k.revoked.as_ref().is_none_or(|(at, _)| now - at < super::KEEP_ENDED));
        let mut compacted = Vec::new();
        for k in keys.values() {
            for r in records(k) {
                compacted.push(serde_json::to_vec(&r).unwrap_or_default());
            }
        }
        let changed = compacted.len() != replayed.records.len() || replayed.torn_bytes > 0;
        let store = backend.open(LOG, changed.then_some(compacted)).await?;
        Ok(Keys { store, keys: RefCell::new(keys), conns, busy: Rc::default() })
    }

    /// Every key kept (newest first).
    pub fn list(&self) -> Vec<Key> {
        self.keys.borrow().values().rev().cloned().collect()
    }

    /// Keys not yet revoked.
    pub fn outstanding(&self) -> Vec<Key> {
        self.keys.borrow().values().filter(|k| k.revoked.is_none()).cloned().collect()
    }

    fn write(&self, rec: Record) -> Result<Durable, Error> {
        let d = self.store.append(&serde_json::to_vec(&rec).map_err(|e| Error::Unavailable(e.to_string()))?)?;
        apply(&mut self.keys.borrow_mut(), rec);
        Ok(d)
    }

    /// Makes a key for `run` from `service`'s `mint:`, valid for `ttl`; its value, which the
    /// caller hands to the run and never writes down.
    pub async fn mint(
        &self,
        broker: &Broker,
        policy: &Policy,
        run: Ulid,
        service: &str,
        ttl: Duration,
    ) -> Result<SecretBytes, Error> {
        let m = mint_of(policy, service)?;
        let id = crate::ids::new_ulid(crate::time::now());
        let name = format!("ephyr-run-{run}-{id}");
        let intent = Record::Intent {
            id,
            run,
            service: service.to_owned(),
            project: m.project.clone(),
            name: name.clone(),
            at: crate::time::now().secs(),
        };
        self.write(intent)?.wait().await?;
        let path = format!("/organization/projects/{}/service_accounts", m.project);
        let expires_in = ttl.as_secs().clamp(60, 31_536_000);
        let no_key = |what: &str| Error::Upstream {
            code: "upstream_failed",
            message: format!("service {service:?}: the admin API's answer has no {what}"),
        };
        // With scopes: the account alone first, then its one key with the scopes (the account's
        // default key has none); the account is journaled in between, so a crash there leaves
        // nothing the sweeper cannot delete.
        let body = match m.scopes.is_empty() {
            true => json!({ "name": name, "expires_in_seconds": expires_in }),
            false => json!({ "name": name, "create_service_account_only": true }),
        };
        let (status, v) = self.call(broker, policy, m, Method::POST, &path, Some(&body)).await?;
        if !status.is_success() {
            return Err(refused(service, "creating a service account", status, &v));
        }
        let account = v["id"].as_str().ok_or_else(|| no_key("account id"))?.to_owned();
        let key = if m.scopes.is_empty() {
            v["api_key"].clone()
        } else {
            self.write(Record::Minted { id, account: account.clone(), expires_at: None })?.wait().await?;
            let body = json!({ "name": name, "expires_in_seconds": expires_in, "scopes": m.scopes });
            let (status, k) =
                self.call(broker, policy, m, Method::POST, &format!("{path}/{account}/api_keys"), Some(&body)).await?;
            if !status.is_success() {
                return Err(refused(service, "creating the account's key", status, &k));
            }
            k
        };
        let value = SecretBytes::new(key["value"].as_str().ok_or_else(|| no_key("key"))?.as_bytes().to_vec());
        let expires_at = key["expires_at"].as_i64();
        self.write(Record::Minted { id, account, expires_at })?.wait().await?;
        Ok(value)
    }

    /// Revokes every outstanding key whose run is over (or, with `all`, every outstanding key);
    /// how many were revoked, and the failures (each names its key).
    pub async fn sweep(&self, broker: &Broker, all: bool) -> (usize, Vec<String>) {
        let policy = broker.policy();
        let mut done = 0;
        let mut failures = Vec::new();
        for k in self.outstanding() {
            let over = all || broker.runs.get(k.run).is_none_or(|r| r.ended().is_some());
            if !over || !self.busy.borrow_mut().insert(k.id) {
                continue;
            }
            let _busy = Busy(self.busy.clone(), k.id);
            // Revoked meanwhile by another sweep (it finished between our snapshot and now).
            if self.keys.borrow().get(&k.id).is_some_and(|k| k.revoked.is_some()) {
                continue;
            }
            match self.revoke(broker, &policy, &k).await {
                Ok(()) => done += 1,
                Err(e) => failures.push(format!("key {} ({}): {}", k.id, k.name, e.message())),
            }
        }
        (done, failures)
    }

    async fn revoke(&self, broker: &Broker, policy: &Policy, k: &Key) -> Result<(), Error> {
        let m = mint_of(policy, &k.service)?;
        let base = format!("/organization/projects/{}/service_accounts", k.project);
        let account = match &k.account {
            Some(a) => Some(a.clone()),
            None => self.find(broker, policy, m, &base, &k.name).await?,
        };
        let how = match account {
            None => "never created".to_owned(),
            Some(a) => {
                let (status, v) = self.call(broker, policy, m, Method::DELETE, &format!("{base}/{a}"), None).await?;
                match status {
                    s if s.is_success() => format!("account {a} deleted"),
                    StatusCode::NOT_FOUND => format!("account {a} was already gone"),
                    s => return Err(refused(&k.service, "deleting a service account", s, &v)),
                }
            }
        };
        self.write(Record::Revoked { id: k.id, at: crate::time::now().secs(), how: how.clone() })?.wait().await?;
        let ev = crate::broker::audit::Event::new(crate::broker::audit::Kind::Http, "key_revoked")
            .agent("broker".to_owned())
            .task(k.run.to_string(), vec![k.run.to_string()])
            .allow()
            .action(json!({ "service": k.service, "key": k.id.to_string(), "name": k.name }))
            .outcome(json!({ "how": how }));
        broker.audit_now(ev).await;
        Ok(())
    }

    /// The account named `name`, paging through the project's accounts.
    async fn find(
        &self,
        broker: &Broker,
        policy: &Policy,
        m: &Mint,
        base: &str,
        name: &str,
    ) -> Result<Option<String>, Error> {
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let path = match &after {
                Some(a) => format!("{base}?limit=100&after={a}"),
                None => format!("{base}?limit=100"),
            };
            let (status, v) = self.call(broker, policy, m, Method::GET, &path, None).await?;
            if !status.is_success() {
                return Err(refused("mint", "listing service accounts", status, &v));
            }
            let data = v["data"].as_array().cloned().unwrap_or_default();
            if let Some(a) = data.iter().find(|a| a["name"].as_str() == Some(name)) {
                return Ok(a["id"].as_str().map(str::to_owned));
            }
            match (v["has_more"].as_bool(), v["last_id"].as_str().or_else(|| data.last()?["id"].as_str())) {
                (Some(true), Some(last)) if after.as_deref() != Some(last) => after = Some(last.to_owned()),
                _ => return Ok(None),
            }
        }
        Err(Error::Upstream { code: "upstream_failed", message: format!("more than {MAX_PAGES} pages of accounts") })
    }

    /// One exchange with the admin API: (status, JSON body or `null`).
    async fn call(
        &self,
        broker: &Broker,
        policy: &Policy,
        m: &Mint,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), Error> {
        let url = &m.url;
        let down =
            |what: String| Error::Upstream { code: "upstream_failed", message: format!("admin API {url}: {what}") };
        let addrs: Vec<IpAddr> = conn::resolve(&broker.pool, &url.host, url.port, TIMEOUT).await.map_err(down)?;
        let tls = if url.scheme == "https" {
            let key = format!("{}/mint/{}", policy.digest, url);
            Some(self.conns.tls_config(&broker.pool, &key, None, None, None).await.map_err(down)?)
        } else {
            None
        };
        let admin = broker.secrets.resolve(&broker.pool, &broker.signer, &m.admin_key).await?;
        let mut bearer = zeroize::Zeroizing::new(b"Bearer ".to_vec());
        bearer.extend_from_slice(admin.expose());
        drop(admin);
        let mut auth =
            http::HeaderValue::from_bytes(&bearer).map_err(|_| down("the admin key is not header text".into()))?;
        auth.set_sensitive(true);
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", url.base_path))
            .header(header::HOST, plan::host_header(&url.scheme, &url.host, url.port))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, auth)
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| down(e.to_string()))?;
        let dest = conn::Dest { host: &url.host, port: url.port, addrs: &addrs, tls, timeout: TIMEOUT };
        let exchange = async {
            let mut sender = self.conns.connect(&dest).await.map_err(|e| down(e.to_string()))?;
            let resp = sender.send_request(req).await.map_err(|e| down(e.to_string()))?;
            let status = resp.status();
            let limited = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
            let body = limited.collect().await.map_err(|e| down(format!("reading the answer: {e}")))?.to_bytes();
            Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
        };
        futures_lite::future::or(exchange, async {
            Deadline::after(TIMEOUT).await;
            Err(down(format!("no answer within {}s", TIMEOUT.as_secs())))
        })
        .await
    }
}

fn mint_of<'p>(policy: &'p Policy, service: &str) -> Result<&'p Mint, Error> {
    policy.services.get(service).and_then(|s| s.mint.as_ref()).ok_or_else(|| {
        Error::Refused(format!("service {service:?} has no mint: section any more; restore it to revoke its keys"))
    })
}

fn refused(service: &str, what: &str, status: StatusCode, v: &Value) -> Error {
    let msg = v["error"]["message"].as_str().unwrap_or("").chars().take(300).collect::<String>();
    Error::Upstream {
        code: "upstream_failed",
        message: format!("service {service:?}: {what}: the admin API answered {status} {msg}").trim_end().to_owned(),
    }
}

fn apply(keys: &mut BTreeMap<Ulid, Key>, rec: Record) {
    match rec {
        Record::Intent { id, run, service, project, name, at } => {
            keys.insert(
                id,
                Key { id, run, service, project, name, at, account: None, expires_at: None, revoked: None },
            );
        }
        Record::Minted { id, account, expires_at } => {
            if let Some(k) = keys.get_mut(&id) {
                k.account = Some(account);
                k.expires_at = expires_at;
            }
        }
        Record::Revoked { id, at, how } => {
            if let Some(k) = keys.get_mut(&id) {
                k.revoked = Some((at, how));
            }
        }
    }
}

fn records(k: &Key) -> Vec<Record> {
    let mut out = vec![Record::Intent {
        id: k.id,
        run: k.run,
        service: k.service.clone(),
        project: k.project.clone(),
        name: k.name.clone(),
        at: k.at,
    }];
    if let Some(a) = &k.account {
        out.push(Record::Minted { id: k.id, account: a.clone(), expires_at: k.expires_at });
    }
    if let Some((at, how)) = &k.revoked {
        out.push(Record::Revoked { id: k.id, at: *at, how: how.clone() });
    }
    out
}
