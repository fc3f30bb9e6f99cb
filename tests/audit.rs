//! The audit trail and metrics of a real broker: verify after a clean run, tampering detected by
//! the CLI with locations, resumption after kill -9, no secrets in the log, promtool on /metrics,
//! fail closed on a full disk.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const POLICY: &str = "roles: {test: {principal: ephyrtest}}\ntargets: {local: {host: 127.0.0.1, allowed_roles: [test]}}\n\
agents: {a: {uid: 4242, ssh: {local: {roles: [test]}}}}\n";

fn sign(b: &Broker, key_dir: &TempDir, principal: &str) -> std::process::Output {
    ephyr(&[
        "cert",
        "sign",
        "--socket",
        b.socket.to_str().unwrap(),
        "--public-key",
        key_dir.join("id.pub").to_str().unwrap(),
        "--principal",
        principal,
    ])
}

fn verify(data: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["audit", "verify", "--data-dir", data.to_str().unwrap(), "--socket", "/nonexistent"];
    args.extend_from_slice(extra);
    let out = ephyr(&args);
    (out.status.code().unwrap_or(-1), stdout(&out))
}

/// Stops the broker cleanly; returns its data dir and keeps its temp dir alive.
fn stop(mut b: Broker) -> (std::path::PathBuf, Option<TempDir>) {
    let data = b.data_dir.clone();
    b.signal(libc::SIGTERM);
    assert_eq!(b.wait_exit(Duration::from_secs(15)).code(), Some(0), "{}", b.log());
    (data, b.dir.take())
}

#[test]
fn a_clean_run_verifies_and_every_kind_of_tampering_is_located() {
    if !require_root() {
        return;
    }
    let keys = TempDir::new("audit-keys");
    keygen(keys.path(), "id");
    let b = Broker::start(BrokerOpts { policy: Some(POLICY), ..Default::default() });
    for _ in 0..3 {
        assert!(sign(&b, &keys, "ephyrtest").status.success());
    }
    assert!(!sign(&b, &keys, "root").status.success());
    // While running: the live head vouches for the unsigned tail.
    let live = ephyr(&[
        "audit",
        "verify",
        "--data-dir",
        b.data_dir.to_str().unwrap(),
        "--socket",
        b.socket.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&live.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    assert!(v["witnesses"].as_array().unwrap().iter().any(|w| w == "the running broker"), "{v:#}");
    let (data, _keep) = stop(b);

    let (code, text) = verify(&data, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("OK:") && text.contains("ends with a final checkpoint"), "{text}");
    let q = ephyr(&["audit", "query", "--data-dir", data.to_str().unwrap(), "--json", "--decision", "deny"]);
    let denies: Vec<serde_json::Value> = stdout(&q).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(denies.len(), 1);
    assert_eq!(denies[0]["event"], "cert_refused");
    assert_eq!(denies[0]["code"], "principal_not_allowed");
    assert!(denies[0]["reason"].as_str().unwrap().contains("\"root\""));

    let log = data.join("audit/audit.jsonl");
    let orig = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = orig.lines().collect();
    let put = |ls: Vec<String>| std::fs::write(&log, ls.join("\n") + "\n").unwrap();
    let own = |ls: &[&str]| ls.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // Edit a field (of the first certificate line; the next line's prev then fails).
    let at = lines.iter().position(|l| l.contains("operator:uid0")).unwrap();
    let mut edited = own(&lines);
    edited[at] = edited[at].replace("operator:uid0", "operator:uid1");
    put(edited);
    let (code, text) = verify(&data, &[]);
    assert_eq!(code, 1);
    assert!(text.contains(&format!("audit.jsonl:{}: prev does not match", at + 2)), "{text}");
    // Delete a line.
    let mut deleted = own(&lines);
    deleted.remove(2);
    put(deleted);
    let (_, text) = verify(&data, &[]);
    assert!(text.contains("audit.jsonl:3: seq 4 follows seq 2"), "{text}");
    // Swap two lines.
    let mut swapped = own(&lines);
    swapped.swap(4, 5);
    put(swapped);
    let (_, text) = verify(&data, &[]);
    assert!(text.contains("audit.jsonl:5: seq 6 follows seq 4"), "{text}");
    // Truncate the tail: the HEAD watermark proves lines are missing.
    put(own(&lines[..lines.len() - 2]));
    let (code, text) = verify(&data, &[]);
    assert_eq!(code, 1);
    assert!(text.contains("truncated:") && text.contains("HEAD vouches for seq"), "{text}");
    // Recompute the whole chain without the signer (Python, as an outside attacker would).
    std::fs::write(&log, &orig).unwrap();
    let script = r#"
import hashlib, json, sys
p = sys.argv[1]
out, prev = [], "0" * 64
for i, line in enumerate(open(p).read().splitlines()):
    v = json.loads(line)
    if v.get("agent") == "operator:uid0": v["agent"] = "operator:uid1"
    v["prev"] = prev
    s = json.dumps(v, separators=(",", ":"))
    prev = hashlib.sha256(s.encode()).hexdigest()
    out.append(s)
open(p, "w").write("\n".join(out) + "\n")
"#;
    let st = Command::new("python3").args(["-c", script, log.to_str().unwrap()]).status().unwrap();
    assert!(st.success());
    let (code, text) = verify(&data, &[]);
    assert_eq!(code, 1);
    assert!(text.contains("the chain before this checkpoint was rewritten"), "{text}");
    assert!(!text.contains("prev does not match"), "the forged chain is self-consistent: {text}");
    // A wrong trusted key: every checkpoint is refused.
    std::fs::write(&log, &orig).unwrap();
    let (code, text) = verify(&data, &["--public-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]);
    assert_eq!(code, 1);
    assert!(text.contains("checkpoint signature is not valid"), "{text}");
}

/// Hardening issue, defect 7: whoever can write the data dir appends lines with a correct seq and
/// prev after a clean stop. Before: a warning only, and the next start's checkpoint signed them.
/// Now the next start reports them (log and audit line), never signs them, and verify refuses.
#[test]
fn lines_forged_after_a_clean_stop_are_reported_and_refused() {
    if !require_root() {
        return;
    }
    let b = Broker::start(BrokerOpts { policy: Some(POLICY), ..Default::default() });
    let (data, _keep) = stop(b);
    assert_eq!(verify(&data, &[]).0, 0);
    let log = data.join("audit/audit.jsonl");
    let script = r#"
import hashlib, json, sys
p = sys.argv[1]
lines = open(p).read().splitlines()
last = json.loads(lines[-1])
prev = hashlib.sha256(lines[-1].encode()).hexdigest()
v = {"v": 1, "seq": last["seq"] + 1, "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "ts": last["ts"], "prev": prev,
     "kind": "cert", "event": "cert_issued", "agent": "a", "decision": "allow"}
open(p, "a").write(json.dumps(v, separators=(",", ":")) + chr(10))
"#;
    assert!(Command::new("python3").args(["-c", script, log.to_str().unwrap()]).status().unwrap().success());
    let (code, text) = verify(&data, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("follow a clean stop") && text.contains("no broker signed them"), "{text}");
    // The next start says so, and its checkpoints vouch only for its own lines.
    let b = Broker::start(BrokerOpts { policy: Some(POLICY), data_dir: Some(data.clone()), ..Default::default() });
    assert!(b.log().contains("follow a clean stop and no broker wrote them"), "{}", b.log());
    let tail = audit_events(&b, "audit_tail_unsigned");
    assert_eq!(tail.len(), 1, "{tail:?}");
    assert_eq!(tail[0]["outcome"]["after_clean_stop"], true);
    let (data, _keep2) = stop(b);
    let (code, text) = verify(&data, &[]);
    assert_eq!(code, 1, "still refused after the next start signed its own lines: {text}");
    assert!(text.contains("follow a clean stop"), "{text}");
}

#[test]
fn restart_and_kill_9_mid_stream_resume_a_valid_chain() {
    if !require_root() {
        return;
    }
    let keys = TempDir::new("audit-k9");
    keygen(keys.path(), "id");
    let dir = TempDir::new("audit-k9-data");
    let data = dir.join("data");
    let mut b = Broker::start(BrokerOpts { policy: Some(POLICY), data_dir: Some(data.clone()), ..Default::default() });
    // Requests in flight while the broker is killed.
    let sock = b.socket.clone();
    let pubkey = keys.join("id.pub");
    let hammer = std::thread::spawn(move || {
        for _ in 0..40 {
            let _ = ephyr(&[
                "cert",
                "sign",
                "--socket",
                sock.to_str().unwrap(),
                "--public-key",
                pubkey.to_str().unwrap(),
                "--principal",
                "ephyrtest",
            ]);
        }
    });
    std::thread::sleep(Duration::from_millis(150));
    b.signal(libc::SIGKILL);
    let _ = b.wait_exit(Duration::from_secs(10));
    hammer.join().unwrap();
    b.child = None;
    let before = std::fs::read_to_string(data.join("audit/audit.jsonl")).unwrap().lines().count();
    assert!(before > 3, "some events were written before the kill");
    // Restart on the same data dir, work, stop cleanly.
    let b2 = Broker::start(BrokerOpts { policy: Some(POLICY), data_dir: Some(data.clone()), ..Default::default() });
    assert!(sign(&b2, &keys, "ephyrtest").status.success());
    stop(b2);
    let (code, text) = verify(&data, &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["first_seq"], 1);
    assert_eq!(v["last_seq"], v["lines"], "no gaps across the kill and the restart: {v:#}");
    assert_eq!(v["ends_cleanly"], true);
}

#[test]
fn no_audit_event_contains_a_configured_secret() {
    if !require_root() {
        return;
    }
    let secret = "s3cr3t-value-that-must-never-be-logged";
    let policy = format!(
        "{POLICY}services: {{svc: {{url: 'https://api.example.com', credential: {{type: bearer, secret: env:EPHYR_TEST_SECRET}}}}}}\n"
    );
    let keys = TempDir::new("audit-secret");
    keygen(keys.path(), "id");
    let dir = TempDir::new("audit-secret-data");
    let data = dir.join("data");
    let env = vec![("EPHYR_TEST_SECRET".to_string(), secret.to_string())];
    let b =
        Broker::start(BrokerOpts { policy: Some(&policy), data_dir: Some(data.clone()), env, ..Default::default() });
    assert!(sign(&b, &keys, "ephyrtest").status.success());
    let _ = sign(&b, &keys, "root");
    let _ = ephyr(&["policy", "reload", "--socket", b.socket.to_str().unwrap()]);
    stop(b);
    let log = std::fs::read_to_string(data.join("audit/audit.jsonl")).unwrap();
    let ca = std::fs::read_to_string(data.join("keys/ca_key")).unwrap();
    let sealing = std::fs::read_to_string(data.join("keys/sealing_key")).unwrap();
    let sealing_b64 = sealing.split_whitespace().nth(1).unwrap();
    let ca_body: String = ca.lines().filter(|l| !l.starts_with("-----")).collect();
    for (what, needle) in
        [("service credential", secret), ("sealing key", sealing_b64), ("CA private key", &ca_body[20..60])]
    {
        assert!(!log.contains(needle), "the audit log contains the {what}");
    }
    assert!(log.contains("cert_issued"), "the log has content to search: {log}");
}

#[test]
fn promtool_accepts_the_metrics_output() {
    if !require_root() {
        return;
    }
    let keys = TempDir::new("metrics");
    keygen(keys.path(), "id");
    let b = Broker::start(BrokerOpts { policy: Some(POLICY), ..Default::default() });
    assert!(sign(&b, &keys, "ephyrtest").status.success());
    let _ = ephyr(&["policy", "reload", "--socket", b.socket.to_str().unwrap()]);
    let _ = Command::new("curl").args(["-s", &format!("http://{}/healthz", b.api)]).output();
    let out = Command::new("curl").args(["-sf", &format!("http://{}/metrics", b.dashboard)]).output().unwrap();
    let text = stdout(&out);
    for m in [
        "ephyr_signer_sandbox_enforced 1",
        "ephyr_signer_available 1",
        "ephyr_certificates_issued_total{requester=\"operator\"} 1",
        "ephyr_policy_reloads_total{outcome=\"ok\"} 1",
        "ephyr_audit_available 1",
        "ephyr_signer_request_duration_seconds_count{kind=\"sign_cert\"} 1",
        "ephyr_http_requests_total{listener=\"api\",code=\"2xx\"} 1",
        "process_resident_memory_bytes ",
        "ephyr_audit_write_duration_seconds_bucket",
    ] {
        assert!(text.contains(m), "missing {m:?} in:\n{text}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let res = promtool.wait_with_output().unwrap();
    assert!(res.status.success(), "promtool: {}{}", stdout(&res), stderr(&res));
}

#[test]
fn a_full_disk_fails_closed_with_a_clear_error() {
    if !require_root() {
        return;
    }
    let keys = TempDir::new("full");
    keygen(keys.path(), "id");
    let dir = TempDir::new("full-data");
    let data = dir.join("data");
    let init =
        ephyr(&["init", "--data-dir", data.to_str().unwrap(), "--config-dir", dir.join("etc").to_str().unwrap()]);
    assert!(init.status.success());
    // A tiny filesystem for the audit directory.
    let audit = data.join("audit");
    let m = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0700,uid=65533,gid=65533", "tmpfs", audit.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(m.success(), "mount tmpfs");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Umount(audit.clone());
    let b = Broker::start(BrokerOpts { policy: Some(POLICY), data_dir: Some(data.clone()), ..Default::default() });
    assert!(sign(&b, &keys, "ephyrtest").status.success());
    // Fill the filesystem. Lines still fit in the audit file's last, partly used page; the first
    // write that needs a new page fails, and from then on nothing is handed out unaudited.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}/fill", audit.display()), "bs=4k", "count=1000"])
        .output();
    let mut failed = None;
    for i in 0..40 {
        let out = sign(&b, &keys, "ephyrtest");
        if !out.status.success() {
            failed = Some((i, out));
            break;
        }
    }
    let (i, out) = failed.expect("the full disk must stop certificate issuance");
    assert!(i < 20, "a page holds at most ~10 lines; failed only after {i}");
    assert!(stdout(&out).is_empty(), "no certificate on stdout");
    assert!(
        stderr(&out).contains("audit_unavailable") && stderr(&out).contains("No space left on device"),
        "{}",
        stderr(&out)
    );
    // Later requests are refused at once, with the same reason; status shows it.
    let again = sign(&b, &keys, "ephyrtest");
    assert!(stderr(&again).contains("audit_unavailable"), "{}", stderr(&again));
    assert!(b.status()["audit"]["failure"].as_str().unwrap().contains("No space left on device"));
    let m = Command::new("curl").args(["-s", &format!("http://{}/metrics", b.dashboard)]).output().unwrap();
    assert!(
        stdout(&m).contains("ephyr_audit_available 0") && stdout(&m).contains("ephyr_audit_failures_total 1"),
        "{}",
        stdout(&m)
    );
}
