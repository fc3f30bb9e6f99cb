//! The MCP endpoint against real clients (the official TypeScript SDK, the Python `mcp` SDK, the
//! MCP conformance suite) and raw HTTP for every refusal: authentication, bad input, sessions,
//! the stateless era's envelope, DNS rebinding, and change notifications on open streams.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

struct Keys {
    alice: String,
    bob: String,
    carol: String,
}

/// alice: SSH on web (read) and a service; bob: no grants; carol: disabled.
fn policy(k: &mut Option<Keys>) -> String {
    let (a, ah) = agent_key("alice");
    let (b, bh) = agent_key("bob");
    let (c, ch) = agent_key("carol");
    *k = Some(Keys { alice: a, bob: b, carol: c });
    format!(
        r#"
roles:
  read: {{principal: ephyrtest, description: read-only}}
  op: {{principal: ephyrop}}
targets:
  web: {{host: 127.0.0.1, allowed_roles: [read, op], description: the web server}}
  db: {{host: 127.0.0.2, allowed_roles: [read]}}
services:
  api: {{url: "http://127.0.0.1:9/v1", methods: [GET, POST], description: an API}}
mcp:
  allowed_origins: ["https://console.example:8443"]
agents:
  alice:
    api_key_hash: "{ah}"
    ssh: {{web: {{roles: [read]}}}}
    services: {{api: {{methods: [GET]}}}}
  bob:
    api_key_hash: "{bh}"
  carol:
    api_key_hash: "{ch}"
    enabled: false
    ssh: {{"*": {{roles: [read]}}}}
"#
    )
}

fn start() -> (Broker, Keys) {
    let mut k = None;
    let p = policy(&mut k);
    let b = Broker::start(BrokerOpts { policy: Some(&p), ..Default::default() });
    (b, k.unwrap())
}

fn auth(key: &str) -> String {
    format!("Bearer {key}")
}

/// A session-era POST.
fn post(b: &Broker, key: &str, session: Option<&str>, body: &Value) -> HttpResponse {
    let a = auth(key);
    let mut h = vec![
        ("Authorization", a.as_str()),
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
    ];
    if let Some(s) = session {
        h.push(("Mcp-Session-Id", s));
    }
    http_request(&b.api, "POST", "/mcp", &h, body.to_string().as_bytes())
}

fn initialize(b: &Broker, key: &str) -> String {
    let r = post(
        b,
        key,
        None,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"]["protocolVersion"], "2025-06-18");
    r.header("mcp-session-id").expect("a session id").to_owned()
}

fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    })
}

/// A stateless-era POST with correct routing headers (overridable).
fn post_modern(b: &Broker, key: &str, method: &str, params: Value, extra: &[(&str, &str)]) -> HttpResponse {
    let mut params = params;
    params["_meta"] = meta();
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params});
    let a = auth(key);
    let name = params.get("name").or(params.get("uri")).and_then(Value::as_str).map(str::to_owned);
    let mut h = vec![
        ("Authorization", a.as_str()),
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", method),
    ];
    if let Some(n) = &name {
        h.push(("Mcp-Name", n.as_str()));
    }
    for (k, v) in extra {
        h.retain(|(hk, _)| !hk.eq_ignore_ascii_case(k));
        if !v.is_empty() {
            h.push((k, v));
        }
    }
    http_request(&b.api, "POST", "/mcp", &h, body.to_string().as_bytes())
}

fn audit_lines(b: &Broker) -> Vec<Value> {
    let text = std::fs::read_to_string(b.data_dir.join("audit/audit.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Read-only tool calls and refusals are audited without holding up the reply (the flusher lingers
/// up to 10 ms to batch them), so a test waits for the line it expects, and gives up after 5 s.
fn audit_until(b: &Broker, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let log = audit_lines(b);
        if done(&log) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The task tools every enabled agent sees (tasks issue), after the discovery tools it may use.
const TASK_TOOLS: [&str; 6] = ["task_create", "task_delegate", "task_info", "task_list", "task_revoke", "task_bind"];

fn alice_tools() -> Vec<String> {
    [
        "list_targets",
        "exec",
        "session_create",
        "session_input",
        "session_close",
        "list_sessions",
        "list_certs",
        "file_read",
        "file_write",
        "file_list",
        "http_request",
        "list_services",
    ]
    .into_iter()
    .chain(TASK_TOOLS)
    .map(String::from)
    .collect()
}

fn names(tools: &Value) -> Vec<String> {
    tools.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn typescript_and_python_sdks_connect_list_read_and_call() {
    if !require_root() {
        return;
    }
    let (b, k) = start();
    let url = format!("http://{}/mcp", b.api);

    // The official TypeScript SDK: session era.
    let out = node().args(["ts_client.mjs", &url, &k.alice]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let ts: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert!(ts.get("error").is_none(), "{}", ts["error"]);
    assert_eq!(ts["protocolVersion"], "2025-11-25");
    assert!(ts["sessionId"].as_str().is_some_and(|s| s.len() == 22));
    assert_eq!(ts["serverInfo"]["name"], "ephyr");
    assert_eq!(ts["capabilities"]["tools"]["listChanged"], true);
    assert_eq!(names(&ts["tools"]), alice_tools(), "alice has SSH and a service, no remotes");
    for t in ts["tools"].as_array().unwrap() {
        assert_eq!(t["inputSchema"]["type"], "object");
        assert_eq!(t["inputSchema"]["additionalProperties"], false);
        let read_only = [
            "list_targets",
            "list_sessions",
            "list_certs",
            "file_read",
            "file_list",
            "list_services",
            "task_info",
            "task_list",
        ]
        .contains(&t["name"].as_str().unwrap());
        assert_eq!(t["annotations"]["readOnlyHint"], read_only, "{t}");
    }
    let resources: Vec<&str> = ts["resources"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for r in ["overview", "targets", "services", "remotes", "roles", "status", "tools"] {
        assert!(resources.contains(&format!("ephyr://{r}").as_str()), "{r} missing from {resources:?}");
    }
    let overview = ts["overview"].as_str().unwrap();
    assert!(overview.contains("agent **alice**") && overview.contains("| web |"), "{overview}");
    assert!(!overview.contains("| db |"), "db is not granted to alice: {overview}");
    let targets: Value = serde_json::from_str(ts["listTargets"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        targets,
        json!([{"name": "web", "host": "127.0.0.1", "port": 22, "roles": ["read"], "description": "the web server"}])
    );
    assert_eq!(ts["badArgs"]["isError"], true);
    assert!(ts["badArgs"]["text"].as_str().unwrap().contains("unknown argument \"nope\""), "{}", ts["badArgs"]);
    assert_eq!(ts["unknownTool"]["code"], -32602);
    assert_eq!(ts["unknownResource"]["code"], -32002, "2025 revisions: resource not found");
    assert_eq!(ts["ping"], json!({}));
    assert_eq!(ts["terminated"], true);

    // The Python SDK (2.x): negotiates the stateless era by itself.
    let out = python("mcp_client.py").args([&url, &k.alice]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let py: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(py["protocol_version"], "2026-07-28");
    assert_eq!(names(&py["tools"]), alice_tools());
    assert!(py["status"].as_str().unwrap().contains("agent **alice**"));
    assert_eq!(py["list_targets"]["is_error"], false);
    assert_eq!(py["bad_args"]["is_error"], true);
    assert_eq!(py["unknown_tool"]["code"], -32602);
    assert_eq!(py["unknown_resource"]["code"], -32602, "2026-07-28: resource not found is -32602");
    // ... and still speaks the session era when asked.
    let out = python("mcp_client.py").args([&url, &k.alice, "legacy"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let legacy: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(legacy["protocol_version"], "2025-11-25");
    assert_eq!(names(&legacy["tools"]), alice_tools());

    // bob has no grants: only the task tools are listed, and calling a hidden tool is a denial
    // with a reason.
    let sid = initialize(&b, &k.bob);
    let r = post(&b, &k.bob, Some(&sid), &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    assert_eq!(names(&r.json()["result"]["tools"]), TASK_TOOLS);
    let r = post(
        &b,
        &k.bob,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "list_targets"}}),
    );
    let res = &r.json()["result"];
    assert_eq!(res["isError"], true);
    assert!(res["content"][0]["text"].as_str().unwrap().contains("policy_denies_target"), "{res}");

    // Every call is audited with its decision, and no key appears in the log.
    let log = audit_until(&b, |log| {
        log.iter().any(|l| l["agent"] == "bob" && l["event"] == "tool_call")
            && log.iter().any(|l| l["agent"] == "alice" && l["event"] == "tool_call")
    });
    let calls: Vec<&Value> = log.iter().filter(|l| l["event"] == "tool_call").collect();
    assert!(calls.iter().any(|l| l["agent"] == "alice" && l["decision"] == "allow"), "{calls:?}");
    assert!(
        calls.iter().any(|l| l["agent"] == "bob" && l["decision"] == "deny" && l["code"] == "policy_denies_target")
    );
    assert!(log.iter().any(|l| l["event"] == "mcp_session_started" && l["outcome"]["client"] == "ephyr-ts-test"));
    let raw = std::fs::read_to_string(b.data_dir.join("audit/audit.jsonl")).unwrap();
    for key in [&k.alice, &k.bob, &k.carol] {
        assert!(!raw.contains(key.as_str()), "an API key leaked into the audit log");
    }
}

#[test]
fn conformance_suite_server_scenarios() {
    if !require_root() {
        return;
    }
    let (b, k) = start();
    // The runner cannot send credentials: a small forwarding proxy adds them (tests/peers/auth_proxy.mjs).
    let mut proxy =
        node().args(["auth_proxy.mjs", &b.api, &k.alice]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(proxy.stdout.as_mut().unwrap()), &mut port).unwrap();
    let url = format!("http://localhost:{}/mcp", port.trim());
    let results = TempDir::new("conformance");
    let out = node()
        .args([
            "node_modules/@modelcontextprotocol/conformance/dist/index.js",
            "server",
            "--url",
            &url,
            "--expected-failures",
            "conformance-baseline.yml",
            "-o",
            results.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let _ = proxy.kill();
    let _ = proxy.wait();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    // Exit 0: every scenario outside the baseline passed, and none in it passed unexpectedly.
    assert!(out.status.success(), "conformance run failed:\n{text}");
    for s in [
        "server-initialize",
        "ping",
        "logging-set-level",
        "tools-list",
        "resources-list",
        "prompts-list",
        "server-sse-multiple-streams",
        "dns-rebinding-protection",
    ] {
        assert!(text.contains(&format!("✓ {s}:")), "{s} did not pass:\n{text}");
    }
}

#[test]
fn authentication_refusals_rate_limits_and_metadata() {
    if !require_root() {
        return;
    }
    let (b, k) = start();
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta()}});
    let body = list.to_string();
    let modern = |headers: &[(&str, &str)]| {
        let mut h = vec![
            ("Content-Type", "application/json"),
            ("MCP-Protocol-Version", "2026-07-28"),
            ("Mcp-Method", "tools/list"),
        ];
        h.extend_from_slice(headers);
        http_request(&b.api, "POST", "/mcp", &h, body.as_bytes())
    };

    // No credential: 401, the RFC 9728 pointer, no error code (RFC 6750 §3.1).
    let r = modern(&[]);
    assert_eq!(r.status, 401);
    let www = r.header("www-authenticate").unwrap();
    let md_url = format!("http://{}/.well-known/oauth-protected-resource/mcp", b.api);
    assert!(www.starts_with("Bearer ") && www.contains(&format!("resource_metadata=\"{md_url}\"")), "{www}");
    assert!(!www.contains("error="), "{www}");
    assert_eq!(r.json()["error"]["code"], -32001);
    for path in ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"] {
        let md = http_request(&b.api, "GET", path, &[], b"").json();
        assert_eq!(md["resource"], format!("http://{}/mcp", b.api));
        assert_eq!(md["bearer_methods_supported"], json!(["header"]));
    }

    // X-API-Key works as well as Bearer; both at once must agree.
    assert_eq!(modern(&[("X-API-Key", &k.alice)]).status, 200);
    let a = auth(&k.alice);
    assert_eq!(modern(&[("Authorization", &a), ("X-API-Key", &k.alice)]).status, 200);
    let r = modern(&[("Authorization", &a), ("X-API-Key", &k.bob)]);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("different credentials"));
    // Not in the URL.
    let r = http_request(
        &b.api,
        "POST",
        &format!("/mcp?api_key={}", k.alice),
        &[("Content-Type", "application/json"), ("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/list")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("only in headers") && !r.text().contains(&k.alice));
    // Other schemes are refused with a reason.
    let r = modern(&[("Authorization", "Basic YTpi")]);
    assert_eq!(r.status, 400);
    assert!(r.header("www-authenticate").unwrap().contains("error=\"invalid_request\""));

    // A disabled agent's valid key: 403.
    let r = modern(&[("Authorization", &auth(&k.carol))]);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("disabled"));

    // A made-up key in our format: refused without Argon2 (its id matches no agent), fast.
    let fake = format!("ephyr_ak_{}", "A".repeat(54));
    let t = Instant::now();
    let r = modern(&[("Authorization", &auth(&fake))]);
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().contains("error=\"invalid_token\""));
    assert!(t.elapsed() < Duration::from_millis(500));
    // A wrong secret under alice's key id: one SHA-256, then 401.
    let mut wrong = k.alice.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(modern(&[("Authorization", &auth(&wrong))]).status, 401);

    // Ten failures from one address (six so far: the mismatched pair, the URL, Basic, carol's
    // disabled agent, the made-up key, the wrong secret), then 429 for keys that do not verify.
    for _ in 0..4 {
        assert_eq!(modern(&[("Authorization", &auth(&fake))]).status, 401);
    }
    let r = modern(&[("Authorization", &auth(&wrong))]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert!(!r.text().contains(&wrong));
    // Valid keys keep working from the same address: they verify at once (fast stored form).
    assert_eq!(modern(&[("Authorization", &a)]).status, 200);
    assert_eq!(modern(&[("Authorization", &auth(&k.bob))]).status, 200);

    // Failures are audited (a bounded number), never with the key.
    let log = audit_until(&b, |log| {
        log.iter().any(|l| l["code"] == "agent_disabled") && log.iter().any(|l| l["code"] == "invalid_api_key")
    });
    let fails: Vec<&Value> = log.iter().filter(|l| l["event"] == "auth_failed").collect();
    assert!(fails.iter().any(|l| l["code"] == "invalid_api_key"));
    assert!(fails.iter().any(|l| l["code"] == "agent_disabled" && l["agent"] == "carol"));
    assert!(fails.len() <= 14, "audit lines for failures are bounded per source: {}", fails.len());
    let raw = std::fs::read_to_string(b.data_dir.join("audit/audit.jsonl")).unwrap();
    assert!(!raw.contains(&wrong) && !raw.contains(&fake));
    assert!(metric(&b, "ephyr_auth_total{method=\"api_key\",outcome=\"rate_limited\"}") >= 1.0);
}

#[test]
fn bad_input_gets_the_right_error_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let (b, k) = start();
    let sid = initialize(&b, &k.alice);
    let sessions_before = metric(&b, "ephyr_mcp_sessions");
    let audit_before = audit_until(&b, |log| log.iter().any(|l| l["event"] == "mcp_session_started")).len();
    let a = auth(&k.alice);
    let raw = |method: &str, headers: &[(&str, &str)], body: &[u8]| {
        let mut h = vec![("Authorization", a.as_str()), ("Mcp-Session-Id", sid.as_str())];
        h.extend_from_slice(headers);
        http_request(&b.api, method, "/mcp", &h, body)
    };
    let json_ct = [("Content-Type", "application/json")];
    for (body, status, code, words) in [
        (&b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": "[..], 400, -32700, "not JSON"),
        (b"", 400, -32700, "empty"),
        (b"{\"jsonrpc\":\"1.0\",\"id\":1,\"method\":\"tools/list\"}", 400, -32600, "must be \"2.0\""),
        (b"[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}]", 400, -32600, "batch"),
        (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"a\",\"method\":\"b\"}", 400, -32600, "duplicate"),
        (b"{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"tools/list\"}", 400, -32600, "\"id\""),
        (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\",\"params\":7}", 400, -32600, "params"),
        (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"no/such\"}", 200, -32601, "method not found"),
        (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{}}", 200, -32602, "name"),
        (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"list_targets\",\"arguments\":[]}}", 200, -32602, "arguments"),
        (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"resources/read\",\"params\":{\"uri\":\"file:///etc/shadow\"}}", 200, -32002, "unknown resource"),
    ] {
        let r = raw("POST", &json_ct, body);
        assert_eq!(r.status, status, "{}: {}", String::from_utf8_lossy(body), r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], code, "{}: {e}", String::from_utf8_lossy(body));
        assert!(e["message"].as_str().unwrap().contains(words), "{}: {e}", String::from_utf8_lossy(body));
    }
    // Deeply nested JSON is a parse error, not a stack overflow.
    let deep = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\",\"params\":{{\"a\":{}{}}}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let r = raw("POST", &json_ct, deep.as_bytes());
    assert!(r.status == 400 || r.status == 413, "{}", r.status);
    // Wrong content type, wrong Accept, unknown HTTP method.
    let r = raw("POST", &[("Content-Type", "text/plain")], b"{}");
    assert_eq!(r.status, 415);
    assert!(r.text().contains("Content-Type must be application/json"));
    let r = raw("POST", &[("Content-Type", "application/json"), ("Accept", "text/html")], b"{}");
    assert_eq!(r.status, 406);
    let r = raw("PUT", &json_ct, b"{}");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST, DELETE"));
    // Oversized: refused from Content-Length before reading, and while reading a chunked body.
    let big = vec![b' '; (1 << 20) + 1];
    let r = raw("POST", &json_ct, &big);
    assert_eq!(r.status, 413);
    assert!(r.text().contains("exceeds 1048576 bytes"));
    // A notification and a posted response: accepted, nothing to answer.
    assert_eq!(raw("POST", &json_ct, b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/cancelled\"}").status, 202);
    assert_eq!(raw("POST", &json_ct, b"{\"jsonrpc\":\"2.0\",\"id\":5,\"result\":{}}").status, 202);

    // Slow clients: headers that never finish and a body that never arrives are both cut off.
    use std::io::{Read, Write};
    let slow_headers = std::thread::spawn({
        let addr = b.api.clone();
        move || {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"POST /mcp HTTP/1.1\r\nHost: x\r\n").unwrap();
            let t = Instant::now();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            (t.elapsed(), String::from_utf8_lossy(&buf).into_owned())
        }
    });
    let slow_body = std::thread::spawn({
        let addr = b.api.clone();
        let a = a.clone();
        let sid = sid.clone();
        move || {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            let head = format!(
                "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {a}\r\nMcp-Session-Id: {sid}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"jsonrpc\""
            );
            s.write_all(head.as_bytes()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        }
    });
    let (took, resp) = slow_headers.join().unwrap();
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(20), "{took:?}");
    assert!(resp.is_empty() || resp.starts_with("HTTP/1.1 408"), "{resp}");
    let resp = slow_body.join().unwrap();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("request body not received within 10s"), "{resp}");

    // Nothing changed: same sessions, the session still works, no audit lines from refusals.
    assert_eq!(metric(&b, "ephyr_mcp_sessions"), sessions_before);
    let r = post(&b, &k.alice, Some(&sid), &json!({"jsonrpc": "2.0", "id": 9, "method": "ping"}));
    assert_eq!(r.json()["result"], json!({}));
    let new: Vec<Value> = audit_lines(&b).into_iter().skip(audit_before).collect();
    assert!(new.iter().all(|l| l["event"] == "tool_call"), "only the tool calls above are audited: {new:?}");
}

#[test]
fn sessions_are_bound_to_their_credential_and_the_stateless_envelope_is_checked() {
    if !require_root() {
        return;
    }
    let (b, k) = start();
    // Session era.
    let sid = initialize(&b, &k.alice);
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    assert_eq!(post(&b, &k.alice, Some(&sid), &list).status, 200);
    let r = post(&b, &k.alice, None, &list);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("Mcp-Session-Id header is required"));
    let r = post(&b, &k.bob, Some(&sid), &list);
    assert_eq!(r.status, 404, "another agent's credential cannot use the session");
    let r = post(&b, &k.alice, Some("not-a-session"), &list);
    assert_eq!(r.status, 404);
    let a = auth(&k.alice);
    let r = http_request(
        &b.api,
        "POST",
        "/mcp",
        &[
            ("Authorization", &a),
            ("Mcp-Session-Id", &sid),
            ("Content-Type", "application/json"),
            ("MCP-Protocol-Version", "1999-01-01"),
        ],
        list.to_string().as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // The 2025-03-26 header on a later-negotiated session is still a version we speak.
    let r = http_request(
        &b.api,
        "POST",
        "/mcp",
        &[
            ("Authorization", &a),
            ("Mcp-Session-Id", &sid),
            ("Content-Type", "application/json"),
            ("MCP-Protocol-Version", "2025-03-26"),
        ],
        list.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200);
    // initialize validation.
    let r = post(&b, &k.alice, None, &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("protocolVersion is missing"));
    let r = post(
        &b,
        &k.alice,
        None,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2099-01-01", "capabilities": {}}}),
    );
    assert_eq!(r.json()["result"]["protocolVersion"], "2025-11-25", "an unknown version gets our latest");
    // DELETE ends it.
    let del = |key: &str| {
        http_request(&b.api, "DELETE", "/mcp", &[("Authorization", &auth(key)), ("Mcp-Session-Id", &sid)], b"")
    };
    assert_eq!(del(&k.bob).status, 404);
    assert_eq!(del(&k.alice).status, 200);
    assert_eq!(post(&b, &k.alice, Some(&sid), &list).status, 404);

    // Stateless era: every rung of the envelope check.
    let r = post_modern(&b, &k.alice, "tools/list", json!({}), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let res = &r.json()["result"];
    assert_eq!(res["resultType"], "complete");
    assert_eq!(res["cacheScope"], "private");
    assert_eq!(res["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "ephyr");
    assert!(r.header("mcp-session-id").is_none(), "no sessions in the stateless era");
    let d = post_modern(&b, &k.alice, "server/discover", json!({}), &[]).json();
    assert_eq!(d["result"]["supportedVersions"], json!(["2026-07-28"]));
    for (method, params, extra, status, code, words) in [
        ("tools/list", json!({}), vec![("Mcp-Method", "")], 400, -32020, "Mcp-Method header is missing"),
        ("tools/list", json!({}), vec![("Mcp-Method", "tools/call")], 400, -32020, "does not match"),
        ("tools/call", json!({"name": "list_targets"}), vec![("Mcp-Name", "list_services")], 400, -32020, "Mcp-Name"),
        (
            "tools/call",
            json!({"name": "list_targets"}),
            vec![("Mcp-Name", "")],
            400,
            -32020,
            "Mcp-Name header is missing",
        ),
        ("ping", json!({}), vec![], 404, -32601, "method not found"),
        ("initialize", json!({}), vec![], 404, -32601, "method not found"),
        ("resources/read", json!({"uri": "ephyr://nope"}), vec![], 400, -32602, "unknown resource"),
    ] {
        let r = post_modern(&b, &k.alice, method, params, &extra);
        assert_eq!(r.status, status, "{method} {extra:?}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], code, "{method}: {e}");
        assert!(e["message"].as_str().unwrap().contains(words), "{method}: {e}");
        assert_eq!(r.json()["id"], 7);
    }
    // An unknown version: the spec's -32022 with the versions we serve (no guessing).
    let body = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2027-01-01", "io.modelcontextprotocol/clientCapabilities": {}}}});
    let r = http_request(
        &b.api,
        "POST",
        "/mcp",
        &[
            ("Authorization", &a),
            ("Content-Type", "application/json"),
            ("MCP-Protocol-Version", "2027-01-01"),
            ("Mcp-Method", "tools/list"),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32022);
    assert_eq!(r.json()["error"]["data"], json!({"supported": ["2026-07-28"], "requested": "2027-01-01"}));
    // Routing headers may not repeat.
    let r = http_request(
        &b.api,
        "POST",
        "/mcp",
        &[
            ("Authorization", &a),
            ("Content-Type", "application/json"),
            ("MCP-Protocol-Version", "2026-07-28"),
            ("Mcp-Method", "tools/list"),
            ("Mcp-Method", "tools/list"),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.json()["error"]["code"], -32020);
    // A notification: 202.
    let r = http_request(
        &b.api,
        "POST",
        "/mcp",
        &[("Authorization", &a), ("Content-Type", "application/json"), ("MCP-Protocol-Version", "2026-07-28")],
        b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/cancelled\"}",
    );
    assert_eq!(r.status, 202);
    // GET is not part of the stateless era.
    let r = http_request(&b.api, "GET", "/mcp", &[("Authorization", &a), ("MCP-Protocol-Version", "2026-07-28")], b"");
    assert_eq!(r.status, 405);
}

#[test]
fn dns_rebinding_and_foreign_origins_are_refused() {
    if !require_root() {
        return;
    }
    let (b, k) = start();
    let a = auth(&k.alice);
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}}}).to_string();
    let req = |host: &str, origin: Option<&str>| {
        let mut h = vec![("Authorization", a.as_str()), ("Content-Type", "application/json"), ("Host", host)];
        if let Some(o) = origin {
            h.push(("Origin", o));
        }
        http_request(&b.api, "POST", "/mcp", &h, init.as_bytes())
    };
    let port = b.api.rsplit(':').next().unwrap().to_owned();
    let local = format!("localhost:{port}");
    assert_eq!(req(&local, None).status, 200);
    assert_eq!(req(&local, Some(&format!("http://localhost:{port}"))).status, 200);
    assert_eq!(req(&local, Some("https://console.example:8443")).status, 200, "listed in mcp.allowed_origins");
    let r = req("evil.example.com", Some("http://evil.example.com"));
    assert_eq!(r.status, 403);
    assert!(r.text().contains("DNS rebinding"), "{}", r.text());
    let r = req(&local, Some("http://evil.example.com"));
    assert_eq!(r.status, 403);
    assert!(r.text().contains("mcp.allowed_origins"));
    assert_eq!(req(&local, Some("null")).status, 403);
    // Refused before authentication: no audit noise, no session.
    assert!(audit_lines(&b).iter().all(|l| l["event"] != "auth_failed"));
}

#[test]
fn a_policy_reload_is_announced_on_open_streams_and_shutdown_ends_them() {
    if !require_root() {
        return;
    }
    let (mut b, k) = start();
    let a = auth(&k.alice);
    // Session era: the GET stream.
    let sid = initialize(&b, &k.alice);
    let mut get = HttpStream::open(
        &b.api,
        "GET",
        "/mcp",
        &[("Authorization", &a), ("Mcp-Session-Id", &sid), ("Accept", "text/event-stream")],
        b"",
    );
    get.read_until("ephyr notification stream", Duration::from_secs(5));
    // A second GET stream for the same session is refused.
    let r = http_request(
        &b.api,
        "GET",
        "/mcp",
        &[("Authorization", &a), ("Mcp-Session-Id", &sid), ("Accept", "text/event-stream")],
        b"",
    );
    assert_eq!(r.status, 409);
    // Stateless era: subscriptions/listen.
    let mut params = json!({"notifications": {"toolsListChanged": true}});
    params["_meta"] = meta();
    let body = json!({"jsonrpc": "2.0", "id": "sub-1", "method": "subscriptions/listen", "params": params}).to_string();
    let mut listen = HttpStream::open(
        &b.api,
        "POST",
        "/mcp",
        &[
            ("Authorization", &a),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
            ("MCP-Protocol-Version", "2026-07-28"),
            ("Mcp-Method", "subscriptions/listen"),
        ],
        body.as_bytes(),
    );
    let ack = listen.read_until("notifications/subscriptions/acknowledged", Duration::from_secs(5));
    assert!(ack.contains("content-type: text/event-stream"), "{ack}");
    assert!(ack.contains("\"toolsListChanged\":true") && !ack.contains("resourcesListChanged"), "{ack}");
    assert!(ack.contains("\"io.modelcontextprotocol/subscriptionId\":\"sub-1\""), "{ack}");
    assert_eq!(metric(&b, "ephyr_mcp_streams"), 2.0);

    // Reload: both streams hear about it.
    let out = ephyr(&["policy", "reload", "--socket", b.socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let g = get.read_until("notifications/resources/list_changed", Duration::from_secs(5));
    assert!(g.contains("notifications/tools/list_changed"), "{g}");
    let l = listen.read_until("notifications/tools/list_changed", Duration::from_secs(5));
    assert!(!l.contains("resources/list_changed"), "only what was asked for: {l}");

    // Deleting the session ends its stream.
    let r = http_request(&b.api, "DELETE", "/mcp", &[("Authorization", &a), ("Mcp-Session-Id", &sid)], b"");
    assert_eq!(r.status, 200);
    // The stream's body ends (the last chunk of a chunked response) with its session.
    get.read_until("\r\n0\r\n\r\n", Duration::from_secs(5));

    // Shutdown ends the subscription with its result, and the broker exits promptly.
    b.signal(libc::SIGTERM);
    let end = listen.read_until("\"result\"", Duration::from_secs(5));
    assert!(end.contains("\"id\":\"sub-1\"") && end.contains("\"resultType\":\"complete\""), "{end}");
    let t = Instant::now();
    assert!(b.wait_exit(Duration::from_secs(10)).success());
    assert!(t.elapsed() < Duration::from_secs(5), "open streams do not hold up shutdown");
}
