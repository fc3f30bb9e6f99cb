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

#[test]
fn whoami_targets_certs_and_tasks_show_the_running_broker() {
    if !require_root() {
        return;
    }
    let user = "ephyrt-views";
    ensure_user(user);
    let uid = ephyr::users::lookup(user).unwrap().uid;
    let (alice, alice_hash) = agent_key("alice");
    let (_, bob_hash) = agent_key("bob");
    let policy = policy(&alice_hash, &bob_hash)
        .replace("  bob:\n", &format!("  local:\n    uid: {uid}\n    ssh:\n      web: {{ roles: [read] }}\n  bob:\n"));
    let b = Broker::start(BrokerOpts { policy: Some(&policy), ..Default::default() });
    let sock = b.socket.to_str().unwrap().to_owned();
    let view = |what: &str, json: bool| {
        let mut args = vec![what, "--socket", &sock];
        if json {
            args.push("--json");
        }
        let out = ephyr(&args);
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        stdout(&out)
    };
    // whoami as root: an operator, no agent; as the mapped uid: its agent and what it reaches.
    let me: serde_json::Value = serde_json::from_str(&view("whoami", true)).unwrap();
    assert_eq!((me["uid"].as_u64(), me["operator"].as_bool(), me["agent"].is_null()), (Some(0), Some(true), true));
    let out = Command::new("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups"])
        .arg(ephyr_bin())
        .args(["whoami", "--socket", &sock])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("operator: no") && text.contains("agent: local") && text.contains("ssh: web (read)"),
        "{text}"
    );
    // ... and may not list what only operators see.
    let out = Command::new("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups"])
        .arg(ephyr_bin())
        .args(["certs", "--socket", &sock])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not_an_operator"), "{}", stderr(&out));

    let t = view("targets", false);
    assert!(t.contains("web  127.0.0.1:1  host key: not pinned"), "{t}");
    assert!(t.contains("read") && t.contains("as nobody") && t.contains("agents: alice, local"), "{t}");

    // A certificate (an operator's), shown in hex and decimal.
    let keys = TempDir::new("views-key");
    let kp = keys.join("id");
    assert!(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f", kp.to_str().unwrap()])
            .status()
            .unwrap()
            .success()
    );
    let signed = ephyr(&[
        "cert",
        "sign",
        "--socket",
        &sock,
        "--public-key",
        keys.join("id.pub").to_str().unwrap(),
        "--principal",
        "nobody",
        "--json",
    ]);
    assert!(signed.status.success(), "{}", stderr(&signed));
    let serial =
        serde_json::from_slice::<serde_json::Value>(&signed.stdout).unwrap()["serial"].as_str().unwrap().to_owned();
    let decimal = u64::from_str_radix(&serial, 16).unwrap().to_string();
    let c = view("certs", false);
    assert!(c.contains(&serial) && c.contains(&decimal), "{c}");
    assert!(c.contains("(operator)") && c.contains("idle"), "{c}");

    // Tasks as a tree: a root and its delegated child under it.
    let root =
        tool_call(&b.api, &alice, "task_create", json!({"description": "parent", "ttl": "10m", "can_delegate": true}))
            .unwrap();
    let child = tool_call(
        &b.api,
        &alice,
        "task_delegate",
        json!({"parent_task_id": root["task_id"], "description": "child", "ttl": "5m"}),
    )
    .unwrap();
    let tree = view("tasks", false);
    let (r, k) = (root["task_id"].as_str().unwrap(), child["task_id"].as_str().unwrap());
    let lines: Vec<&str> = tree.lines().collect();
    assert!(lines[0].starts_with(r) && lines[0].contains("\"parent\"") && lines[0].contains("may delegate"), "{tree}");
    assert!(lines[1].starts_with(&format!("└─ {k}")), "{tree}");
    tool_call(&b.api, &alice, "task_revoke", json!({"task_id": r})).unwrap();
    assert!(view("tasks", false).lines().all(|l| l.contains("REVOKED")), "the tree shows the cascade");
    let j: serde_json::Value = serde_json::from_str(&view("tasks", true)).unwrap();
    assert_eq!(j["tasks"].as_array().unwrap().len(), 2);
}

#[test]
fn doctor_checks_targets_secrets_the_audit_chain_and_the_running_broker() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("doctor2");
    let data = dir.join("data");
    let init =
        ephyr(&["init", "--data-dir", data.to_str().unwrap(), "--config-dir", dir.join("etc").to_str().unwrap()]);
    assert!(init.status.success(), "{}", stderr(&init));
    // Something that listens (a target only needs TCP here) and a port that does not.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap().port();
    let listener2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open2 = listener2.local_addr().unwrap().port();
    let (_, hash) = agent_key("a");
    let policy = format!(
        r#"version: 1
roles: {{ read: {{ principal: nobody }} }}
targets:
  up: {{ host: 127.0.0.1, port: {open}, allowed_roles: [read], host_key_fingerprint: "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" }}
  loose: {{ host: 127.0.0.1, port: {open2}, allowed_roles: [read] }}
  down: {{ host: 127.0.0.1, port: 1, allowed_roles: [read] }}
services:
  api: {{ url: "https://api.example", credential: {{ type: bearer, secret: "store:api-token" }} }}
agents:
  a: {{ api_key_hash: "{hash}", services: {{ api: {{}} }} }}
"#
    );
    let b = Broker::start(BrokerOpts { policy: Some(&policy), data_dir: Some(data.clone()), ..Default::default() });
    let config = b.dir.as_ref().unwrap().join("policy.yaml");
    let doctor = |extra: &[&str]| {
        let mut args =
            vec!["doctor", "--json", "--data-dir", data.to_str().unwrap(), "--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = ephyr(&args);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
        (out.status.code(), v)
    };
    let sock = b.socket.to_str().unwrap().to_owned();
    let (code, v) = doctor(&["--socket", &sock]);
    let find = |v: &serde_json::Value, name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name}: {v:#}"))
            .clone()
    };
    assert_eq!(code, Some(1), "an unset secret is a problem: {v:#}");
    assert_eq!(find(&v, "running broker")["status"], "ok");
    assert_eq!(find(&v, "target up")["status"], "ok");
    let loose = find(&v, "target loose");
    assert_eq!(loose["status"], "warn");
    assert!(
        loose["detail"].as_str().unwrap().contains("NOT pinned")
            && loose["detail"].as_str().unwrap().contains("ephyr target scan")
    );
    assert!(find(&v, "target down")["detail"].as_str().unwrap().contains("not reachable"));
    let secret = find(&v, "secret store:api-token");
    assert_eq!(secret["status"], "fail");
    assert!(secret["detail"].as_str().unwrap().contains("ephyr secret set api-token"), "{secret}");
    assert_eq!(find(&v, "audit chain")["status"], "ok");

    // Set the secret: that problem goes.
    let mut set = Command::new(ephyr_bin())
        .args(["secret", "set", "api-token", "--socket", &sock])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut set.stdin.take().unwrap(), b"tok").unwrap();
    assert!(set.wait().unwrap().success());
    let (code, v) = doctor(&["--socket", &sock]);
    assert_eq!(find(&v, "secret store:api-token")["status"], "ok");
    assert_eq!(code, Some(0), "{v:#}");

    // A forged audit line is found; a broker that does not answer is a problem (not with --offline).
    drop(b);
    let log = data.join("audit/audit.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("\"agent\":\"", "\"agent\":\"x", 1)).unwrap();
    let (code, v) = doctor(&[]);
    assert_eq!(code, Some(1));
    assert_eq!(find(&v, "audit chain")["status"], "fail", "{v:#}");
    let broker = find(&v, "running broker");
    assert_eq!(broker["status"], "fail");
    assert!(broker["detail"].as_str().unwrap().contains("systemctl start ephyr"), "{broker}");
    let (_, v) = doctor(&["--offline"]);
    assert_eq!(find(&v, "running broker")["status"], "ok");
}
