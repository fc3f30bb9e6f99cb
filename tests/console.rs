//! The operator console on the dashboard listener, from outside: sign-in and sessions, CSRF and
//! origin checks, roles, the login limiter, what pages may never contain, and the kill switch
//! (`ephyr freeze`, the console's freeze) with its effects and its journal across a restart.
//! The browser walk (real Chromium) is in `tests/console_browser.rs`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const ADMIN_PW: &str = "correct horse battery staple";
const VIEWER_PW: &str = "viewer password 12345";

struct Keys {
    bot: String,
    bot_hash: String,
}

fn policy(k: &Keys, extra_operators: &str) -> String {
    format!(
        "version: 1\noperators:\n{}{}{extra_operators}\
         services:\n  api: {{ url: \"http://127.0.0.1:9/\", credential: {{ type: bearer, secret: \"env:CONSOLE_TEST_SECRET\" }} }}\n\
         agents:\n  bot:\n    api_key_hash: \"{}\"\n    can_delegate: true\n    services: {{ api: {{}} }}\n",
        operator_entry("root-admin", "admin", ADMIN_PW),
        operator_entry("watcher", "viewer", VIEWER_PW),
        k.bot_hash
    )
}

fn keys() -> Keys {
    let (bot, bot_hash) = agent_key("bot");
    Keys { bot, bot_hash }
}

type Client = ConsoleClient;

fn start(policy: &str, data_dir: Option<std::path::PathBuf>) -> Broker {
    Broker::start(BrokerOpts {
        policy: Some(policy),
        data_dir,
        env: vec![("CONSOLE_TEST_SECRET".into(), "s3cr3t-upstream-credential".into())],
        ..Default::default()
    })
}

fn frozen(b: &Broker) -> serde_json::Value {
    local_request(&b.socket, "GET", "/v1/freezes", b"").json()["frozen"].clone()
}

#[test]
fn sign_in_sessions_csrf_origin_and_roles() {
    if !require_root() {
        return;
    }
    let k = keys();
    let b = start(&policy(&k, ""), None);
    let mut admin = Client::new(&b.dashboard);

    // Signed out: pages send you to the form; every console answer carries the hardening.
    let r = admin.get("/agents");
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/login"));
    for path in ["/login", "/agents", "/assets/console.js"] {
        let r = http_request(&b.dashboard, "GET", path, &[("Origin", "http://localhost:1")], b"");
        let csp = r.header("content-security-policy").unwrap_or_else(|| panic!("{path}: no CSP"));
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(r.header("access-control-allow-origin"), None, "{path}: no CORS");
    }
    // DNS rebinding: a foreign Host on the loopback listener is refused.
    let r = http_request(&b.dashboard, "GET", "/login", &[("Host", "attacker.example")], b"");
    assert_eq!(r.status, 403, "{}", r.text());

    // A wrong password: refused, audited without the password.
    let r = admin.login("root-admin", "not the password at all");
    assert_eq!(r.status, 401);
    assert!(admin.cookie.is_none());
    let r = admin.login("root-admin", ADMIN_PW);
    assert_eq!(r.status, 303, "{}", r.text());
    let set = r.header("set-cookie").unwrap();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && !set.contains("Secure"), "{set}");
    let logins = audit_events(&b, "console_login");
    assert_eq!(logins.len(), 2);
    assert_eq!(logins[0]["decision"], "deny");
    assert_eq!(logins[1]["agent"], "console:root-admin");
    assert!(!std::fs::read_to_string(b.data_dir.join("audit/audit.jsonl")).unwrap().contains("horse"));
    assert!(!b.log().contains("horse"), "the password is never logged");

    // Every view renders for the admin, and none shows a hash or a credential.
    for (path, _) in [
        ("/", ""),
        ("/agents", ""),
        ("/tasks", ""),
        ("/ssh", ""),
        ("/recordings", ""),
        ("/remotes", ""),
        ("/audit", ""),
        ("/graphs", ""),
        ("/policy", ""),
        ("/inspect", ""),
        ("/audit/verify", ""),
    ] {
        let r = admin.get(path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let t = r.text();
        for secret in ["argon2id", "ephyr-sha256", "s3cr3t-upstream-credential", &k.bot] {
            assert!(!t.contains(secret), "{path} shows {secret:?}");
        }
    }
    assert!(admin.get("/policy").text().contains("password_hash: &quot;(redacted)&quot;"));
    // A refused proxied request (loopback upstream, network rules) is the service's last error.
    let r = http_request(&b.api, "GET", "/v1/proxy/api/x", &[("Authorization", &format!("Bearer {}", k.bot))], b"");
    assert_eq!(r.status, 403, "{}", r.text());
    let row = || {
        let page = admin.get("/remotes").text();
        let row = &page[page.find("<td>api").expect("the service row")..];
        row[..row.find("</tr>").unwrap()].to_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    // The refusal is a note: on disk within the audit log's linger.
    while !row().contains("network_denied") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(row().contains("network_denied"), "last error shown: {}", row());

    // State changes need the CSRF token, a same-origin request, and nothing changes otherwise.
    let csrf = admin.csrf();
    let form = format!("csrf={csrf}&kind=agent&name=bot");
    assert_eq!(admin.post("/freeze", "kind=agent&name=bot", &[]).status, 403, "no token");
    assert_eq!(admin.post("/freeze", "csrf=AAAA&kind=agent&name=bot", &[]).status, 403, "wrong token");
    assert_eq!(admin.post("/freeze", &form, &[("Origin", "http://evil.example")]).status, 403, "cross-origin");
    assert_eq!(admin.post("/freeze", &form, &[("Origin", "http://localhost:1")]).status, 403, "another local origin");
    let cross_site: &[(&str, &str)] = &[("Origin", ""), ("Sec-Fetch-Site", "cross-site")];
    assert_eq!(admin.post("/freeze", &form, cross_site).status, 403, "cross-site fetch");
    assert_eq!(frozen(&b), json!([]), "refused requests change nothing");
    assert!(tool_call(&b.api, &k.bot, "list_services", json!({})).is_ok());

    // A viewer sees everything and changes nothing.
    let mut viewer = Client::new(&b.dashboard);
    assert_eq!(viewer.login("watcher", VIEWER_PW).status, 303);
    assert_eq!(viewer.get("/agents").status, 200);
    assert!(!viewer.get("/agents").text().contains("action=\"/freeze\""), "no buttons for viewers");
    let vform = format!("csrf={}&kind=agent&name=bot", viewer.csrf());
    let r = viewer.post("/freeze", &vform, &[]);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("viewer"));
    assert_eq!(frozen(&b), json!([]));

    // The admin's freeze works (and is audited with the operator's name).
    let r = admin.post("/freeze", &format!("{form}&reason=testing"), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(frozen(&b)[0]["by"], "console:root-admin");
    let err = tool_call(&b.api, &k.bot, "task_create", json!({"description": "x"})).unwrap_err();
    assert!(err.contains("frozen"), "{err}");
    let ev = audit_events(&b, "freeze");
    assert_eq!(ev[0]["agent"], "console:root-admin");
    assert_eq!(ev[0]["action"]["reason"], "testing");
    let r = admin.post("/unfreeze", &form, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(tool_call(&b.api, &k.bot, "list_services", json!({})).is_ok());

    // The session cookie means nothing on the API listener or to another broker.
    let cookie = admin.cookie.clone().unwrap();
    let r = http_request(&b.api, "GET", "/", &[("Cookie", &cookie)], b"");
    assert_eq!(r.status, 404, "the API listener has no console");
    let r = http_request(&b.api, "POST", "/mcp", &[("Cookie", &cookie), ("Content-Type", "application/json")], b"{}");
    assert_eq!(r.status, 401, "a console cookie is no MCP credential");
    let other = start(&policy(&k, ""), None);
    let mut stolen = Client::new(&other.dashboard);
    stolen.cookie = Some(cookie.clone());
    assert_eq!(stolen.get("/agents").status, 303, "another broker's session is not a session here");

    // After logout the same cookie is refused.
    let r = admin.post("/logout", &format!("csrf={csrf}"), &[]);
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(admin.get("/agents").status, 303);
    assert_eq!(admin.post("/freeze", &form, &[]).status, 401);
    assert_eq!(frozen(&b), json!([]));
}

#[test]
fn password_guessing_is_slowed_per_name_and_per_source() {
    if !require_root() {
        return;
    }
    let k = keys();
    let b = start(&policy(&k, ""), None);
    let mut c = Client::new(&b.dashboard);
    for i in 0..5 {
        assert_eq!(c.login("root-admin", &format!("guess number {i}")).status, 401);
    }
    // Now even the right password waits: the limiter answers before any check.
    let started = Instant::now();
    let r = c.login("root-admin", ADMIN_PW);
    assert_eq!(r.status, 429, "{}", r.text());
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=900).contains(&wait));
    assert!(started.elapsed() < Duration::from_millis(400), "refused without hashing");
    assert!(c.cookie.is_none());
    // Another operator name from the same source waits too (the source is counted).
    assert_eq!(c.login("watcher", VIEWER_PW).status, 429);
    std::thread::sleep(Duration::from_secs(wait + 1));
    assert_eq!(c.login("root-admin", ADMIN_PW).status, 303, "after the wait, the right password works");
    // An unknown name costs the same Argon2 check and is not remembered by name.
    let t = Instant::now();
    assert_eq!(Client::new(&b.dashboard).login("nobody", "whatever password").status, 401);
    assert!(t.elapsed() > Duration::from_millis(20), "the decoy hash is checked");
    assert!(metric(&b, "ephyr_console_logins_total{outcome=\"throttled\"}") >= 2.0);
}

#[test]
fn freeze_revokes_an_agents_tasks_refuses_it_and_survives_a_restart() {
    if !require_root() {
        return;
    }
    let k = keys();
    let p = policy(&k, "");
    let data = TempDir::new("freeze-data");
    let mut b = start(&p, Some(data.path().to_path_buf()));
    let task = tool_call(&b.api, &k.bot, "task_create", json!({"description": "doomed"})).unwrap();
    let token = task["token"].as_str().unwrap().to_owned();
    assert!(tool_call(&b.api, &token, "list_services", json!({})).is_ok());

    // Bad input: a clear error, nothing frozen.
    let out = ephyr(&["freeze", "agent", "ghost", "--socket", b.socket.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no agent \"ghost\""), "{}", stderr(&out));
    let out = ephyr(&["freeze", "planet", "bot", "--socket", b.socket.to_str().unwrap()]);
    assert!(stderr(&out).contains("unknown kind"), "{}", stderr(&out));
    assert_eq!(frozen(&b), json!([]));

    let out =
        ephyr(&["freeze", "agent", "bot", "--reason", "compromised laptop", "--socket", b.socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 task(s) revoked"), "{}", stdout(&out));
    let v = mcp_request(
        &b.api,
        &token,
        "tools/call",
        Some("list_services"),
        json!({"name": "list_services", "arguments": {}}),
    );
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("revoked"), "the task died with the freeze: {v}");
    let err = tool_call(&b.api, &k.bot, "task_create", json!({"description": "again"})).unwrap_err();
    assert!(err.contains("frozen"), "new grants stop at once: {err}");
    assert_eq!(metric(&b, "ephyr_freezes_total{kind=\"agent\"}"), 1.0);

    // The freeze is journaled: it holds after a restart, with who and why.
    b.signal(15);
    b.wait_exit(Duration::from_secs(20));
    let b = start(&p, Some(data.path().to_path_buf()));
    let f = frozen(&b);
    assert_eq!(f[0]["kind"], "agent");
    assert_eq!(f[0]["name"], "bot");
    assert_eq!(f[0]["reason"], "compromised laptop");
    assert_eq!(f[0]["by"], "operator:uid0");
    assert!(tool_call(&b.api, &k.bot, "task_create", json!({"description": "x"})).unwrap_err().contains("frozen"));
    assert_eq!(b.status()["frozen"][0]["name"], "bot", "status shows it");
    let out = ephyr(&["status", "--socket", b.socket.to_str().unwrap()]);
    assert!(stdout(&out).contains("FROZEN agent bot by operator:uid0"), "{}", stdout(&out));

    // Unfreezing lets the agent back in; the revoked task stays revoked.
    let out = ephyr(&["unfreeze", "agent", "bot", "--socket", b.socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(tool_call(&b.api, &k.bot, "list_services", json!({})).is_ok());
    let v = mcp_request(
        &b.api,
        &token,
        "tools/call",
        Some("list_services"),
        json!({"name": "list_services", "arguments": {}}),
    );
    assert!(v["error"].is_object(), "revoked stays revoked: {v}");
    let out = ephyr(&["freezes", "--socket", b.socket.to_str().unwrap()]);
    assert!(stdout(&out).contains("nothing is frozen"));
    assert_eq!(audit_events(&b, "unfreeze")[0]["agent"], "operator:uid0");
}

#[test]
fn a_forged_freeze_journal_stops_start_up_instead_of_thawing() {
    if !require_root() {
        return;
    }
    let k = keys();
    let p = policy(&k, "");
    let data = TempDir::new("freeze-forged");
    let mut b = start(&p, Some(data.path().to_path_buf()));
    let out = ephyr(&["freeze", "agent", "bot", "--socket", b.socket.to_str().unwrap()]);
    assert!(out.status.success());
    b.signal(15);
    b.wait_exit(Duration::from_secs(20));
    // Damage the middle of the journal (not a torn tail): start-up must refuse, not forget.
    let path = data.join("state/freezes.journal");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = 8 + 12 + 4;
    bytes[mid] ^= 0xff;
    bytes.extend_from_slice(&bytes.clone()[8..]);
    std::fs::write(&path, &bytes).unwrap();
    let mut b = Broker::start(BrokerOpts {
        policy: Some(&p),
        data_dir: Some(data.path().to_path_buf()),
        expect_ready: false,
        ..Default::default()
    });
    let st = b.wait_exit(Duration::from_secs(20));
    assert!(!st.success());
    assert!(b.log().contains("freezes"), "{}", b.log());
}

#[test]
fn freezing_a_target_or_an_agent_closes_sessions_streams_and_lists_certificates_on_the_krl() {
    if !require_root() {
        return;
    }
    const USER: &str = "ephyrt-read";
    ensure_user(USER);
    let (data, sshd, fp) = init_with_sshd("freeze-ssh", "ListenAddress 127.0.0.2");
    let (alice, alice_hash) = agent_key("alice");
    let (bob, bob_hash) = agent_key("bob");
    let p = format!(
        "version: 1\nroles:\n  read: {{ principal: {USER} }}\n\
         targets:\n  a: {{ host: 127.0.0.1, port: {port}, allowed_roles: [read], host_key_fingerprint: \"{fp}\" }}\n\
         \x20 b: {{ host: 127.0.0.2, port: {port}, allowed_roles: [read], host_key_fingerprint: \"{fp}\" }}\n\
         agents:\n  alice:\n    api_key_hash: \"{alice_hash}\"\n    ssh: {{ \"*\": {{ roles: [read] }} }}\n\
         \x20 bob:\n    api_key_hash: \"{bob_hash}\"\n    ssh: {{ \"*\": {{ roles: [read] }} }}\n",
        port = sshd.port
    );
    let b = start(&p, Some(data.path().to_path_buf()));
    let on_a = tool_call(&b.api, &alice, "session_create", json!({"target": "a", "role": "read"})).unwrap();
    let on_b = tool_call(&b.api, &alice, "session_create", json!({"target": "b", "role": "read"})).unwrap();
    let serial_a = on_a["cert_serial"].as_str().unwrap().to_owned();
    let krl_has = |serial: &str| {
        let krl = http_request(&b.dashboard, "GET", "/v1/ssh/krl", &[], b"");
        let path = data.join("krl.bin");
        std::fs::write(&path, &krl.body).unwrap();
        // `ssh-keygen -Q` tests a key against a KRL; the serial is what ours lists, so read the
        // list's text form instead.
        let out = std::process::Command::new("ssh-keygen").args(["-Q", "-l", "-f"]).arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        text.contains(&format!("serial: {}", u64::from_str_radix(serial, 16).unwrap())) || text.contains(serial)
    };
    assert!(!krl_has(&serial_a));

    // Freeze target a: its session closes and its certificate is listed; target b is untouched.
    let out = ephyr(&["freeze", "target", "a", "--socket", b.socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 certificate(s) revoked, 1 SSH session(s) closed"), "{}", stdout(&out));
    let sessions = tool_call(&b.api, &alice, "list_sessions", json!({})).unwrap();
    let ids: Vec<&str> = sessions.as_array().unwrap().iter().filter_map(|s| s["session_id"].as_str()).collect();
    assert_eq!(ids, [on_b["session_id"].as_str().unwrap()], "only the session on b is left");
    assert!(krl_has(&serial_a), "the frozen target's certificate is on the KRL");
    let err = tool_call(&b.api, &bob, "exec", json!({"target": "a", "role": "read", "command": "id"})).unwrap_err();
    assert!(err.contains("target \"a\" is frozen"), "{err}");
    assert!(tool_call(&b.api, &bob, "exec", json!({"target": "b", "role": "read", "command": "id -un"})).is_ok());

    // Freeze agent alice: her session on b closes, her session-era MCP stream ends.
    let init = http_request(
        &b.api,
        "POST",
        "/mcp",
        &[
            ("Authorization", &format!("Bearer {alice}")),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ],
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
        .to_string()
        .as_bytes(),
    );
    let sid = init.header("mcp-session-id").unwrap().to_owned();
    let mut stream = HttpStream::open(
        &b.api,
        "GET",
        "/mcp",
        &[
            ("Authorization", &format!("Bearer {alice}")),
            ("Mcp-Session-Id", &sid),
            ("Accept", "text/event-stream"),
            ("Connection", "close"),
        ],
        b"",
    );
    stream.read_until("ephyr notification stream", Duration::from_secs(5));
    assert!(!stream.wait_closed(Duration::from_millis(500)), "open before the freeze");
    let out = ephyr(&["freeze", "agent", "alice", "--json", "--socket", b.socket.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["effects"]["mcp_sessions_ended"], 1, "{v}");
    assert_eq!(v["effects"]["ssh_sessions_closed"], 1, "{v}");
    assert!(stream.wait_closed(Duration::from_secs(5)), "the agent's stream ends");
    assert!(tool_call(&b.api, &bob, "list_sessions", json!({})).is_ok(), "bob is untouched");
    let freezes = audit_events(&b, "freeze");
    assert_eq!(freezes.len(), 2);
    assert_eq!(freezes[1]["outcome"]["certs_revoked"], 1);
}

#[test]
fn a_console_on_the_lan_accepts_its_own_origin_and_no_other() {
    if !require_root() {
        return;
    }
    let k = keys();
    let b = Broker::start(BrokerOpts {
        policy: Some(&policy(&k, "")),
        extra: vec!["--dashboard-listen".into(), "0.0.0.0:0".into(), "--insecure-plain-http".into()],
        ..Default::default()
    });
    let port = b.dashboard.rsplit(':').next().unwrap().to_owned();
    let addr = format!("127.0.0.1:{port}");
    let host = format!("pi.example:{port}");
    let form = format!("name=root-admin&password={}", ADMIN_PW.replace(' ', "+"));
    let post = |origin: &str| {
        http_request(
            &addr,
            "POST",
            "/login",
            &[("Host", &host), ("Origin", origin), ("Content-Type", "application/x-www-form-urlencoded")],
            form.as_bytes(),
        )
    };
    let r = post(&format!("http://pi.example:{port}"));
    assert_eq!(r.status, 303, "the console's own LAN origin: {}", r.text());
    let r = post(&format!("http://evil.example:{port}"));
    assert_eq!(r.status, 403, "{}", r.text());
    let r = post(&format!("https://pi.example:{port}"));
    assert_eq!(r.status, 403, "another scheme is another origin: {}", r.text());

    // On a listener that faces the network, /metrics (agent and service names) needs a local
    // scraper or a signed-in operator; /healthz and the KRL stay public.
    let lan_ip = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").and_then(|_| s.local_addr()))
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback());
    if let Some(ip) = lan_ip {
        let lan = format!("{ip}:{port}");
        let r = http_request(&lan, "GET", "/metrics", &[], b"");
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(!r.text().contains("ephyr_"), "no metric leaks");
        assert_eq!(http_request(&lan, "GET", "/healthz", &[], b"").status, 200);
        let mut c = Client::new(&lan);
        c.cookie = post(&format!("http://pi.example:{port}"))
            .header("set-cookie")
            .and_then(|v| v.split(';').next())
            .map(str::to_owned);
        assert!(c.get("/metrics").text().contains("ephyr_build_info"), "a signed-in operator reads them");
    }
    assert!(http_request(&addr, "GET", "/metrics", &[], b"").text().contains("ephyr_build_info"), "from this host");
}
