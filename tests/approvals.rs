//! Human approval from outside: real MCP clients (the Python `mcp` SDK and the TypeScript SDK)
//! call `exec` on an approval-guarded role of a real sshd; operators answer with `ephyr approve`
//! and `ephyr deny`. What must hold: nothing runs before approval; an approval runs exactly the
//! action it was asked for, once (a waiver: again, for its window only); a denial's reason and an
//! expiry reach the agent; four eyes needs two different approvers; requests survive a restart;
//! a child task does not inherit its parent's approval; the HTTP proxy route is held the same way
//! and webhook and ntfy notifications reach a real receiver without a secret. The console's queue
//! in Chromium is in `tests/console_browser.rs`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const USER: &str = "ephyrt-appr";

/// A broker whose agent `bot` may run commands as `op` on target `nas` (a real sshd), with
/// `approvals` as the policy's approvals section.
struct Setup {
    b: Broker,
    key: String,
    /// Where commands on the target leave their marks (the target is this machine).
    marks: TempDir,
    _sshd: Sshd,
    data: TempDir,
    policy: String,
}

fn policy(port: u16, fp: &str, hash: &str, approvals: &str, extra: &str) -> String {
    format!(
        "version: 1\n{extra}roles:\n  op: {{ principal: {USER} }}\n  read: {{ principal: {USER} }}\n\
         targets:\n  nas: {{ host: 127.0.0.1, port: {port}, allowed_roles: [op, read], host_key_fingerprint: \"{fp}\" }}\n\
         agents:\n  bot:\n    api_key_hash: \"{hash}\"\n    can_delegate: true\n    ssh: {{ nas: {{ roles: [op, read] }} }}\n\
         approvals:\n{approvals}"
    )
}

fn setup(tag: &str, approvals: &str, extra: &str) -> Setup {
    ensure_user(USER);
    let (data, sshd, fp) = init_with_sshd(tag, "");
    let (key, hash) = agent_key("bot");
    let p = policy(sshd.port, &fp, &hash, approvals, extra);
    let b =
        Broker::start(BrokerOpts { policy: Some(&p), data_dir: Some(data.path().to_path_buf()), ..Default::default() });
    let marks = TempDir::new(&format!("{tag}-marks"));
    std::fs::set_permissions(marks.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    Setup { b, key, marks, _sshd: sshd, data, policy: p }
}

impl Setup {
    /// A command that appends `tag` to the marks file: how many times it ran is counted there.
    fn mark(&self, tag: &str) -> String {
        format!("echo {tag} >> {}/marks", self.marks.path().display())
    }

    fn ran(&self, tag: &str) -> usize {
        std::fs::read_to_string(self.marks.path().join("marks"))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == tag)
            .count()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--socket", self.b.socket.to_str().unwrap()]);
        ephyr(&all)
    }

    /// The approval requests `ephyr approvals --all --json` lists.
    fn queue(&self) -> Vec<Value> {
        let out = self.cli(&["approvals", "--all", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
    }

    /// The Python SDK's call of `exec` as `op`: `(is_error, text)`.
    fn py_exec(&self, command: &str) -> (bool, String) {
        let args = json!({ "target": "nas", "role": "op", "command": command }).to_string();
        let out = python("mcp_call.py")
            .args([&format!("http://{}/mcp", self.b.api), &self.key, "exec", &args])
            .output()
            .unwrap();
        assert!(out.status.success(), "python client: {}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["is_error"].as_bool().unwrap(), v["text"].as_str().unwrap().to_owned())
    }

    /// The Python SDK's `exec` as `op` with `cred`, asking for progress (so it is held), in the
    /// background; its output once it answers.
    fn py_exec_held(&self, cred: &str, command: &str) -> std::thread::JoinHandle<std::process::Output> {
        let api = format!("http://{}/mcp", self.b.api);
        let (cred, args) = (cred.to_owned(), json!({ "target": "nas", "role": "op", "command": command }).to_string());
        std::thread::spawn(move || {
            python("mcp_call.py").args([&api, &cred, "exec", &args, "progress"]).output().unwrap()
        })
    }

    /// A new delegable task of the agent: its token and id.
    fn task(&self, description: &str) -> (String, String) {
        let args = json!({"description": description, "ttl": "10m", "can_delegate": true});
        let t = tool_call(&self.b.api, &self.key, "task_create", args).unwrap();
        (t["token"].as_str().unwrap().to_owned(), t["task_id"].as_str().unwrap().to_owned())
    }

    /// The id of the waiting request a held call opened (waits up to 10 s for it).
    fn wait_pending(&self) -> String {
        for _ in 0..100 {
            if let Some(r) = self.queue().iter().find(|r| r["state"] == "pending") {
                return r["id"].as_str().unwrap().to_owned();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no held call opened a request");
    }
}

/// The request id a pending result names.
fn pending_id(text: &str) -> String {
    assert!(text.starts_with("approval pending (approval_pending):"), "{text}");
    let at = text.find("Request ").expect("names its request") + "Request ".len();
    text[at..at + 26].to_owned()
}

const RULES: &str = "  hold: 0s\n  rules:\n\
    \x20   op-commands:\n      ssh: { targets: [nas], roles: [op] }\n      approvers: [local]\n      timeout: 10m\n      waiver: 1m\n\
    \x20   short:\n      ssh: { targets: [nas], roles: [op], commands: [\"echo short*\"] }\n      approvers: [local]\n      timeout: 2s\n";

#[test]
fn exec_runs_once_per_approval_of_exactly_that_command_and_a_denial_or_expiry_reaches_the_agent() {
    if !require_root() {
        return;
    }
    let s = setup("appr-exec", RULES, "");
    let once = s.mark("once");
    // An operator watching the queue: `ephyr approvals --follow --json`, one line per change.
    let mut follow = std::process::Command::new(ephyr_bin())
        .args(["approvals", "--follow", "--json", "--socket", s.b.socket.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, seen) = std::sync::mpsc::channel::<Value>();
    let out = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str(&line).unwrap());
        }
    });

    // Asked: nothing runs, the agent is told which request waits.
    let (err, text) = s.py_exec(&once);
    assert!(err, "{text}");
    let id = pending_id(&text);
    assert!(text.contains("op-commands") && text.contains("same arguments"), "{text}");
    assert_eq!(s.ran("once"), 0, "nothing runs before approval");
    let q = s.queue();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["id"], id.as_str());
    assert_eq!(q[0]["state"], "pending");
    assert_eq!(q[0]["action"]["command"], once.as_str(), "the operator sees the exact command");
    // The same call again is the same request, not a second one.
    assert_eq!(pending_id(&s.py_exec(&once).1), id);
    // A read-only role is not held.
    let args = json!({ "target": "nas", "role": "read", "command": "id -un" });
    assert_eq!(tool_call(&s.b.api, &s.key, "exec", args).unwrap()["stdout"], format!("{USER}\n"));

    let line = seen.recv_timeout(Duration::from_secs(5)).expect("--follow shows the new request");
    assert_eq!((line["id"].as_str(), line["state"].as_str()), (Some(id.as_str()), Some("pending")));

    // Approved from the CLI: the next identical call runs, once.
    let out = s.cli(&["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("approved"), "{}", stdout(&out));
    let line = seen.recv_timeout(Duration::from_secs(5)).expect("--follow shows the decision");
    assert_eq!((line["id"].as_str(), line["state"].as_str()), (Some(id.as_str()), Some("approved")));
    let _ = follow.kill();
    let _ = follow.wait();
    let (err, text) = s.py_exec(&once);
    assert!(!err, "{text}");
    assert_eq!(s.ran("once"), 1);
    // Used up: the same call asks anew.
    let (err, text) = s.py_exec(&once);
    assert!(err);
    let again = pending_id(&text);
    assert_ne!(again, id, "a used approval is not reused");
    assert_eq!(s.ran("once"), 1);

    // An approval covers only its own command: a changed command is a request of its own.
    assert!(s.cli(&["approve", &again]).status.success());
    let (err, text) = s.py_exec(&s.mark("other"));
    assert!(err, "{text}");
    let other = pending_id(&text);
    assert_ne!(other, again);
    assert_eq!(s.ran("other"), 0);
    assert_eq!(s.ran("once"), 1, "the approval of `once` did not run `other`");
    assert!(!s.py_exec(&once).0, "the approved command still runs");
    assert_eq!(s.ran("once"), 2);

    // Denied with a reason: the agent is told it, and nothing ran.
    let out = s.cli(&["deny", &other]);
    assert_eq!(out.status.code(), Some(2), "deny needs a reason");
    let out = s.cli(&["deny", &other, "--reason", "not during backups"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (err, text) = s.py_exec(&s.mark("other"));
    assert!(err);
    assert!(text.starts_with("denied (approval_denied):") && text.contains("not during backups"), "{text}");
    assert!(text.contains("operator:uid0"), "names who denied: {text}");
    assert_eq!(s.ran("other"), 0);
    // A denied request cannot be approved afterwards.
    let out = s.cli(&["approve", &other]);
    assert!(!out.status.success() && stderr(&out).contains("denied already"), "{}", stderr(&out));

    // Nobody answers: the request expires and the agent is told so.
    let (err, text) = s.py_exec("echo short");
    assert!(err);
    let short = pending_id(&text);
    std::thread::sleep(Duration::from_millis(3500));
    let (err, text) = s.py_exec("echo short");
    assert!(err);
    assert!(text.starts_with("denied (approval_expired):") && text.contains(&short), "{text}");
    assert!(s.cli(&["approve", &short]).status.code() != Some(0), "an expired request cannot be approved");

    // The audit trail has every request, decision, use and expiry, with who answered.
    let decisions = audit_events(&s.b, "approval_decision");
    assert!(decisions.iter().any(|e| e["agent"] == "operator:uid0"
        && e["action"]["approve"] == false
        && e["action"]["reason"] == "not during backups"));
    assert!(audit_events(&s.b, "approval_requested").len() >= 4);
    assert_eq!(audit_events(&s.b, "approval_used").len(), 2);
    assert!(audit_events(&s.b, "approval_expired").iter().any(|e| e["action"]["approval"] == short.as_str()));
    let metrics = http_request(&s.b.dashboard, "GET", "/metrics", &[], b"").text();
    for line in ["ephyr_approvals_total{outcome=\"denied\"} 1", "ephyr_approvals_total{outcome=\"used\"} 2"] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[test]
fn a_waiver_covers_the_identical_action_for_its_window_only_and_a_child_task_does_not_inherit() {
    if !require_root() {
        return;
    }
    let s = setup("appr-waiver", RULES, "");
    let cmd = s.mark("w");
    let (_, text) = s.py_exec(&cmd);
    let id = pending_id(&text);
    // A waiver beyond the rule's is refused; within it, accepted.
    let out = s.cli(&["approve", &id, "--waive", "2m"]);
    assert!(!out.status.success() && stderr(&out).contains("at most 1m"), "{}", stderr(&out));
    // (Raw calls inside the window: a Python SDK start can take seconds on a loaded machine.)
    assert!(s.cli(&["approve", &id, "--waive", "8s"]).status.success());
    let approved = std::time::Instant::now();
    let args = json!({ "target": "nas", "role": "op", "command": cmd });
    assert!(tool_call(&s.b.api, &s.key, "exec", args.clone()).is_ok());
    assert!(tool_call(&s.b.api, &s.key, "exec", args).is_ok(), "the waiver covers the identical action again");
    assert!(approved.elapsed() < Duration::from_secs(8), "both calls ran inside the window");
    assert_eq!(s.ran("w"), 2);
    assert!(s.py_exec(&s.mark("w2")).0, "but not another command");
    std::thread::sleep(Duration::from_millis(8500).saturating_sub(approved.elapsed()));
    let (err, text) = s.py_exec(&cmd);
    assert!(err && text.starts_with("approval pending"), "after its window the waiver is gone: {text}");
    assert_eq!(s.ran("w"), 2);

    // A task's approval (even with a waiver) is its own: a child delegated from it asks anew.
    let (parent_token, _) = s.task("parent");
    let args = json!({"target": "nas", "role": "op", "command": s.mark("t")});
    let err = tool_call(&s.b.api, &parent_token, "exec", args.clone()).unwrap_err();
    let tid = pending_id(&err);
    assert!(s.cli(&["approve", &tid, "--waive", "1m"]).status.success());
    assert!(tool_call(&s.b.api, &parent_token, "exec", args.clone()).is_ok());
    let child =
        tool_call(&s.b.api, &parent_token, "task_delegate", json!({"description": "child", "ttl": "5m"})).unwrap();
    let child_token = child["token"].as_str().unwrap();
    let err = tool_call(&s.b.api, child_token, "exec", args.clone()).unwrap_err();
    assert_ne!(pending_id(&err), tid, "the child's call is a request of its own");
    assert_eq!(s.ran("t"), 1);
    // The API key alone (no task) is another identity again.
    assert!(tool_call(&s.b.api, &s.key, "exec", args).unwrap_err().starts_with("approval pending"));
}

#[test]
fn a_call_with_progress_is_held_until_approved_and_four_eyes_needs_two_approvers() {
    if !require_root() {
        return;
    }
    let admin = operator_entry("alice", "admin", "alice password 1234");
    let rules = "  rules:\n    four:\n      ssh: { targets: [nas], roles: [op] }\n      approvers: [local, role:admin]\n      four_eyes: true\n      timeout: 2m\n";
    let s = setup("appr-held", rules, &format!("operators:\n{admin}"));
    let cmd = s.mark("held");
    // The TypeScript SDK asks for progress: the call stays open while the request waits.
    let api = format!("http://{}/mcp", s.b.api);
    let (key, args) = (s.key.clone(), json!({ "target": "nas", "role": "op", "command": cmd }).to_string());
    let client = std::thread::spawn(move || node().args(["ts_call.mjs", &api, &key, "exec", &args]).output().unwrap());
    let id = s.wait_pending();
    assert!(s.cli(&["approve", &id]).status.success());
    let out = s.cli(&["approve", &id]);
    assert!(stderr(&out).contains("four eyes needs another approver"), "{}", stderr(&out));
    assert_eq!(s.ran("held"), 0, "one approval of two runs nothing");
    assert_eq!(s.queue()[0]["state"], "pending");
    // The second approver: an admin in the console (a POST with its session and CSRF token).
    let mut c = ConsoleClient::new(&s.b.dashboard);
    c.login("alice", "alice password 1234");
    let csrf = c.csrf();
    let r = c.post("/approvals/decide", &format!("csrf={csrf}&id={id}&decision=approve&reason=&waiver="), &[]);
    assert!(r.status == 200 && r.text().contains("is approved"), "{} {}", r.status, r.text());
    let out = client.join().unwrap();
    assert!(out.status.success(), "ts client: {}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["isError"], false, "{v}");
    assert!(!v["progress"].as_array().unwrap().is_empty(), "the client saw the wait as progress: {v}");
    assert_eq!(s.ran("held"), 1);
    let q = s.queue();
    let voters: Vec<&str> = q[0]["votes"].as_array().unwrap().iter().map(|v| v["by"].as_str().unwrap()).collect();
    assert_eq!(voters, ["operator:uid0", "console:alice"]);

    // The Python SDK with a progress callback is held the same way, and told which request waits.
    let client = s.py_exec_held(&s.key, &s.mark("py"));
    let id = s.wait_pending();
    assert!(s.cli(&["approve", &id]).status.success());
    let csrf = c.csrf();
    c.post("/approvals/decide", &format!("csrf={csrf}&id={id}&decision=approve"), &[]);
    let out = client.join().unwrap();
    assert!(out.status.success(), "python client: {}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["is_error"], false, "{v}");
    assert!(v["progress"][0].as_str().unwrap().contains(&id), "the first progress names the request: {v}");
    assert_eq!(s.ran("py"), 1);

    // A task revoked while its call waits: the call ends at once, and approving it later runs
    // nothing.
    let (token, task_id) = s.task("held");
    let client = s.py_exec_held(&token, &s.mark("gone"));
    let id = s.wait_pending();
    tool_call(&s.b.api, &s.key, "task_revoke", json!({"task_id": task_id})).unwrap();
    let out = client.join().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["is_error"], true, "{v}");
    assert!(v["text"].as_str().unwrap().contains("revoked or expired while request"), "{v}");
    assert!(s.cli(&["approve", &id]).status.success());
    let csrf = c.csrf();
    c.post("/approvals/decide", &format!("csrf={csrf}&id={id}&decision=approve"), &[]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.ran("gone"), 0, "nothing ran for the revoked task");
}

#[test]
fn a_pending_request_survives_a_restart_and_is_answered_after_it() {
    if !require_root() {
        return;
    }
    let s = setup("appr-restart", RULES, "");
    let cmd = s.mark("r");
    let id = pending_id(&s.py_exec(&cmd).1);
    let Setup { mut b, key, marks, _sshd, data, policy } = s;
    b.signal(15);
    b.wait_exit(Duration::from_secs(10));
    drop(b);
    let b = Broker::start(BrokerOpts {
        policy: Some(&policy),
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    });
    let s = Setup { b, key, marks, _sshd, data, policy };
    let q = s.queue();
    assert_eq!(q.len(), 1);
    assert_eq!((q[0]["id"].as_str().unwrap(), q[0]["state"].as_str().unwrap()), (id.as_str(), "pending"));
    assert_eq!(s.ran("r"), 0, "a restart approves nothing");
    assert!(s.cli(&["approve", &id]).status.success());
    assert!(!s.py_exec(&cmd).0);
    assert_eq!(s.ran("r"), 1);

    // A journal damaged in its middle (not a torn tail) stops start-up: requests and answers
    // are never silently dropped.
    let Setup { mut b, data, policy, .. } = s;
    b.signal(15);
    b.wait_exit(Duration::from_secs(10));
    drop(b);
    let path = data.join("state/approvals.journal");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8 + 12 + 4] ^= 0xff;
    bytes.extend_from_slice(&bytes.clone()[8..]);
    std::fs::write(&path, &bytes).unwrap();
    let mut b = Broker::start(BrokerOpts {
        policy: Some(&policy),
        data_dir: Some(data.path().to_path_buf()),
        expect_ready: false,
        ..Default::default()
    });
    assert!(!b.wait_exit(Duration::from_secs(10)).success());
    assert!(b.log().contains("approvals"), "the refusal names the journal: {}", b.log());
}

#[test]
fn a_held_proxy_request_is_bound_to_its_body_and_notifications_reach_a_receiver_without_secrets() {
    if !require_root() {
        return;
    }
    // One real HTTP server is both the service's upstream and the notification receiver.
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (key, hash) = agent_key("bot");
    let p = format!(
        "version: 1\nnetwork: {{ allow: ['127.0.0.1/32'] }}\n\
         services:\n  api: {{ url: \"http://127.0.0.1:{port}/\", credential: {{ type: bearer, secret: \"env:APPR_UPSTREAM\" }} }}\n\
         agents:\n  bot:\n    api_key_hash: \"{hash}\"\n    services: {{ api: {{}} }}\n\
         approvals:\n  hold: 0s\n  console_url: \"https://ephyr.lan:8553\"\n\
         \x20 notify:\n    hook: {{ webhook: \"http://127.0.0.1:{port}/hook\", token: \"env:APPR_HOOK\" }}\n\
         \x20   phone: {{ ntfy: \"http://127.0.0.1:{port}/ephyr-topic\" }}\n\
         \x20 rules:\n    router-writes:\n      http: {{ services: [api], methods: [POST, DELETE] }}\n",
        port = up.port
    );
    let b = Broker::start(BrokerOpts {
        policy: Some(&p),
        env: vec![
            ("APPR_UPSTREAM".into(), "upstream-credential-0451".into()),
            ("APPR_HOOK".into(), "hook-token-7788".into()),
        ],
        ..Default::default()
    });
    let auth = format!("Bearer {key}");
    let send = |method: &str, body: &str| {
        http_request(&b.api, method, "/v1/proxy/api/things?x=1", &[("Authorization", &auth)], body.as_bytes())
    };
    let upstream_saw =
        |path: &str| up.requests().iter().filter(|r| r["path"].as_str().unwrap_or("").starts_with(path)).count();

    // GET is not held; POST waits, and nothing reaches the upstream.
    assert_eq!(send("GET", "").status, 200);
    let r = send("POST", "{\"name\": \"body-secret-xyz\"}");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("approval_pending"), "{}", r.text());
    let id = r.header("x-ephyr-approval").expect("names the request").to_owned();
    assert_eq!(upstream_saw("/things"), 1, "only the GET arrived");

    // The notifications arrive (in the background) and carry no secret.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (upstream_saw("/hook") == 0 || upstream_saw("/ephyr-topic") == 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let reqs = up.requests();
    let hook = reqs.iter().find(|r| r["path"] == "/hook").expect("the webhook arrived");
    let body: Value = serde_json::from_str(hook["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["url"], format!("https://ephyr.lan:8553/approvals#{id}"));
    assert!(body["summary"].as_str().unwrap().contains("POST /things"), "{body}");
    let header = |r: &Value, name: &str| {
        r["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
            .map(|h| h[1].clone())
    };
    assert_eq!(header(hook, "authorization"), Some(json!("Bearer hook-token-7788")));
    let ntfy = reqs.iter().find(|r| r["path"] == "/ephyr-topic").expect("the ntfy push arrived");
    assert!(ntfy["body"].as_str().unwrap().contains(&id));
    assert_eq!(header(ntfy, "click"), Some(json!(format!("https://ephyr.lan:8553/approvals#{id}"))));
    assert_eq!(header(ntfy, "authorization"), None, "no token configured, none sent");
    for n in [hook, ntfy] {
        let all = n.to_string();
        for secret in [key.as_str(), "upstream-credential-0451", "body-secret-xyz"] {
            assert!(!all.contains(secret), "a notification carries {secret:?}: {all}");
        }
    }
    assert_eq!(metric(&b, "ephyr_approvals_pending"), 1.0);
    let status = ephyr(&["status", "--socket", b.socket.to_str().unwrap()]);
    assert!(stdout(&status).contains("approvals: 1 request(s) waiting"), "{}", stdout(&status));

    // Approved: the identical request goes through once, with the credential injected there.
    let out = ephyr(&["approve", &id, "--socket", b.socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = send("POST", "{\"name\": \"body-secret-xyz\"}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(upstream_saw("/things"), 2);
    assert_eq!(up.last_header("authorization"), ["Bearer upstream-credential-0451"]);
    // Another body is another request; so is the same body again.
    let r = send("POST", "{\"name\": \"something else\"}");
    assert_eq!(r.status, 403);
    assert_ne!(r.header("x-ephyr-approval"), Some(id.as_str()));
    assert_eq!(send("POST", "{\"name\": \"body-secret-xyz\"}").status, 403, "used up");
    assert_eq!(upstream_saw("/things"), 2);
    assert_eq!(metric(&b, "ephyr_approvals_pending"), 2.0);
}

#[test]
fn an_agent_cannot_flood_the_queue_and_only_named_approvers_answer() {
    if !require_root() {
        return;
    }
    let rules = "  hold: 0s\n  max_pending_per_agent: 3\n  rules:\n    ops:\n      ssh: { targets: [nas], roles: [op] }\n      approvers: [carol]\n";
    let carol = operator_entry("carol", "viewer", "carol password 1234");
    let dave = operator_entry("dave", "admin", "dave password 12345");
    let s = setup("appr-flood", rules, &format!("operators:\n{carol}{dave}"));
    for i in 0..3 {
        assert!(s.py_exec(&format!("echo {i}")).1.starts_with("approval pending"));
    }
    let (err, text) = s.py_exec("echo 4");
    assert!(err && text.contains("3 approval requests waiting (at most 3"), "{text}");
    assert_eq!(s.queue().len(), 3, "the refused one opened no request");
    let id = s.queue()[0]["id"].as_str().unwrap().to_owned();
    // Not an approver: the CLI (local is not listed) and an admin the rule does not name.
    let out = s.cli(&["approve", &id]);
    assert!(stderr(&out).contains("may not answer") && stderr(&out).contains("carol"), "{}", stderr(&out));
    let mut dave = ConsoleClient::new(&s.b.dashboard);
    dave.login("dave", "dave password 12345");
    let csrf = dave.csrf();
    let r = dave.post("/approvals/decide", &format!("csrf={csrf}&id={id}&decision=approve&reason=&waiver="), &[]);
    assert_eq!(r.status, 409, "{}", r.text());
    // The viewer the rule names answers; a forged decision or a cross-site post is refused.
    let mut carol = ConsoleClient::new(&s.b.dashboard);
    carol.login("carol", "carol password 1234");
    let csrf = carol.csrf();
    let r = carol.post("/approvals/decide", &format!("csrf={csrf}&id={id}&decision=maybe"), &[]);
    assert_eq!(r.status, 400);
    let r = carol.post(
        "/approvals/decide",
        &format!("csrf={csrf}&id={id}&decision=approve"),
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(r.status, 403);
    let r = carol.post("/approvals/decide", &format!("csrf=nope&id={id}&decision=approve"), &[]);
    assert_eq!(r.status, 403);
    assert_eq!(s.queue().iter().find(|r| r["id"] == id.as_str()).unwrap()["state"], "pending");
    let r = carol.post("/approvals/decide", &format!("csrf={csrf}&id={id}&decision=deny&reason="), &[]);
    assert_eq!(r.status, 400, "a denial needs a reason");
    let r = carol.post("/approvals/decide", &format!("csrf={csrf}&id={id}&decision=approve&reason=ok"), &[]);
    assert!(r.text().contains("is approved"), "{}", r.text());
    assert_eq!(s.queue().iter().find(|r| r["id"] == id.as_str()).unwrap()["state"], "approved");

    // The kill switch closes what the agent still has open: the two waiting requests are denied
    // in the freezer's name, the approved one can no longer be used.
    let out = s.cli(&["freeze", "agent", "bot", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["effects"]["approvals_denied"], 3, "{v}");
    let q = s.queue();
    assert!(q.iter().all(|r| r["state"] == "denied" || r["state"] == "expired"), "{q:?}");
    let denied = q.iter().find(|r| r["state"] == "denied").unwrap();
    assert!(denied["votes"][0]["reason"].as_str().unwrap().contains("agent bot was frozen by operator:uid0"));
    assert_eq!(q.iter().find(|r| r["id"] == id.as_str()).unwrap()["state"], "expired");
}

#[test]
fn a_delegation_waits_for_approval_of_exactly_that_hand_off() {
    if !require_root() {
        return;
    }
    let rules = "  hold: 0s\n  rules:\n    hand-offs:\n      delegate: { to: [\"*\"] }\n      approvers: [local]\n";
    let s = setup("appr-delegate", rules, "");
    let (token, _) = s.task("parent");
    let ask = json!({"description": "child", "ttl": "5m", "envelope": {"targets": ["nas"]}});
    let err = tool_call(&s.b.api, &token, "task_delegate", ask.clone()).unwrap_err();
    let id = pending_id(&err);
    let q = s.queue();
    assert_eq!(q[0]["action"]["kind"], "delegate");
    assert_eq!(q[0]["action"]["envelope"]["targets"], json!(["nas"]), "the operator sees the envelope");
    assert!(s.cli(&["approve", &id]).status.success());
    // A wider envelope is another hand-off; the approved one goes through, once.
    let wider = json!({"description": "child", "ttl": "5m"});
    assert!(tool_call(&s.b.api, &token, "task_delegate", wider).unwrap_err().starts_with("approval pending"));
    let child = tool_call(&s.b.api, &token, "task_delegate", ask.clone()).unwrap();
    assert!(child["token"].is_string(), "{child}");
    assert!(tool_call(&s.b.api, &token, "task_delegate", ask).unwrap_err().starts_with("approval pending"));
}
