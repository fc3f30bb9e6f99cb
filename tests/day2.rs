//! Day 2: watching a running broker. `ephyr monitor` follows the live audit stream with filters;
//! `audit query` says what each event did and `--json` prints the log's own bytes.

mod common;

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn policy(alice: &str, bob: &str) -> String {
    format!(
        r#"version: 1
roles:
  read: {{ principal: nobody }}
targets:
  web: {{ host: 127.0.0.1, port: 1, allowed_roles: [read] }}
agents:
  alice:
    api_key_hash: "{alice}"
    ssh:
      web: {{ roles: [read] }}
    can_delegate: true
  bob:
    api_key_hash: "{bob}"
"#
    )
}

/// Reads what `child` printed until `needle` shows, or fails after `limit`.
fn read_until(out: &mut std::process::ChildStdout, seen: &mut String, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !seen.contains(needle) {
        assert!(Instant::now() < deadline, "{needle:?} not shown; got:\n{seen}");
        let mut buf = [0u8; 4096];
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "monitor ended; got:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[test]
fn monitor_follows_what_agents_do_live_with_filters() {
    if !require_root() {
        return;
    }
    let (alice, alice_hash) = agent_key("alice");
    let (bob, bob_hash) = agent_key("bob");
    let b = Broker::start(BrokerOpts { policy: Some(&policy(&alice_hash, &bob_hash)), ..Default::default() });
    let data = b.data_dir.to_str().unwrap().to_owned();
    let mut mon = Command::new(ephyr_bin())
        .args(["monitor", "--data-dir", &data, "--agent", "alice", "--no-color", "--last", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = mon.stdout.take().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // bob's call is filtered out; alice's denied exec and her task appear, with what was done.
    let _ = tool_call(&b.api, &bob, "list_targets", json!({}));
    let e = tool_call(&b.api, &alice, "exec", json!({"target": "nope", "role": "read", "command": "uptime"}));
    assert!(e.is_err() || e.as_ref().unwrap().to_string().contains("denied"), "{e:?}");
    let t = tool_call(&b.api, &alice, "task_create", json!({"description": "watch me", "ttl": "5m"})).unwrap();
    let mut seen = String::new();
    read_until(&mut out, &mut seen, "task_create", Duration::from_secs(10));
    assert!(seen.contains("DENY "), "a denial is marked: {seen}");
    assert!(seen.contains("tool=exec target=nope role=read command=\"uptime\""), "says what was tried: {seen}");
    assert!(!seen.contains("agent=bob"), "--agent filters: {seen}");
    assert!(!seen.contains("\x1b["), "--no-color: {seen}");
    assert!(seen.contains(t["task_id"].as_str().unwrap()), "{seen}");
    let _ = mon.kill();
    let _ = mon.wait();

    // `audit query --json` prints the log's lines byte for byte.
    let log = std::fs::read(b.data_dir.join("audit/audit.jsonl")).unwrap();
    let out = ephyr(&["audit", "query", "--data-dir", &data, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let complete = &log[..log.iter().rposition(|c| *c == b'\n').unwrap() + 1];
    assert!(out.stdout.starts_with(complete) || complete.starts_with(&out.stdout), "raw lines, unchanged");
    // --decision deny with --target narrows to the one denial.
    let out = ephyr(&["audit", "query", "--data-dir", &data, "--decision", "deny", "--target", "nope"]);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("agent=alice") && text.contains("command=\"uptime\""), "{text}");
    let bad = ephyr(&["audit", "query", "--data-dir", &data, "--decision", "maybe"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("allow, deny or error"), "{}", stderr(&bad));
}
