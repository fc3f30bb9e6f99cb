//! `ephyr demo`: the whole product on the machine it runs on, safely, in about ten seconds.
//!
//! What runs here: the CLI process drives everything. It starts two children under one private
//! temp dir: a throwaway OpenSSH `sshd` on loopback (its own config and host key, trusting only
//! the demo's CA; never the system sshd) and `ephyr serve` with a generated policy. Every step
//! then talks to the broker's real MCP endpoint over HTTP, as an agent would, and says what
//! happened and why. Run as a normal user, commands run as that user; run as root, they run as a
//! throwaway account `ephyr-demo` (no password, home in the temp dir) that is removed at the end.
//!
//! Cleanup (children stopped, the account removed, the dir deleted) lives in [`Lab`]'s `Drop`,
//! and also runs on Ctrl-C or SIGTERM (a thread waits for the signal).

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use data_encoding::{BASE64URL_NOPAD, HEXLOWER};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{Value, json};

use super::client;

/// Options of `ephyr demo`.
#[derive(Debug, Default)]
pub struct DemoOptions {
    /// Wait for Enter between steps.
    pub step: bool,
    /// One JSON object per step instead of the narration.
    pub json: bool,
    /// After the walkthrough, keep the lab up for your own MCP client until Ctrl-C.
    pub keep: bool,
}

/// The account commands run as when the demo runs as root.
pub const DEMO_ACCOUNT: &str = "ephyr-demo";
const SSHD: &str = "/usr/sbin/sshd";
const PROTOCOL: &str = "2026-07-28";

/// What must be undone; idempotent, shared with the signal thread.
#[derive(Default)]
struct Cleanup {
    children: Vec<Child>,
    account: Option<String>,
    dir: Option<PathBuf>,
}

impl Cleanup {
    fn run(&mut self) {
        for c in &mut self.children {
            let _ = crate::os::kill(c.id() as i32, SIGTERM);
        }
        for mut c in self.children.drain(..) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(a) = self.account.take() {
            // Whatever still runs as the throwaway account (a command the broker started over
            // a connection that sshd's exit did not end yet) goes first.
            if let Some(acct) = crate::users::lookup(&a) {
                kill_processes_of(acct.uid);
            }
            // sshd's session processes may outlive the listener by a moment; userdel refuses a
            // user with processes, so retry briefly, then force.
            let del = |force: bool| {
                let mut c = Command::new("userdel");
                if force {
                    c.arg("--force");
                }
                c.arg(&a).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
            };
            let deadline = Instant::now() + Duration::from_secs(3);
            while !del(false) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if crate::users::lookup(&a).is_some() {
                del(true);
            }
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

const SIGTERM: i32 = 15;

/// Set by the signal thread when Ctrl-C or SIGTERM arrives: the main thread's steps fail from
/// then on (their peers are being stopped), and it must leave the exit to the signal thread.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Waits for the signal thread to finish the cleanup and exit, if a signal is being handled.
fn yield_to_signal() {
    if STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}
const SIGKILL: i32 = 9;

/// SIGKILL to every process whose real uid is `uid` (the throwaway account's leftovers).
fn kill_processes_of(uid: u32) {
    let Ok(dir) = std::fs::read_dir("/proc") else { return };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok());
        if real == Some(uid) {
            let _ = crate::os::kill(pid, SIGKILL);
        }
    }
}

/// The running demo: its dir, ports, credentials.
struct Lab {
    dir: PathBuf,
    data: PathBuf,
    socket: PathBuf,
    mcp: String,
    api_key: String,
    account: String,
}

/// Runs the cleanup when dropped: on every way out of [`run`], errors and panics included.
struct CleanupGuard(Arc<Mutex<Cleanup>>);

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        c.run();
    }
}

/// One step's outcome.
struct Outcome {
    ok: bool,
    detail: Value,
    text: String,
}

/// Output: narration or JSON lines.
struct Say {
    json: bool,
    step: bool,
    n: u32,
}

impl Say {
    fn title(&mut self, title: &str) {
        self.n += 1;
        if !self.json {
            println!("\n\x1b[1m{}. {title}\x1b[0m", self.n);
        }
    }

    fn line(&self, text: &str) {
        if !self.json {
            for l in text.lines() {
                println!("   {l}");
            }
        }
    }

    fn done(&self, name: &str, o: &Outcome) {
        if self.json {
            println!("{}", json!({ "step": self.n, "name": name, "ok": o.ok, "detail": o.detail }));
        } else {
            self.line(&o.text);
            println!("   {}", if o.ok { "\x1b[32m✓ as expected\x1b[0m" } else { "\x1b[31m✗ not as expected\x1b[0m" });
        }
        let _ = std::io::stdout().flush();
        if self.step && !self.json {
            print!("   [Enter for the next step] ");
            let _ = std::io::stdout().flush();
            let _ = std::io::stdin().lock().read_line(&mut String::new());
        }
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
        .unwrap_or(None)
        .or_else(|| ["/usr/bin", "/usr/sbin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file()))
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free loopback port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn run_quiet(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The account commands run as, created when running as root.
fn account(cleanup: &Arc<Mutex<Cleanup>>, dir: &Path) -> Result<String, String> {
    let (uid, _, _) = crate::os::user_ids();
    if uid != 0 {
        return crate::users::name_of(uid)
            .ok_or_else(|| format!("uid {uid} has no passwd entry: the demo's sshd needs a named account"));
    }
    let home = dir.join("home");
    // An account left by a demo that was killed (SIGKILL, power loss) is reused and removed at
    // the end; an `ephyr-demo` account that is not the demo's is never touched.
    if let Some(home_of) = home_of(DEMO_ACCOUNT) {
        if !home_of.starts_with(&std::env::temp_dir().join("ephyr-demo-").to_string_lossy().into_owned()) {
            return Err(format!(
                "an account {DEMO_ACCOUNT:?} exists that the demo did not make (home {home_of}); run the demo as a normal user instead"
            ));
        }
        run_quiet(
            Command::new("usermod").args(["--home", home.to_str().ok_or("temp dir is not UTF-8")?, DEMO_ACCOUNT]),
            "usermod",
        )?;
        cleanup.lock().map_err(|_| "cleanup lock")?.account = Some(DEMO_ACCOUNT.to_owned());
    } else {
        let home_s = home.to_str().ok_or("temp dir is not UTF-8")?;
        run_quiet(
            Command::new("useradd")
                .args(["--system", "--no-create-home", "--home-dir", home_s, "--shell", "/bin/sh"])
                .arg(DEMO_ACCOUNT),
            "useradd (creating the throwaway account ephyr-demo)",
        )?;
        cleanup.lock().map_err(|_| "cleanup lock")?.account = Some(DEMO_ACCOUNT.to_owned());
    }
    // '*': no password, but not locked (sshd without PAM refuses locked accounts).
    run_quiet(Command::new("usermod").args(["-p", "*", DEMO_ACCOUNT]), "usermod")?;
    let a = crate::users::lookup(DEMO_ACCOUNT).ok_or("the ephyr-demo account vanished")?;
    std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
    std::os::unix::fs::chown(&home, Some(a.uid), Some(a.gid)).map_err(|e| format!("{}: {e}", home.display()))?;
    Ok(DEMO_ACCOUNT.to_owned())
}

/// The home directory of `name` in /etc/passwd.
fn home_of(name: &str) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[0] == name).then(|| f[5].to_owned())
    })
}

fn policy_text(account: &str, port: u16, fingerprint: &str, key_hash: &str) -> String {
    format!(
        r#"# Generated by `ephyr demo`: one sshd on loopback, reached as two targets (127.0.0.1, 127.0.0.2).
version: 1
roles:
  shell: {{ principal: {account} }}
targets:
  lab:   {{ host: 127.0.0.1, port: {port}, allowed_roles: [shell], host_key_fingerprint: "{fingerprint}" }}
  vault: {{ host: 127.0.0.2, port: {port}, allowed_roles: [shell], host_key_fingerprint: "{fingerprint}" }}
agents:
  demo:
    api_key_hash: "{key_hash}"
    ssh:
      "*": {{ roles: [shell] }}
    can_delegate: true
"#
    )
}

/// Starts sshd and the broker; everything under a fresh temp dir.
fn start(say: &Say, cleanup: Arc<Mutex<Cleanup>>) -> Result<Lab, String> {
    if !Path::new(SSHD).is_file() {
        return Err(format!(
            "{SSHD} is not installed. The demo runs its own OpenSSH server on loopback (it never touches the system's); install it with `apt install openssh-server` (on Debian the service can stay disabled: `systemctl disable --now ssh`)"
        ));
    }
    let keygen = find_in_path("ssh-keygen").ok_or("ssh-keygen is not installed (apt install openssh-client)")?;
    let mut suffix = [0u8; 6];
    crate::secret::random_bytes(&mut suffix).map_err(|e| format!("no randomness: {e}"))?;
    let dir = std::env::temp_dir().join(format!("ephyr-demo-{}", HEXLOWER.encode(&suffix)));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    cleanup.lock().map_err(|_| "cleanup lock")?.dir = Some(dir.clone());
    // Reachable by the broker's own account when it drops privileges; nothing secret lies here
    // but the data dir (which `init` makes 0700) and the sshd dir (0700 below).
    set_mode(&dir, 0o755)?;
    let account = account(&cleanup, &dir)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the ephyr binary: {e}"))?;

    // Keys: the broker's CA (init), sshd's host key.
    let data = dir.join("data");
    run_quiet(
        Command::new(&exe).arg("init").arg("--data-dir").arg(&data).arg("--config-dir").arg(dir.join("etc")),
        "ephyr init",
    )?;
    let ca = std::fs::read_to_string(data.join("keys/ca_key.pub")).map_err(|e| format!("the CA public key: {e}"))?;
    let sshd_dir = dir.join("sshd");
    std::fs::create_dir(&sshd_dir).map_err(|e| e.to_string())?;
    set_mode(&sshd_dir, 0o700)?;
    let host_key = sshd_dir.join("host_ed25519");
    run_quiet(Command::new(&keygen).args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&host_key), "ssh-keygen")?;
    let host_pub = std::fs::read_to_string(sshd_dir.join("host_ed25519.pub")).map_err(|e| e.to_string())?;
    let fingerprint = crate::broker::ssh::client::parse_public_key(host_pub.trim())
        .map_err(|e| format!("host key: {e}"))?
        .fingerprint(russh::keys::HashAlg::Sha256)
        .to_string();
    std::fs::write(sshd_dir.join("ca.pub"), &ca).map_err(|e| e.to_string())?;

    // sshd: loopback only, certificates from the demo CA only.
    let ssh_port = free_port()?;
    let root = crate::os::user_ids().0 == 0;
    if root {
        std::fs::create_dir_all("/run/sshd").map_err(|e| format!("/run/sshd: {e}"))?;
    }
    let config = format!(
        "Port {ssh_port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {hk}\nPidFile {pid}\nTrustedUserCAKeys {ca}\nAuthorizedKeysFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin no\nLogLevel VERBOSE\n",
        hk = host_key.display(),
        pid = sshd_dir.join("sshd.pid").display(),
        ca = sshd_dir.join("ca.pub").display(),
    );
    std::fs::write(sshd_dir.join("sshd_config"), config).map_err(|e| e.to_string())?;
    let sshd_log = dir.join("sshd.log");
    let sshd = Command::new(SSHD)
        .args(["-D", "-e", "-f"])
        .arg(sshd_dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&sshd_log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("starting {SSHD}: {e}"))?;
    cleanup.lock().map_err(|_| "cleanup lock")?.children.push(sshd);

    // The broker, with a policy for this sshd and a fresh agent key.
    let (key, _) = crate::broker::auth::api_key::generate()?;
    let hash = crate::broker::auth::api_key::fast_hash(key.expose()).ok_or("a fresh key has no fast hash")?;
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, policy_text(&account, ssh_port, &fingerprint, &hash)).map_err(|e| e.to_string())?;
    set_mode(&policy, 0o644)?;
    let socket = dir.join("ephyr.sock");
    let broker_log = dir.join("broker.log");
    let log = std::fs::File::create(&broker_log).map_err(|e| e.to_string())?;
    let broker = Command::new(&exe)
        .arg("serve")
        .arg("--config")
        .arg(&policy)
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--dashboard-listen", "127.0.0.1:0", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting ephyr serve: {e}"))?;
    cleanup.lock().map_err(|_| "cleanup lock")?.children.push(broker);

    // Ready: sshd accepts, the broker's signer has a worker.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", ssh_port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("sshd did not start; its log:\n{}", tail(&sshd_log)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let listen = loop {
        if let Ok((s, v)) = client::request(&socket, http::Method::GET, "/v1/status", None)
            && s.is_success()
            && v["signer"]["available"].as_bool() == Some(true)
        {
            break v["listen"].as_str().unwrap_or_default().to_owned();
        }
        let exited =
            cleanup.lock().map_err(|_| "cleanup lock")?.children.iter_mut().any(|c| !matches!(c.try_wait(), Ok(None)));
        if exited || Instant::now() > deadline {
            return Err(format!(
                "the broker or sshd did not start; the broker's log:\n{}\nsshd's log:\n{}",
                tail(&broker_log),
                tail(&sshd_log)
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    say.line(&format!(
        "Everything lives in {} and is removed at the end (also on Ctrl-C).\n\
         sshd (throwaway, loopback):  127.0.0.1:{ssh_port}, trusts only this demo's CA, host key {fingerprint}\n\
         ephyr broker:                http://{listen}/mcp, policy {}\n\
         commands run as:             {account}{}",
        dir.display(),
        policy.display(),
        if root { " (a throwaway account, removed at the end)" } else { " (you)" }
    ));
    Ok(Lab {
        mcp: format!("http://{listen}/mcp"),
        dir: dir.clone(),
        data,
        socket,
        api_key: key.expose().to_owned(),
        account,
    })
}

/// An agent's MCP request: JSON-RPC over Streamable HTTP (stateless protocol era), with an
/// `Ephyr-PoP` proof when a holder key is given. Returns (HTTP status, JSON body).
fn mcp(
    lab: &Lab,
    bearer: &str,
    method: &str,
    params: Value,
    holder: Option<&Ed25519KeyPair>,
) -> Result<(u16, Value), String> {
    let name = params.get("name").and_then(Value::as_str).unwrap_or("-").to_owned();
    let mut params = params;
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": { "name": "ephyr-demo", "version": env!("CARGO_PKG_VERSION") },
    });
    let body = serde_json::to_vec(&json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }))
        .map_err(|e| e.to_string())?;
    let auth = format!("Bearer {bearer}");
    let mut headers: Vec<(&str, String)> = vec![
        ("authorization", auth),
        ("content-type", "application/json".into()),
        ("accept", "application/json, text/event-stream".into()),
        ("mcp-protocol-version", PROTOCOL.into()),
        ("mcp-method", method.into()),
    ];
    if method == "tools/call" {
        headers.push(("mcp-name", name.clone()));
    }
    if let Some(k) = holder {
        headers.push(("ephyr-pop", pop_header(k, &lab.mcp, method, &name, &body, bearer)?));
    }
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, bytes) = client::post_tcp(&lab.mcp, &h, body)?;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&bytes) }));
    Ok((status.as_u16(), v))
}

/// The ephyr proof-of-possession header (docs/pop.md).
fn pop_header(
    k: &Ed25519KeyPair,
    url: &str,
    method: &str,
    tool: &str,
    body: &[u8],
    token: &str,
) -> Result<String, String> {
    let sha = |b: &[u8]| HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
    let target = url.trim_start_matches("http://");
    let ts = crate::time::now().secs();
    let mut n = [0u8; 16];
    crate::secret::random_bytes(&mut n).map_err(|e| format!("no randomness: {e}"))?;
    let nonce = BASE64URL_NOPAD.encode(&n);
    let text =
        ["ephyr-pop-v1", "POST", target, method, tool, &sha(body), &sha(token.as_bytes()), &ts.to_string(), &nonce]
            .join("\n");
    let sig = BASE64URL_NOPAD.encode(k.sign(text.as_bytes()).as_ref());
    Ok(format!("ts={ts}; nonce={nonce}; sig={sig}"))
}

/// A tool call's result: (is_error, the text, the parsed JSON if the text is JSON).
fn call(
    lab: &Lab,
    bearer: &str,
    tool: &str,
    args: Value,
    holder: Option<&Ed25519KeyPair>,
) -> Result<(bool, String, Value), String> {
    let (status, v) = mcp(lab, bearer, "tools/call", json!({ "name": tool, "arguments": args }), holder)?;
    if status != 200 {
        let msg = v["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
        return Ok((true, format!("HTTP {status}: {msg}"), v));
    }
    if let Some(e) = v.get("error") {
        return Ok((true, e["message"].as_str().unwrap_or("error").to_owned(), v));
    }
    let text = v["result"]["content"][0]["text"].as_str().unwrap_or_default().to_owned();
    let parsed = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok((v["result"]["isError"].as_bool().unwrap_or(false), text, parsed))
}

fn holder_key() -> Result<(Ed25519KeyPair, String), String> {
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    crate::secret::random_bytes(seed.as_mut()).map_err(|e| format!("no randomness: {e}"))?;
    let k = Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).map_err(|_| "bad seed")?;
    let public = BASE64URL_NOPAD.encode(k.public_key().as_ref());
    Ok((k, public))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The walkthrough; every step's outcome is checked, and the first unexpected one stops it.
fn walk(lab: &Lab, say: &mut Say) -> Result<(), String> {
    let key = lab.api_key.clone();
    let step = |say: &mut Say, name: &str, title: &str, f: &mut dyn FnMut() -> Result<Outcome, String>| {
        say.title(title);
        let o = f()?;
        say.done(name, &o);
        if o.ok { Ok(()) } else { Err(format!("step {} ({name}) did not go as expected: {}", say.n, o.text)) }
    };

    step(say, "tools_list", "An agent connects and lists its tools", &mut || {
        let (status, v) = mcp(lab, &key, "tools/list", json!({}), None)?;
        let names: Vec<&str> = v["result"]["tools"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t["name"].as_str()).collect())
            .unwrap_or_default();
        Ok(Outcome {
            ok: status == 200 && names.contains(&"exec"),
            text: format!(
                "MCP tools/list with the agent's API key: {} tools\n  {}\nThe list is what this agent's policy allows, nothing more.",
                names.len(),
                names.join(", ")
            ),
            detail: json!({ "status": status, "tools": names }),
        })
    })?;

    step(say, "exec", "It runs a command on a target", &mut || {
        let (err, text, r) =
            call(lab, &key, "exec", json!({ "target": "lab", "role": "shell", "command": "id -un; uname -sr" }), None)?;
        let out = r["stdout"].as_str().unwrap_or_default().to_owned();
        Ok(Outcome {
            ok: !err && r["exit_code"] == 0 && out.starts_with(&lab.account),
            text: format!(
                "exec lab/shell `id -un; uname -sr` → exit {}\n{}\nFor this one command the broker made a fresh Ed25519 key, had the sandboxed signer certify it\nfor principal {:?} for about a minute (serial {}), used it, and forgot the key.",
                r["exit_code"],
                out.trim_end().lines().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n"),
                lab.account,
                r["cert_serial"].as_str().unwrap_or("?")
            ),
            detail: json!({ "is_error": err, "exit_code": r["exit_code"], "stdout": out, "text": if err { text } else { String::new() } }),
        })
    })?;

    step(say, "session", "A session keeps one certificate and connection for several commands", &mut || {
        let (err, text, r) = call(lab, &key, "session_create", json!({ "target": "lab", "role": "shell" }), None)?;
        if err {
            return Ok(Outcome { ok: false, text, detail: json!({ "session_create": false }) });
        }
        let id = r["session_id"].as_str().unwrap_or_default().to_owned();
        let mut outs = Vec::new();
        for c in ["echo first", "echo second"] {
            let (e, t, r) = call(lab, &key, "exec", json!({ "session_id": id, "command": c }), None)?;
            outs.push((e, if e { t } else { r["stdout"].as_str().unwrap_or_default().trim().to_owned() }));
        }
        let (closed_err, _, _) = call(lab, &key, "session_close", json!({ "session_id": id }), None)?;
        let ok = outs.iter().all(|(e, _)| !e) && outs[1].1 == "second" && !closed_err;
        Ok(Outcome {
            ok,
            text: format!(
                "session_create → {id}; two commands on it: {:?}, {:?}; session_close.\nSessions are closed when idle, when their task is revoked, or when policy stops allowing them.",
                outs[0].1, outs[1].1
            ),
            detail: json!({ "session_id": id, "outputs": outs.iter().map(|o| o.1.clone()).collect::<Vec<_>>(), "closed": !closed_err }),
        })
    })?;

    let (holder, holder_pub) = holder_key()?;
    let mut root_token = String::new();
    let mut root_id = String::new();
    step(
        say,
        "task_create",
        "The agent starts a task: a token narrower than its policy, bound to its key",
        &mut || {
            let (err, text, r) = call(
                lab,
                &key,
                "task_create",
                json!({ "description": "demo: look around lab and vault", "ttl": "10m", "can_delegate": true,
                    "envelope": { "targets": ["lab", "vault"] }, "holder_pub_key": holder_pub }),
                None,
            )?;
            root_token = r["token"].as_str().unwrap_or_default().to_owned();
            root_id = r["task_id"].as_str().unwrap_or_default().to_owned();
            Ok(Outcome {
                ok: !err && root_token.starts_with("mac_") && r["holder_bound"] == true,
                text: if err {
                    text
                } else {
                    format!(
                        "task {root_id}: 10 minutes, targets lab and vault, may delegate, holder-bound.\nIts token ({} bytes) is a macaroon: anyone can narrow it offline, nobody can widen it.",
                        root_token.len()
                    )
                },
                detail: json!({ "task_id": root_id, "holder_bound": r["holder_bound"] }),
            })
        },
    )?;

    step(say, "proof_of_possession", "A stolen token is useless without the holder's key", &mut || {
        let (status, v) =
            mcp(lab, &root_token, "tools/call", json!({ "name": "list_targets", "arguments": {} }), None)?;
        let refused = v["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
        let (err, _, _) = call(lab, &root_token, "list_targets", json!({}), Some(&holder))?;
        Ok(Outcome {
            ok: status == 401 && !err,
            text: format!(
                "Without a proof: HTTP {status}: {}\nWith an Ephyr-PoP proof signed by the holder key (bound to this request, used once): accepted.",
                first_line(&refused)
            ),
            detail: json!({ "without_proof_status": status, "with_proof_ok": !err }),
        })
    })?;

    let mut child_token = String::new();
    let mut child_id = String::new();
    step(say, "delegate", "It delegates a narrower child task to a sub-agent", &mut || {
        let (err, text, r) = call(
            lab,
            &root_token,
            "task_delegate",
            json!({ "description": "demo: only lab", "ttl": "5m", "envelope": { "targets": ["lab"], "tools": ["exec", "list_targets"] } }),
            Some(&holder),
        )?;
        child_token = r["token"].as_str().unwrap_or_default().to_owned();
        child_id = r["task_id"].as_str().unwrap_or_default().to_owned();
        Ok(Outcome {
            ok: !err && child_token.starts_with("mac_"),
            text: if err {
                text
            } else {
                format!(
                    "child task {child_id} (depth {}): 5 minutes, target lab only, tools exec and list_targets.\nIt inherits the parent's holder binding.",
                    r["depth"]
                )
            },
            detail: json!({ "task_id": child_id, "depth": r["depth"] }),
        })
    })?;

    step(say, "envelope", "The child can do what it was given, and nothing beyond", &mut || {
        let (ok_err, _, ok_r) = call(
            lab,
            &child_token,
            "exec",
            json!({ "target": "lab", "role": "shell", "command": "echo inside" }),
            Some(&holder),
        )?;
        let (deny_err, deny_text, _) = call(
            lab,
            &child_token,
            "exec",
            json!({ "target": "vault", "role": "shell", "command": "echo outside" }),
            Some(&holder),
        )?;
        Ok(Outcome {
            ok: !ok_err && deny_err && deny_text.contains("denied"),
            text: format!(
                "exec on lab  → {:?}\nexec on vault → {}",
                ok_r["stdout"].as_str().unwrap_or_default().trim(),
                first_line(&deny_text)
            ),
            detail: json!({ "lab_ok": !ok_err, "vault_denied": deny_err, "reason": deny_text }),
        })
    })?;

    step(say, "revoke", "The operator (or the agent) revokes the task: the whole tree dies at once", &mut || {
        let (err, text, r) = call(lab, &key, "task_revoke", json!({ "task_id": root_id }), None)?;
        let (child_err, child_text, _) = call(
            lab,
            &child_token,
            "exec",
            json!({ "target": "lab", "role": "shell", "command": "echo still here" }),
            Some(&holder),
        )?;
        Ok(Outcome {
            ok: !err && r["cascade_count"] == 1 && child_err,
            text: format!(
                "task_revoke {root_id} → {} (cascade {}).\nThe child's next call: {}",
                if err { text } else { "revoked".into() },
                r["cascade_count"],
                first_line(&child_text)
            ),
            detail: json!({ "cascade_count": r["cascade_count"], "child_refused": child_err, "child_reason": child_text }),
        })
    })?;

    step(say, "krl", "Certificates issued under the revoked tree are on the revocation list", &mut || {
        let url = lab.mcp.trim_end_matches("/mcp").to_owned() + "/v1/ssh/krl";
        let krl = get(&url)?;
        let path = lab.dir.join("revoked.krl");
        std::fs::write(&path, &krl).map_err(|e| e.to_string())?;
        let listed = find_in_path("ssh-keygen")
            .map(|k| Command::new(k).args(["-Q", "-l", "-f"]).arg(&path).output())
            .transpose()
            .map_err(|e| e.to_string())?
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let serials = listed.lines().filter(|l| l.starts_with("serial:")).count();
        Ok(Outcome {
            ok: serials >= 1,
            text: format!(
                "GET /v1/ssh/krl: an OpenSSH KRL of {} bytes; `ssh-keygen -Q -l` lists {serials} revoked serial(s).\nTargets fetch it every minute (`ephyr target setup-script --broker-url`), so a leaked\ncertificate of a revoked task stops working there too.",
                krl.len()
            ),
            detail: json!({ "bytes": krl.len(), "serials": serials }),
        })
    })?;

    step(say, "audit", "Everything above is in a signed, hash-chained audit trail", &mut || {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let out = Command::new(&exe)
            .args(["audit", "verify", "--json", "--data-dir"])
            .arg(&lab.data)
            .arg("--socket")
            .arg(&lab.socket)
            .output()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let q = Command::new(&exe)
            .args(["audit", "query", "--data-dir"])
            .arg(&lab.data)
            .args(["--task", &root_id])
            .output();
        let tree = q.map(|o| String::from_utf8_lossy(&o.stdout).lines().count()).unwrap_or(0);
        Ok(Outcome {
            ok: out.status.success(),
            text: format!(
                "ephyr audit verify: {} ({} lines, {} signed checkpoints)\nephyr audit query --task {root_id}: {tree} events of that task tree.",
                if out.status.success() { "verified" } else { "FAILED" },
                v["lines"],
                v["checkpoints"]
            ),
            detail: json!({ "verified": out.status.success(), "report": v, "tree_events": tree }),
        })
    })?;
    Ok(())
}

/// Prints how to reach the lab with your own MCP client (or, with `json`, one object).
fn keep(lab: &Lab, json: bool) {
    if json {
        println!(
            "{}",
            json!({ "step": "ready", "mcp": lab.mcp, "api_key": lab.api_key, "socket": lab.socket, "targets": ["lab", "vault"], "role": "shell" })
        );
        let _ = std::io::stdout().flush();
        return;
    }
    let snippet = json!({ "mcpServers": { "ephyr-demo": { "type": "http", "url": lab.mcp, "headers": { "Authorization": format!("Bearer {}", lab.api_key) } } } });
    println!(
        "\nThe lab stays up until Ctrl-C. Point your own MCP client at it and ask it to run a command\n\
         on target \"lab\" as role \"shell\" (the exec tool):\n\n  \
         claude mcp add --transport http ephyr-demo {} --header \"Authorization: Bearer {}\"\n\n\
         or, for JSON-configured clients:\n{}\n\nLocal CLI: export EPHYR_SOCKET={}   (ephyr status, tasks, certs, monitor --data-dir {})",
        lab.mcp,
        lab.api_key,
        serde_json::to_string_pretty(&snippet).unwrap_or_default(),
        lab.socket.display(),
        lab.data.display()
    );
    let _ = std::io::stdout().flush();
}

/// One GET to the broker's TCP listener (the KRL).
fn get(url: &str) -> Result<Vec<u8>, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let auth = uri.authority().ok_or("no host")?.as_str().to_owned();
    let mut s = std::net::TcpStream::connect(&auth).map_err(|e| format!("{auth}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(s, "GET {} HTTP/1.1\r\nHost: {auth}\r\nConnection: close\r\n\r\n", uri.path()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut buf).map_err(|e| e.to_string())?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no HTTP head")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {url}: {}", first_line(&head)));
    }
    Ok(buf[split + 4..].to_vec())
}

/// Runs the demo; returns the exit code (0: every step went as expected).
pub fn run(o: &DemoOptions) -> Result<u8, String> {
    let cleanup = Arc::new(Mutex::new(Cleanup::default()));
    // Ctrl-C and SIGTERM: clean up, then exit 130. Installed before any child exists.
    let signals =
        crate::os::signal_pipe(&[libc::SIGINT, libc::SIGTERM]).map_err(|e| format!("signal handlers: {e}"))?;
    let keeping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (cleanup, keeping) = (cleanup.clone(), keeping.clone());
        std::thread::spawn(move || {
            // A blocking read of the signal pipe: this thread only waits for the first signal.
            let _ = std::io::Read::read(&mut std::fs::File::from(signals), &mut [0u8; 1]);
            STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Ok(mut c) = cleanup.lock() {
                c.run();
            }
            if keeping.load(std::sync::atomic::Ordering::SeqCst) {
                eprintln!("\nephyr demo: stopped; everything it started is removed");
                std::process::exit(0);
            }
            eprintln!("\nephyr demo: interrupted; everything it started is stopped and removed");
            std::process::exit(130);
        });
    }
    let mut say = Say { json: o.json, step: o.step, n: 0 };
    if !o.json {
        println!("ephyr demo: the broker, a throwaway SSH server and an agent, all on this machine.");
    }
    let started = Instant::now();
    let guard = CleanupGuard(cleanup.clone());
    let lab = start(&say, cleanup).inspect_err(|_| yield_to_signal())?;
    let walked = walk(&lab, &mut say);
    if walked.is_err() {
        yield_to_signal();
    }
    if walked.is_ok() && o.keep {
        keeping.store(true, std::sync::atomic::Ordering::SeqCst);
        keep(&lab, o.json);
        loop {
            std::thread::park();
        }
    }
    drop(guard);
    walked?;
    if !o.json {
        println!(
            "\nDone in {:.1}s; everything the demo started is stopped and removed.\n\
             Next: `ephyr serve --dev` and connect your MCP client (README.md), then\n\
             `ephyr target setup-script` for a real host (docs/target-setup.md).",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(0)
}
