//! The SSH command policy and command recordings against a real OpenSSH sshd: the command table
//! (tests/data/commands.tsv) through MCP `exec`, role and task-token policies, `policy explain
//! --command`, and recordings checked against the audit trail.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const USER: &str = "ephyrt-cmd";

struct Lab {
    /// The `ephyr` copy, the CA file, the forced-command wrapper and its log, for the sealed target
    /// (a copy of the test binary: ~190 MB, removed with the lab).
    shim: TempDir,
    _sshd: Sshd,
    broker: Broker,
    alice: String,
    data: TempDir,
    conf: TempDir,
}

/// The console viewer's password.
const WATCHER_PW: &str = "watcher-password-for-recordings";

/// A secret the policy names (a service credential): masked in recordings.
const SECRET: &str = "s3cr3t-token-value-42";

/// A broker whose target `web` has the command table's policy, `plain` none, and whose role
/// `narrow` has its own; both targets are the same real sshd.
fn lab() -> Lab {
    if !require_root() {
        panic!("tests/ssh_commands.rs needs root (a user for sshd)");
    }
    ensure_user(USER);
    let data = TempDir::new("cmd-data");
    let conf = TempDir::new("cmd-conf");
    let out =
        ephyr(&["init", "--data-dir", data.path().to_str().unwrap(), "--config-dir", conf.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sshd = Sshd::start(
        &data.join("keys/ca_key.pub"),
        "MaxStartups 200\nMaxSessions 200\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nListenAddress 127.0.0.3\n",
    );
    let fp = ssh_fingerprint(&sshd.dir.join("host_ed25519.pub"));
    let (alice, alice_hash) = agent_key("alice");
    let port = sshd.port;
    let table_policy: String = std::fs::read_to_string(repo().join("tests/data/commands-policy.yaml"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("      {l}\n"))
        .collect();
    // The sealed target's verifier: a copy of this build's binary and the CA's public key, readable
    // by the role user, behind a wrapper that logs what sshd hands it (so the test can replay it).
    let shim = TempDir::new("shim");
    std::fs::copy(ephyr_bin(), shim.join("ephyr")).unwrap();
    std::fs::copy(data.join("keys/ca_key.pub"), shim.join("ca.pub")).unwrap();
    std::fs::write(
        shim.join("wrapper"),
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$SSH_ORIGINAL_COMMAND\" >> {d}/seen\nexec {d}/ephyr \"$@\" --state {d}/state\n",
            d = shim.path().display()
        ),
    )
    .unwrap();
    std::fs::write(shim.join("seen"), "").unwrap();
    std::fs::create_dir_all(shim.join("state")).unwrap();
    let uid = ephyr::users::lookup(USER).unwrap().uid;
    for (f, mode) in
        [("", 0o755), ("ephyr", 0o755), ("ca.pub", 0o644), ("wrapper", 0o755), ("seen", 0o666), ("state", 0o700)]
    {
        let path = shim.join(f);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::chown(shim.join("state"), Some(uid), None).unwrap();
    let sealed_policy = table_policy.clone();
    let watcher = operator_entry("watcher", "viewer", WATCHER_PW);
    let policy = format!(
        r#"version: 1
operators:
{watcher}roles:
  read: {{ principal: {USER} }}
  narrow:
    principal: {USER}
    commands: {{ allow: ["id ...", "uname ..."], pipelines: false }}
targets:
  web:
    host: 127.0.0.1
    port: {port}
    allowed_roles: [read, narrow]
    host_key_fingerprint: "{fp}"
    commands:
{table_policy}
  sealed:
    host: 127.0.0.3
    port: {port}
    allowed_roles: [read, narrow]
    host_key_fingerprint: "{fp}"
    verify_on_target: true
    shim_path: {shim}/wrapper
    shim_ca: {shim}/ca.pub
    commands:
{sealed_policy}
  plain: {{ host: 127.0.0.2, port: {port}, allowed_roles: [read, narrow], host_key_fingerprint: "{fp}" }}
services:
  api: {{ url: "http://127.0.0.1:9/", credential: {{ type: bearer, secret: env:CMD_TEST_TOKEN }} }}
agents:
  alice:
    api_key_hash: "{alice_hash}"
    ssh:
      "*": {{ roles: [read, narrow] }}
    can_delegate: true
"#,
        shim = shim.path().display(),
    );
    std::fs::write(conf.join("policy.yaml"), &policy).unwrap();
    let broker = Broker::start(BrokerOpts {
        policy: Some(&policy),
        data_dir: Some(data.path().to_path_buf()),
        env: vec![("CMD_TEST_TOKEN".into(), SECRET.into())],
        ..Default::default()
    });
    Lab { shim, _sshd: sshd, broker, alice, data, conf }
}

impl Lab {
    fn exec(&self, cred: &str, target: &str, role: &str, cmd: &str) -> Result<Value, String> {
        tool_call(
            &self.broker.api,
            cred,
            "exec",
            json!({"target": target, "role": role, "command": cmd, "timeout": 10}),
        )
    }
}

fn table() -> Vec<(String, String)> {
    std::fs::read_to_string(repo().join("tests/data/commands.tsv"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("//") && !l.is_empty())
        .map(|l| {
            let (want, cmd) = l.split_once('\t').unwrap();
            (want.to_owned(), cmd.replace('⏎', "\n").replace('␍', "\r"))
        })
        .collect()
}

/// Every row of the table through MCP `exec`, on a target checked by the broker only (`web`) and
/// on one that also verifies each command itself (`sealed`: `ephyr shim` as the forced command):
/// allowed commands run on the target (an exit code comes back), refused ones fail with
/// `command_denied` and the row's reason code, and no certificate is issued for them.
#[test]
fn the_command_table_through_mcp_exec_against_sshd_with_the_verifier_off_and_on() {
    let l = lab();
    let rows = table();
    assert!(rows.len() >= 60);
    let mut wrong = Vec::new();
    for target in ["web", "sealed"] {
        for (want, cmd) in &rows {
            let certs_before = audit_events(&l.broker, "cert_issued").len();
            let got = l.exec(&l.alice, target, "read", cmd);
            let certs_after = audit_events(&l.broker, "cert_issued").len();
            match (want.as_str(), got) {
                ("ok", Ok(r))
                    if r["exit_code"].is_number() && r["exit_code"] != 126 && certs_after == certs_before + 1 => {}
                ("ok", other) => wrong.push(format!("{target}: {cmd:?}: want it to run, got {other:?}")),
                (code, Err(e)) if e.contains("command_denied") && e.contains(&format!("({code})")) => {
                    if certs_after != certs_before {
                        wrong.push(format!("{target}: {cmd:?}: refused ({code}) but a certificate was issued"));
                    }
                }
                (code, other) => wrong.push(format!("{target}: {cmd:?}: want {code}, got {other:?}")),
            }
        }
    }
    assert!(wrong.is_empty(), "{} rows differ:\n{}", wrong.len(), wrong.join("\n"));
    // What ran is what was checked: `l\s` ran `ls` (quote removal), on the target, both ways.
    for target in ["web", "sealed"] {
        let r = l.exec(&l.alice, target, "read", r"l\s -d /etc").unwrap();
        assert_eq!(r["stdout"], "/etc\n", "{target}: {r}");
    }
    // On the sealed target every command went through the verifier with an envelope.
    let seen = std::fs::read_to_string(l.shim.join("seen")).unwrap();
    assert!(seen.lines().count() >= rows.iter().filter(|r| r.0 == "ok").count(), "{seen}");
    assert!(seen.lines().all(|x| x.starts_with("ephyr-exec-v1 ")), "{seen}");
    // Each refusal is audited with its code.
    let denied = audit_events(&l.broker, "tool_call");
    assert!(
        denied.iter().any(|e| e["code"] == "command_denied"
            && e["reason"].as_str().is_some_and(|r| r.contains("(wrapper)") && r.contains("bash -c"))),
        "{denied:?}"
    );
}

/// Runs the verifier on the target as sshd would for a connection with the certificate (the
/// role user, `SSH_ORIGINAL_COMMAND` set): what someone holding a stolen certificate can send.
/// `wire` `None`: no command at all (an interactive login).
fn shim_as_user(l: &Lab, target: &str, wire: Option<&str>) -> (Option<i32>, String, String) {
    let mut c = Command::new("runuser");
    c.args(["-u", USER, "--"])
        .arg(l.shim.join("ephyr"))
        .args(["shim", "--target", target, "--ca"])
        .arg(l.shim.join("ca.pub"))
        .arg("--state")
        .arg(l.shim.join("state"))
        .env("SHELL", "/bin/sh");
    match wire {
        Some(w) => c.env("SSH_ORIGINAL_COMMAND", w),
        None => c.env_remove("SSH_ORIGINAL_COMMAND"),
    };
    let out = c.output().unwrap();
    (out.status.code(), stdout(&out), stderr(&out))
}

/// The target runs only what the signer signed for it, once: a replayed envelope, a command
/// altered after signing, a plain command (a stolen certificate without the broker), and an
/// envelope for another target are all refused there; the signer itself refuses a command the
/// target's policy does not allow, however the broker asks.
#[test]
fn the_target_refuses_replayed_altered_and_unsigned_commands() {
    let l = lab();
    let r = l.exec(&l.alice, "sealed", "read", "echo sealed-run").unwrap();
    assert_eq!(r["stdout"], "sealed-run\n", "{r}");
    let seen = std::fs::read_to_string(l.shim.join("seen")).unwrap();
    let wire = seen.lines().last().unwrap().to_owned();
    assert!(wire.starts_with("ephyr-exec-v1 ") && !wire.contains("sealed-run"), "the command travels encoded: {wire}");

    // Replayed: the nonce was used by the real run.
    let (code, out, err) = shim_as_user(&l, "sealed", Some(&wire));
    assert_eq!(code, Some(126), "{out} {err}");
    assert!(err.contains("already used here (a replay)") && out.is_empty(), "{err}");

    // Altered after signing: same signature, another command.
    let parts: Vec<&str> = wire.split(' ').collect();
    let text = String::from_utf8(data_encoding::BASE64URL_NOPAD.decode(parts[1].as_bytes()).unwrap()).unwrap();
    let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
    let altered = text.replace(&b64("echo sealed-run"), &b64("touch /tmp/ephyr-shim-pwned"));
    assert_ne!(altered, text);
    let forged = format!("{} {} {}", parts[0], data_encoding::BASE64URL_NOPAD.encode(altered.as_bytes()), parts[2]);
    let (code, _, err) = shim_as_user(&l, "sealed", Some(&forged));
    assert_eq!(code, Some(126));
    assert!(err.contains("the signature does not match the envelope"), "{err}");
    assert!(!std::path::Path::new("/tmp/ephyr-shim-pwned").exists());

    // A plain command, as with a stolen certificate and no signer.
    let (code, _, err) = shim_as_user(&l, "sealed", Some("touch /tmp/ephyr-shim-pwned"));
    assert_eq!(code, Some(126));
    assert!(err.contains("does not come with an ephyr-exec-v1 envelope"), "{err}");
    // No command at all (an interactive login).
    let (code, _, err) = shim_as_user(&l, "sealed", None);
    assert_eq!(code, Some(126));
    assert!(err.contains("interactive login is refused"), "{err}");

    // A fresh envelope for `sealed`, presented to a verifier configured as another target.
    let r = l.exec(&l.alice, "sealed", "read", "echo second").unwrap();
    assert_eq!(r["stdout"], "second\n");
    let seen = std::fs::read_to_string(l.shim.join("seen")).unwrap();
    let wire2 = seen.lines().last().unwrap().to_owned();
    let (code, _, err) = shim_as_user(&l, "web", Some(&wire2));
    assert_eq!(code, Some(126));
    assert!(err.contains("is for target \"sealed\""), "{err}");
    assert!(!std::path::Path::new("/tmp/ephyr-shim-pwned").exists());

    // The signer's copy of a sealed target is fixed at its start: a reload that changes it, or
    // adds a sealed target, says what happens until a restart.
    let policy_file = l.broker.socket.parent().unwrap().join("policy.yaml");
    let sock = l.broker.socket.to_str().unwrap().to_owned();
    let text = std::fs::read_to_string(l.conf.join("policy.yaml")).unwrap();
    let changed = text.replace("        - id\n", "        - id\n        - uptime\n");
    assert_ne!(changed, text);
    std::fs::write(&policy_file, &changed).unwrap();
    let out = ephyr(&["policy", "reload", "--socket", &sock]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out)
            .contains("target \"sealed\" verifies commands on the host and its roles or command policy changed"),
        "{}",
        stdout(&out)
    );
    let added = changed.replace("plain: { host: 127.0.0.2,", "plain: { verify_on_target: true, host: 127.0.0.2,");
    assert_ne!(added, changed);
    std::fs::write(&policy_file, &added).unwrap();
    let out = ephyr(&["policy", "reload", "--socket", &sock]);
    assert!(
        stdout(&out).contains("target \"plain\" verifies commands on the host, but the signer was started without it"),
        "{}",
        stdout(&out)
    );
    let e = l.exec(&l.alice, "plain", "read", "id").unwrap_err();
    assert!(e.contains("was not started with it as sealed"), "{e}");
    // Nothing was sent, so nothing is recorded as run.
    let ran = audit_events(&l.broker, "ssh_exec");
    assert!(!ran.iter().any(|e| e["action"]["target"] == "plain"), "{ran:?}");
}
/// A target without a command policy runs anything the role's shell allows (unchanged); a role's
/// policy applies on every target, together with the target's.
#[test]
fn role_policies_apply_everywhere_and_unpoliced_targets_stay_open() {
    let l = lab();
    let r = l.exec(&l.alice, "plain", "read", "echo $((6*7)) | cat").unwrap();
    assert_eq!(r["stdout"], "42\n", "{r}");
    assert_eq!(l.exec(&l.alice, "plain", "narrow", "id -un").unwrap()["stdout"], format!("{USER}\n"));
    let e = l.exec(&l.alice, "plain", "narrow", "id | cat").unwrap_err();
    assert!(e.contains("(pipeline)") && e.contains("role narrow"), "{e}");
    let e = l.exec(&l.alice, "plain", "narrow", "ls /").unwrap_err();
    assert!(e.contains("(program_not_allowed)"), "{e}");
    // On `web` both apply: the target allows `ls`, the role does not.
    let e = l.exec(&l.alice, "web", "narrow", "ls /").unwrap_err();
    assert!(e.contains("(program_not_allowed)") && e.contains("role narrow"), "{e}");
    assert!(l.exec(&l.alice, "web", "narrow", "uname -s").is_ok());
}

/// A task token's `arg.command LIKE [...]` is checked per simple command on the syntax tree: the
/// globs that once matched `uptime; rm -rf /` as one string no longer reach the second command.
#[test]
fn task_token_command_globs_are_checked_per_simple_command() {
    let l = lab();
    let t = tool_call(&l.broker.api, &l.alice, "task_create", json!({"description": "probe"})).unwrap();
    let token = t["token"].as_str().unwrap();
    let m = ephyr::macaroon::Macaroon::decode(token).unwrap();
    let narrowed = ephyr::macaroon::attenuate(&m, "arg.command LIKE [uptime*,id*]").encode();
    assert_eq!(l.exec(&narrowed, "plain", "read", "id -un && uptime").unwrap()["exit_code"], 0);
    for (cmd, code) in [
        ("id; rm -rf /tmp/nothing", "program_not_allowed"),
        ("id $(rm -rf /tmp/nothing)", "command_substitution"),
        ("uptime && bash -c id", "wrapper"),
        ("id > /tmp/x", "redirection"),
    ] {
        let e = l.exec(&narrowed, "plain", "read", cmd).unwrap_err();
        assert!(e.contains("argument_constraint") && e.contains(&format!("({code})")), "{cmd}: {e}");
    }
}

/// `policy explain --command` gives the reason code and the offending node, without a broker.
#[test]
fn policy_explain_names_the_reason_code_and_node() {
    let l = lab();
    let config = l.conf.join("policy.yaml");
    let explain = |cmd: &str| {
        let out = Command::new(ephyr_bin())
            .args(["policy", "explain", "--config", config.to_str().unwrap(), "--agent", "alice"])
            .args(["--action", "ssh:web:read", "--command", cmd, "--json"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out)));
        (out.status.code(), v)
    };
    let (code, v) = explain("ls /etc | grep x && sh -c 'rm -rf /'");
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["code"], "command_denied");
    assert_eq!(v["command"]["reason_code"], "wrapper", "{v}");
    assert_eq!(v["command"]["node"], "sh -c 'rm -rf /'", "{v}");
    let (code, v) = explain("journalctl -u nginx | tail -n 5");
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["command"]["checked"], true);
    assert_eq!(v["command"]["by"], json!(["target web"]));
    // Text output names the code too; a command with a bad action is refused clearly.
    let out = Command::new(ephyr_bin())
        .args(["policy", "explain", "--config", config.to_str().unwrap(), "--agent", "alice"])
        .args(["--action", "ssh:web:read", "--command", "cat /etc/nginx/../shadow"])
        .output()
        .unwrap();
    assert!(stdout(&out).contains("arguments_not_allowed at \"cat /etc/nginx/../shadow\""), "{}", stdout(&out));
    let out = Command::new(ephyr_bin())
        .args(["policy", "explain", "--config", config.to_str().unwrap(), "--agent", "alice"])
        .args(["--action", "http:x:GET:/", "--command", "id"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("--command goes with an action ssh:TARGET:ROLE"), "{}", stderr(&out));
}

fn recording_cli(l: &Lab, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(ephyr_bin())
        .arg("recording")
        .args(args)
        .args(["--data-dir", l.data.path().to_str().unwrap()])
        .output()
        .unwrap();
    (out.status.code(), stdout(&out), stderr(&out))
}

/// Every command that runs is recorded (asciicast v2, secrets the policy names masked), its
/// SHA-256 in the audit line; `ephyr recording` shows it only while the two match, and says which
/// recording was edited after the fact. Refused commands leave no recording.
#[test]
fn recordings_are_kept_masked_and_an_edit_is_detected() {
    let l = lab();
    let r = l
        .exec(&l.alice, "plain", "read", &format!("printf 'héllo\\n'; echo oops >&2; echo token={SECRET}; exit 3"))
        .unwrap();
    assert_eq!(r["exit_code"], 3, "{r}");
    let id = r["recording_id"].as_str().expect("a recording id").to_owned();
    let file = l.data.join(&format!("recordings/{id}.cast"));
    let bytes = std::fs::read(&file).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(!text.contains(SECRET), "{text}");
    assert!(text.starts_with("{\"") && text.contains("\"version\":2"), "{text}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    // A session's commands are recorded too, with the session named.
    let s = tool_call(&l.broker.api, &l.alice, "session_create", json!({"target": "plain", "role": "read"})).unwrap();
    let sid = s["session_id"].as_str().unwrap();
    let r2 =
        tool_call(&l.broker.api, &l.alice, "exec", json!({"session_id": sid, "command": "echo in-session"})).unwrap();
    let id2 = r2["recording_id"].as_str().unwrap().to_owned();
    // A refused command leaves none.
    let before = std::fs::read_dir(l.data.join("recordings")).unwrap().count();
    assert!(l.exec(&l.alice, "web", "read", "bash -c id").is_err());
    assert_eq!(std::fs::read_dir(l.data.join("recordings")).unwrap().count(), before);
    // The audit line carries the hash of exactly these bytes.
    let lines = audit_events(&l.broker, "ssh_recording");
    let line = lines.iter().find(|e| e["outcome"]["recording"] == id.as_str()).expect("an audit line");
    assert_eq!(line["outcome"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(line["action"]["target"], "plain");

    let (code, out, err) = recording_cli(&l, &["list", "--json"]);
    assert_eq!(code, Some(0), "{out} {err}");
    let rows: Value = serde_json::from_str(&out).unwrap();
    let row = rows.as_array().unwrap().iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(
        (row["status"].as_str(), row["agent"].as_str(), row["exit_code"].as_i64()),
        (Some("ok"), Some("alice"), Some(3))
    );
    assert!(rows.as_array().unwrap().iter().any(|r| r["id"] == id2.as_str() && r["session"] == sid), "{rows}");
    let (code, out, _) = recording_cli(&l, &["show", &id]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("héllo\n") && out.contains("oops") && out.contains("token=*****") && !out.contains(SECRET),
        "{out}"
    );
    assert!(out.contains("[exit 3]"), "{out}");
    let (code, out, _) = recording_cli(&l, &["play", &id2, "--speed", "100"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("in-session"), "{out}");

    // The console shows it to any operator after the same check.
    let mut console = ConsoleClient::new(&l.broker.dashboard);
    assert_eq!(console.login("watcher", WATCHER_PW).status, 303);
    let listed = console.get("/recordings");
    assert_eq!(listed.status, 200);
    assert!(listed.text().contains(&format!("/recordings/{id}")), "{}", listed.text());
    let shown = console.get(&format!("/recordings/{id}"));
    assert_eq!(shown.status, 200);
    let page = shown.text();
    assert!(page.contains("sha256 verified") && page.contains("token=****") && !page.contains(SECRET), "{page}");
    assert!(page.contains("h&#233;llo") || page.contains("héllo"), "{page}");

    // Edit the output after the fact: refused, named, and listed as tampered.
    std::fs::write(&file, text.replace("oops", "fine")).unwrap();
    let (code, _, err) = recording_cli(&l, &["show", &id]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("recording {id} was changed after it was written")), "{err}");
    let (code, out, _) = recording_cli(&l, &["list"]);
    assert_eq!(code, Some(1));
    assert!(out.lines().any(|x| x.starts_with(&id) && x.contains("TAMPERED")), "{out}");
    let shown = console.get(&format!("/recordings/{id}"));
    assert_eq!(shown.status, 409);
    assert!(
        shown.text().contains("was changed after it was written") && !shown.text().contains("fine"),
        "{}",
        shown.text()
    );
    assert_eq!(console.get("/recordings/..%2f..%2fetc%2fpasswd").status, 404);
    // A forged recording with no audit line is not shown either.
    let forged = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    std::fs::write(l.data.join(&format!("recordings/{forged}.cast")), &bytes).unwrap();
    let (code, _, err) = recording_cli(&l, &["show", forged]);
    assert_eq!(code, Some(1));
    assert!(err.contains("has no audit line"), "{err}");
    // Bad input: a clear error, nothing read outside the directory.
    let (code, _, err) = recording_cli(&l, &["show", "../../etc/passwd"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("is not a recording id"), "{err}");
}

/// The setup script for a target that verifies commands itself, for real against a second sshd
/// with its own config dir: it installs the binary (EPHYR_BIN) and forces `ephyr shim` on the
/// role accounts; `target verify` then reports the verifier active, and commands run through it.
#[test]
fn the_setup_script_installs_the_verifier_and_target_verify_sees_it() {
    if !require_root() {
        panic!("needs root");
    }
    ensure_user(USER);
    let own = OwnSshd::start("sealed-setup");
    let (dir, ssh_dir, port) = (&own.dir, &own.ssh_dir, own.port);
    let bin_dir = std::path::PathBuf::from(format!("/tmp/ephyr-sealed-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bin_dir);
    // Removed on drop, also when an assertion fails (the installed binary is ~180 MB).
    let _bin_guard = TempDir(bin_dir.clone());
    // The directory must be reachable by the role user (the CA file the verifier reads is in it).
    for d in [dir.path(), ssh_dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let data = TempDir::new("sealed-data");
    let conf = TempDir::new("sealed-conf");
    let out =
        ephyr(&["init", "--data-dir", data.path().to_str().unwrap(), "--config-dir", conf.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (alice, alice_hash) = agent_key("alice");
    let policy = format!(
        r#"version: 1
roles:
  read: {{ principal: {USER} }}
targets:
  fresh:
    host: 127.0.0.1
    port: {port}
    allowed_roles: [read]
    verify_on_target: true
    shim_path: {bin}/ephyr
    shim_ca: {ssh}/ephyr_ca.pub
    commands: {{ allow: ["echo ...", "id ..."] }}
agents:
  alice:
    api_key_hash: "{alice_hash}"
    ssh:
      fresh: {{ roles: [read] }}
"#,
        bin = bin_dir.display(),
        ssh = ssh_dir.display(),
    );
    let broker = Broker::start(BrokerOpts {
        policy: Some(&policy),
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    });
    let sock = broker.socket.to_str().unwrap().to_owned();
    let policy_path = broker.socket.parent().unwrap().join("policy.yaml");
    std::fs::write(&policy_path, &policy).unwrap();
    let verify = || {
        let out = ephyr(&["target", "verify", "fresh", "--socket", &sock, "--json"]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out)))
    };
    assert_eq!(verify()["ok"], false);

    let out = own.setup_script(&policy_path, "fresh", &sock);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = dir.join("setup.sh");
    std::fs::write(&script, &out.stdout).unwrap();
    // Without the binary on the host (and no EPHYR_BIN) the script stops before changing sshd.
    let missing = Command::new("sh").arg(&script).output().unwrap();
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("is missing: copy the static ephyr binary there"), "{}", stderr(&missing));
    assert!(!ssh_dir.join("sshd_config.d/ephyr.conf").exists());
    let real = Command::new("sh").arg(&script).env("EPHYR_BIN", ephyr_bin()).output().unwrap();
    assert!(real.status.success(), "{}\n{}", stdout(&real), stderr(&real));
    let drop_in = std::fs::read_to_string(ssh_dir.join("sshd_config.d/ephyr.conf")).unwrap();
    assert!(
        drop_in
            .contains(&format!("Match User {USER}\n    ForceCommand {}/ephyr shim --target fresh", bin_dir.display())),
        "{drop_in}"
    );
    let after = poll_until(Duration::from_secs(10), verify, |v| v["ok"] == true);
    assert_eq!(after["ok"], true, "{after}");
    assert!(after["roles"][0]["warnings"].to_string().contains("commands are verified on the host"), "{after}");
    let r = tool_call(
        &broker.api,
        &alice,
        "exec",
        json!({"target": "fresh", "role": "read", "command": "echo through-the-verifier"}),
    )
    .unwrap();
    assert_eq!(r["stdout"], "through-the-verifier\n", "{r}");
}

/// A `shell` session keeps one shell: `cd` and `export` carry over, every command is still checked
/// by the policy, a syntax error fails only that command, and `exit`, a timeout or the end of the
/// shell closes the session; an `exec` session carries nothing over; a target that verifies
/// commands on the host has no shell sessions.
#[test]
fn shell_sessions_keep_the_directory_and_environment_and_each_command_is_policed() {
    let l = lab();
    let call = |args: Value| {
        tool_call(&l.broker.api, &l.alice, if args.get("command").is_some() { "exec" } else { "session_create" }, args)
    };
    let s = call(json!({"target": "web", "role": "read", "mode": "shell"})).unwrap();
    assert_eq!(s["mode"], "shell", "{s}");
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let run = |cmd: &str| call(json!({"session_id": sid, "command": cmd}));
    assert_eq!(run("cd /etc").unwrap()["exit_code"], 0);
    assert_eq!(run("pwd").unwrap()["stdout"], "/etc\n");
    assert_eq!(run("export EPHYR_T=carried").unwrap()["exit_code"], 0);
    assert_eq!(run("printenv EPHYR_T").unwrap()["stdout"], "carried\n");
    // Still policed, one command at a time; the session survives a refusal.
    for (cmd, code) in
        [("rm -rf /tmp/x", "program_denied"), ("export PATH=/tmp/evil", "shell_state"), ("cd $HOME", "expansion")]
    {
        let e = run(cmd).unwrap_err();
        assert!(e.contains("command_denied") && e.contains(&format!("({code})")), "{cmd}: {e}");
    }
    assert_eq!(run("pwd").unwrap()["stdout"], "/etc\n");
    let r = run("echo -n no-newline").unwrap();
    assert_eq!(r["stdout"], "no-newline", "{r}");
    assert!(r["recording_id"].is_string());

    // Without a policy: a syntax error fails that command only; exit ends the session.
    let p = call(json!({"target": "plain", "role": "read", "mode": "shell"})).unwrap();
    let pid = p["session_id"].as_str().unwrap().to_owned();
    let prun = |cmd: &str, timeout: u64| call(json!({"session_id": pid, "command": cmd, "timeout": timeout}));
    assert_eq!(prun("cd /usr; x=kept", 10).unwrap()["exit_code"], 0);
    let r = prun("echo (", 10).unwrap();
    assert_ne!(r["exit_code"], 0, "{r}");
    // dash says "Syntax error", bash "syntax error" (the role account's login shell decides).
    assert!(r["stderr"].as_str().unwrap().to_ascii_lowercase().contains("syntax error"), "{r}");
    assert_eq!(prun("echo \"$x $(pwd)\"", 10).unwrap()["stdout"], "kept /usr\n");
    let r = prun("exit 3", 10).unwrap();
    assert!(r["notice"].as_str().unwrap_or("").contains("the session is closed"), "{r}");
    let e = prun("pwd", 10).unwrap_err();
    assert!(e.contains("no session"), "{e}");
    // A timeout kills the shell and closes the session.
    let p2 = call(json!({"target": "plain", "role": "read", "mode": "shell"})).unwrap();
    let pid2 = p2["session_id"].as_str().unwrap().to_owned();
    let r = call(json!({"session_id": pid2, "command": "sleep 30", "timeout": 1})).unwrap();
    assert_eq!(r["timed_out"], true, "{r}");
    assert!(r["notice"].is_string(), "{r}");
    assert!(call(json!({"session_id": pid2, "command": "true"})).is_err());

    // An exec session carries nothing over.
    let e = call(json!({"target": "plain", "role": "read"})).unwrap();
    let eid = e["session_id"].as_str().unwrap().to_owned();
    assert_eq!(e["mode"], "exec");
    call(json!({"session_id": eid, "command": "cd /usr"})).unwrap();
    assert_ne!(call(json!({"session_id": eid, "command": "pwd"})).unwrap()["stdout"], "/usr\n");
    // Not on a target that verifies each command.
    let e = call(json!({"target": "sealed", "role": "read", "mode": "shell"})).unwrap_err();
    assert!(e.contains("shell sessions are not available there"), "{e}");
}

/// A terminal session runs interactive programs: keystrokes in, the screen out, the size the
/// program sees follows a resize, Ctrl-C reaches it, the keystrokes are recorded (an `i` event)
/// and audited; it is refused wherever commands are judged.
#[test]
fn terminal_sessions_run_interactive_programs_and_are_refused_where_commands_are_judged() {
    let l = lab();
    let create = |args: Value| tool_call(&l.broker.api, &l.alice, "session_create", args);
    let s = create(json!({"target": "plain", "role": "read", "mode": "pty", "cols": 100, "rows": 30})).unwrap();
    assert_eq!((s["mode"].as_str(), s["terminal"]["cols"].as_u64()), (Some("pty"), Some(100)), "{s}");
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let input = |args: Value| {
        let mut a = json!({"session_id": sid, "wait_ms": 3000});
        a.as_object_mut().unwrap().extend(args.as_object().unwrap().clone());
        tool_call(&l.broker.api, &l.alice, "session_input", a)
    };
    // Reads until the terminal has printed `want` (output can come in several calls).
    let until = |keys: &str, want: &str| -> String {
        let mut seen = input(json!({"input": keys})).unwrap()["output"].as_str().unwrap().to_owned();
        for _ in 0..10 {
            if seen.contains(want) {
                break;
            }
            seen.push_str(input(json!({"input": ""})).unwrap()["output"].as_str().unwrap());
        }
        assert!(seen.contains(want), "{want:?} not in {seen:?}");
        seen
    };
    until("stty size\r", "30 100");
    until("", "");
    let r = input(json!({"input": "stty size\r", "cols": 50, "rows": 20})).unwrap();
    let mut seen = r["output"].as_str().unwrap().to_owned();
    if !seen.contains("20 50") {
        seen.push_str(&until("", "20 50"));
    }
    assert!(seen.contains("20 50"), "{seen}");
    // An interactive program: `cat` echoes a line, Ctrl-C stops it, the shell is still there.
    until("cat\r", "cat");
    until("hello-from-the-terminal\r", "hello-from-the-terminal\r\nhello-from-the-terminal");
    until("\u{3}", "");
    let r = until("echo still-$((40+2))\r", "still-42");
    assert!(r.contains("still-42"), "{r}");
    // Recorded with the keystrokes; audited before they were sent.
    let r = input(json!({"input": "echo recorded-keys\r"})).unwrap();
    let id = r["recording_id"].as_str().unwrap().to_owned();
    let cast = std::fs::read_to_string(l.data.join(&format!("recordings/{id}.cast"))).unwrap();
    let header: Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
    assert_eq!((header["width"].as_u64(), header["height"].as_u64()), (Some(50), Some(20)), "{cast}");
    let first: Value = serde_json::from_str(cast.lines().nth(1).unwrap()).unwrap();
    assert_eq!(first, json!([0.0, "i", "echo recorded-keys\r"]), "{cast}");
    let inputs = audit_events(&l.broker, "ssh_input");
    assert!(inputs.iter().any(|e| e["action"]["input"] == "echo recorded-keys\r" && e["action"]["session"] == sid));
    let (code, shown, _) = recording_cli(&l, &["show", &id]);
    assert_eq!(code, Some(0));
    assert!(shown.contains("# [input \"echo recorded-keys\\r\"]"), "{shown}");
    // exec is not for a terminal; exit ends it.
    let e = tool_call(&l.broker.api, &l.alice, "exec", json!({"session_id": sid, "command": "id"})).unwrap_err();
    assert!(e.contains("is a terminal"), "{e}");
    let mut r = input(json!({"input": "exit 7\r"})).unwrap();
    for _ in 0..10 {
        if r["ended"] == true {
            break;
        }
        r = input(json!({"input": ""})).unwrap();
    }
    assert_eq!((r["ended"].as_bool(), r["exit_code"].as_u64()), (Some(true), Some(7)), "{r}");
    assert!(input(json!({"input": "id\r"})).unwrap_err().contains("no session"));

    // Refused where commands are judged: a target policy, a role policy, a sealed target.
    for (target, role, why) in [
        ("web", "read", "the target has a command policy"),
        ("plain", "narrow", "the role has a command policy"),
        ("sealed", "read", "verifies every command itself"),
    ] {
        let e = create(json!({"target": target, "role": role, "mode": "pty"})).unwrap_err();
        assert!(e.contains(why), "{target}/{role}: {e}");
    }
    let e = create(json!({"target": "plain", "role": "read", "cols": 80})).unwrap_err();
    assert!(e.contains("for mode \"pty\" only"), "{e}");
    // Listed only where a terminal could be opened: not under a token narrowed to `web`.
    let t = tool_call(&l.broker.api, &l.alice, "task_create", json!({"description": "web only"})).unwrap();
    let m = ephyr::macaroon::Macaroon::decode(t["token"].as_str().unwrap()).unwrap();
    let web_only = ephyr::macaroon::attenuate(&m, "target IN [web]").encode();
    let listed =
        |cred: &str| mcp_request(&l.broker.api, cred, "tools/list", None, json!({}))["result"]["tools"].to_string();
    assert!(listed(&l.alice).contains("\"session_input\""));
    assert!(!listed(&web_only).contains("\"session_input\"") && listed(&web_only).contains("\"exec\""));
    // session_input is for terminals only.
    let x = create(json!({"target": "plain", "role": "read", "mode": "shell"})).unwrap();
    let e =
        tool_call(&l.broker.api, &l.alice, "session_input", json!({"session_id": x["session_id"], "input": "id\r"}))
            .unwrap_err();
    assert!(e.contains("is not a terminal"), "{e}");
}
