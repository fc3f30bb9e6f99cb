//! `ephyr run HOST` against a real OpenSSH sshd on loopback: a stand-in agent
//! (tests/helpers/run_agent.py, the official `openai`, `anthropic` and `mcp` Python SDKs with only
//! the environment the run gave it) chats through the proxy and calls a tool; nothing in its run
//! directory is a provider key; after the run the token is refused and the directory is gone; a
//! killed CLI's run dies within its lease; a spent budget reaches the SDK in the provider's
//! shape; disposable keys from a STAND-IN of OpenAI's admin API (tests/helpers/upstream.py: the
//! real API is paid and unreachable here) are revoked when the run ends and after a broker crash.
//!
//! The host account is root: this machine's Python packages (the SDKs) live in root's own
//! interpreter, which other accounts cannot read. Everything the tests check about the run
//! directory (mode, contents, sweep) is the same for any account.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const USER: &str = "root";
const PROVIDER_KEY: &str = "sk-real-provider-key";
const ADMIN_KEY: &str = "sk-admin-STANDIN-key";
const LEASE: u64 = 3;
const OP_PASSWORD: &str = "correct horse battery staple";

struct Lab {
    broker: Broker,
    /// The runner agent's API key (`ephyr run --url`).
    key: String,
    policy: String,
    up: Upstream,
    _sshd: Sshd,
    data: TempDir,
    /// run_agent.py where the host user can read it.
    scripts: TempDir,
}

fn lab() -> Option<Lab> {
    if !require_root() {
        return None;
    }
    let (data, sshd, fp) = init_with_sshd("run", "");
    let up = Upstream::start_env(None, "127.0.0.1", &[], &[("LLM_KEY", PROVIDER_KEY), ("ADMIN_KEY", ADMIN_KEY)]);
    let scripts = TempDir::new("run-scripts");
    std::fs::copy(repo().join("tests/helpers/run_agent.py"), scripts.join("run_agent.py")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(scripts.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(scripts.join("run_agent.py"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (port, upp) = (sshd.port, up.port);
    let op = operator_entry("ops", "viewer", OP_PASSWORD);
    let (key, hash) = agent_key("runner");
    let policy = format!(
        r#"version: 1
operators:
{op}
network: {{ allow: [127.0.0.1/32] }}
roles:
  run: {{ principal: {USER} }}
targets:
  lab: {{ host: 127.0.0.1, port: {port}, allowed_roles: [run], host_key_fingerprint: "{fp}", extensions: [permit-pty] }}
services:
  openai:
    url: http://127.0.0.1:{upp}/v1
    credential: {{ type: bearer, secret: "env:LLM_KEY" }}
    errors: openai
    mint: {{ provider: openai, admin_key: "env:ADMIN_KEY", project: proj_standin, url: "http://127.0.0.1:{upp}/v1" }}
  openai-scoped:
    url: http://127.0.0.1:{upp}/v1
    credential: {{ type: bearer, secret: "env:LLM_KEY" }}
    errors: openai
    mint: {{ provider: openai, admin_key: "env:ADMIN_KEY", project: proj_standin, url: "http://127.0.0.1:{upp}/v1", scopes: [api.model.read, api.model.request] }}
  anthropic:
    url: http://127.0.0.1:{upp}
    credential: {{ type: header, header: x-api-key, secret: "env:LLM_KEY" }}
    errors: anthropic
agents:
  runner:
    uid: 0
    api_key_hash: "{hash}"
    ssh: {{ lab: {{ roles: [run] }} }}
    services: {{ openai: {{}}, openai-scoped: {{}}, anthropic: {{}} }}
runs:
  default:
    role: run
    lease: {LEASE}s
    envelope: {{ targets: [lab], services: [openai, anthropic] }}
  tight:
    role: run
    lease: {LEASE}s
    envelope: {{ targets: [lab], services: [openai] }}
    budget: {{ requests: 2 }}
  keyed:
    role: run
    lease: {LEASE}s
    envelope: {{ targets: [lab], services: [openai] }}
    keys: [openai]
  scoped:
    role: run
    lease: {LEASE}s
    envelope: {{ targets: [lab], services: [openai-scoped] }}
    keys: [openai-scoped]
"#
    );
    let broker = start_broker(&policy, data.path());
    Some(Lab { broker, key, policy, up, _sshd: sshd, data, scripts })
}

fn start_broker(policy: &str, data: &Path) -> Broker {
    Broker::start(BrokerOpts {
        policy: Some(policy),
        data_dir: Some(data.to_path_buf()),
        env: vec![("LLM_KEY".into(), PROVIDER_KEY.into()), ("ADMIN_KEY".into(), ADMIN_KEY.into())],
        ..Default::default()
    })
}

impl Lab {
    fn run_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(ephyr_bin());
        c.arg("run").args(["--socket", self.broker.socket.to_str().unwrap()]).args(args);
        c.stdin(Stdio::null());
        c
    }

    fn agent(&self, template: &str, mode: &[&str]) -> Command {
        let script = self.scripts.join("run_agent.py");
        let mut c = self.run_cmd(&["lab", "--template", template, "--", "python3", script.to_str().unwrap()]);
        c.args(mode);
        c
    }

    fn runs(&self) -> Value {
        local_request(&self.broker.socket, "GET", "/v1/runs", b"").json()
    }

    fn refused(&self, token: &str) -> bool {
        let auth = format!("Bearer {token}");
        let r = http_request(
            &self.broker.api,
            "POST",
            "/v1/proxy/openai/chat/completions",
            &[("Authorization", &auth), ("Content-Type", "application/json")],
            br#"{"model":"m","messages":[]}"#,
        );
        r.status == 401
    }

    fn accounts(&self) -> Vec<Value> {
        let r = http_request(&format!("127.0.0.1:{}", self.up.port), "GET", "/_standin/accounts", &[], b"");
        r.json().as_array().cloned().unwrap_or_default()
    }
}

fn json_line(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| {
        panic!("no JSON from the agent; stdout {text:?} stderr {}", String::from_utf8_lossy(&out.stderr))
    });
    serde_json::from_str(line).unwrap()
}

/// A CLI whose agent printed its run directory and READY (the `sleep` mode).
fn started(mut c: Command) -> (Child, Value) {
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("the agent said nothing").unwrap();
    let seen: Value = serde_json::from_str(&first).unwrap_or_else(|_| panic!("{first:?}"));
    assert_eq!(lines.next().unwrap().unwrap(), "READY");
    (child, seen)
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

#[test]
fn a_run_chats_and_calls_a_tool_with_nothing_to_steal_then_leaves_nothing() {
    let Some(lab) = lab() else { return };
    let out = lab.agent("default", &["chat"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "exit {:?}; stderr {err}", out.status);
    let v = json_line(&out);
    assert_eq!(v["openai"], "Hello from the stand-in", "{v}");
    assert_eq!(v["anthropic"], "Hello from the stand-in", "{v}");
    assert_eq!(v["mcp"]["is_error"], false, "{v}");
    assert!(v["mcp"]["text"].as_str().unwrap().contains("run: python3 on lab"), "the run's own task: {v}");
    // The run directory: private, on tmpfs here (/dev/shm for a user without /run/user), only
    // the three files, and no provider key in it or in the agent's environment.
    assert_eq!(v["files"], serde_json::json!(["env", "mcp.json", "token"]), "{v}");
    assert_eq!(v["mode"], "0o700", "{v}");
    let dir = v["dir"].as_str().unwrap();
    assert!(dir.starts_with("/dev/shm/ephyr-run-") || dir.starts_with("/run/user/"), "{dir}");
    assert_eq!(v["provider_key_in_dir"], false, "{v}");
    assert_eq!(v["provider_key_in_env"], false, "{v}");
    let token = v["token_file"].as_str().unwrap();
    assert!(token.starts_with("mac_"), "{token}");
    // After the run: the token is refused, the directory is gone, the run is recorded.
    assert!(lab.refused(token), "the run's token still works after the run");
    assert!(!Path::new(dir).exists(), "{dir} is still there");
    let runs = lab.runs();
    let r = &runs["runs"][0];
    assert_eq!(r["end_reason"], "agent_exited", "{runs}");
    assert_eq!(r["host"], "lab");
    assert_eq!(r["label"], "python3");
    assert_eq!(r["usage"]["requests"], 2, "{runs}");
    // The stand-in's usage fields: 1 + 4 tokens for each provider (the stream's counted too).
    assert_eq!((r["usage"]["input_tokens"].as_u64(), r["usage"]["output_tokens"].as_u64()), (Some(2), Some(8)));
    assert_eq!(r["usage"]["models"]["claude-standin"][2], 4, "{runs}");
    assert_eq!((r["usage"]["tool_calls"].as_u64(), r["usage"]["commands"].as_u64()), (Some(1), Some(0)), "{runs}");
    assert!(err.contains("ended (agent_exited)") && err.contains("2 LLM requests"), "{err}");
    assert_eq!(runs["live_ids"], serde_json::json!([]));
    // The audit trail has the run's start and end, and no token or key.
    let audit = std::fs::read_to_string(lab.data.join("audit/audit.jsonl")).unwrap_or_default();
    assert!(audit.contains("\"run_start\"") && audit.contains("\"run_end\""), "no run records in the audit");
    assert!(!audit.contains(token) && !audit.contains(PROVIDER_KEY));
    // `ephyr runs` and the console's Tasks view show it, with its usage per model.
    let o = ephyr(&["runs", "--socket", lab.broker.socket.to_str().unwrap()]);
    assert!(stdout(&o).contains("agent_exited") && stdout(&o).contains("lab"), "{}", stdout(&o));
    let mut console = ConsoleClient::new(&lab.broker.dashboard);
    assert_eq!(console.login("ops", OP_PASSWORD).status, 303);
    let page = console.get("/tasks").text();
    assert!(page.contains("Runs (ephyr run)") && page.contains("agent_exited"), "{page}");
    assert!(page.contains("gpt-standin: 1 req, 1 in, 4 out"), "{page}");
    assert!(!page.contains(token), "the console shows the token");
}

#[test]
fn a_killed_cli_s_run_dies_within_its_lease_and_the_next_run_sweeps_its_directory() {
    let Some(lab) = lab() else { return };
    let (cli, seen) = started(lab.agent("default", &["sleep", "60"]));
    let token = seen["token_file"].as_str().unwrap().to_owned();
    let dir = seen["dir"].as_str().unwrap().to_owned();
    assert!(!lab.refused(&token), "the token works while the run is live");
    // Renewals keep it alive past its lease while the CLI lives.
    std::thread::sleep(Duration::from_secs(LEASE + 1));
    assert!(!lab.refused(&token), "the run died although its CLI renews the lease");
    kill9(cli.id());
    let killed = Instant::now();
    let dead = poll_until(Duration::from_secs(LEASE + 5), || lab.refused(&token), |d| *d);
    let took = killed.elapsed();
    assert!(dead, "the run outlived its lease");
    eprintln!("lease {LEASE}s: the token was refused {took:?} after kill -9 of the CLI");
    assert!(took <= Duration::from_secs(LEASE + 2), "the run died after {took:?}, beyond its lease of {LEASE}s + 1s");
    let runs = lab.runs();
    assert_eq!(runs["runs"][0]["end_reason"], "lease_expired", "{runs}");
    // The directory outlived the CLI; a cleanup sweep removes it (the next run's start would too).
    assert!(Path::new(&dir).exists());
    let out = lab.run_cmd(&["--cleanup", "lab"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("removed {dir}")), "{out:?}");
    assert!(!Path::new(&dir).exists(), "the stale directory is still there");
    // A live run's directory is never swept.
    let (mut live, seen2) = started(lab.agent("default", &["sleep", "60"]));
    let out = lab.run_cmd(&["--cleanup", "lab"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let live_dir = seen2["dir"].as_str().unwrap();
    assert!(Path::new(live_dir).exists(), "the sweep removed a live run's directory");
    // SIGTERM to the CLI: the run ends at once (not by its lease) and its directory goes.
    let t2 = seen2["token_file"].as_str().unwrap().to_owned();
    let _ = Command::new("kill").args(["-TERM", &live.id().to_string()]).status();
    let st = live.wait().unwrap();
    assert_eq!(st.code(), Some(130));
    assert!(lab.refused(&t2));
    assert!(!Path::new(live_dir).exists(), "{live_dir} is still there");
    let id = live_dir.rsplit("ephyr-run-").next().unwrap().split('.').next().unwrap();
    let runs = lab.runs();
    let r = runs["runs"].as_array().unwrap().iter().find(|r| r["id"] == id).unwrap();
    assert_eq!(r["end_reason"], "interrupted_sigterm", "{runs}");
    // Ended by the broker's side (an operator here): the CLI learns it at its next renewal,
    // hangs the agent up, removes the directory and exits 125.
    let (mut third, seen3) = started(lab.agent("default", &["sleep", "60"]));
    let dir3 = seen3["dir"].as_str().unwrap().to_owned();
    let id3 = dir3.rsplit("ephyr-run-").next().unwrap().split('.').next().unwrap().to_owned();
    let r =
        local_request(&lab.broker.socket, "POST", &format!("/v1/runs/{id3}/end"), br#"{"reason":"operator_said_so"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(LEASE + 5);
    let code = loop {
        match third.try_wait().unwrap() {
            Some(s) => break s.code(),
            None if Instant::now() > deadline => break None,
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(code, Some(125), "the CLI did not stop");
    assert!(!Path::new(&dir3).exists(), "{dir3} is still there");
    let runs = lab.runs();
    let r = runs["runs"].as_array().unwrap().iter().find(|r| r["id"] == id3.as_str()).unwrap();
    assert_eq!(r["end_reason"], "operator_said_so", "the first reason is kept: {runs}");
}

#[test]
fn a_spent_budget_reaches_the_sdk_in_the_providers_shape() {
    let Some(lab) = lab() else { return };
    let out = lab.agent("tight", &["budget"]).output().unwrap();
    let v = json_line(&out);
    assert_eq!(v["ok"], 2, "{v}");
    assert_eq!(v["error"]["class"], "RateLimitError", "{v}");
    assert_eq!(v["error"]["status"], 429, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("budget of 2 requests") && msg.contains("budget_exceeded"), "{msg}");
    // The narrower envelope held: this run's token has no Anthropic.
    let runs = lab.runs();
    assert_eq!(runs["runs"][0]["usage"]["requests"], 2, "{runs}");
}

#[test]
fn bad_input_is_refused_before_anything_starts() {
    let Some(lab) = lab() else { return };
    let cases: [(&[&str], &str); 5] = [
        (&["nope", "--", "true"], "no target \"nope\""),
        (&["lab", "--template", "nope", "--", "true"], "no run template \"nope\""),
        (&["lab", "--envelope", r#"{"services":["gitea"]}"#, "--", "true"], "outside the run template's envelope"),
        (&["lab", "--ttl", "2h", "--", "true"], "a run lasts 1m to 30m"),
        (&["lab", "--agent", "nope"], "unknown agent \"nope\""),
    ];
    for (args, want) in cases {
        let out = lab.run_cmd(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(lab.runs()["live_ids"], serde_json::json!([]), "a refused start left a run");
    let tasks = local_request(&lab.broker.socket, "GET", "/v1/tasks", b"").json();
    assert_eq!(tasks["tasks"], serde_json::json!([]), "a refused start left a task: {tasks}");
}

#[test]
fn a_terminal_run_gets_a_pty() {
    let Some(lab) = lab() else { return };
    let out = lab
        .run_cmd(&["lab", "--tty", "--", "sh", "-c", "tty; echo TERM=$TERM"])
        .env("TERM", "xterm-test")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("/dev/pts/") && text.contains("TERM=xterm-test"), "{text}");
}

#[test]
fn disposable_keys_are_revoked_when_the_run_ends_and_after_a_broker_crash() {
    let Some(mut lab) = lab() else { return };
    // 1. Minted with the run's expiry, handed over instead of the token, revoked at the end.
    let out = lab.agent("keyed", &["env"]).output().unwrap();
    let v = json_line(&out);
    let key = v["OPENAI_API_KEY"].as_str().unwrap();
    assert!(key.starts_with("sk-svcacct-disposable-"), "{v}");
    assert_eq!(v["OPENAI_BASE_URL"], Value::Null, "a minted key goes to the provider itself");
    let gone = poll_until(Duration::from_secs(5), || lab.accounts().is_empty(), |g| *g);
    assert!(gone, "the account outlived its run: {:?}", lab.accounts());
    let keys = local_request(&lab.broker.socket, "GET", "/v1/keys", b"").json();
    assert!(keys["keys"][0]["revoked"].as_str().unwrap().contains("deleted"), "{keys}");
    assert!(!keys.to_string().contains(key), "the key's value is listed");
    // With scopes: the account alone, then its one key with the scopes and the run's expiry.
    let (mut scoped, seen) = started(lab.agent("scoped", &["sleep", "60"]));
    let accounts = lab.accounts();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(accounts[0]["role"], "none", "{accounts:?}");
    let k = &accounts[0]["api_key"];
    assert_eq!(k["scopes"], serde_json::json!(["api.model.read", "api.model.request"]), "{accounts:?}");
    assert!(k["expires_at"].as_i64().is_some(), "{accounts:?}");
    assert!(seen["provider_key_in_env"] == false, "{seen}");
    let _ = Command::new("kill").args(["-TERM", &scoped.id().to_string()]).status();
    assert_eq!(scoped.wait().unwrap().code(), Some(130));
    let gone = poll_until(Duration::from_secs(5), || lab.accounts().is_empty(), |g| *g);
    assert!(gone, "the scoped account outlived its run: {:?}", lab.accounts());

    // 2. The broker dies while the run holds a key: the restarted broker revokes it once the
    //    run's lease (restarted with the broker) runs out.
    let (cli, _) = started(lab.agent("keyed", &["sleep", "60"]));
    let accounts = lab.accounts();
    assert_eq!(accounts.len(), 1);
    let expires = accounts[0]["api_key"]["expires_at"].as_i64().unwrap();
    let created = accounts[0]["created_at"].as_i64().unwrap();
    assert!((expires - created - 1800).abs() <= 5, "server-side expiry is the run's ttl: {accounts:?}");
    kill9(cli.id());
    kill9(lab.broker.pid());
    lab.broker.wait_exit(Duration::from_secs(10));
    lab.broker = start_broker(&lab.policy, lab.data.path());
    let gone = poll_until(Duration::from_secs(LEASE + 15), || lab.accounts().is_empty(), |g| *g);
    assert!(gone, "a crash left a live key: {:?}", lab.accounts());

    // 3. The broker dies after asking for a key and before hearing back: the key exists at the
    //    provider, the journal has only the intent; the restarted broker finds it by name.
    http_request(&format!("127.0.0.1:{}", lab.up.port), "POST", "/_standin/hang", &[], b"");
    let mut cli = lab.agent("keyed", &["env"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let made = poll_until(Duration::from_secs(10), || lab.accounts().len(), |n| *n == 1);
    assert_eq!(made, 1);
    kill9(lab.broker.pid());
    lab.broker.wait_exit(Duration::from_secs(10));
    let _ = cli.kill();
    let _ = cli.wait();
    lab.broker = start_broker(&lab.policy, lab.data.path());
    let gone = poll_until(Duration::from_secs(LEASE + 15), || lab.accounts().is_empty(), |g| *g);
    assert!(gone, "an unanswered mint left a live key: {:?}", lab.accounts());
    let o = ephyr(&["keys", "list", "--json", "--socket", lab.broker.socket.to_str().unwrap()]);
    let keys: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(keys.as_array().unwrap().iter().all(|k| !k["revoked"].is_null()), "{keys}");
}

#[test]
fn another_local_user_cannot_see_renew_or_end_a_run() {
    let Some(lab) = lab() else { return };
    let (mut cli, seen) = started(lab.agent("default", &["sleep", "60"]));
    let dir = seen["dir"].as_str().unwrap();
    let id = dir.rsplit("ephyr-run-").next().unwrap().split('.').next().unwrap();
    let sock = lab.broker.socket.to_str().unwrap();
    let nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args(args)
            .output()
            .unwrap()
    };
    for what in ["renew", "end"] {
        let out = nobody(&[
            "curl",
            "-s",
            "--unix-socket",
            sock,
            "-X",
            "POST",
            &format!("http://l/v1/runs/{id}/{what}"),
            "-d",
            "{}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("no run {id}")), "{what}: {text}");
    }
    let out = nobody(&[ephyr_bin().to_str().unwrap(), "runs", "--json", "--socket", sock]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]", "another user's runs are listed");
    let out = nobody(&[ephyr_bin().to_str().unwrap(), "run", "lab", "--socket", sock, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_agent_for_uid"), "{out:?}");
    assert!(!lab.refused(seen["token_file"].as_str().unwrap()), "the run was ended by another user");
    let _ = cli.kill();
    let _ = cli.wait();
}

#[test]
fn a_forged_runs_or_keys_journal_stops_start_up_with_where() {
    let Some(_) = lab() else { return };
    for log in ["runs", "keys"] {
        let data = TempDir::new("run-forged");
        assert!(
            ephyr(&[
                "init",
                "--data-dir",
                data.path().to_str().unwrap(),
                "--config-dir",
                data.join("etc").to_str().unwrap()
            ])
            .status
            .success()
        );
        // A well-framed record (length and checksum right) whose content is not a record.
        let payload = br#"{"t":"start","id":"not-a-ulid"}"#;
        let digest = sha256(payload);
        let mut bytes = b"EPHYRJ1\n".to_vec();
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&digest[..8]);
        bytes.extend_from_slice(payload);
        std::fs::write(data.join(&format!("state/{log}.journal")), bytes).unwrap();
        let mut b = Broker::start(BrokerOpts {
            policy: Some("version: 1\n"),
            data_dir: Some(data.path().to_path_buf()),
            expect_ready: false,
            ..Default::default()
        });
        let st = b.wait_exit(Duration::from_secs(20));
        assert!(!st.success());
        let log_text = b.log();
        assert!(log_text.contains(&format!("{log} log: record 1")), "{log}: {log_text}");
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    let out = Command::new("python3")
        .args(["-c", "import hashlib,sys; sys.stdout.write(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(b)?;
            c.wait_with_output()
        })
        .unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn a_run_from_elsewhere_uses_the_agents_api_key_over_tcp() {
    let Some(lab) = lab() else { return };
    let url = format!("http://{}", lab.broker.api);
    let script = lab.scripts.join("run_agent.py");
    let run = |key: &str| {
        Command::new(ephyr_bin())
            .args(["run", "lab", "--url", &url, "--", "python3", script.to_str().unwrap(), "chat"])
            .env("EPHYR_TOKEN", key)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&lab.key);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json_line(&out);
    assert_eq!(v["openai"], "Hello from the stand-in", "{v}");
    let token = v["token_file"].as_str().unwrap();
    assert!(lab.refused(token));
    // The run is the agent's: `ephyr runs --url` lists it; the socket shows it as started remotely.
    let o = Command::new(ephyr_bin())
        .args(["runs", "--json", "--url", &url])
        .env("EPHYR_TOKEN", &lab.key)
        .output()
        .unwrap();
    let runs: Value = serde_json::from_str(&stdout(&o)).unwrap_or_else(|_| panic!("{o:?}"));
    assert_eq!(runs[0]["end_reason"], "agent_exited", "{runs}");
    assert_eq!(runs[0]["uid"].as_u64(), Some(u64::from(u32::MAX)), "{runs}");
    // A wrong key, and a task token (a run is a new task tree: only the agent starts one).
    let out = run("ek_wrong.key");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(token);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") || err.contains("api_key_required"), "{err}");
    let t =
        tool_call(&lab.broker.api, &lab.key, "task_create", serde_json::json!({"description": "a task", "ttl": "10m"}))
            .unwrap();
    let out = run(t["token"].as_str().unwrap());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("api_key_required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without a key: a usage error naming EPHYR_TOKEN.
    let out = Command::new(ephyr_bin())
        .args(["run", "lab", "--url", &url, "--", "true"])
        .env_remove("EPHYR_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EPHYR_TOKEN"));
}
