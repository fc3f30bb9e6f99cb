//! SSH and the HTTP proxy on in-memory handles (`broker::ports`): no broker process, no signer
//! process. Certificates come from the signer's own custody code run in process (real Ed25519
//! certificates), the audit trail is an in-memory sink, task liveness and secrets are small
//! stand-ins; the upstream is a real HTTP server on loopback. What these show is that the two
//! features need nothing of the broker but their ports, and that their records and cleanup are
//! right on paths that end early.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::rc::Rc;
use std::time::Duration;

use ephyr::broker::Error;
use ephyr::broker::audit::{AuditSink, Event, MemorySink};
use ephyr::broker::auth::{Caller, Via};
use ephyr::broker::blocking::BlockingPool;
use ephyr::broker::journal::{Backend, Durable, Files, Replayed, Store};
use ephyr::broker::metrics::Metrics;
use ephyr::broker::policy::{Arguments, Policy, SecretRef};
use ephyr::broker::ports::{CertSigner, Local, Ports, SecretSource, SignedCert, TaskLiveness};
use ephyr::broker::proxy::{Call, Proxy};
use ephyr::broker::signer_client::CallError;
use ephyr::broker::ssh::{
    Asker, Ssh, hosts::KnownHosts, recording::Store as Recordings, registry::Issued, registry::Registry,
};
use ephyr::os::SharedCounters;
use ephyr::secret::SecretBytes;
use ephyr::signer::custody::{Custody, SignerConfig};
use ephyr::signer::keys::{CaKey, SealingKey};
use ephyr::signer::protocol::{CertRequest, Request, Response};
use ephyr::time::UnixMicros;

/// The signer's custody, in this process.
struct InProcessSigner {
    custody: Custody,
    ca: String,
}

impl InProcessSigner {
    fn new() -> Self {
        let ca = CaKey::generate().unwrap();
        let config = SignerConfig {
            max_cert_ttl_secs: 3600,
            principals: BTreeSet::from(["reader".to_owned()]),
            rate_limit: 100,
            rate_window_secs: 60,
            sealed: Default::default(),
        };
        let custody = Custody::new(&ca, &SealingKey::generate().unwrap(), config, SharedCounters::new().unwrap());
        InProcessSigner { custody, ca: ca.public_line() }
    }
}

impl CertSigner for InProcessSigner {
    fn sign<'a>(&'a self, req: CertRequest) -> Local<'a, Result<SignedCert, CallError>> {
        let now = ephyr::time::now().secs() as u64;
        let r = match self.custody.handle(Request::SignUserCert(req), now) {
            Response::Certificate { serial, certificate } => Ok((serial, certificate)),
            Response::Error(e) => Err(CallError::Refused(e)),
            other => Err(CallError::Protocol(format!("{other:?}"))),
        };
        Box::pin(async move { r })
    }

    fn max_cert_ttl(&self) -> Option<u64> {
        Some(3600)
    }

    fn ca_public_key(&self) -> Option<String> {
        Some(self.ca.clone())
    }
}

/// Task liveness: the named tasks are revoked.
#[derive(Default)]
struct Revoked(RefCell<BTreeSet<String>>);

impl TaskLiveness for Revoked {
    fn unusable(&self, task: &str) -> bool {
        self.0.borrow().contains(task)
    }

    fn ended(&self, _task: String, _also: Option<UnixMicros>) -> Local<'static, ()> {
        Box::pin(std::future::pending())
    }
}

/// Secrets: one value for `env:TOKEN`, nothing else.
struct OneSecret(&'static str);

impl SecretSource for OneSecret {
    fn resolve<'a>(&'a self, r: &'a SecretRef) -> Local<'a, Result<SecretBytes, Error>> {
        let v = match r {
            SecretRef::Env(n) if n == "TOKEN" => Ok(SecretBytes::new(self.0.as_bytes().to_vec())),
            other => Err(Error::Unavailable(format!("secret {other}: not in this test"))),
        };
        Box::pin(async move { v })
    }
}

/// An audit trail that has failed.
struct FailedAudit;

impl AuditSink for FailedAudit {
    fn record(&self, _e: Event) -> Result<ephyr::broker::audit::Ticket, ephyr::broker::audit::AuditError> {
        Err(ephyr::broker::audit::AuditError::Unavailable("disk full".into()))
    }

    fn failure(&self) -> Option<String> {
        Some("disk full".into())
    }
}

struct Stand {
    audit: MemorySink,
    metrics: Metrics,
    signer: InProcessSigner,
    tasks: Revoked,
    secrets: OneSecret,
    pool: BlockingPool,
    approvals: ephyr::broker::approvals::Approvals,
}

impl Stand {
    fn new() -> Self {
        Stand {
            audit: MemorySink::default(),
            metrics: Metrics::default(),
            signer: InProcessSigner::new(),
            tasks: Revoked::default(),
            secrets: OneSecret("s3cret-value-42"),
            pool: BlockingPool::new(1, 8),
            approvals: ephyr::broker::approvals::Approvals::in_memory(),
        }
    }

    fn ports(&self) -> Ports<'_> {
        Ports {
            audit: &self.audit,
            metrics: &self.metrics,
            signer: &self.signer,
            tasks: &self.tasks,
            secrets: &self.secrets,
            pool: &self.pool,
            approvals: &self.approvals,
            progress: None,
        }
    }

    fn events(&self) -> Vec<&'static str> {
        self.audit.0.borrow().iter().map(|e| e.name).collect()
    }
}

fn alice() -> Caller {
    Caller { agent: "alice".into(), via: Via::ApiKey, fingerprint: [7; 32], source: None }
}

fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn ssh_on_ports_issues_records_and_releases_when_the_host_is_unreachable() {
    let dir = common::TempDir::new("ports");
    let port = closed_port();
    let policy = Policy::parse(
        &format!(
            "version: 1\nroles: {{read: {{principal: reader}}}}\ntargets: {{web: {{host: 127.0.0.1, port: {port}, allowed_roles: [read]}}}}\nagents: {{alice: {{ssh: {{web: {{roles: [read]}}}}}}}}\n"
        ),
        "test",
    )
    .unwrap();
    let stand = Stand::new();
    let ex = Rc::new(smol::LocalExecutor::new());
    let logs = Files::new(dir.path().to_owned(), stand.pool.clone(), ex.clone());
    ephyr::broker::reactor::block_on(ex.run(async {
        let (registry, _) = Registry::load(&logs, 1).await.unwrap();
        let known = KnownHosts::load(&dir.path().join("known_hosts")).unwrap();
        let ssh = Ssh::new(registry, known, Recordings { dir: dir.path().join("recordings") });
        let caller = alice();
        let asker = Asker { ports: stand.ports(), caller: &caller, policy: &policy, arguments: Arguments::None };
        let e = ssh.exec_once(asker, "web", "read", "uptime", Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(e.code(), "host_unreachable", "{e:?}");
        // The certificate was issued and recorded before it was used, then released.
        assert_eq!(stand.events(), ["cert_issued"]);
        assert_eq!(ssh.registry.in_use("alice"), (0, 0));
        assert_eq!(stand.metrics.get("ephyr_certificates_issued_total", &[("requester", "agent")]), 1.0);
        assert_eq!(stand.metrics.get("ephyr_ssh_connects_total", &[("outcome", "host_unreachable")]), 1.0);
        let listed = ssh.registry.list(ephyr::time::now().secs() as u64, |_| true);
        assert_eq!(listed.len(), 1, "the issued certificate stays listed until it expires");

        // The KRL is signed over the CA the ports name; an unrevoked certificate is not on it.
        let krl = ssh.krl(stand.ports()).expect("a CA key, so a KRL");
        assert!(krl.starts_with(b"SSHKRL\n\0"), "OpenSSH KRL magic");

        // A refused signer: nothing recorded, nothing held.
        let refusing = Policy::parse(
            &format!(
                "version: 1\nroles: {{op: {{principal: root}}}}\ntargets: {{web: {{host: 127.0.0.1, port: {port}, allowed_roles: [op]}}}}\nagents: {{alice: {{ssh: {{web: {{roles: [op]}}}}}}}}\n"
            ),
            "test",
        )
        .unwrap();
        let asker = Asker { ports: stand.ports(), caller: &caller, policy: &refusing, arguments: Arguments::None };
        let e = ssh.exec_once(asker, "web", "op", "uptime", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(&e, Error::Signer(m) if m.contains("root")), "{e:?}");
        assert_eq!(stand.events(), ["cert_issued"], "a refusal issues nothing and records no issuance");
        assert_eq!(ssh.registry.in_use("alice"), (0, 0));
    }));
}

#[test]
fn ssh_refuses_before_issuing_when_the_audit_trail_has_failed() {
    let dir = common::TempDir::new("ports");
    let policy = Policy::parse(
        "version: 1\nroles: {read: {principal: reader}}\ntargets: {web: {host: 127.0.0.1, port: 1, allowed_roles: [read]}}\nagents: {alice: {ssh: {web: {roles: [read]}}}}\n",
        "test",
    )
    .unwrap();
    let stand = Stand::new();
    let logs = Files::new(dir.path().to_owned(), stand.pool.clone(), Rc::new(smol::LocalExecutor::new()));
    ephyr::broker::reactor::block_on(async {
        let (registry, _) = Registry::load(&logs, 1).await.unwrap();
        let known = KnownHosts::load(&dir.path().join("known_hosts")).unwrap();
        let ssh = Ssh::new(registry, known, Recordings { dir: dir.path().join("recordings") });
        let caller = alice();
        let ports = Ports { audit: &FailedAudit, ..stand.ports() };
        let asker = Asker { ports, caller: &caller, policy: &policy, arguments: Arguments::None };
        let e = ssh.exec_once(asker, "web", "read", "uptime", Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(e.code(), "unavailable", "{e:?}");
        assert!(e.message().contains("disk full"), "{e:?}");
        assert_eq!(ssh.registry.in_use("alice"), (0, 0), "nothing held after a refusal");
        assert_eq!(stand.metrics.get("ephyr_ssh_connects_total", &[("outcome", "ok")]), 0.0);
    });
}

/// A one-request-at-a-time HTTP/1.1 server on loopback that answers with the request it got.
fn echo_server() -> (u16, std::thread::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        let body = format!("you sent: {text}");
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
        s.write_all(resp.as_bytes()).unwrap();
        text
    });
    (port, h)
}

#[test]
fn the_proxy_on_ports_injects_the_port_secret_and_scrubs_it_from_the_answer() {
    let (port, upstream) = echo_server();
    let policy = Policy::parse(
        &format!(
            "version: 1\nservices: {{echo: {{url: \"http://127.0.0.1:{port}\", credential: {{type: bearer, secret: \"env:TOKEN\"}}}}}}\nnetwork: {{allow: [127.0.0.1/32]}}\nagents: {{alice: {{services: {{echo: {{}}}}}}}}\n"
        ),
        "test",
    )
    .unwrap();
    let stand = Stand::new();
    let ex = Rc::new(smol::LocalExecutor::new());
    let proxy = Proxy::new(ex.clone());
    let headers = http::HeaderMap::new();
    let caller = alice();
    let out = ephyr::broker::reactor::block_on(ex.run(async {
        let call = Call {
            tool: None,
            service: "echo",
            host: None,
            method: "POST",
            path: "/v1/things",
            headers: &headers,
            body: bytes::Bytes::from_static(b"{}"),
            timeout: None,
            via: "route",
            arguments: Arguments::None,
        };
        let answer = proxy.send(stand.ports(), &caller, &policy, call).await.unwrap();
        assert_eq!(answer.status, 200);
        http_body_util::BodyExt::collect(answer.body).await.unwrap().to_bytes()
    }));
    let seen = upstream.join().unwrap();
    assert!(seen.to_ascii_lowercase().contains("authorization: bearer s3cret-value-42"), "{seen}");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("you sent: POST /v1/things"), "{out}");
    assert!(!out.contains("s3cret-value-42"), "the secret never reaches the agent: {out}");
    assert_eq!(stand.events(), ["http_request"], "a POST is recorded before it leaves");
    assert_eq!(stand.metrics.get("ephyr_proxy_requests_total", &[("service", "echo"), ("code", "2xx")]), 1.0);
}

#[test]
fn the_proxy_refuses_without_a_secret_or_an_audit_trail_and_sends_nothing() {
    let port = closed_port();
    let policy = Policy::parse(
        &format!(
            "version: 1\nservices: {{other: {{url: \"http://127.0.0.1:{port}\", credential: {{type: bearer, secret: \"env:MISSING\"}}}}}}\nnetwork: {{allow: [127.0.0.1/32]}}\nagents: {{alice: {{services: {{other: {{}}}}}}}}\n"
        ),
        "test",
    )
    .unwrap();
    let stand = Stand::new();
    let ex = Rc::new(smol::LocalExecutor::new());
    let proxy = Proxy::new(ex.clone());
    let headers = http::HeaderMap::new();
    let caller = alice();
    ephyr::broker::reactor::block_on(ex.run(async {
        let call = |method| Call {
            tool: None,
            service: "other",
            host: None,
            method,
            path: "/",
            headers: &headers,
            body: bytes::Bytes::new(),
            timeout: None,
            via: "route",
            arguments: Arguments::None,
        };
        let e = match proxy.send(stand.ports(), &caller, &policy, call("POST")).await {
            Err(e) => e,
            Ok(_) => panic!("sent without its credential"),
        };
        assert_eq!(e.code(), "unavailable");
        assert!(e.message().contains("env:MISSING"), "names the reference: {e:?}");
        let failed = Ports { audit: &FailedAudit, ..stand.ports() };
        let e = match proxy.send(failed, &caller, &policy, call("GET")).await {
            Err(e) => e,
            Ok(_) => panic!("sent without an audit trail"),
        };
        assert!(e.message().contains("audit log is unavailable (disk full)"), "{e:?}");
    }));
    assert!(stand.events().is_empty(), "nothing recorded: nothing was sent");
}

/// A second durable-state backend, in memory: the features (certificate registry, task store)
/// run on it unchanged, which is what a replicated backend (ADR 0009) relies on.
#[derive(Default)]
struct MemoryLogs(Rc<RefCell<std::collections::BTreeMap<String, Vec<Vec<u8>>>>>);

struct MemoryLog {
    logs: Rc<RefCell<std::collections::BTreeMap<String, Vec<Vec<u8>>>>>,
    name: String,
}

impl Store for MemoryLog {
    fn append(&self, payload: &[u8]) -> Result<Durable, Error> {
        self.logs.borrow_mut().entry(self.name.clone()).or_default().push(payload.to_vec());
        Ok(Durable::settled(Ok(())))
    }
}

impl Backend for MemoryLogs {
    fn replay<'a>(&'a self, name: &'a str) -> Local<'a, Result<Replayed, Error>> {
        let records = self.0.borrow().get(name).cloned().unwrap_or_default();
        Box::pin(async move { Ok(Replayed { records, torn_bytes: 0 }) })
    }

    fn open<'a>(&'a self, name: &'a str, compacted: Option<Vec<Vec<u8>>>) -> Local<'a, Result<Rc<dyn Store>, Error>> {
        if let Some(c) = compacted {
            self.0.borrow_mut().insert(name.to_owned(), c);
        }
        let log = MemoryLog { logs: self.0.clone(), name: name.to_owned() };
        Box::pin(async move { Ok(Rc::new(log) as Rc<dyn Store>) })
    }
}

#[test]
fn durable_state_runs_on_another_backend_unchanged() {
    let logs = MemoryLogs::default();
    let cert = |serial, valid_before| Issued {
        serial,
        key_id: format!("k{serial}"),
        agent: "alice".into(),
        task: None,
        lineage: vec![],
        target: "web".into(),
        role: "read".into(),
        principal: "reader".into(),
        valid_after: 0,
        valid_before,
        session: None,
    };
    ephyr::broker::reactor::block_on(async {
        let (r, _) = Registry::load(&logs, 10).await.unwrap();
        let (held, d) = r.hold(cert(1, 100)).unwrap();
        d.unwrap().wait().await.unwrap();
        drop(held);
        r.add(cert(2, 20)).unwrap().unwrap().wait().await.unwrap();
        assert!(r.revoke(1, 15).await.unwrap());
        assert!(!r.revoke(9, 15).await.unwrap(), "no such certificate");
    });
    assert_eq!(logs.0.borrow()["certs"].len(), 3, "two issued, one revoked");
    // A restart on the same backend: the revocation survived, the expired certificate is gone
    // and the log was compacted to what is live.
    let (r, _) = ephyr::broker::reactor::block_on(Registry::load(&logs, 50)).unwrap();
    let listed = r.list(50, |_| true);
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].cert.serial, listed[0].revoked_at), (1, Some(15)));
    assert_eq!(logs.0.borrow()["certs"].len(), 2);
    // The task store opens its own log there too.
    let (tasks, loaded) = ephyr::broker::reactor::block_on(ephyr::broker::tasks::TaskStore::load(
        &logs,
        ephyr::time::now(),
        |_c: String, _s: Vec<u8>| async { Err::<ephyr::macaroon::RootKey, String>("unused".into()) },
    ))
    .unwrap();
    assert_eq!((loaded.tasks, tasks.len()), (0, 0));
    assert!(logs.0.borrow().contains_key("tasks"), "compacted into its own log");
}
