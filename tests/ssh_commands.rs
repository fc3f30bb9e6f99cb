//! The SSH command policy against a real OpenSSH sshd: the command table (tests/data/commands.tsv)
//! through MCP `exec`, role and task-token policies, and `policy explain --command`.

mod common;

use std::process::Command;

use common::*;
use serde_json::{Value, json};

const USER: &str = "ephyrt-cmd";

struct Lab {
    _sshd: Sshd,
    broker: Broker,
    alice: String,
    _data: TempDir,
    conf: TempDir,
}

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
        "MaxStartups 200\nMaxSessions 200\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\n",
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
    let policy = format!(
        r#"version: 1
roles:
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
  plain: {{ host: 127.0.0.2, port: {port}, allowed_roles: [read, narrow], host_key_fingerprint: "{fp}" }}
agents:
  alice:
    api_key_hash: "{alice_hash}"
    ssh:
      "*": {{ roles: [read, narrow] }}
    can_delegate: true
"#
    );
    std::fs::write(conf.join("policy.yaml"), &policy).unwrap();
    let broker = Broker::start(BrokerOpts {
        policy: Some(&policy),
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    });
    Lab { _sshd: sshd, broker, alice, _data: data, conf }
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

/// Every row of the table through MCP `exec`: allowed commands run on the target (an exit code
/// comes back), refused ones fail with `command_denied` and the row's reason code, and no
/// certificate is issued for them.
#[test]
fn the_command_table_through_mcp_exec_against_sshd() {
    let l = lab();
    let rows = table();
    assert!(rows.len() >= 60);
    let mut wrong = Vec::new();
    for (want, cmd) in &rows {
        let certs_before = audit_events(&l.broker, "cert_issued").len();
        let got = l.exec(&l.alice, "web", "read", cmd);
        let certs_after = audit_events(&l.broker, "cert_issued").len();
        match (want.as_str(), got) {
            ("ok", Ok(r)) if r["exit_code"].is_number() && certs_after == certs_before + 1 => {}
            ("ok", other) => wrong.push(format!("{cmd:?}: want it to run, got {other:?}")),
            (code, Err(e)) if e.contains("command_denied") && e.contains(&format!("({code})")) => {
                if certs_after != certs_before {
                    wrong.push(format!("{cmd:?}: refused ({code}) but a certificate was issued"));
                }
            }
            (code, other) => wrong.push(format!("{cmd:?}: want {code}, got {other:?}")),
        }
    }
    assert!(wrong.is_empty(), "{} of {} rows differ:\n{}", wrong.len(), rows.len(), wrong.join("\n"));
    // What ran is what was checked: the table's `l\s /etc` ran `ls` (quote removal), on the target.
    let r = l.exec(&l.alice, "web", "read", r"l\s -d /etc").unwrap();
    assert_eq!(r["stdout"], "/etc\n", "{r}");
    // Each refusal is audited with its code.
    let denied = audit_events(&l.broker, "tool_call");
    assert!(
        denied.iter().any(|e| e["code"] == "command_denied"
            && e["reason"].as_str().is_some_and(|r| r.contains("(wrapper)") && r.contains("bash -c"))),
        "{denied:?}"
    );
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
