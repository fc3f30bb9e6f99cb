//! `ephyr doctor`: checks files, keys, the policy, a real signer's sandbox, and a running broker.
//!
//! What runs here: `stat`/reads of the data dir, a self-check signer (fork+exec of
//! `ephyr __signer --self-check`, which enters the real sandbox and forks probe children that try
//! to escape it), and one request to the local socket if a broker is running. Prints a table (or
//! JSON); exits non-zero if anything failed.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::broker::datadir::DataDir;
use crate::broker::policy;
use crate::broker::privileges;
use crate::broker::signer_client::{self, Launch};
use crate::signer::keys::CaKey;
use crate::signer::protocol::KeyPaths;
use crate::signer::protocol::{ProbeLayer, SeccompState};
use crate::signer::{SignerConfig, TargetIds};

/// Options of `ephyr doctor`.
#[derive(Debug, Default)]
pub struct DoctorOptions {
    /// Data dir.
    pub data_dir: PathBuf,
    /// Policy file.
    pub config: PathBuf,
    /// Local socket of a running broker.
    pub socket: PathBuf,
    /// JSON output.
    pub json: bool,
    /// Broker account (when root).
    pub broker_user: Option<String>,
    /// Signer account (when root).
    pub signer_user: Option<String>,
    /// Checking before the broker's first start: no running broker is not a problem.
    pub offline: bool,
}

/// Result of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth attention.
    Warn,
    /// A problem: doctor exits non-zero.
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    check: String,
    status: Status,
    detail: String,
}

struct Report(Vec<Check>);

impl Report {
    fn add(&mut self, check: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.0.push(Check { check: check.into(), status, detail: detail.into() });
    }
}

fn mode_owner(path: &Path) -> Option<(u32, u32)> {
    fs::metadata(path).ok().map(|m| (m.mode() & 0o7777, m.uid()))
}

fn check_dir(r: &mut Report, name: &str, path: &Path, want_owner: Option<u32>) {
    match mode_owner(path) {
        None => r.add(name, Status::Fail, format!("{} is missing (run `ephyr init`)", path.display())),
        Some((mode, uid)) => {
            let mut status = Status::Ok;
            let mut notes = vec![format!("{mode:04o} uid {uid}")];
            if mode & 0o002 != 0 {
                status = Status::Fail;
                notes.push("world-writable".into());
            } else if mode & 0o077 != 0 && name != "data dir" {
                status = Status::Fail;
                notes.push("must be 0700".into());
            }
            if let Some(w) = want_owner
                && uid != w
            {
                status = Status::Fail;
                notes.push(format!("should be owned by uid {w}"));
            }
            r.add(name, status, notes.join(", "));
        }
    }
}

fn check_secret_file(r: &mut Report, name: &str, path: &Path, want_owner: u32) {
    match mode_owner(path) {
        None => r.add(name, Status::Fail, format!("{} is missing (run `ephyr init`)", path.display())),
        Some((mode, uid)) => {
            if mode & 0o077 != 0 {
                r.add(
                    name,
                    Status::Fail,
                    format!(
                        "permissions {mode:04o}: must be 0600 (readable by the signer only): chmod 600 {}",
                        path.display()
                    ),
                );
            } else if uid != want_owner {
                r.add(name, Status::Fail, format!("owned by uid {uid}, expected uid {want_owner}"));
            } else {
                r.add(name, Status::Ok, format!("{mode:04o} uid {uid}"));
            }
        }
    }
}

/// Each target: can a TCP connection be made (2 s, all targets at once), and is its host key
/// pinned. Warnings only: a host may be down for a reason.
fn check_targets(r: &mut Report, p: &policy::Policy) {
    let probes: Vec<_> = p
        .targets
        .iter()
        .filter(|(_, t)| t.enabled)
        .map(|(name, t)| {
            let (name, host, port, pinned) = (name.clone(), t.host.clone(), t.port, t.host_key.is_set());
            std::thread::spawn(move || {
                use std::net::ToSocketAddrs as _;
                let reached = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| e.to_string())
                    .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
                    .and_then(|a| {
                        std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2))
                            .map_err(|e| e.to_string())
                    });
                (name, host, port, pinned, reached.map(drop))
            })
        })
        .collect();
    for h in probes {
        let Ok((name, host, port, pinned, reached)) = h.join() else { continue };
        let check = format!("target {name}");
        match (reached, pinned) {
            (Err(e), _) => r.add(check, Status::Warn, format!("{host}:{port} not reachable: {e}")),
            (Ok(()), true) => r.add(check, Status::Ok, format!("{host}:{port} reachable, host key pinned")),
            (Ok(()), false) => r.add(
                check,
                Status::Warn,
                format!("{host}:{port} reachable, host key NOT pinned: `ephyr target scan {host}:{port}` prints the line to pin"),
            ),
        }
    }
}

/// Each `store:` secret the policy uses is set (its sealed file exists).
fn check_store_secrets(r: &mut Report, p: &policy::Policy, dir: &Path) {
    for (name, users) in p.store_refs() {
        let check = format!("secret store:{name}");
        if crate::broker::secrets::sealed_path(dir, &name).exists() {
            r.add(check, Status::Ok, format!("set (used by {})", users.join(", ")));
        } else if fs::read_dir(dir).is_err() && !crate::broker::privileges::is_root() {
            r.add(check, Status::Warn, format!("cannot read {} as this user", dir.display()));
        } else {
            r.add(
                check,
                Status::Fail,
                format!(
                    "not set: requests to {} will fail; run `ephyr secret set {name}` (the value on stdin)",
                    users.join(", ")
                ),
            );
        }
    }
}

/// The audit trail's hash chain and signed checkpoints (as `ephyr audit verify`, without a
/// running broker's head).
/// The listeners' local CA, when the broker made one: its fingerprint (what clients trust).
fn check_tls(r: &mut Report, dir: &Path) {
    let ca = dir.join("ca.pem");
    if !ca.exists() {
        r.add("TLS", Status::Ok, "no local CA (loopback listeners, or a given --tls-cert)");
        return;
    }
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    match CertificateDer::from_pem_file(&ca) {
        Ok(c) => r.add(
            "TLS local CA",
            Status::Ok,
            format!(
                "{} {} (clients trust this file: docs/console.md, \"TLS\")",
                ca.display(),
                crate::broker::tls::fingerprint(&c)
            ),
        ),
        Err(e) => r.add("TLS local CA", Status::Fail, format!("{}: {e}", ca.display())),
    }
}

fn check_audit_chain(r: &mut Report, dir: &Path, keys: &KeyPaths) {
    let paths = match crate::broker::audit::log_files(dir) {
        Ok(p) if p.is_empty() => return r.add("audit chain", Status::Ok, "no audit lines yet"),
        Ok(p) => p,
        Err(e) => return r.add("audit chain", Status::Warn, format!("cannot list {}: {e}", dir.display())),
    };
    let mut files = Vec::new();
    for p in &paths {
        match fs::read(p) {
            Ok(b) => files.push((p.display().to_string(), b)),
            Err(e) => return r.add("audit chain", Status::Warn, format!("cannot read {}: {e}", p.display())),
        }
    }
    let key = fs::read_to_string(keys.checkpoint_pub())
        .ok()
        .and_then(|t| data_encoding::BASE64.decode(t.trim().as_bytes()).ok());
    let witnesses: Vec<_> = crate::broker::audit::read_head(dir).into_iter().collect();
    let rep = crate::broker::audit::verify::verify(&files, key.as_deref(), &witnesses);
    if rep.ok() {
        r.add(
            "audit chain",
            Status::Ok,
            format!("{} line(s), {} signed checkpoint(s), chain intact", rep.lines, rep.checkpoints),
        );
    } else {
        let first = rep.errors.first().map(|f| f.to_string()).unwrap_or_default();
        r.add(
            "audit chain",
            Status::Fail,
            format!("{} problem(s), first: {first} (run `ephyr audit verify` for all)", rep.errors.len()),
        );
    }
}

/// Runs all checks and prints them. Returns whether nothing failed.
pub fn run(o: &DoctorOptions) -> Result<bool, String> {
    let mut r = Report(Vec::new());
    let root = privileges::is_root();
    let me = crate::os::user_ids().1;
    let ids = if root {
        privileges::resolve_identities(o.broker_user.as_deref(), o.signer_user.as_deref()).ok()
    } else {
        None
    };
    let data = DataDir::at(&o.data_dir);
    let keys = KeyPaths::new(&data.root);

    check_dir(&mut r, "data dir", &data.root, None);
    check_dir(&mut r, "keys dir", &keys.dir, Some(me));
    check_secret_file(&mut r, "CA key", &keys.ca_key(), me);
    check_secret_file(&mut r, "sealing key", &keys.sealing_key(), me);
    let ca_ok = match fs::read(keys.ca_key()) {
        Ok(text) => match CaKey::parse_openssh(&text, &keys.ca_key()) {
            Ok(ca) => {
                let line = ca.public_line();
                let fp = ssh_key::PublicKey::from_openssh(&line)
                    .map(|k| k.fingerprint(ssh_key::HashAlg::Sha256).to_string())
                    .unwrap_or_default();
                r.add("CA key type", Status::Ok, format!("ssh-ed25519 {fp}"));
                match fs::read_to_string(keys.ca_pub()) {
                    Ok(p) if p == format!("{line}\n") => {
                        r.add("CA public key file", Status::Ok, "matches the private key")
                    }
                    Ok(_) => r.add(
                        "CA public key file",
                        Status::Fail,
                        "does not match the private key (run `ephyr init` to rewrite it)",
                    ),
                    Err(e) => r.add("CA public key file", Status::Fail, e.to_string()),
                }
                true
            }
            Err(e) => {
                r.add("CA key type", Status::Fail, e.to_string());
                false
            }
        },
        Err(e) => {
            r.add("CA key type", Status::Warn, format!("cannot read the CA key as uid {me}: {e}"));
            false
        }
    };
    let broker_uid = ids.as_ref().map(|i| i.broker.uid).unwrap_or(me);
    check_dir(&mut r, "state dir", &data.state(), Some(broker_uid));
    check_dir(&mut r, "audit dir", &data.audit(), Some(broker_uid));

    let policy = match policy::load_file(&o.config) {
        Ok(p) => {
            r.add("policy", Status::Ok, format!("{}: {} target(s)", o.config.display(), p.targets.len()));
            for w in &p.warnings {
                r.add("policy warning", Status::Warn, w.clone());
            }
            Some(p)
        }
        Err(e) => {
            r.add("policy", Status::Fail, e.to_string());
            None
        }
    };
    if let Some(p) = &policy {
        check_targets(&mut r, p);
        check_store_secrets(&mut r, p, &data.state().join("secrets"));
    }
    check_audit_chain(&mut r, &data.audit(), &keys);
    check_tls(&mut r, &data.root.join("tls"));

    // A real signer in self-check mode: same code, same sandbox, plus escape probes.
    let cfg = SignerConfig {
        max_cert_ttl_secs: policy.as_ref().map_or(3600, |p| p.limits.cert_ttl_max.as_secs() as u32),
        principals: policy.as_ref().map(|p| p.signer_principals()).unwrap_or_default(),
        rate_limit: 1,
        rate_window_secs: 60,
        sealed: policy.as_ref().map(crate::broker::signer_client::sealed_targets).unwrap_or_default(),
    };
    let launch = Launch::new(
        ca_ok.then(|| data.root.clone()),
        false,
        ids.as_ref().map(|i| TargetIds { uid: i.signer.uid, gid: i.signer.gid }),
        &cfg,
        false,
    );
    match crate::broker::reactor::block_on(signer_client::self_check(&launch)) {
        Ok((status, probes)) => {
            let s = &status.sandbox;
            let layers = format!(
                "uid {} gid {}, caps {}, no_new_privs {}, dumpable {}, landlock ABI {} {:?}, seccomp {:?}",
                s.uid,
                s.gid,
                if s.caps_cleared { "cleared" } else { "NOT cleared" },
                s.no_new_privs,
                s.dumpable,
                s.landlock_abi,
                s.landlock,
                s.seccomp
            );
            if s.enforced {
                r.add("signer sandbox", Status::Ok, layers);
            } else {
                r.add("signer sandbox", Status::Fail, format!("{layers}; problems: {}", s.problems.join("; ")));
            }
            if !root {
                r.add(
                    "privilege separation",
                    Status::Warn,
                    "not root: broker and signer share a uid (start as root for separation)",
                );
            }
            for p in probes {
                let name = format!("escape {} ({})", p.kind.as_str(), p.layer.as_str());
                let status = match (p.outcome.blocked(), p.layer) {
                    (true, _) => Status::Ok,
                    (false, ProbeLayer::Worker) => Status::Fail,
                    // Landlock alone does not cover everything on older ABIs; seccomp does.
                    (false, ProbeLayer::Landlock) if s.seccomp == SeccompState::Enforced => Status::Warn,
                    (false, ProbeLayer::Landlock) => Status::Fail,
                };
                r.add(name, status, p.outcome.describe());
            }
        }
        Err(e) => r.add("signer sandbox", Status::Fail, e.to_string()),
    }

    match super::client::request(&o.socket, http::Method::GET, "/v1/status", None) {
        Ok((code, v)) if code.is_success() => {
            let available = v["signer"]["available"].as_bool().unwrap_or(false);
            let restarts = v["signer"]["restarts"].as_u64().unwrap_or(0);
            let enforced = v["signer"]["sandbox"]["enforced"].as_bool().unwrap_or(false);
            let status = if available && enforced { Status::Ok } else { Status::Fail };
            r.add(
                "running broker",
                status,
                format!(
                    "pid {} uid {}, signer {} (restarts {restarts}, sandbox {})",
                    v["pid"],
                    v["uid"],
                    if available { "available" } else { "UNAVAILABLE" },
                    if enforced { "enforced" } else { "NOT enforced" }
                ),
            );
        }
        Ok((code, v)) => r.add("running broker", Status::Warn, format!("{code}: {}", v["message"])),
        Err(_) if o.offline => {
            r.add("running broker", Status::Ok, format!("not running (no answer on {}; --offline)", o.socket.display()))
        }
        Err(e) => r.add(
            "running broker",
            Status::Fail,
            format!(
                "{e}: start it (`systemctl start ephyr` or `ephyr serve`), or pass --socket if it listens elsewhere, or --offline before its first start"
            ),
        ),
    }

    let healthy = r.0.iter().all(|c| c.status != Status::Fail);
    if o.json {
        println!("{}", serde_json::json!({ "healthy": healthy, "checks": r.0 }));
    } else {
        let w = r.0.iter().map(|c| c.check.len()).max().unwrap_or(10).max(5);
        println!("{:<w$}  {:<6}  DETAIL", "CHECK", "STATUS");
        for c in &r.0 {
            let s = match c.status {
                Status::Ok => "ok",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("{:<w$}  {:<6}  {}", c.check, s, c.detail);
        }
        println!("\n{}", if healthy { "No problems found." } else { "Problems found (FAIL above)." });
    }
    Ok(healthy)
}
