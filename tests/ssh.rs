//! SSH access against a real OpenSSH sshd on 127.0.0.1 that trusts only the broker's CA: one-shot
//! exec, force-command, host keys, sessions bound to agent and task, output caps, timeouts,
//! limits, expired and revoked certificates (KRL), `ephyr exec` and the target setup script.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const READ: &str = "ephyrt-read";
const OP: &str = "ephyrt-op";

struct Lab {
    sshd: Sshd,
    broker: Broker,
    alice: String,
    bob: String,
    data: TempDir,
    /// The KRL the sshd reads; removed with the lab.
    _krl_dir: TempDir,
    policy: String,
}

/// A data dir with keys, an sshd trusting its CA (with a KRL file), and a broker whose policy has
/// targets on that sshd. `limits` is YAML for the `limits:` map.
fn lab(limits: &str) -> Lab {
    if !require_root() {
        panic!("tests/ssh.rs needs root (users for sshd)");
    }
    ensure_user(READ);
    ensure_user(OP);
    let data = TempDir::new("ssh-data");
    let conf = TempDir::new("ssh-conf");
    let out =
        ephyr(&["init", "--data-dir", data.path().to_str().unwrap(), "--config-dir", conf.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ca = data.join("keys/ca_key.pub");
    let krl_dir = TempDir::new("ssh-krl");
    let krl = krl_dir.join("revoked.krl");
    assert!(Command::new("ssh-keygen").args(["-q", "-k", "-f"]).arg(&krl).status().unwrap().success());
    let listen: String = (2..=6).map(|i| format!("ListenAddress 127.0.0.{i}\n")).collect();
    let sshd = Sshd::start(&ca, &format!("RevokedKeys {}\nMaxStartups 200\nMaxSessions 200\n{listen}", krl.display()));
    let fp = ssh_fingerprint(&sshd.dir.join("host_ed25519.pub"));
    let (alice, alice_hash) = agent_key("alice");
    let (bob, bob_hash) = agent_key("bob");
    let port = sshd.port;
    let policy = format!(
        r#"version: 1
limits:
  cert_ttl_max: 10m
{limits}
roles:
  read: {{ principal: {READ} }}
  op: {{ principal: {OP} }}
targets:
  a: {{ host: 127.0.0.1, port: {port}, allowed_roles: [read, op], host_key_fingerprint: "{fp}" }}
  b: {{ host: 127.0.0.2, port: {port}, allowed_roles: [read, op] }}
  forced: {{ host: 127.0.0.3, port: {port}, allowed_roles: [read], host_key_fingerprint: "{fp}", force_command: /usr/bin/id -un }}
  wrongkey: {{ host: 127.0.0.4, port: {port}, allowed_roles: [read], host_key_fingerprint: "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" }}
  filtered: {{ host: 127.0.0.5, port: {port}, allowed_roles: [read], host_key_fingerprint: "{fp}", command_deny: ["rm *"] }}
  closed: {{ host: 127.0.0.1, port: 1, allowed_roles: [read] }}
  short: {{ host: 127.0.0.6, port: {port}, allowed_roles: [read], host_key_fingerprint: "{fp}", cert_ttl_default: 40s, cert_ttl_max: 40s }}
agents:
  alice:
    api_key_hash: "{alice_hash}"
    ssh:
      "*": {{ roles: [read, op] }}
    can_delegate: true
  bob:
    api_key_hash: "{bob_hash}"
    ssh:
      a: {{ roles: [read] }}
  local:
    uid: 0
    ssh:
      a: {{ roles: [read] }}
"#
    );
    let broker = Broker::start(BrokerOpts {
        policy: Some(&policy),
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    });
    // The KRL file path, for tests that install a fetched list.
    std::fs::write(data.join("krl-path"), krl.to_str().unwrap()).unwrap();
    Lab { sshd, broker, alice, bob, data, _krl_dir: krl_dir, policy }
}

impl Lab {
    fn call(&self, cred: &str, tool: &str, args: Value) -> Result<Value, String> {
        tool_call(&self.broker.api, cred, tool, args)
    }
    fn exec(&self, cred: &str, target: &str, role: &str, cmd: &str) -> Result<Value, String> {
        self.call(cred, "exec", json!({"target": target, "role": role, "command": cmd}))
    }
    fn krl_path(&self) -> PathBuf {
        PathBuf::from(std::fs::read_to_string(self.data.join("krl-path")).unwrap())
    }
}

#[test]
fn exec_uses_the_role_principal_and_refuses_roles_the_agent_lacks() {
    let l = lab("");
    let r = l.exec(&l.alice, "a", "read", "id -un; echo oops >&2; exit 3").unwrap();
    assert_eq!(r["stdout"], format!("{READ}\n"));
    assert_eq!(r["stderr"], "oops\n");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["stdout_truncated"], false);
    assert!(r["duration_ms"].as_f64().unwrap() > 0.0);
    let r = l.exec(&l.alice, "a", "op", "id -un").unwrap();
    assert_eq!(r["stdout"], format!("{OP}\n"));
    // bob has only `read` on a, nothing on b.
    let e = l.exec(&l.bob, "a", "op", "id -un").unwrap_err();
    assert!(e.contains("policy_denies_role"), "{e}");
    let e = l.exec(&l.bob, "b", "read", "id -un").unwrap_err();
    assert!(e.contains("policy_denies_target"), "{e}");
    // Clear errors for bad input, before any certificate.
    for (args, words) in [
        (json!({"target": "a", "command": "id"}), "\"target\" and \"role\" are required"),
        (json!({"target": "nope", "role": "read", "command": "id"}), "unknown_target"),
        (json!({"target": "a", "role": "read", "command": "  "}), "\"command\" is empty"),
        (json!({"target": "a", "role": "read", "command": "id", "timeout": 0}), "between 1 and"),
        (json!({"target": "filtered", "role": "read", "command": "rm -rf /tmp/x"}), "command_deny"),
        (json!({"target": "closed", "role": "read", "command": "id"}), "host_unreachable"),
    ] {
        let e = l.call(&l.alice, "exec", args.clone()).unwrap_err();
        assert!(e.contains(words), "{args}: {e}");
    }
    // The certificate named the agent and task in its key id (sshd logs it) and was audited first.
    assert!(l.sshd.log().contains("ephyr:alice:-:a/read:"), "{}", l.sshd.log());
    let issued = audit_events(&l.broker, "cert_issued");
    assert!(issued.len() >= 2, "{issued:?}");
    assert!(!audit_events(&l.broker, "ssh_exec").is_empty());
    // After a one-shot command the broker no longer holds the key; the cert is still listed.
    let certs = l.call(&l.alice, "list_certs", json!({})).unwrap();
    let certs = certs.as_array().unwrap();
    assert!(certs.len() >= 2 && certs.iter().all(|c| c["in_use"] == false), "{certs:?}");
    assert!(l.call(&l.bob, "list_certs", json!({})).unwrap().as_array().unwrap().is_empty());
    // list_targets shows what this caller may use.
    let t = l.call(&l.bob, "list_targets", json!({})).unwrap();
    assert_eq!(t.as_array().unwrap().len(), 1, "{t}");
    assert_eq!(t[0]["roles"], json!(["read"]));
}

#[test]
fn force_command_is_enforced_by_sshd_and_host_keys_are_checked() {
    let l = lab("");
    let r = l.exec(&l.alice, "forced", "read", "echo not this").unwrap();
    assert_eq!(r["stdout"], format!("{READ}\n"), "sshd ran the forced command");
    let e = l.exec(&l.alice, "wrongkey", "read", "id").unwrap_err();
    assert!(e.contains("host key mismatch") && e.contains("host_key_mismatch"), "{e}");
    assert_eq!(audit_events(&l.broker, "host_key_mismatch").len(), 1);
    // Target b pins nothing: trusted on first use, recorded, warned about; later uses are checked.
    let r = l.exec(&l.alice, "b", "read", "true").unwrap();
    assert!(r["host_key_warning"].as_str().unwrap().contains("first use"), "{r}");
    let known = std::fs::read_to_string(l.broker.data_dir.join("state/known_hosts")).unwrap();
    let fp = ssh_fingerprint(&l.sshd.dir.join("host_ed25519.pub"));
    assert!(known.contains(&format!("b 127.0.0.2:{} {fp}", l.sshd.port)), "{known}");
    let r = l.exec(&l.alice, "b", "read", "true").unwrap();
    assert!(r.get("host_key_warning").is_none(), "{r}");
}

#[test]
fn a_host_ca_vouches_only_for_the_names_it_signed() {
    // A second sshd whose host key carries a certificate from a host CA, naming 127.0.0.7 only.
    let l = lab("");
    let dir = TempDir::new("ssh-hostca");
    let hostca = keygen(dir.path(), "hostca");
    let data = TempDir::new("ssh-hostca-sshd");
    let host = keygen(data.path(), "host");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-s", hostca.to_str().unwrap(), "-h", "-I", "test-host", "-n", "127.0.0.7"])
        .arg(format!("{}.pub", host.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let ca = l.data.join("keys/ca_key.pub");
    let sshd = Sshd::start(
        &ca,
        &format!(
            "HostKey {h}\nHostCertificate {h}-cert.pub\nListenAddress 127.0.0.7\nListenAddress 127.0.0.8\n",
            h = host.display()
        ),
    );
    let ca_line = std::fs::read_to_string(format!("{}.pub", hostca.display())).unwrap();
    let policy = l.policy.replace(
        "  closed: { host: 127.0.0.1, port: 1, allowed_roles: [read] }",
        &format!(
            "  closed: {{ host: 127.0.0.1, port: 1, allowed_roles: [read] }}\n  \
             signed: {{ host: 127.0.0.7, port: {p}, allowed_roles: [read], host_ca: \"{c}\" }}\n  \
             unsigned: {{ host: 127.0.0.8, port: {p}, allowed_roles: [read], host_ca: \"{c}\" }}",
            p = sshd.port,
            c = ca_line.trim()
        ),
    );
    assert_ne!(policy, l.policy);
    drop(l.broker);
    let b = Broker::start(BrokerOpts {
        policy: Some(&policy),
        data_dir: Some(l.data.path().to_path_buf()),
        ..Default::default()
    });
    let r =
        tool_call(&b.api, &l.alice, "exec", json!({"target": "signed", "role": "read", "command": "id -un"})).unwrap();
    assert_eq!(r["stdout"], format!("{READ}\n"));
    assert!(r.get("host_key_warning").is_none());
    let e = tool_call(&b.api, &l.alice, "exec", json!({"target": "unsigned", "role": "read", "command": "id -un"}))
        .unwrap_err();
    assert!(e.contains("host_key_mismatch"), "a host certificate for 127.0.0.7 vouched for 127.0.0.8: {e}");
}

#[test]
fn sessions_belong_to_their_agent_and_task_and_follow_the_current_token() {
    let l = lab("");
    let s = l.call(&l.alice, "session_create", json!({"target": "a", "role": "read"})).unwrap();
    let id = s["session_id"].as_str().unwrap().to_owned();
    for i in 0..3 {
        let r = l.call(&l.alice, "exec", json!({"session_id": id, "command": format!("echo {i}")})).unwrap();
        assert_eq!(r["stdout"], format!("{i}\n"));
        assert_eq!(r["timings"]["session"], true);
    }
    // Another agent cannot see or use it.
    let e = l.call(&l.bob, "exec", json!({"session_id": id, "command": "id"})).unwrap_err();
    assert!(e.contains("no session"), "{e}");
    assert!(l.call(&l.bob, "list_sessions", json!({})).unwrap().as_array().unwrap().is_empty());
    assert_eq!(l.call(&l.alice, "list_sessions", json!({})).unwrap().as_array().unwrap().len(), 1);
    // A session's target and role are its own: naming others is an error.
    let e = l.call(&l.alice, "exec", json!({"session_id": id, "target": "b", "command": "id"})).unwrap_err();
    assert!(e.contains("does not match session"), "{e}");
    assert_eq!(l.call(&l.alice, "session_close", json!({"session_id": id})).unwrap()["status"], "closed");
    // A session never runs on a certificate about to expire: within 30 s of its end a command
    // first renews it (new key, certificate and connection), transparently.
    let s = l.call(&l.alice, "session_create", json!({"target": "short", "role": "read"})).unwrap();
    let first = s["cert_serial"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_secs(11));
    let r = l.call(&l.alice, "exec", json!({"session_id": s["session_id"], "command": "echo renewed"})).unwrap();
    assert_eq!(r["stdout"], "renewed\n");
    assert_ne!(r["cert_serial"].as_str().unwrap(), first, "the certificate was renewed");
    l.call(&l.alice, "session_close", json!({"session_id": s["session_id"]})).unwrap();
    assert!(l.call(&l.alice, "exec", json!({"session_id": id, "command": "id"})).unwrap_err().contains("no session"));

    // A task allowed on a and b opens a session on b; its child, narrowed to a, cannot use it.
    let t = l
        .call(
            &l.alice,
            "task_create",
            json!({"description": "t", "envelope": {"targets": ["a", "b"]}, "can_delegate": true}),
        )
        .unwrap();
    let (task, token) = (t["task_id"].as_str().unwrap().to_owned(), t["token"].as_str().unwrap().to_owned());
    let s = l.call(&token, "session_create", json!({"target": "b", "role": "read"})).unwrap();
    let sid = s["session_id"].as_str().unwrap().to_owned();
    assert_eq!(l.call(&token, "exec", json!({"session_id": sid, "command": "echo ok"})).unwrap()["stdout"], "ok\n");
    let c = l
        .call(
            &token,
            "task_delegate",
            json!({"parent_task_id": task, "description": "only a", "envelope": {"targets": ["a"]}}),
        )
        .unwrap();
    let child = c["token"].as_str().unwrap().to_owned();
    // The parent's session on b is outside the child's envelope: it cannot use, list or close it.
    let e = l.call(&child, "exec", json!({"session_id": sid, "command": "id"})).unwrap_err();
    assert!(e.contains("no session"), "child narrowed to a used a session on b: {e}");
    assert!(l.call(&child, "list_sessions", json!({})).unwrap().as_array().unwrap().is_empty());
    let e = l.call(&child, "session_close", json!({"session_id": sid})).unwrap_err();
    assert!(e.contains("no session"), "child narrowed to a closed a session on b: {e}");
    assert_eq!(l.call(&token, "list_sessions", json!({})).unwrap().as_array().unwrap().len(), 1, "still open");
    // The API key of the same agent is not the task: the session is not its.
    assert!(l.call(&l.alice, "exec", json!({"session_id": sid, "command": "id"})).unwrap_err().contains("no session"));
    // The task's certificates are listed for it, and held while the session is open.
    let certs = l.call(&token, "list_certs", json!({})).unwrap();
    assert!(
        certs.as_array().unwrap().iter().any(|c| c["session_id"] == sid.as_str() && c["in_use"] == true),
        "{certs}"
    );
    let serial = certs.as_array().unwrap().iter().find(|c| c["session_id"] == sid.as_str()).unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    // Revoking the task: its token stops working and its session is closed at once.
    assert_eq!(metric(&l.broker, "ephyr_ssh_sessions"), 1.0);
    l.call(&l.alice, "task_revoke", json!({"task_id": task})).unwrap();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).to_string();
    let r = http_request(
        &l.broker.api,
        "POST",
        "/mcp",
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 401);
    assert_eq!(metric(&l.broker, "ephyr_ssh_sessions"), 0.0);
    let closed = audit_events(&l.broker, "session_close");
    assert!(closed.iter().any(|e| e["outcome"]["reason"] == "task revoked or expired"), "{closed:?}");
    // ... and the revoked task's unexpired certificate is on the KRL targets fetch.
    let krl = http_request(&l.broker.api, "GET", "/v1/ssh/krl", &[], b"");
    assert_eq!(krl.status, 200);
    let path = l.data.join("fetched.krl");
    std::fs::write(&path, &krl.body).unwrap();
    let out = Command::new("ssh-keygen").args(["-Q", "-l", "-f"]).arg(&path).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{listing} {}", stderr(&out));
    let n = u64::from_str_radix(&serial, 16).unwrap();
    assert!(listing.contains(&format!("serial: {n}")), "serial {n} not in KRL:\n{listing}");
}

/// Hardening issue, defect 2: `arg.*` caveats appended to a task token bind SSH commands
/// (they were ignored: a child limited to `uptime` could run anything).
#[test]
fn token_argument_constraints_bind_ssh_commands() {
    let l = lab("");
    let t = l.call(&l.alice, "task_create", json!({"description": "probe", "can_delegate": true})).unwrap();
    let token = t["token"].as_str().unwrap().to_owned();
    let attenuate = |tok: &str, caveat: &str| {
        let m = ephyr::macaroon::Macaroon::decode(tok).unwrap();
        ephyr::macaroon::attenuate(&m, caveat).encode()
    };
    let only_uptime = attenuate(&token, "arg.command IN [uptime]");
    let r = l.exec(&only_uptime, "a", "read", "uptime").unwrap();
    assert_eq!(r["exit_code"], 0, "{r}");
    let e = l.exec(&only_uptime, "a", "read", "id").unwrap_err();
    assert!(e.contains("argument_constraint") && e.contains("command"), "{e}");
    let e = l.exec(&only_uptime, "a", "read", "uptime; id").unwrap_err();
    assert!(e.contains("argument_constraint"), "{e}");
    // A session takes no command: the constraint cannot be checked there, so it is refused.
    let e = l.call(&only_uptime, "session_create", json!({"target": "a", "role": "read"})).unwrap_err();
    assert!(e.contains("argument_constraint") && e.contains("does not take"), "{e}");
    // The timeout: a call argument, not a fact of the action; a declared one must be given.
    let short = attenuate(&token, "arg.timeout <= 10");
    let ok = l.call(&short, "exec", json!({"target": "a", "role": "read", "command": "true", "timeout": 5})).unwrap();
    assert_eq!(ok["exit_code"], 0);
    let e =
        l.call(&short, "exec", json!({"target": "a", "role": "read", "command": "true", "timeout": 60})).unwrap_err();
    assert!(e.contains("argument_constraint") && e.contains("timeout"), "{e}");
    let e = l.call(&short, "exec", json!({"target": "a", "role": "read", "command": "true"})).unwrap_err();
    assert!(e.contains("must be given explicitly"), "{e}");
    // Every refusal is audited with its reason.
    let denied = audit_events(&l.broker, "tool_call");
    assert!(denied.iter().any(|e| e["decision"] == "deny" && e["code"] == "argument_constraint"), "{denied:?}");
}

/// The kill switch for one certificate: revoking it from the local API (operations layer) puts it
/// on the KRL and closes the session that holds it, in one audited act.
#[test]
fn revoking_a_sessions_certificate_closes_the_session() {
    let l = lab("");
    let s = l.call(&l.alice, "session_create", json!({"target": "a", "role": "read"})).unwrap();
    let serial = s["cert_serial"].as_str().unwrap().to_owned();
    assert_eq!(l.call(&l.alice, "list_sessions", json!({})).unwrap().as_array().unwrap().len(), 1);
    let out = ephyr(&["cert", "revoke", &serial, "--socket", l.broker.socket.to_str().unwrap()]);
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
    assert!(l.call(&l.alice, "list_sessions", json!({})).unwrap().as_array().unwrap().is_empty());
    let e = l.call(&l.alice, "exec", json!({"session_id": s["session_id"], "command": "id"})).unwrap_err();
    assert!(e.contains("no session"), "{e}");
    let revoked = audit_events(&l.broker, "cert_revoked");
    assert_eq!(revoked.len(), 1, "one act, one record: {revoked:?}");
    assert_eq!(revoked[0]["outcome"]["session_closed"], s["session_id"]);
    assert!(revoked[0]["agent"].as_str().unwrap().starts_with("operator:uid"));
    let closed = audit_events(&l.broker, "session_close");
    assert!(closed.iter().any(|e| e["outcome"]["reason"] == "its certificate was revoked"), "{closed:?}");
}

#[test]
fn output_caps_and_timeouts_stop_the_remote_command() {
    let l = lab("");
    let started = Instant::now();
    let r = l.exec(&l.alice, "a", "read", "head -c 100000000 /dev/zero | tr '\\0' a; echo done >&2").unwrap();
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1 << 20);
    assert!(!r["stderr"].as_str().unwrap().starts_with("done"), "{}", r["stderr"]);
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    // stderr is capped the same way.
    let r = l.exec(&l.alice, "a", "read", "head -c 5000000 /dev/zero >&2").unwrap();
    assert_eq!(r["stderr_truncated"], true);

    let marker = format!("/tmp/ephyr-timeout-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    let started = Instant::now();
    let cmd = format!("echo started; sleep 20; touch {marker}");
    let r = l.call(&l.alice, "exec", json!({"target": "a", "role": "op", "command": cmd, "timeout": 1})).unwrap();
    assert_eq!(r["timed_out"], true);
    assert_eq!(r["exit_code"], -1);
    assert_eq!(r["stdout"], "started\n");
    assert!(r["stderr"].as_str().unwrap().contains("timeout after 1s"));
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    // The remote shell was killed: it is gone and never reaches the last command.
    std::thread::sleep(Duration::from_secs(1));
    let ps = Command::new("pgrep").args(["-u", OP, "-f", &marker]).output().unwrap();
    assert!(!ps.status.success(), "remote command still running: {}", String::from_utf8_lossy(&ps.stdout));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!Path::new(&marker).exists());
}

#[test]
fn limits_and_the_signer_rate_are_clear_errors() {
    let l = lab("  signer_rate: 3/1m\n  max_certs_per_agent: 1");
    let s = l.call(&l.alice, "session_create", json!({"target": "a", "role": "read"})).unwrap();
    let e = l.call(&l.alice, "session_create", json!({"target": "a", "role": "read"})).unwrap_err();
    assert!(e.contains("holds 1 certificates (its limit is 1)"), "{e}");
    let e = l.exec(&l.alice, "a", "read", "id").unwrap_err();
    assert!(e.contains("its limit is 1"), "{e}");
    // Other agents have their own count.
    l.exec(&l.bob, "a", "read", "id").unwrap();
    l.call(&l.alice, "session_close", json!({"session_id": s["session_id"]})).unwrap();
    l.exec(&l.alice, "a", "read", "id").unwrap();
    // Three certificates so far; the signer's own limit says no to the fourth.
    let e = l.exec(&l.alice, "a", "read", "id").unwrap_err();
    assert!(e.contains("rate limit"), "{e}");
}

/// Hardening issue, defect 8: a reload that asks for more than the signer's caps (fixed at start)
/// made every exec fail until a restart. Now the reload says so, and certificates are shortened to
/// the signer's cap.
#[test]
fn a_reload_beyond_the_signers_caps_warns_and_exec_keeps_working() {
    let l = lab("");
    let before = l.call(&l.alice, "exec", json!({"target": "a", "role": "read", "command": "true"})).unwrap();
    assert_eq!(before["exit_code"], 0);
    let raised =
        l.policy.replace("cert_ttl_max: 10m", "cert_ttl_max: 2h\n  cert_ttl_default: 1h\n  signer_rate: 1000/1m");
    assert_ne!(raised, l.policy);
    std::fs::write(l.broker.socket.parent().unwrap().join("policy.yaml"), &raised).unwrap();
    let out = ephyr(&["policy", "reload", "--socket", l.broker.socket.to_str().unwrap()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text} {}", stderr(&out));
    assert!(text.contains("limits.cert_ttl_max is 2h, above the running signer's certificate cap of 10m"), "{text}");
    assert!(text.contains("certificates are shortened to 10m until ephyr restarts"), "{text}");
    assert!(text.contains("limits.signer_rate allows 1000 per"), "{text}");
    // exec still works; its certificate lives at most the signer's cap.
    let r = l.call(&l.alice, "exec", json!({"target": "a", "role": "read", "command": "true"})).unwrap();
    assert_eq!(r["exit_code"], 0, "{r}");
    let certs = l.call(&l.alice, "list_certs", json!({})).unwrap();
    let newest =
        certs.as_array().unwrap().iter().max_by_key(|c| c["valid_before"].as_str().map(str::to_owned)).unwrap().clone();
    let life = |c: &Value, k: &str| chrono_secs(c[k].as_str().unwrap());
    assert!(life(&newest, "valid_before") - life(&newest, "valid_after") <= 600 + 60, "{newest}");
}

/// Seconds of an RFC 3339 UTC time (`2026-11-29T23:01:21Z`).
fn chrono_secs(t: &str) -> i64 {
    let out = Command::new("date").args(["-u", "-d", t, "+%s"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn sshd_refuses_expired_and_revoked_certificates() {
    let l = lab("");
    let dir = TempDir::new("ssh-op");
    let key = keygen(dir.path(), "id");
    let sign = |ttl: &str| {
        let out = ephyr(&[
            "cert",
            "sign",
            "--socket",
            l.broker.socket.to_str().unwrap(),
            "--public-key",
            &format!("{}.pub", key.display()),
            "--principal",
            READ,
            "--ttl",
            ttl,
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let cert = dir.join("id-cert.pub");
        std::fs::write(&cert, format!("{}\n", v["certificate"].as_str().unwrap())).unwrap();
        (cert, v["serial"].as_str().unwrap().to_owned())
    };
    // Expired: valid for 2 s.
    let (cert, _) = sign("2s");
    let ok = l.sshd.ssh(&key, &cert, READ, "id -un");
    assert!(ok.status.success(), "{}", stderr(&ok));
    std::thread::sleep(Duration::from_secs(3));
    let out = l.sshd.ssh(&key, &cert, READ, "id -un");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Permission denied"), "{}", stderr(&out));
    // Revoked: works, is revoked, the KRL is fetched into RevokedKeys, sshd refuses it.
    let (cert, serial) = sign("5m");
    assert!(l.sshd.ssh(&key, &cert, READ, "true").status.success());
    let out = ephyr(&["cert", "revoke", &serial, "--socket", l.broker.socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = ephyr(&["cert", "revoke", "ffffffffffffffff", "--socket", l.broker.socket.to_str().unwrap()]);
    assert!(stderr(&again).contains("unknown_certificate"), "{}", stderr(&again));
    let krl = http_request(&l.broker.api, "GET", "/v1/ssh/krl", &[], b"");
    assert_eq!(krl.status, 200);
    std::fs::write(l.krl_path(), &krl.body).unwrap();
    let out = l.sshd.ssh(&key, &cert, READ, "true");
    assert!(!out.status.success(), "a revoked certificate still logs in");
    assert!(l.sshd.log().to_lowercase().contains("revoked"), "{}", l.sshd.log());
    // The revocation survives a restart of the broker.
    drop(l.broker);
    let b = Broker::start(BrokerOpts {
        policy: Some(&l.policy),
        data_dir: Some(l.data.path().to_path_buf()),
        ..Default::default()
    });
    let krl2 = http_request(&b.api, "GET", "/v1/ssh/krl", &[], b"");
    let path = dir.join("after.krl");
    std::fs::write(&path, &krl2.body).unwrap();
    let listing = Command::new("ssh-keygen").args(["-Q", "-l", "-f"]).arg(&path).output().unwrap();
    let n = u64::from_str_radix(&serial, 16).unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains(&format!("serial: {n}")));
}

#[test]
fn ephyr_exec_runs_locally_by_uid_and_remotely_with_a_credential() {
    let l = lab("");
    let sock = l.broker.socket.to_str().unwrap();
    let out = ephyr(&["exec", "a", "--role", "read", "--socket", sock, "--", "echo", "hello;", "exit", "7"]);
    assert_eq!(stdout(&out), "hello\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(7));
    // uid 0 maps to agent `local`, which has no `op`.
    let out = ephyr(&["exec", "a", "--role", "op", "--socket", sock, "--", "id"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("policy_denies_role"), "{}", stderr(&out));
    let out = Command::new(ephyr_bin())
        .args(["exec", "a", "--role", "op", "--url", &format!("http://{}", l.broker.api), "--", "id", "-un"])
        .env("EPHYR_TOKEN", &l.alice)
        .output()
        .unwrap();
    assert_eq!(stdout(&out), format!("{OP}\n"), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
    let out = Command::new(ephyr_bin())
        .args(["exec", "a", "--role", "op", "--url", &format!("http://{}", l.broker.api), "--", "id"])
        .env("EPHYR_TOKEN", "mac_not-a-token")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    let out = ephyr(&["exec", "a", "--socket", sock, "--", "id"]);
    assert_eq!(out.status.code(), Some(2), "a missing --role is a usage error");
}

#[test]
fn the_setup_script_is_valid_sh_and_configures_what_sshd_needs() {
    let l = lab("");
    let policy = l.broker.dir.as_ref().unwrap().join("policy.yaml");
    let out = ephyr(&[
        "target",
        "setup-script",
        "--config",
        policy.to_str().unwrap(),
        "--target",
        "a",
        "--socket",
        l.broker.socket.to_str().unwrap(),
        "--broker-url",
        "http://192.0.2.5:8554",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    let ca = std::fs::read_to_string(l.data.join("keys/ca_key.pub")).unwrap();
    assert!(script.contains(ca.trim()), "the running broker's CA");
    for needle in [READ, OP, "TrustedUserCAKeys", "AuthorizedPrincipalsFile", "RevokedKeys", "/v1/ssh/krl"] {
        assert!(script.contains(needle), "{needle} missing");
    }
    let path = l.data.join("setup.sh");
    std::fs::write(&path, &script).unwrap();
    let check = Command::new("sh").arg("-n").arg(&path).output().unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    let out = ephyr(&[
        "target",
        "setup-script",
        "--config",
        policy.to_str().unwrap(),
        "--target",
        "nope",
        "--socket",
        l.broker.socket.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("no target \"nope\""), "{}", stderr(&out));
}

/// `target scan` reads the host key to pin; `target verify` logs in as every role of a target
/// and reports per role: a good sshd passes; a wrong pin, an sshd that does not trust the CA and
/// a closed port each fail with their reason.
#[test]
fn target_scan_and_verify_against_good_and_misconfigured_sshds() {
    let l = lab("");
    let sock = l.broker.socket.to_str().unwrap().to_owned();
    let host_fp = ssh_fingerprint(&l.sshd.dir.join("host_ed25519.pub"));
    let out = ephyr(&["target", "scan", &format!("127.0.0.1:{}", l.sshd.port), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let scanned: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(scanned["fingerprint"], host_fp.as_str(), "the key the sshd presents");
    let human = stdout(&ephyr(&["target", "scan", &format!("127.0.0.1:{}", l.sshd.port)]));
    assert!(human.contains(&format!("host_key_fingerprint: \"{host_fp}\"")), "{human}");
    let closed = ephyr(&["target", "scan", "127.0.0.1:1"]);
    assert_eq!(closed.status.code(), Some(1));
    assert!(stderr(&closed).contains("host unreachable"), "{}", stderr(&closed));

    // A second, real sshd that trusts another CA: the broker's certificates are refused there.
    let other = TempDir::new("other-ca");
    let other_key = other.join("ca");
    assert!(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&other_key)
            .status()
            .unwrap()
            .success()
    );
    let untrusting = Sshd::start(&other.join("ca.pub"), "");
    let policy = l.policy.replace(
        "targets:\n",
        &format!("targets:\n  untrusting: {{ host: 127.0.0.1, port: {}, allowed_roles: [read] }}\n", untrusting.port),
    );
    std::fs::write(l.broker.socket.parent().unwrap().join("policy.yaml"), &policy).unwrap();
    assert!(ephyr(&["policy", "reload", "--socket", &sock]).status.success());

    let verify = |name: &str| {
        let out = ephyr(&["target", "verify", name, "--socket", &sock, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out)));
        (out.status.code(), v)
    };
    let (code, good) = verify("a");
    assert_eq!(code, Some(0), "{good}");
    let roles = good["roles"].as_array().unwrap();
    assert_eq!(roles.len(), 2);
    for r in roles {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["logged_in_as"], r["principal"], "{r}");
        assert!(r["host_key"].as_str().unwrap().contains(&host_fp), "{r}");
    }
    let (code, bad) = verify("wrongkey");
    assert_eq!(code, Some(1));
    assert!(bad["roles"][0]["problems"][0].as_str().unwrap().contains("host_key_mismatch"), "{bad}");
    let (_, bad) = verify("untrusting");
    let p = bad["roles"][0]["problems"][0].as_str().unwrap();
    assert!(p.contains("auth_refused") && p.contains("TrustedUserCAKeys"), "{bad}");
    let (_, bad) = verify("closed");
    assert!(bad["roles"][0]["problems"][0].as_str().unwrap().contains("host_unreachable"), "{bad}");
    let unknown = ephyr(&["target", "verify", "nope", "--socket", &sock]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stderr(&unknown).contains("no target \"nope\""), "{}", stderr(&unknown));
    // Each verification is audited, with its outcome.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let recorded = audit_events(&l.broker, "target_verify");
    assert_eq!(recorded.len(), 4, "{recorded:?}");
    assert_eq!(recorded[0]["outcome"]["ok"], true);
}

/// The setup script for real against a second sshd with its own config dir (never the system's):
/// the dry run changes nothing; the real run makes the broker's certificates work there (checked
/// with `target verify`), reloads only that sshd, and leaves the lab's sshd alone.
#[test]
fn the_setup_script_configures_a_non_system_sshd_and_its_dry_run_changes_nothing() {
    let l = lab("");
    let sock = l.broker.socket.to_str().unwrap().to_owned();
    let own = OwnSshd::start("setup-sshd");
    let (dir, ssh_dir, config, port) = (&own.dir, &own.ssh_dir, &own.config, own.port);
    let policy = l.policy.replace(
        "targets:\n",
        &format!("targets:\n  fresh: {{ host: 127.0.0.1, port: {port}, allowed_roles: [read, op] }}\n"),
    );
    let policy_path = l.broker.socket.parent().unwrap().join("policy.yaml");
    std::fs::write(&policy_path, &policy).unwrap();
    assert!(ephyr(&["policy", "reload", "--socket", &sock]).status.success());
    let verify = || {
        let out = ephyr(&["target", "verify", "fresh", "--socket", &sock, "--json"]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out)))
    };
    let before = verify();
    assert_eq!(before["ok"], false, "{before}");
    assert!(before["roles"][0]["problems"][0].as_str().unwrap().contains("auth_refused"), "{before}");

    let out = own.setup_script(&policy_path, "fresh", &sock);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = dir.join("setup.sh");
    std::fs::write(&script, &out.stdout).unwrap();
    let config_before = std::fs::read_to_string(config).unwrap();

    // The dry run: every file and command named, nothing changed.
    let dry = Command::new("sh").arg(&script).arg("--dry-run").output().unwrap();
    assert!(dry.status.success(), "{}", stderr(&dry));
    let said = stdout(&dry);
    for needle in [
        format!("would write {}/ephyr_ca.pub (mode 0644):", ssh_dir.display()),
        format!("would write {}/sshd_config.d/ephyr.conf (mode 0644):", ssh_dir.display()),
        format!("+ sshd -t -f {}", config.display()),
        "+ kill -HUP ".into(),
        "dry run, nothing changed".into(),
    ] {
        assert!(said.contains(&needle), "{needle:?} not in:\n{said}");
    }
    assert!(!ssh_dir.join("ephyr_ca.pub").exists(), "the dry run wrote nothing");
    assert_eq!(std::fs::read_to_string(config).unwrap(), config_before);

    // The real run: the sshd named by the pid file reloads and trusts the broker's CA.
    let real = Command::new("sh").arg(&script).output().unwrap();
    assert!(real.status.success(), "{}\n{}", stdout(&real), stderr(&real));
    assert!(
        std::fs::read_to_string(config)
            .unwrap()
            .starts_with(&format!("Include {}/sshd_config.d/*.conf", ssh_dir.display()))
    );
    let after = poll_until(Duration::from_secs(10), verify, |v| v["ok"] == true);
    assert_eq!(after["ok"], true, "{after}");
    assert_eq!(after["roles"].as_array().unwrap().len(), 2);
    // The lab's sshd was not signalled and still serves.
    let r = l.call(&l.alice, "exec", json!({"target": "a", "role": "read", "command": "true"})).unwrap();
    assert_eq!(r["exit_code"], 0);
}
