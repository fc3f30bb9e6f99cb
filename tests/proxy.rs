//! The credential-injecting HTTP proxy against real upstreams: Python `http.server` processes on
//! loopback and inside a network namespace made by the test (veth pair, private addresses that
//! the default network rules allow), and TLS servers with a test CA.

mod common;

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const SECRET: &str = "sk-live-UPSTREAM-SECRET-0123456789";

/// A network namespace with a veth pair: the host side is `<net>.1`, the namespace has `<net>.2`
/// and `<net>.3`. Removed (with everything running in it) on drop.
struct Netns {
    name: String,
    net: String,
}

static NETS: AtomicU32 = AtomicU32::new(0);

impl Netns {
    fn new() -> Netns {
        let n = NETS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("ephyr-px-{pid}-{n}");
        let net = format!("10.{}.{}", 100 + pid % 100, (pid / 100 % 200) + n);
        let (host, peer) = (format!("epx{}h{n}", pid % 100000), format!("epx{}n{n}", pid % 100000));
        let sh = |c: &str| {
            let o = Command::new("sh").arg("-c").arg(c).output().unwrap();
            assert!(o.status.success(), "{c}: {}", String::from_utf8_lossy(&o.stderr));
        };
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip link add {host} type veth peer name {peer}"));
        sh(&format!("ip link set {peer} netns {name}"));
        sh(&format!("ip addr add {net}.1/24 dev {host} && ip link set {host} up"));
        sh(&format!(
            "ip -n {name} addr add {net}.2/24 dev {peer} && ip -n {name} addr add {net}.3/24 dev {peer} \
             && ip -n {name} link set {peer} up && ip -n {name} link set lo up"
        ));
        Netns { name, net }
    }

    fn addr(&self, last: u8) -> String {
        format!("{}.{last}", self.net)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns pids {0} | xargs -r kill -9; ip netns del {0}", self.name))
            .status();
    }
}

fn proxy(b: &Broker, method: &str, path: &str, cred: &str, body: &[u8]) -> HttpResponse {
    let auth = format!("Bearer {cred}");
    http_request(&b.api, method, path, &[("Authorization", &auth), ("Content-Type", "application/json")], body)
}

fn call(b: &Broker, key: &str, args: Value) -> Result<Value, String> {
    tool_call(&b.api, key, "http_request", args)
}

/// A broker with the echo services on `host:port`.
fn echo_broker(
    ns_host: &str,
    port: u16,
    extra_services: &str,
    network: &str,
    env: Vec<(String, String)>,
) -> (Broker, String) {
    let (key, hash) = agent_key("agent");
    let policy = format!(
        r#"version: 1
services:
  echo:
    url: http://{ns_host}:{port}
    credential: {{ type: bearer, secret: "env:ECHO_TOKEN" }}
    max_request: 64KiB
    max_response: 256KiB
    read_timeout: 3s
  echo-q:
    url: http://{ns_host}:{port}/q
    credential: {{ type: query, param: key, secret: "env:ECHO_TOKEN" }}
  echo-paths:
    url: http://{ns_host}:{port}
    credential: {{ type: bearer, secret: "env:ECHO_TOKEN" }}
    methods: [GET, POST]
    paths: ["/api/*"]
  big:
    url: http://{ns_host}:{port}
    max_response: 4MiB
{extra_services}
{network}
agents:
  agent:
    api_key_hash: "{hash}"
    can_delegate: true
    services: {{ "*": {{}} }}
  other:
    api_key_hash: "{hash2}"
    services: {{ big: {{}} }}
"#,
        hash2 = agent_key("other").1
    );
    let mut env = env;
    env.push(("ECHO_TOKEN".into(), SECRET.into()));
    let b = Broker::start(BrokerOpts { policy: Some(&policy), env, ..Default::default() });
    (b, key)
}

#[test]
fn the_credential_is_injected_and_never_returned() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let up = Upstream::start(Some(&ns.name), &ns.addr(2), &[]);
    let dir = TempDir::new("proxy-secret");
    let file = dir.join("basic.txt");
    std::fs::write(&file, "basic-pass\n").unwrap();
    let extra = format!(
        r#"  echo-store:
    url: http://{h}:{p}/s
    credential: {{ type: header, header: x-api-key, secret: "store:anthropic" }}
  echo-basic:
    url: http://{h}:{p}/b
    credential: {{ type: basic, username: ci, secret: "file:{f}" }}"#,
        h = ns.addr(2),
        p = up.port,
        f = file.display()
    );
    let (b, key) = echo_broker(&ns.addr(2), up.port, &extra, "", vec![]);

    // Through the tool, with an attempt to override the credential.
    let r = call(
        &b,
        &key,
        json!({"service": "echo", "path": "/echo/x?a=1", "headers": {"Authorization": "Bearer mine", "X-Trace": "t1"}}),
    )
    .unwrap();
    assert_eq!(r["status_code"], 200, "{r}");
    assert_eq!(up.last_header("authorization"), [format!("Bearer {SECRET}")], "only the injected credential arrives");
    assert_eq!(up.last_header("x-trace"), ["t1"]);
    assert_eq!(up.last_header("accept-encoding"), ["identity"]);
    let rid = r["request_id"].as_str().unwrap();
    assert_eq!(up.last_header("x-ephyr-request-id"), [rid]);
    assert!(up.last_header("x-ephyr-proxy")[0].starts_with("ephyr/"));
    let text = r.to_string();
    assert!(!text.contains(SECRET), "the echoed credential is scrubbed: {text}");
    assert!(text.contains("Bearer ***"), "{text}");
    assert_eq!(r["headers"]["x-ephyr-request-id"], rid);
    assert_eq!(r["url"], format!("http://{}:{}/echo/x", ns.addr(2), up.port), "no query in the reported URL");

    // Through the plain route with an API key: the key is not forwarded, the secret not returned.
    let resp = proxy(&b, "POST", "/v1/proxy/echo/echo/y?q=2", &key, br#"{"hello":"world"}"#);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(!resp.text().contains(SECRET) && !resp.text().contains(&key), "{}", resp.text());
    assert_eq!(up.last_header("authorization"), [format!("Bearer {SECRET}")]);
    let last = up.requests().pop().unwrap();
    assert_eq!(last["path"], "/echo/y?q=2");
    assert_eq!(last["body"], r#"{"hello":"world"}"#);
    assert_eq!(resp.header("x-ephyr-proxy"), Some("echo"));
    assert!(resp.header("x-ephyr-request-id").is_some());

    // Query-parameter injection replaces whatever the agent sent under that name.
    let r = call(&b, &key, json!({"service": "echo-q", "path": "/find?key=agents-own&x=1"})).unwrap();
    assert_eq!(r["status_code"], 200);
    let last = up.requests().pop().unwrap();
    assert_eq!(last["path"], format!("/q/find?x=1&key={}", SECRET));
    assert!(!r.to_string().contains(SECRET));

    // A stored secret: set through the CLI from stdin, used as a custom header.
    let r = call(&b, &key, json!({"service": "echo-store", "path": "/"})).unwrap_err();
    assert!(r.contains("store:anthropic is not set") && r.contains("ephyr secret set anthropic"), "{r}");
    let sock = b.socket.to_str().unwrap().to_owned();
    let mut set = Command::new(ephyr_bin())
        .args(["secret", "set", "anthropic", "--socket", &sock])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    set.stdin.take().unwrap().write_all(b"sk-ant-STORED-42\n").unwrap();
    let out = set.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r =
        call(&b, &key, json!({"service": "echo-store", "path": "/", "headers": {"x-api-key": "agents-own"}})).unwrap();
    assert_eq!(r["status_code"], 200);
    assert_eq!(up.last_header("x-api-key"), ["sk-ant-STORED-42"], "stored value, newline dropped, agent's header gone");
    assert!(!r.to_string().contains("sk-ant-STORED-42"));
    let sealed = std::fs::read(b.data_dir.join("state/secrets/anthropic.sealed")).unwrap();
    assert!(!sealed.windows(16).any(|w| w == b"sk-ant-STORED-42"), "stored sealed, not in clear");
    let list = ephyr(&["secret", "list", "--json", "--socket", &sock]);
    let v: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["secrets"][0]["name"], "anthropic");
    assert_eq!(v["secrets"][0]["used_by"], json!(["echo-store"]));
    assert!(!String::from_utf8_lossy(&list.stdout).contains("STORED"));
    let bad = ephyr(&["secret", "set", "../etc", "--socket", &sock]);
    assert!(!bad.status.success());

    // Basic from a file.
    let r = call(&b, &key, json!({"service": "echo-basic", "path": "/"})).unwrap();
    assert_eq!(r["status_code"], 200);
    let basic = format!("Basic {}", data_encoding_b64(b"ci:basic-pass"));
    assert_eq!(up.last_header("authorization"), [basic.as_str()]);
    assert!(!r.to_string().contains(&basic[6..]), "the base64 form is scrubbed too");

    // Credential-bearing response headers are dropped; a compressed body is not passed on.
    let r = call(&b, &key, json!({"service": "echo", "path": "/cookie"})).unwrap();
    let h = r["headers"].as_object().unwrap();
    assert!(!h.contains_key("set-cookie") && !h.contains_key("www-authenticate"), "{r}");
    assert_eq!(h["x-fine"], "yes");
    let e = call(&b, &key, json!({"service": "echo", "path": "/gzip"})).unwrap_err();
    assert!(e.contains("gzip-encoded") && !e.contains(SECRET), "{e}");
    // ... nor one compressed as a transfer-coding (hardening issue, defect 8: it passed unscrubbed).
    let e = call(&b, &key, json!({"service": "echo", "path": "/gzip-te"})).unwrap_err();
    assert!(e.contains("transfer-coding \"gzip\"") && !e.contains(SECRET), "{e}");
    let r = proxy(&b, "GET", "/v1/proxy/echo/gzip-te", &key, b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.text().contains(SECRET));
    // Method-override headers never reach the upstream: the method authorized is the method sent.
    let r = call(
        &b,
        &key,
        json!({"service": "echo", "method": "POST", "path": "/echo/m", "body": "{}", "headers": {
            "X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE", "X-Method-Override": "DELETE"}}),
    )
    .unwrap();
    assert_eq!(r["status_code"], 200);
    for h in ["x-http-method-override", "x-http-method", "x-method-override"] {
        assert!(up.last_header(h).is_empty(), "{h} was forwarded");
    }

    // The audit trail names services, never secrets.
    let audit = std::fs::read_to_string(b.data_dir.join("audit/audit.jsonl")).unwrap();
    assert!(!audit.contains(SECRET) && !audit.contains("sk-ant-STORED-42") && !audit.contains("basic-pass"));
    let posts = audit_events(&b, "http_request");
    assert!(posts.iter().any(|e| e["action"]["method"] == "POST" && e["action"]["service"] == "echo"), "{posts:?}");
    let ends = audit_events(&b, "http_response");
    assert!(ends.iter().any(|e| e["outcome"]["status"] == 200 && e["action"]["path"] == "/echo/y"), "{ends:?}");
    assert!(!b.log().contains(SECRET));
}

fn data_encoding_b64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(char::from(T[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn ssrf_targets_are_denied_with_reasons() {
    let (key, hash) = agent_key("agent");
    let policy = format!(
        r#"version: 1
services:
  web: {{ url: "http://web.invalid", allowed_hosts: ["*"], methods: [GET] }}
  web6: {{ url: "http://web.invalid:8080", allowed_hosts: ["*"] }}
  lh:
    url: http://localhost:9
    credential: {{ type: bearer, secret: "env:ECHO_TOKEN" }}
agents:
  agent:
    api_key_hash: "{hash}"
    services: {{ "*": {{}} }}
"#
    );
    let b = Broker::start(BrokerOpts {
        policy: Some(&policy),
        env: vec![("ECHO_TOKEN".into(), SECRET.into())],
        ..Default::default()
    });
    for (url, words) in [
        ("http://127.0.0.1/", "127.0.0.1 is a loopback address"),
        ("http://127.8.9.10/", "loopback"),
        ("http://[::1]/", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]/", "127.0.0.1 is a loopback address"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254 is a link-local address (incl. the 169.254.169.254 metadata service)",
        ),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://[fd00:ec2::254]/", "cloud metadata"),
        ("http://localhost/", "localhost resolves to"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://[fd12::1]/", "unique local address"),
        ("http://[fe80::1]/", "link-local"),
        ("http://224.0.0.1/", "multicast"),
        ("http://web.invalid:8080/x", "cannot resolve web.invalid"),
    ] {
        let e = call(&b, &key, json!({"url": url})).unwrap_err();
        assert!(e.contains(words), "{url}: {e}");
        if !words.starts_with("cannot") {
            assert!(e.contains("network_denied"), "{url}: {e}");
        }
    }
    for (url, words) in [
        ("http://2130706433/", "dotted-decimal"),
        ("http://0177.0.0.1/", "dotted-decimal"),
        ("http://0x7f.0.0.1/", "dotted-decimal"),
        ("http://127.1/", "dotted-decimal"),
        ("http://017700000001/", "dotted-decimal"),
        ("http://web.invalid:8081/", "no service covers"),
        ("gopher://web.invalid/", "not supported"),
        ("http://user:pw@example.com/", "passwords"),
    ] {
        let e = call(&b, &key, json!({"url": url})).unwrap_err();
        assert!(e.contains(words), "{url}: {e}");
    }
    // A configured service whose name resolves to loopback, through the route too.
    let r = proxy(&b, "GET", "/v1/proxy/lh/x", &key, b"");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "network_denied");
    assert!(r.json()["message"].as_str().unwrap().contains("localhost resolves to"), "{}", r.text());
    std::thread::sleep(Duration::from_millis(100));
    let denials = audit_events(&b, "http_request");
    assert!(
        denials.iter().any(|e| e["decision"]["code"] == "network_denied" || e.to_string().contains("network_denied")),
        "{denials:?}"
    );
    // A method the service does not allow.
    let e = call(&b, &key, json!({"url": "http://8.8.8.8/", "method": "POST"})).unwrap_err();
    assert!(e.contains("method_not_allowed"), "{e}");
}

#[test]
fn redirects_are_returned_and_not_followed() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let a = Upstream::start(Some(&ns.name), &ns.addr(2), &[]);
    let other = Upstream::start(Some(&ns.name), &ns.addr(3), &[]);
    let (b, key) = echo_broker(&ns.addr(2), a.port, "", "", vec![]);
    let to = format!("http://{}:{}/steal", ns.addr(3), other.port);
    let r = call(&b, &key, json!({"service": "echo", "path": format!("/redirect?to={to}")})).unwrap();
    assert_eq!(r["status_code"], 302);
    assert_eq!(r["headers"]["location"], to);
    let resp = proxy(&b, "GET", &format!("/v1/proxy/echo/redirect?to={to}"), &key, b"");
    assert_eq!(resp.status, 302);
    assert_eq!(resp.header("location"), Some(to.as_str()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(other.requests().is_empty(), "the other host never saw a request (nor the secret)");
    assert_eq!(a.requests().len(), 2);
    // Asking for the other host directly is refused: no service covers it.
    let e = call(&b, &key, json!({"url": to})).unwrap_err();
    assert!(e.contains("no service covers"), "{e}");
}

#[test]
fn sse_streams_token_by_token_through_the_route() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let up = Upstream::start(Some(&ns.name), &ns.addr(2), &[]);
    let (b, key) = echo_broker(&ns.addr(2), up.port, "", "", vec![]);
    let auth = format!("Bearer {key}");
    let start = Instant::now();
    let mut s = HttpStream::open(&b.api, "GET", "/v1/proxy/echo/sse?n=6&delay=0.4", &[("Authorization", &auth)], b"");
    let first = s.read_until("data: tok0", Duration::from_secs(5));
    let t0 = start.elapsed();
    assert!(first.contains("text/event-stream"), "{first}");
    assert!(!first.contains("tok1"), "events arrive one by one: {first}");
    s.read_until("data: tok1", Duration::from_secs(5));
    let t1 = start.elapsed();
    s.read_until("[DONE]", Duration::from_secs(10));
    let t_end = start.elapsed();
    assert!(t0 < Duration::from_millis(1500), "first token after {t0:?}");
    assert!(t1 >= t0 + Duration::from_millis(250), "tok1 came {:?} after tok0", t1 - t0);
    assert!(
        t_end >= Duration::from_millis(2300),
        "the upstream took {t_end:?}: the first byte came long before the end"
    );
}

#[test]
fn tls_upstreams_are_verified_by_hostname() {
    let certs = TempDir::new("proxy-certs");
    let o = python("upstream.py").args(["certs", certs.path().to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = |f: &str| certs.join(f).to_str().unwrap().to_owned();
    let tls = Upstream::start(None, "127.0.0.1", &["--tls", &c("server.pem"), &c("server.key")]);
    let mtls =
        Upstream::start(None, "127.0.0.1", &["--tls", &c("server.pem"), &c("server.key"), "--client-ca", &c("ca.pem")]);
    let key_file = certs.join("client.key");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let services = format!(
        r#"  tls:
    url: https://localhost:{t}
    credential: {{ type: bearer, secret: "env:ECHO_TOKEN" }}
    tls: {{ ca_file: "{ca}" }}
  tls-ip:
    url: https://127.0.0.1:{t}
    tls: {{ ca_file: "{ca}" }}
  tls-other-ca:
    url: https://localhost:{t}
    tls: {{ ca_file: "{other}" }}
  tls-system:
    url: https://localhost:{t}
  mtls:
    url: https://localhost:{m}
    tls: {{ ca_file: "{ca}", client_cert: "{cc}", client_key: "file:{ck}" }}
  mtls-nocert:
    url: https://localhost:{m}
    tls: {{ ca_file: "{ca}" }}"#,
        t = tls.port,
        m = mtls.port,
        ca = c("ca.pem"),
        other = c("other-ca.pem"),
        cc = c("client.pem"),
        ck = key_file.display(),
    );
    let (b, key) = echo_broker("127.0.0.1", 9, &services, "network: { allow: ['127.0.0.1/32', '::1/128'] }", vec![]);
    let r = call(&b, &key, json!({"service": "tls", "path": "/echo"})).unwrap();
    assert_eq!(r["status_code"], 200, "{r}");
    assert_eq!(tls.last_header("authorization"), [format!("Bearer {SECRET}")]);
    assert_eq!(tls.last_header("host"), [format!("localhost:{}", tls.port)]);
    let resp = proxy(&b, "GET", "/v1/proxy/tls/echo", &key, b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    for (svc, words) in [
        ("tls-ip", "not valid for name \"127.0.0.1\""),
        ("tls-other-ca", "UnknownIssuer"),
        ("tls-system", "UnknownIssuer"),
        ("mtls-nocert", "CertificateRequired"),
    ] {
        let e = call(&b, &key, json!({"service": svc, "path": "/echo"})).unwrap_err();
        assert!(e.contains(words) && e.contains("upstream_failed"), "{svc}: {e}");
    }
    let r = call(&b, &key, json!({"service": "mtls", "path": "/echo"})).unwrap();
    assert_eq!(r["status_code"], 200, "{r}");
}

#[test]
fn a_revoked_task_stops_mid_stream_and_after() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let up = Upstream::start(Some(&ns.name), &ns.addr(2), &[]);
    let (b, key) = echo_broker(&ns.addr(2), up.port, "", "", vec![]);
    let t = tool_call(
        &b.api,
        &key,
        "task_create",
        json!({"description": "llm work", "ttl": "10m", "envelope": {"services": ["echo"]}}),
    )
    .unwrap();
    let token = t["token"].as_str().unwrap().to_owned();
    let task = t["task_id"].as_str().unwrap().to_owned();
    let r = proxy(&b, "GET", "/v1/proxy/echo/echo", &token, b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = proxy(&b, "GET", "/v1/proxy/big/bytes?n=5", &token, b"");
    assert_eq!(r.status, 403, "the token's envelope names only echo");
    assert_eq!(r.json()["error"], "token_denies_service");
    let auth = format!("Bearer {token}");
    let mut s = HttpStream::open(&b.api, "GET", "/v1/proxy/echo/sse?n=100&delay=0.1", &[("Authorization", &auth)], b"");
    s.read_until("data: tok2", Duration::from_secs(5));
    let revoked = tool_call(&b.api, &key, "task_revoke", json!({"task_id": task})).unwrap();
    assert_eq!(revoked["revoked"], task.as_str(), "{revoked}");
    let cut = Instant::now();
    // The stream ends at once with an error event that says why, then the response ends (the
    // last chunk), so an SDK reports the reason instead of a broken connection.
    let text = s.read_until("0\r\n\r\n", Duration::from_secs(5));
    assert!(cut.elapsed() < Duration::from_secs(3));
    assert!(text.contains("event: error\ndata: {\"error\":\"task_ended\""), "{text}");
    assert!(text.contains("the task was revoked or expired"), "{text}");
    assert!(!text.contains("[DONE]"), "the stream was cut, not finished");
    let r = proxy(&b, "GET", "/v1/proxy/echo/echo", &token, b"");
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("revoked"), "{}", r.text());
    std::thread::sleep(Duration::from_millis(100));
    let ends = audit_events(&b, "http_response");
    assert!(ends.iter().any(|e| e.to_string().contains("revoked or expired")), "{ends:?}");
}

#[test]
fn limits_paths_and_timeouts() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let up = Upstream::start(Some(&ns.name), &ns.addr(2), &[]);
    let (b, key) = echo_broker(&ns.addr(2), up.port, "", "", vec![]);
    let before = up.requests().len();
    // Request bodies beyond max_request (64 KiB).
    let big = vec![b'a'; 70 * 1024];
    let r = proxy(&b, "POST", "/v1/proxy/echo/echo", &key, &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("max_request"), "{}", r.text());
    let e =
        call(&b, &key, json!({"service": "echo", "method": "POST", "path": "/echo", "body": "a".repeat(70 * 1024)}))
            .unwrap_err();
    assert!(e.contains("body_too_large") && e.contains("max_request"), "{e}");
    assert_eq!(up.requests().len(), before, "nothing oversized reached the upstream");
    // Responses beyond max_response (256 KiB): refused by length, cut when streamed.
    let r = proxy(&b, "GET", "/v1/proxy/echo/bytes?n=300000", &key, b"");
    assert_eq!(r.status, 502);
    assert!(r.text().contains("max_response"), "{}", r.text());
    let auth = format!("Bearer {key}");
    let mut s = HttpStream::open(&b.api, "GET", "/v1/proxy/echo/chunked?n=300000", &[("Authorization", &auth)], b"");
    assert!(s.wait_closed(Duration::from_secs(10)));
    let head_end = s.buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let got = s.buf[head_end..].iter().filter(|c| **c == b'y').count();
    assert!(got <= 256 * 1024 && got > 0, "cut at the limit: {got}");
    assert!(!String::from_utf8_lossy(&s.buf).ends_with("0\r\n\r\n"), "no clean end of the chunked body");
    // The tool returns at most 1 MiB and says so.
    let r = call(&b, &key, json!({"service": "big", "path": "/bytes?n=2000000"})).unwrap();
    assert_eq!(r["truncated"], true);
    assert_eq!(r["body"].as_str().unwrap().len(), 1 << 20);
    // Paths are normalised before they are checked.
    for (path, status, code) in [
        ("/v1/proxy/echo-paths/api/x", 200, ""),
        ("/v1/proxy/echo-paths/api/../admin", 403, "path_not_allowed"),
        ("/v1/proxy/echo-paths/api/..", 403, "path_not_allowed"),
        ("/v1/proxy/echo-paths/api/%2e%2e/admin", 400, "invalid_request"),
        ("/v1/proxy/echo-paths/api/..;/admin", 400, "invalid_request"),
        ("/v1/proxy/echo-paths/api%2F..%2Fadmin", 400, "invalid_request"),
        ("/v1/proxy/nope/x", 403, "unknown_service"),
        ("/v1/proxy/", 404, "not_found"),
    ] {
        let r = proxy(&b, "GET", path, &key, b"");
        assert_eq!(r.status, status, "{path}: {}", r.text());
        if !code.is_empty() {
            assert_eq!(r.json()["error"], code, "{path}");
        }
    }
    assert_eq!(up.requests().last().unwrap()["path"], "/api/x");
    // Made-up service names never become metric labels (hardening issue, defect 3): they are all
    // counted as one "(unknown)" series.
    let before = http_request(&b.dashboard, "GET", "/metrics", &[], b"").text().lines().count();
    for i in 0..200 {
        assert_eq!(proxy(&b, "GET", &format!("/v1/proxy/made-up-{i}/x"), &key, b"").status, 403);
    }
    let m = http_request(&b.dashboard, "GET", "/metrics", &[], b"").text();
    assert!(!m.contains("made-up-"), "request input became a label");
    assert!(m.contains("ephyr_proxy_requests_total{service=\"(unknown)\",code=\"unknown_service\"}"), "{m}");
    assert!(m.lines().count() <= before + 2, "series grew with request input");
    let r = proxy(&b, "DELETE", "/v1/proxy/echo-paths/api/x", &key, b"");
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "method_not_allowed");
    // An agent without a grant, and no credential at all.
    let (other_key, _) = agent_key("x");
    let r = proxy(&b, "GET", "/v1/proxy/echo/echo", &other_key, b"");
    assert_eq!(r.status, 401);
    let r = http_request(&b.api, "GET", "/v1/proxy/echo/echo", &[], b"");
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    // Read timeout (3 s) before the upstream answers (after 6 s).
    let t = Instant::now();
    let r = proxy(&b, "GET", "/v1/proxy/echo/slow?delay=6", &key, b"");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("read_timeout"), "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(5));
    // The same bound between two pieces of a streamed body: one event, then 6 s of silence.
    let t = Instant::now();
    let r = proxy(&b, "GET", "/v1/proxy/echo/sse?n=2&delay=6", &key, b"");
    assert!(r.text().contains("tok0") && !r.text().contains("tok1"), "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(5), "the stalled stream was not cut: {:?}", t.elapsed());
}

#[test]
fn the_openai_and_anthropic_sdks_work_unchanged_with_a_task_token() {
    if !require_root() {
        return;
    }
    // The LLM APIs are paid services this machine cannot reach: tests/helpers/upstream.py stands
    // in for them (same paths, headers and stream formats), inside a network namespace.
    let ns = Netns::new();
    let dir = TempDir::new("llm");
    let log = dir.join("llm.jsonl");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3"])
        .arg(repo().join("tests/helpers/upstream.py"))
        .args(["serve", "--host", &ns.addr(2), "--log", log.to_str().unwrap()])
        .env("LLM_KEY", "sk-real-provider-key")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("READY ").unwrap().parse().unwrap();
    let up = format!("http://{}:{port}", ns.addr(2));
    let (key, hash) = agent_key("dispatcher");
    // The shipped example policy, with the providers' URLs pointed at the stand-in.
    let policy = std::fs::read_to_string(repo().join("policies/llm.yaml"))
        .unwrap()
        .replace("https://api.openai.com", &up)
        .replace("https://api.anthropic.com", &up);
    let policy = policy
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("api_key_hash:") {
                format!("    api_key_hash: \"{hash}\"")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let b = Broker::start(BrokerOpts { policy: Some(&policy), ..Default::default() });
    let sock = b.socket.to_str().unwrap().to_owned();
    for name in ["openai", "anthropic"] {
        let mut set = Command::new(ephyr_bin())
            .args(["secret", "set", name, "--socket", &sock])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        set.stdin.take().unwrap().write_all(b"sk-real-provider-key").unwrap();
        assert!(set.wait().unwrap().success());
    }
    let t = tool_call(
        &b.api,
        &key,
        "task_create",
        json!({"description": "remote coder", "ttl": "1h", "envelope": {"services": ["openai", "anthropic"]}}),
    )
    .unwrap();
    let token = t["token"].as_str().unwrap();
    // Two more tasks, each revoked by its own holder in the middle of a stream.
    let victim = |d: &str| {
        let v = tool_call(
            &b.api,
            &key,
            "task_create",
            json!({"description": d, "ttl": "1h", "envelope": {"services": ["openai", "anthropic"]}}),
        )
        .unwrap();
        v["token"].as_str().unwrap().to_owned()
    };
    let (v1, v2) = (victim("revoked mid-stream (openai)"), victim("revoked mid-stream (anthropic)"));
    let o = python("llm_sdk.py").args([&format!("http://{}", b.api), token, &v1, &v2]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["openai_text"], "Hello from the stand-in", "{v}");
    assert_eq!(v["anthropic_text"], "Hello from the stand-in", "{v}");
    for sdk in ["openai_stream", "anthropic_stream"] {
        let pieces = v[sdk].as_array().unwrap();
        let text: String = pieces.iter().map(|p| p[0].as_str().unwrap()).collect();
        assert_eq!(text, "Hello from the stand-in", "{sdk}: {v}");
        let (first, last) = (pieces[0][1].as_f64().unwrap(), pieces.last().unwrap()[1].as_f64().unwrap());
        assert!(last - first >= 0.45, "{sdk}: pieces arrived as they were produced, not at once: {v}");
    }
    // The SDKs show the broker's reasons, not a bare status.
    let said = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    assert!(said("bad_token").starts_with("401: Error code: 401 - ephyr: invalid task token"), "{v}");
    assert!(said("bad_token").ends_with("(invalid_token)"), "the message itself, not a dump of the body: {v}");
    assert!(said("anthropic_401").starts_with("401: ") && said("anthropic_401").contains("ephyr: "), "{v}");
    assert!(
        said("openai_403").starts_with("403: Error code: 403 - ephyr: service \"openai\" does not allow path"),
        "{v}"
    );
    assert!(said("anthropic_403").starts_with("403: ") && said("anthropic_403").contains("ephyr: "), "{v}");
    // A revocation mid-stream reaches the SDK as an error that says so, after the first piece.
    for k in ["openai_revoked_stream", "anthropic_revoked_stream"] {
        let s = said(k);
        assert!(s.contains("the task was revoked or expired") && s.contains("(task_ended)"), "{k}: {v}");
        // Revoked after the first piece; one more may already be buffered when the cut lands
        // (pieces are 0.2 s apart), never the whole answer (four pieces).
        let after: u32 = s.rsplit("(after ").next().and_then(|r| r.split(' ').next()?.parse().ok()).unwrap();
        assert!((1..4).contains(&after), "{k}: {v}");
    }
    // The provider saw its own key; the token never left the broker.
    let reqs = std::fs::read_to_string(&log).unwrap();
    assert!(!reqs.contains(token) && !reqs.contains("mac_"), "the task token is not forwarded");
    assert!(reqs.contains("sk-real-provider-key"));
    // The paths the example policy does not list are refused.
    let r = proxy(&b, "POST", "/v1/proxy/openai/files", token, b"{}");
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "path_not_allowed", "OpenAI's error shape (errors: openai)");
    assert_eq!(r.json()["error"]["type"], "permission_error");
    let _ = child.kill();
    let _ = child.wait();
}
