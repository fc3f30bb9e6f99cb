//! The operator console in a real browser (Debian's `chromium`, driven by Playwright for Python,
//! `tests/helpers/console_walk.py`) against a real broker with live data: a task tree, an SSH
//! session on a real OpenSSH sshd, audit events. The walk signs in, renders every view on a
//! desktop and a phone-sized screen, sees the live audit feed, revokes a task, freezes an agent,
//! reloads a broken policy and reads its error, inspects a token, runs axe-core, and gives the
//! second approval of a four-eyes request in the approval queue; then this test proves the
//! effects from outside (the revoked token and the frozen agent are refused over MCP, the broken
//! policy never loaded, the approved command ran once). Screenshots: `target/console-screenshots/`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const PRINCIPAL: &str = "ephyrt-read";
const PASSWORD: &str = "browser walk password 1";

#[test]
fn the_console_in_chromium_walks_every_view_and_acts() {
    if !require_root() {
        return;
    }
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is needed (scripts/test.sh installs it)"
    );
    ensure_user(PRINCIPAL);
    let (data, sshd, fp) = init_with_sshd("console-data", "");
    let (alice, alice_hash) = agent_key("alice");
    let (mallory, mallory_hash) = agent_key("mallory");
    let policy = format!(
        "version: 1\noperators:\n{}roles:\n  read: {{ principal: {PRINCIPAL} }}\n  op: {{ principal: {PRINCIPAL} }}\n\
         targets:\n  web: {{ host: 127.0.0.1, port: {}, allowed_roles: [read, op], host_key_fingerprint: \"{fp}\" }}\n\
         approvals:\n  hold: 0s\n  rules:\n    ops:\n      ssh: {{ targets: [web], roles: [op] }}\n      four_eyes: true\n\
         agents:\n  alice:\n    api_key_hash: \"{alice_hash}\"\n    can_delegate: true\n    ssh: {{ web: {{ roles: [read, op] }} }}\n\
         \x20 mallory:\n    api_key_hash: \"{mallory_hash}\"\n    ssh: {{ web: {{ roles: [read] }} }}\n",
        operator_entry("ops", "admin", PASSWORD),
        sshd.port
    );
    let b = Broker::start(BrokerOpts {
        policy: Some(&policy),
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    });
    // Live data: a task tree (a root and a delegated child), an SSH session, audit events.
    let root = tool_call(&b.api, &alice, "task_create", json!({"description": "nightly backup", "can_delegate": true}))
        .unwrap();
    let token = root["token"].as_str().unwrap().to_owned();
    let task_id = root["task_id"].as_str().or(root["id"].as_str()).unwrap().to_owned();
    tool_call(&b.api, &token, "task_delegate", json!({"description": "check disks", "ttl": "5m"})).unwrap();
    let s = tool_call(&b.api, &alice, "session_create", json!({"target": "web", "role": "read"})).unwrap();
    let session = s["session_id"].as_str().unwrap().to_owned();
    tool_call(&b.api, &alice, "exec", json!({"target": "web", "role": "read", "command": "id -un"})).unwrap();
    assert!(tool_call(&b.api, &mallory, "list_targets", json!({})).is_ok());
    // A four-eyes request: approved once from the CLI; the browser gives the second approval.
    let marker = format!("/tmp/ephyr-approved-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    let held = json!({"target": "web", "role": "op", "command": format!("touch {marker}")});
    let pending = tool_call(&b.api, &alice, "exec", held.clone()).unwrap_err();
    let at = pending.find("Request ").expect(&pending) + 8;
    let approval_id = pending[at..at + 26].to_owned();
    let out = ephyr(&["approve", &approval_id, "--socket", b.socket.to_str().unwrap()]);
    assert!(stdout(&out).contains("1 of 2"), "{}{}", stdout(&out), stderr(&out));

    let shots = repo().join("target/console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let cfg = json!({
        "dashboard": b.dashboard, "api": b.api, "operator": "ops", "password": PASSWORD,
        "agent_key": alice, "task_id": task_id, "task_token": token, "freeze_agent": "mallory",
        "ssh_session": session, "policy_path": b.dir.as_ref().unwrap().join("policy.yaml"),
        "broken_policy": "version: 1\nagents:\n  x: { ssh: { nowhere: { roles: [nothing] } } }\n",
        "shots": shots, "axe": repo().join("tests/peers/node_modules/axe-core/axe.min.js"),
        "approval_id": approval_id,
    });
    let out = python("console_walk.py").arg(cfg.to_string()).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the browser walk failed:\n{report}\n{}\nbroker log:\n{}", stderr(&out), b.log());
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(r["failures"], json!([]));
    assert!(r["screenshots"].as_array().unwrap().len() >= 15, "{report}");
    assert!(shots.join("phone_overview.png").exists());

    // What the browser did, seen from outside.
    let v = mcp_request(
        &b.api,
        &token,
        "tools/call",
        Some("list_targets"),
        json!({"name": "list_targets", "arguments": {}}),
    );
    assert!(
        v["error"]["message"].as_str().unwrap_or("").contains("revoked"),
        "revoked in the UI, refused over MCP: {v}"
    );
    let err =
        tool_call(&b.api, &mallory, "exec", json!({"target": "web", "role": "read", "command": "id"})).unwrap_err();
    assert!(err.contains("frozen"), "frozen in the UI, refused over MCP: {err}");
    assert!(tool_call(&b.api, &alice, "list_targets", json!({})).is_ok(), "others are untouched");
    let reloads = audit_events(&b, "policy_reload");
    assert!(reloads.iter().any(|e| e["outcome"]["ok"] == false && e["agent"] == "console:ops"), "{reloads:?}");
    assert_eq!(
        b.status()["policy_digest"],
        reloads.last().unwrap()["outcome"]["kept"],
        "the broken policy never loaded"
    );
    assert!(!std::path::Path::new(&marker).exists(), "nothing ran before the second approval");
    tool_call(&b.api, &alice, "exec", held).unwrap();
    assert!(std::path::Path::new(&marker).exists(), "approved in the browser, the command ran");
    let _ = std::fs::remove_file(&marker);
    let decisions = audit_events(&b, "approval_decision");
    assert_eq!(decisions.last().unwrap()["agent"], "console:ops");
    assert_eq!(decisions.last().unwrap()["action"]["reason"], "checked the disk");
    let revokes = audit_events(&b, "task_revoke");
    assert_eq!(revokes[0]["agent"], "console:ops");
    assert_eq!(revokes[0]["outcome"]["cascade_count"], 1, "the child died with it");
    drop(sshd);
    std::thread::sleep(Duration::from_millis(10));
}
