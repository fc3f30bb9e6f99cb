//! Shared helpers for the integration tests: run the real `ephyr` binary, a real OpenSSH `sshd`
//! on 127.0.0.1, and small Python helpers (tests/helpers/).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn ephyr_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ephyr"))
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Tests that need root (privilege drop, sshd, other uids) call this first. CI runs as root; a
/// developer without root can set EPHYR_SKIP_ROOT_TESTS=1 to skip them knowingly.
pub fn require_root() -> bool {
    if ephyr::os::user_ids().1 == 0 {
        return true;
    }
    if std::env::var_os("EPHYR_SKIP_ROOT_TESTS").is_some() {
        eprintln!("SKIPPED (not root, EPHYR_SKIP_ROOT_TESTS set)");
        return false;
    }
    panic!("this test needs root (run scripts/test.sh as root, or set EPHYR_SKIP_ROOT_TESTS=1)");
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ephyr-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 (small race window; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `ephyr ARGS` to completion.
pub fn ephyr(args: &[&str]) -> Output {
    Command::new(ephyr_bin()).args(args).output().expect("run ephyr")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running `ephyr serve`.
pub struct Broker {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub api: String,
    pub dashboard: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    /// The broker's temp dir (socket, policy, default data dir); removed on drop.
    pub dir: Option<TempDir>,
}

/// Options for starting a broker.
pub struct BrokerOpts<'a> {
    pub policy: Option<&'a str>,
    pub dev: bool,
    pub extra: Vec<String>,
    /// Wrap the command (e.g. `setpriv ...`, or a Python seccomp wrapper).
    pub wrapper: Vec<String>,
    pub data_dir: Option<PathBuf>,
    pub expect_ready: bool,
    /// Extra environment for the broker process.
    pub env: Vec<(String, String)>,
}

impl Default for BrokerOpts<'_> {
    fn default() -> Self {
        Self {
            policy: None,
            dev: false,
            extra: vec![],
            wrapper: vec![],
            data_dir: None,
            expect_ready: true,
            env: vec![],
        }
    }
}

impl Broker {
    pub fn start(o: BrokerOpts<'_>) -> Broker {
        let dir = TempDir::new("broker");
        let data_dir = o.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        if !o.dev && !data_dir.join("keys/ca_key").exists() {
            let out = ephyr(&[
                "init",
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--config-dir",
                dir.join("etc").to_str().unwrap(),
            ]);
            assert!(out.status.success(), "init failed: {}", stderr(&out));
        }
        let socket = dir.join("ephyr.sock");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--dashboard-listen".into(),
            "127.0.0.1:0".into(),
            "--socket".into(),
            socket.to_str().unwrap().into(),
        ];
        if o.dev {
            args.push("--dev".into());
        }
        if !o.dev || o.data_dir.is_some() {
            args.push("--data-dir".into());
            args.push(data_dir.to_str().unwrap().into());
        }
        if let Some(p) = o.policy {
            let path = dir.join("policy.yaml");
            std::fs::write(&path, p).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            args.push("--config".into());
            args.push(path.to_str().unwrap().into());
        }
        args.extend(o.extra.iter().cloned());
        // The socket dir must be reachable by the dropped broker uid and by test clients.
        use std::os::unix::fs::PermissionsExt;
        // (An unprivileged broker started through a wrapper must be able to create its socket.)
        let mode = if o.wrapper.is_empty() { 0o755 } else { 0o1777 };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        let mut cmd = if o.wrapper.is_empty() {
            Command::new(ephyr_bin())
        } else {
            let mut c = Command::new(&o.wrapper[0]);
            c.args(&o.wrapper[1..]).arg(ephyr_bin());
            c
        };
        cmd.args(&args)
            .envs(o.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ephyr serve");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for pipe in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let mut b = Broker {
            child: Some(child),
            socket,
            data_dir,
            api: String::new(),
            dashboard: String::new(),
            log,
            dir: Some(dir),
        };
        if o.expect_ready {
            let st = b.wait_ready(Duration::from_secs(20));
            b.api = st["listen"].as_str().unwrap().to_string();
            b.dashboard = st["dashboard_listen"].as_str().unwrap().to_string();
        }
        b
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Polls the local status until the signer has a worker.
    pub fn wait_ready(&mut self, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status()
                && st["signer"]["available"].as_bool() == Some(true)
            {
                return st;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("broker exited early ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "broker not ready in time:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_status(&self) -> Option<serde_json::Value> {
        let out = ephyr(&["status", "--json", "--socket", self.socket.to_str().unwrap()]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status().unwrap_or_else(|| panic!("status failed:\n{}", self.log()))
    }

    /// Waits for the process to exit; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "broker did not exit in time:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: i32) {
        ephyr::os::kill(self.pid() as i32, sig).unwrap();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = ephyr::os::kill(c.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Creates a local user with a usable-but-passwordless account (for sshd) if missing.
pub fn ensure_user(name: &str) {
    if ephyr::users::lookup(name).is_some() {
        return;
    }
    let out = Command::new("useradd").args(["-m", "-s", "/bin/sh", name]).output().expect("useradd");
    // Another test may have created it concurrently.
    assert!(out.status.success() || ephyr::users::lookup(name).is_some(), "useradd {name}: {:?}", out);
    // '*' = no password login, but not "locked" (sshd refuses locked accounts without PAM).
    let _ = Command::new("usermod").args(["-p", "*", name]).output();
}

/// Calls `f` until `done` holds for its value or `within` passes; returns the last value.
pub fn poll_until<T>(within: Duration, f: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + within;
    loop {
        let v = f();
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A second sshd with its own config dir under a temporary directory (never the system's), as
/// `ephyr target setup-script --ssh-dir/--sshd-pid-file` configures it; killed when dropped (a
/// failed assertion included: it would hold the test's output open).
pub struct OwnSshd {
    pub port: u16,
    pub dir: TempDir,
    pub ssh_dir: PathBuf,
    pub config: PathBuf,
    pub pid_file: PathBuf,
    child: Child,
}

impl OwnSshd {
    pub fn start(tag: &str) -> OwnSshd {
        let dir = TempDir::new(tag);
        let ssh_dir = dir.join("ssh");
        std::fs::create_dir_all(&ssh_dir).unwrap();
        let hk = ssh_dir.join("host_ed25519");
        let keygen = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&hk).status();
        assert!(keygen.unwrap().success());
        let port = free_port();
        let pid_file = ssh_dir.join("sshd.pid");
        let config = ssh_dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n",
                hk.display(),
                pid_file.display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pid_file.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnSshd { port, dir, ssh_dir, config, pid_file, child }
    }

    /// `ephyr target setup-script` for `target` of the policy file, configuring this sshd.
    pub fn setup_script(&self, policy: &Path, target: &str, socket: &str) -> Output {
        ephyr(&[
            "target",
            "setup-script",
            "--config",
            policy.to_str().unwrap(),
            "--target",
            target,
            "--socket",
            socket,
            "--ssh-dir",
            self.ssh_dir.to_str().unwrap(),
            "--sshd-pid-file",
            self.pid_file.to_str().unwrap(),
        ])
    }
}

impl Drop for OwnSshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real OpenSSH sshd on 127.0.0.1 trusting one CA.
pub struct Sshd {
    pub port: u16,
    pub dir: TempDir,
    child: Child,
}

impl Sshd {
    pub fn start(ca_pub: &Path, extra_config: &str) -> Sshd {
        let dir = TempDir::new("sshd");
        std::fs::create_dir_all("/run/sshd").unwrap();
        let hostkey = dir.join("host_ed25519");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f", hostkey.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::copy(ca_pub, dir.join("ca.pub")).unwrap();
        let port = free_port();
        let cfg = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\nTrustedUserCAKeys {ca}\n\
             AuthorizedKeysFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nLogLevel VERBOSE\n{extra_config}\n",
            hk = hostkey.display(),
            pid = dir.join("sshd.pid").display(),
            ca = dir.join("ca.pub").display(),
        );
        std::fs::write(dir.join("sshd_config"), cfg).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", dir.join("sshd_config").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .expect("start /usr/sbin/sshd (install openssh-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sshd { port, dir, child }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// Runs `command` as `user` with key + certificate; returns the output.
    pub fn ssh(&self, key: &Path, cert: &Path, user: &str, command: &str) -> Output {
        Command::new("ssh")
            .args(["-p", &self.port.to_string(), "-i", key.to_str().unwrap()])
            .args(["-o", &format!("CertificateFile={}", cert.display())])
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"])
            .arg(format!("{user}@127.0.0.1"))
            .arg(command)
            .output()
            .unwrap()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Generates an ed25519 key pair in `dir`; returns the private key path.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f", key.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    key
}

/// Runs a Python helper from tests/helpers/.
pub fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(repo().join("tests/helpers").join(script));
    c
}

/// A parsed HTTP response (tests talk raw HTTP/1.1 so that every header and status is visible).
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
    out
}

/// Parses a complete response (head and body as read until EOF).
pub fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    HttpResponse { status, headers, body }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn http_request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer from the head alone (413 from Content-Length) and close while the body
    // is still being sent: the write then fails with EPIPE, and the answer is still there to read.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

/// One HTTP/1.1 request to the broker's local API (its Unix socket).
pub fn local_request(socket: &Path, method: &str, path: &str, body: &[u8]) -> HttpResponse {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

/// A response read incrementally (an SSE stream).
pub struct HttpStream {
    pub stream: std::net::TcpStream,
    pub buf: Vec<u8>,
}

impl HttpStream {
    /// Sends a request and keeps the connection for reading.
    pub fn open(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpStream {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        HttpStream { stream: s, buf: Vec::new() }
    }

    /// Shuts the connection's write side down (the request is whole; nothing more comes).
    pub fn half_close(&self) {
        self.stream.shutdown(std::net::Shutdown::Write).unwrap();
    }

    /// Reads until `needle` has arrived (or panics after `timeout`); returns everything so far.
    pub fn read_until(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if text.contains(needle) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{needle:?} did not arrive within {timeout:?}; got: {text}");
            self.stream.set_read_timeout(Some(left.min(Duration::from_millis(200)))).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("stream closed before {needle:?}; got: {text}"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Reads until EOF (or `timeout`); returns whether EOF came.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            self.stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// The Node.js 22 that scripts/test.sh installs under tests/peers (npm package `node@22`).
pub fn node() -> Command {
    let bin = repo().join("tests/peers/node_modules/node/bin/node");
    assert!(bin.exists(), "{} is missing: run scripts/test.sh (it runs npm ci in tests/peers)", bin.display());
    let mut c = Command::new(bin);
    c.current_dir(repo().join("tests/peers"));
    c
}

/// A fresh agent API key and its hash (`ephyr keygen agent NAME --json`).
pub fn agent_key(name: &str) -> (String, String) {
    let out = ephyr(&["keygen", "agent", name, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["api_key"].as_str().unwrap().to_owned(), v["api_key_hash"].as_str().unwrap().to_owned())
}

/// A stateless-era `tools/call` with a bearer credential: `Ok(parsed JSON or text)` or
/// `Err(error text)` for an `isError` result. Panics on protocol-level failures.
/// One MCP request in the stateless era (the `_meta` and routing headers a 2026-07-28 client
/// sends); the JSON-RPC answer. `name`: the tool of a `tools/call`.
pub fn mcp_request(
    api: &str,
    cred: &str,
    method: &str,
    name: Option<&str>,
    params: serde_json::Value,
) -> serde_json::Value {
    let (body, headers) = mcp_parts(cred, method, name, params, 1);
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = http_request(api, "POST", "/mcp", &h, body.as_bytes());
    // A JSON-RPC error comes with a 4xx status in the stateless era.
    let v = r.json();
    assert!(
        r.status == 200 || ((400..500).contains(&r.status) && v["error"].is_object()),
        "{method} {name:?}: {} {}",
        r.status,
        r.text()
    );
    v
}

/// The body and headers of a stateless-era MCP request: `_meta` (kept if the caller gave
/// some, e.g. a progress token) and the routing headers added.
fn mcp_parts(
    cred: &str,
    method: &str,
    name: Option<&str>,
    params: serde_json::Value,
    id: u64,
) -> (String, Vec<(&'static str, String)>) {
    let mut params = params;
    for (k, v) in [
        ("io.modelcontextprotocol/protocolVersion", serde_json::json!("2026-07-28")),
        ("io.modelcontextprotocol/clientCapabilities", serde_json::json!({})),
        ("io.modelcontextprotocol/clientInfo", serde_json::json!({"name": "ephyr-tests", "version": "1"})),
    ] {
        params["_meta"][k] = v;
    }
    let body = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
    let mut h = vec![
        ("Authorization", format!("Bearer {cred}")),
        ("Content-Type", "application/json".to_owned()),
        ("Accept", "application/json, text/event-stream".to_owned()),
        ("MCP-Protocol-Version", "2026-07-28".to_owned()),
        ("Mcp-Method", method.to_owned()),
    ];
    if let Some(n) = name {
        h.push(("Mcp-Name", n.to_owned()));
    }
    (body, h)
}

/// A stateless-era MCP request whose answer is read as a stream (an event stream: progress
/// before a result, or a `subscriptions/listen`): `_meta` and the routing headers added.
pub fn mcp_stream(api: &str, cred: &str, method: &str, name: Option<&str>, params: serde_json::Value) -> HttpStream {
    let (body, headers) = mcp_parts(cred, method, name, params, 9);
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    HttpStream::open(api, "POST", "/mcp", &h, body.as_bytes())
}

pub fn tool_call(api: &str, cred: &str, tool: &str, args: serde_json::Value) -> Result<serde_json::Value, String> {
    let v = mcp_request(api, cred, "tools/call", Some(tool), serde_json::json!({"name": tool, "arguments": args}));
    let res = &v["result"];
    assert!(res.is_object(), "{tool}: {v}");
    let text = res["content"][0]["text"].as_str().unwrap_or("").to_owned();
    if res["isError"] == true {
        Err(text)
    } else {
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }
}

/// The value of an unlabelled metric on the broker's dashboard `/metrics` (0 when absent).
pub fn metric(b: &Broker, name: &str) -> f64 {
    let r = http_request(&b.dashboard, "GET", "/metrics", &[], b"");
    r.text()
        .lines()
        .find(|l| l.starts_with(name) && (l.as_bytes().get(name.len()) == Some(&b' ')))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The broker's audit lines for `event`.
pub fn audit_events(b: &Broker, name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(b.data_dir.join("audit/audit.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["event"] == name)
        .collect()
}

/// The `operators.NAME` entry (indented for under `operators:`) that `ephyr operator add` prints
/// for `password` (given on stdin).
pub fn operator_entry(name: &str, role: &str, password: &str) -> String {
    use std::io::Write;
    let mut c = Command::new(ephyr_bin())
        .args(["operator", "add", name, "--role", role])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "operator add {name}");
    let text = String::from_utf8(out.stdout).unwrap();
    let hash = text.lines().find_map(|l| l.trim().strip_prefix("password_hash: ")).unwrap().to_owned();
    format!("  {name}:\n    role: {role}\n    password_hash: {hash}\n")
}

/// The SHA-256 fingerprint of an SSH public key file, as `ssh-keygen -l` prints it.
pub fn ssh_fingerprint(pubkey: &Path) -> String {
    let out = Command::new("ssh-keygen").args(["-l", "-E", "sha256", "-f"]).arg(pubkey).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_owned()
}

/// A data dir made by `ephyr init` (its CA in `keys/ca_key.pub`), and an sshd that trusts that
/// CA with `extra_config`; returns both and the sshd's host-key fingerprint.
pub fn init_with_sshd(tag: &str, extra_config: &str) -> (TempDir, Sshd, String) {
    let data = TempDir::new(tag);
    let conf = TempDir::new(&format!("{tag}-conf"));
    let out =
        ephyr(&["init", "--data-dir", data.path().to_str().unwrap(), "--config-dir", conf.path().to_str().unwrap()]);
    assert!(out.status.success(), "init: {}", stderr(&out));
    let sshd = Sshd::start(&data.join("keys/ca_key.pub"), extra_config);
    let fp = ssh_fingerprint(&sshd.dir.join("host_ed25519.pub"));
    (data, sshd, fp)
}

/// An upstream process (tests/helpers/upstream.py serve).
pub struct Upstream {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Upstream {
    pub fn start(netns: Option<&str>, host: &str, extra: &[&str]) -> Upstream {
        Upstream::start_env(netns, host, extra, &[])
    }

    /// As [`Upstream::start`], with `env` for the process (the stand-ins' keys).
    pub fn start_env(netns: Option<&str>, host: &str, extra: &[&str], env: &[(&str, &str)]) -> Upstream {
        let dir = TempDir::new("upstream");
        let log = dir.join("requests.jsonl");
        let script = repo().join("tests/helpers/upstream.py");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "python3"]);
                c
            }
            None => Command::new("python3"),
        };
        cmd.arg(script).args(["serve", "--host", host, "--log", log.to_str().unwrap()]).args(extra);
        cmd.envs(env.iter().copied());
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("READY ").unwrap_or_else(|| panic!("upstream: {line:?}")).parse().unwrap();
        Upstream { child, port, log, _dir: dir }
    }

    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn last_header(&self, name: &str) -> Vec<String> {
        let reqs = self.requests();
        let last = reqs.last().expect("the upstream got no request");
        last["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
            .map(|h| h[1].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A browser-like client of one console.
pub struct ConsoleClient {
    pub addr: String,
    pub cookie: Option<String>,
}

impl ConsoleClient {
    pub fn new(addr: &str) -> ConsoleClient {
        ConsoleClient { addr: addr.to_owned(), cookie: None }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn login(&mut self, name: &str, password: &str) -> HttpResponse {
        let body = format!("name={}&password={}", name, password.replace(' ', "+"));
        let origin = self.origin();
        let r = http_request(
            &self.addr,
            "POST",
            "/login",
            &[("Origin", &origin), ("Content-Type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        );
        if let Some(c) = r.header("set-cookie") {
            self.cookie = c.split(';').next().map(str::to_owned);
        }
        r
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        let mut h = vec![];
        if let Some(c) = &self.cookie {
            h.push(("Cookie", c.as_str()));
        }
        http_request(&self.addr, "GET", path, &h, b"")
    }

    /// The session's CSRF token, read from a page's form.
    pub fn csrf(&self) -> String {
        let page = self.get("/").text();
        let at = page.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
        page[at..at + page[at..].find('"').unwrap()].to_owned()
    }

    pub fn post(&self, path: &str, form: &str, extra: &[(&str, &str)]) -> HttpResponse {
        let origin = self.origin();
        let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/x-www-form-urlencoded")];
        if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("origin")) {
            h.push(("Origin", &origin));
        }
        if let Some(c) = &self.cookie {
            h.push(("Cookie", c.as_str()));
        }
        h.extend_from_slice(extra);
        http_request(&self.addr, "POST", path, &h, form.as_bytes())
    }
}

/// A wrapper for [`BrokerOpts::wrapper`]: the appliance unit's capability bounding set
/// (image/systemd/ephyr.service: CAP_SETUID, CAP_SETGID, CAP_SETPCAP; no CAP_CHOWN, CAP_FOWNER
/// or CAP_DAC_OVERRIDE).
pub fn as_the_unit() -> Vec<String> {
    ["setpriv", "--bounding-set", "-all,+setuid,+setgid,+setpcap"].map(String::from).to_vec()
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// An ES256 JWT with `header` and `claims`, signed with the PKCS#8 P-256 key `der` (tests make
/// their own keys: a cluster's, an agent's).
pub fn es256_jwt(der: &[u8], header: &serde_json::Value, claims: &serde_json::Value) -> String {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng).unwrap();
    let enc = |v: &[u8]| data_encoding::BASE64URL_NOPAD.encode(v);
    let msg = format!("{}.{}", enc(header.to_string().as_bytes()), enc(claims.to_string().as_bytes()));
    format!("{msg}.{}", enc(pair.sign(&rng, msg.as_bytes()).unwrap().as_ref()))
}

/// The DER inside a PEM document.
pub fn pem_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    data_encoding::BASE64.decode(b64.as_bytes()).unwrap()
}

/// A session-era MCP session for `cred` (its id) and its open notification stream.
pub fn session_with_stream(api: &str, cred: &str) -> (String, HttpStream) {
    let auth = format!("Bearer {cred}");
    let init = http_request(
        api,
        "POST",
        "/mcp",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ],
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
        .to_string()
        .as_bytes(),
    );
    let sid = init.header("mcp-session-id").unwrap().to_owned();
    let mut stream = HttpStream::open(
        api,
        "GET",
        "/mcp",
        &[("Authorization", &auth), ("Mcp-Session-Id", &sid), ("Accept", "text/event-stream"), ("Connection", "close")],
        b"",
    );
    stream.read_until("ephyr notification stream", Duration::from_secs(5));
    (sid, stream)
}
