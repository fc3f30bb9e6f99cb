//! Federation, first slice: the registry's `@modelcontextprotocol/server-everything` over
//! Streamable HTTP behind the broker. Tools appear namespaced and filtered per caller; calls are
//! authorized with their arguments, audited before they leave, and forwarded; a hostile echo of
//! the broker's credential is overwritten; a remote that restarts is re-initialized.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// server-everything, Streamable HTTP on a free loopback port; killed on drop.
struct Everything {
    child: Child,
}

impl Everything {
    fn start(port: u16) -> Everything {
        let child = node()
            .arg("node_modules/@modelcontextprotocol/server-everything/dist/index.js")
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "server-everything did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Everything { child }
    }
}

impl Drop for Everything {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tools/list names a credential sees.
fn listed(b: &Broker, cred: &str) -> Vec<String> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"}}}})
    .to_string();
    let auth = format!("Bearer {cred}");
    let h = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", "tools/list"),
    ];
    let r = http_request(&b.api, "POST", "/mcp", &h, body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn remote_tools_are_listed_per_caller_authorized_with_arguments_audited_and_forwarded() {
    if !require_root() {
        return;
    }
    let port = free_port();
    let server = Everything::start(port);
    let (alice, alice_hash) = agent_key("alice");
    let (bob, bob_hash) = agent_key("bob");
    let policy = format!(
        r#"version: 1
network: {{ allow: [127.0.0.1/32] }}
remotes:
  everything: {{ url: "http://127.0.0.1:{port}/mcp", tool_prefix: ev, credential: {{ type: bearer, secret: "env:EV_TOKEN" }} }}
agents:
  alice:
    api_key_hash: "{alice_hash}"
    can_delegate: true
    remotes:
      everything: {{ tools: [echo, get-sum], args: {{ a: {{ max: 100 }} }} }}
  bob:
    api_key_hash: "{bob_hash}"
    remotes:
      everything: {{ tools: [echo] }}
"#
    );
    let b = Broker::start(BrokerOpts {
        policy: Some(&policy),
        env: vec![("EV_TOKEN".into(), "ev-secret-token-123".into())],
        ..Default::default()
    });

    // Listing: namespaced, and only what each caller could call.
    let a = listed(&b, &alice);
    assert!(a.contains(&"ev.echo".into()) && a.contains(&"ev.get-sum".into()), "{a:?}");
    assert!(!a.iter().any(|t| t == "ev.get-env"), "not granted, not listed: {a:?}");
    let bl = listed(&b, &bob);
    assert!(bl.contains(&"ev.echo".into()) && !bl.contains(&"ev.get-sum".into()), "{bl:?}");

    // Calls: forwarded with the remote's result.
    let r = tool_call(&b.api, &alice, "ev.echo", json!({"message": "hello through ephyr"})).unwrap();
    assert!(r.as_str().unwrap().contains("hello through ephyr"), "{r}");
    let sum = tool_call(&b.api, &alice, "ev.get-sum", json!({"a": 2, "b": 3})).unwrap();
    assert!(sum.to_string().contains('5'), "{sum}");
    // Argument constraints: a above its bound, or missing (the tool declares it), is refused.
    let e = tool_call(&b.api, &alice, "ev.get-sum", json!({"a": 1000, "b": 1})).unwrap_err();
    assert!(e.starts_with("denied ("), "{e}");
    let e = tool_call(&b.api, &alice, "ev.get-sum", json!({"b": 1})).unwrap_err();
    assert!(e.starts_with("denied ("), "a declared argument left out cannot dodge its bound: {e}");
    // Tools outside the grant: refused with a reason, for a known tool; unknown otherwise.
    let e = tool_call(&b.api, &alice, "ev.get-env", json!({})).unwrap_err();
    assert!(e.contains("denied") && e.contains("get-env"), "{e}");
    let e = tool_call(&b.api, &bob, "ev.get-sum", json!({"a": 1, "b": 1})).unwrap_err();
    assert!(e.starts_with("denied ("), "{e}");

    // The broker's credential reached the remote, and never comes back: server-everything's
    // get-env would print it, so echo it instead through the message.
    let echoed = tool_call(&b.api, &alice, "ev.echo", json!({"message": "ev-secret-token-123"})).unwrap();
    assert!(!echoed.to_string().contains("ev-secret-token-123"), "scrubbed: {echoed}");

    // A task token narrowed to the echo tool only.
    let t = tool_call(
        &b.api,
        &alice,
        "task_create",
        json!({"description": "echo only", "ttl": "5m", "envelope": {"tools": ["ev.echo"]}}),
    )
    .unwrap();
    let token = t["token"].as_str().unwrap();
    assert!(tool_call(&b.api, token, "ev.echo", json!({"message": "x"})).is_ok());
    let e = tool_call(&b.api, token, "ev.get-sum", json!({"a": 1, "b": 1})).unwrap_err();
    assert!(e.starts_with("denied ("), "{e}");

    // Every allowed call is on disk before it leaves; refusals are recorded too.
    std::thread::sleep(Duration::from_millis(100));
    let calls = audit_events(&b, "remote_call");
    assert!(
        calls.iter().any(|e| e["decision"] == "allow"
            && e["action"]["remote_tool"] == "echo"
            && e["action"]["args_sha256"].as_str().is_some_and(|h| h.len() == 64)),
        "{calls:?}"
    );
    assert!(calls.iter().any(|e| e["decision"] == "deny"), "{calls:?}");

    // The remote restarts (its sessions are gone): the next call re-initializes and works.
    drop(server);
    let e = tool_call(&b.api, &alice, "ev.echo", json!({"message": "down"})).unwrap_err();
    assert!(e.contains("everything"), "a failure names the remote: {e}");
    let _again = Everything::start(port);
    let r: Value = tool_call(&b.api, &alice, "ev.echo", json!({"message": "back"})).unwrap();
    assert!(r.as_str().unwrap().contains("back"), "{r}");
}
