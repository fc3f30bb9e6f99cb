//! TLS on both listeners: the local CA a non-loopback broker makes for itself, real MCP SDKs
//! (TypeScript with NODE_EXTRA_CA_CERTS, Python with the CA file) connecting over HTTPS, a
//! client without the CA failing clearly, plain HTTP refused on a TLS port, the console's
//! cookie marked Secure, a given certificate re-read on SIGHUP (a broken one kept out), and
//! plain HTTP on a non-loopback address only with the loud flag.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PW: &str = "tls test operator pw";

fn policy(hash: &str) -> String {
    format!(
        "version: 1\noperators:\n{}agents:\n  bot:\n    api_key_hash: \"{hash}\"\n",
        operator_entry("ops", "admin", PW)
    )
}

fn port(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn helper(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = python("tls_client.py").args(args).envs(env.iter().copied()).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&out), stderr(&out)))
}

#[test]
fn a_non_loopback_broker_makes_a_local_ca_and_real_sdks_trust_it() {
    if !require_root() {
        return;
    }
    let (key, hash) = agent_key("bot");
    let b = Broker::start(BrokerOpts {
        policy: Some(&policy(&hash)),
        extra: vec!["--listen".into(), "0.0.0.0:0".into(), "--dashboard-listen".into(), "0.0.0.0:0".into()],
        ..Default::default()
    });
    let ca = b.data_dir.join("tls/ca.pem");
    assert!(ca.exists(), "the local CA is made");
    let st = b.status();
    let fp = st["tls"]["ca_fingerprint"].as_str().unwrap().to_owned();
    assert!(fp.starts_with("SHA256:"), "{st}");
    assert!(b.log().contains(&fp), "the banner names the CA fingerprint");
    let doctor = ephyr(&["doctor", "--data-dir", b.data_dir.to_str().unwrap(), "--json"]);
    assert!(stdout(&doctor).contains(&fp), "doctor shows it: {}", stdout(&doctor));
    let out = ephyr(&["status", "--socket", b.socket.to_str().unwrap()]);
    assert!(stdout(&out).contains(&format!("TLS: local CA {} {fp}", ca.display())), "{}", stdout(&out));
    let (api, dash) = (format!("localhost:{}", port(&b.api)), format!("127.0.0.1:{}", port(&b.dashboard)));
    let url = format!("https://{api}/mcp");

    // The Python SDK with the CA, and without it.
    let ok = helper(&["mcp", &url, &key, ca.to_str().unwrap()], &[]);
    assert_eq!(ok["ok"], true, "{ok}");
    assert!(ok["tools"].as_u64().unwrap() > 3);
    let refused = helper(&["mcp", &url, &key], &[]);
    assert_eq!(refused["ok"], false);
    assert!(refused["error"].as_str().unwrap().contains("CERTIFICATE_VERIFY_FAILED"), "a clear failure: {refused}");

    // The TypeScript SDK, trusting the CA through NODE_EXTRA_CA_CERTS.
    let out = node().args(["ts_client.mjs", &url, &key]).env("NODE_EXTRA_CA_CERTS", &ca).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert!(v["tools"].as_array().is_some_and(|t| !t.is_empty()), "{v}");
    let out = node().args(["ts_client.mjs", &url, &key]).output().unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("UNABLE_TO_VERIFY_LEAF_SIGNATURE")
            || text.contains("SELF_SIGNED")
            || text.contains("certificate"),
        "node without the CA fails on the certificate: {text}"
    );

    // Plain HTTP to a TLS port gets no HTTP answer.
    let mut s = std::net::TcpStream::connect(&dash).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(!buf.starts_with(b"HTTP/1.1 200"), "plain HTTP is not served on a TLS listener");

    // The console over HTTPS: the session cookie is Secure.
    let v = helper(&["login", "127.0.0.1", &port(&b.dashboard).to_string(), ca.to_str().unwrap(), "ops", PW], &[]);
    assert_eq!(v["status"], 303, "{v}");
    let cookie = v["set_cookie"].as_str().unwrap();
    assert!(cookie.contains("; Secure") && cookie.contains("HttpOnly"), "{cookie}");

    // TLS 1.3 with the generated certificate.
    let p = helper(&["peer", "127.0.0.1", &port(&b.api).to_string()], &[]);
    assert_eq!(p["version"], "TLSv1.3");
}

#[test]
fn a_given_certificate_is_reread_on_sighup_and_a_broken_one_kept_out() {
    if !require_root() {
        return;
    }
    let pki1 = TempDir::new("tls-pki1");
    let pki2 = TempDir::new("tls-pki2");
    for d in [&pki1, &pki2] {
        assert!(python("upstream.py").args(["certs", d.path().to_str().unwrap()]).status().unwrap().success());
    }
    let live = TempDir::new("tls-live");
    let (cert, key) = (live.join("cert.pem"), live.join("key.pem"));
    std::fs::copy(pki1.join("server.pem"), &cert).unwrap();
    std::fs::copy(pki1.join("server.key"), &key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in [&cert, &key] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(live.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (bot, hash) = agent_key("bot");
    let b = Broker::start(BrokerOpts {
        policy: Some(&policy(&hash)),
        extra: vec![
            "--tls-cert".into(),
            cert.to_str().unwrap().into(),
            "--tls-key".into(),
            key.to_str().unwrap().into(),
        ],
        ..Default::default()
    });
    let sha = |p: &std::path::Path| {
        let out =
            std::process::Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(p).output().unwrap();
        ring_sha256(&out.stdout)
    };
    let served = |addr: &str| {
        helper(&["peer", "127.0.0.1", &port(addr).to_string()], &[])["sha256"].as_str().unwrap().to_owned()
    };
    assert_eq!(served(&b.api), sha(&pki1.join("server.pem")));
    assert_eq!(served(&b.dashboard), sha(&pki1.join("server.pem")), "both listeners");
    let url = format!("https://localhost:{}/mcp", port(&b.api));
    assert_eq!(helper(&["mcp", &url, &bot, pki1.join("ca.pem").to_str().unwrap()], &[])["ok"], true);

    // New files, SIGHUP: new connections get the new certificate, without a restart.
    std::fs::copy(pki2.join("server.pem"), &cert).unwrap();
    std::fs::copy(pki2.join("server.key"), &key).unwrap();
    let pid = b.pid();
    b.signal(1);
    wait_until(|| served(&b.api) == sha(&pki2.join("server.pem")), "the new certificate after SIGHUP");
    assert_eq!(b.pid(), pid);
    assert_eq!(helper(&["mcp", &url, &bot, pki2.join("ca.pem").to_str().unwrap()], &[])["ok"], true);
    assert_eq!(helper(&["mcp", &url, &bot, pki1.join("ca.pem").to_str().unwrap()], &[])["ok"], false);

    // A key that does not match: the reload is refused, the current certificate stays.
    std::fs::copy(pki1.join("server.key"), &key).unwrap();
    b.signal(1);
    wait_until(|| b.log().contains("TLS certificate not re-read"), "the refusal in the log");
    assert_eq!(served(&b.api), sha(&pki2.join("server.pem")));
    assert_eq!(b.status()["tls"]["mode"], "given");
}

#[test]
fn plain_http_on_a_non_loopback_address_needs_the_loud_flag() {
    if !require_root() {
        return;
    }
    let (_, hash) = agent_key("bot");
    let b = Broker::start(BrokerOpts {
        policy: Some(&policy(&hash)),
        extra: vec!["--listen".into(), "0.0.0.0:0".into(), "--insecure-plain-http".into()],
        ..Default::default()
    });
    assert!(b.log().contains("INSECURE: plain HTTP"), "{}", b.log());
    assert_eq!(b.status()["tls"], json!(null));
    let r = http_request(&format!("127.0.0.1:{}", port(&b.api)), "GET", "/healthz", &[], b"");
    assert_eq!(r.status, 200);
    assert!(!b.data_dir.join("tls/ca.pem").exists(), "no CA made");
    // And --tls-cert without --tls-key is a configuration error (exit 3).
    let mut bad = Broker::start(BrokerOpts {
        policy: Some(&policy(&hash)),
        extra: vec!["--tls-cert".into(), "/nonexistent.pem".into()],
        expect_ready: false,
        ..Default::default()
    });
    assert_eq!(bad.wait_exit(Duration::from_secs(20)).code(), Some(3));
    assert!(bad.log().contains("--tls-cert and --tls-key go together"), "{}", bad.log());
}

fn ring_sha256(b: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
