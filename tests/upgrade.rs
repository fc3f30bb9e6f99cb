//! Upgrades: this build starts on a data dir a previous release left (tests/data/upgrade/*, written
//! by tests/helpers/upgrade_fixture.py with that release's binary) and keeps its tokens, tasks,
//! audit chain and sealed secrets. docs/upgrading.md is the procedure this test follows.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// `ephyr audit verify` of a stopped broker's data dir: (exit code, report).
fn verify(data: &Path) -> (i32, String) {
    let out = ephyr(&["audit", "verify", "--data-dir", data.to_str().unwrap(), "--socket", "/nonexistent"]);
    (out.status.code().unwrap_or(-1), format!("{}{}", stdout(&out), stderr(&out)))
}

/// The fixtures: one directory per previous release.
fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/data/upgrade"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").exists())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no upgrade fixtures in tests/data/upgrade");
    v
}

/// The broker as the appliance's unit runs it: root with only CAP_SETUID, CAP_SETGID and
/// CAP_SETPCAP in its bounding set (image/systemd/ephyr.service).
fn start(data: &Path, policy: &str) -> Broker {
    Broker::start(BrokerOpts {
        policy: Some(policy),
        data_dir: Some(data.to_path_buf()),
        wrapper: as_the_unit(),
        ..Default::default()
    })
}

fn stop(mut b: Broker) {
    b.signal(libc::SIGTERM);
    assert_eq!(b.wait_exit(Duration::from_secs(15)).code(), Some(0), "{}", b.log());
}

/// What must hold on the upgraded broker, on its first start and after a restart.
fn check_kept(b: &Broker, m: &Value, upstream: &Upstream) {
    let key = m["api_key"].as_str().unwrap();
    let token = |t: &str| m[t]["token"].as_str().unwrap().to_owned();
    // Tasks: the live one and its delegated child still work; the revoked one stays revoked.
    let listed = tool_call(&b.api, key, "task_list", json!({})).expect("task_list");
    let text = listed.to_string();
    for t in ["live", "child", "revoked"] {
        assert!(text.contains(m[t]["task_id"].as_str().unwrap()), "task {t} lost: {text}");
    }
    tool_call(&b.api, &token("live"), "list_targets", json!({})).expect("the live task's token");
    tool_call(&b.api, &token("child"), "list_targets", json!({})).expect("the delegated child's token");
    let r = mcp_request(&b.api, &token("revoked"), "tools/call", Some("list_targets"), json!({"name": "list_targets"}));
    assert!(r.to_string().contains("revoked"), "the revoked task came back: {r}");
    // The sealed secret still opens and is injected, never shown.
    let auth = format!("Bearer {}", token("live"));
    let resp = http_request(&b.api, "GET", "/v1/proxy/api/after-upgrade", &[("Authorization", &auth)], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(upstream.last_header("authorization"), vec![format!("Bearer {}", m["secret"].as_str().unwrap())]);
    let out = ephyr(&["secret", "list", "--socket", b.socket.to_str().unwrap()]);
    assert!(stdout(&out).contains("api_token"), "{}", stdout(&out));
}

#[test]
fn a_previous_release_data_dir_keeps_tokens_tasks_audit_and_secrets() {
    if !require_root() {
        return;
    }
    for fixture in fixtures() {
        let m: Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("manifest.json")).unwrap()).unwrap();
        let dir = TempDir::new("upgrade");
        let st = Command::new("tar")
            .arg("-xzf")
            .arg(fixture.join("data.tar.gz"))
            .arg("-C")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
        let data = dir.join("data");
        // The old release's own audit log verifies with this build's verifier.
        let (code, report) = verify(&data);
        assert_eq!(code, 0, "{}: the old log does not verify: {report}", fixture.display());
        // Its policy, pointed at this test's upstream: the previous release's policy file loads as is.
        let upstream = Upstream::start(None, "127.0.0.1", &[]);
        let old_url = format!("http://127.0.0.1:{}/", m["service_port"]);
        let policy = std::fs::read_to_string(dir.join("policy.yaml"))
            .unwrap()
            .replace(&old_url, &format!("http://127.0.0.1:{}/", upstream.port));
        // Replace the binary, `ephyr init` (keeps every key and file, hands new directories
        // over), restart: the first start on the old data dir.
        let ca = std::fs::read(data.join("keys/ca_key.pub")).unwrap();
        let init = ephyr(&["init", "--data-dir", data.to_str().unwrap(), "--config-dir", dir.path().to_str().unwrap()]);
        assert!(init.status.success(), "{}", stderr(&init));
        assert_eq!(std::fs::read(data.join("keys/ca_key.pub")).unwrap(), ca, "init replaced the CA");
        let b = start(&data, &policy);
        check_kept(&b, &m, &upstream);
        // New state is written (a task created, one revoked) and survives a second restart.
        let key = m["api_key"].as_str().unwrap();
        let fresh = tool_call(&b.api, key, "task_create", json!({"description": "after the upgrade", "ttl": "1h"}))
            .expect("task_create after the upgrade");
        stop(b);
        let b = start(&data, &policy);
        check_kept(&b, &m, &upstream);
        tool_call(&b.api, fresh["token"].as_str().unwrap(), "list_targets", json!({})).expect("the new task's token");
        stop(b);
        // The whole chain, the old release's lines and this build's, verifies end to end.
        let (code, report) = verify(&data);
        assert_eq!(code, 0, "{}: the upgraded log does not verify: {report}", fixture.display());
        let audit = std::fs::read_to_string(data.join("audit/audit.jsonl")).unwrap();
        assert!(audit.contains(m["live"]["task_id"].as_str().unwrap()), "the old lines are gone");
    }
}
