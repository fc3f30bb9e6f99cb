//! The policy engine from the outside: every example policy loads (and matches the JSON Schema
//! editors use), `policy check/diff/explain`, `keygen`, and live reloads of a running broker.

mod common;

use std::time::Duration;

use common::*;

fn examples() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(repo().join("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 4, "dev, example, homelab, production at least: {v:?}");
    v
}

#[test]
fn every_example_policy_loads_and_matches_the_json_schema() {
    for p in examples() {
        let out = ephyr(&["policy", "check", p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}: {}", p.display(), stdout(&out));
    }
    let mut files: Vec<String> = examples().iter().map(|p| p.to_str().unwrap().to_owned()).collect();
    let dir = TempDir::new("schema");
    let typo = dir.join("typo.yaml");
    std::fs::write(&typo, "targets:\n  web:\n    host: x\n    alowed_roles: [read]\n").unwrap();
    files.push(typo.to_str().unwrap().to_owned());
    let out = python("schema_check.py").arg(repo().join("docs/policy.schema.json")).args(&files).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for line in stdout(&out).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let errors = v["errors"].as_array().unwrap();
        if v["file"].as_str().unwrap().ends_with("typo.yaml") {
            assert!(
                errors.iter().any(|e| e.as_str().unwrap().contains("'alowed_roles' was unexpected")),
                "the schema catches typos too: {v}"
            );
        } else {
            assert!(errors.is_empty(), "{v}");
        }
    }
}

#[test]
fn check_lists_every_problem_with_location_and_exits_3() {
    let dir = TempDir::new("check");
    let f = dir.join("bad.yaml");
    std::fs::write(&f, "roles:\n  read: {principal: agent-read}\ntargets:\n  web:\n    host: x\n    allowed_roles: [raed]\nagents:\n  a:\n    ssh:\n      nowhere: {roles: [read]}\n").unwrap();
    let out = ephyr(&["policy", "check", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let text = stdout(&out);
    assert!(text.contains(&format!("{}:6:5: targets.web.allowed_roles: unknown role \"raed\"", f.display())), "{text}");
    assert!(
        text.contains(&format!("{}:10:7: agents.a.ssh.nowhere: unknown target \"nowhere\"", f.display())),
        "{text}"
    );
    assert!(text.contains("2 problem(s)"), "{text}");
    let json = ephyr(&["policy", "check", "--json", f.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 2);
}

#[test]
fn explain_gives_the_decision_and_the_rule_behind_it() {
    let homelab = repo().join("policies/homelab.yaml");
    let h = homelab.to_str().unwrap();
    let allow = ephyr(&["policy", "explain", "--config", h, "--agent", "claude", "--action", "ssh:nas:op"]);
    assert_eq!(allow.status.code(), Some(0));
    assert_eq!(
        stdout(&allow),
        "ALLOW  by rule agents.claude.ssh.nas (certificate principal agent-op)\n       but it waits for approval: \
         rule nas-operator (approvers: role:admin, local; 1 approval(s); timeout 15m; waiver up to 30m)\n"
    );
    // Approval rules by command: a restart waits on any target, another command does not.
    let explain = |action: &str| {
        let out = ephyr(&["policy", "explain", "--config", h, "--agent", "claude", "--action", action, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(explain("ssh:nas:read:uptime")["approval"], serde_json::Value::Null);
    assert_eq!(
        explain("ssh:nas:read:sudo systemctl restart smbd")["approval"]["rules"],
        serde_json::json!(["restarts"])
    );
    let via_template =
        ephyr(&["policy", "explain", "--config", h, "--agent", "claude", "--action", "ssh:pihole:read", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&via_template.stdout).unwrap();
    assert_eq!(v["rule"], "templates.observer.ssh.*");
    let deny = ephyr(&["policy", "explain", "--config", h, "--agent", "cron", "--action", "ssh:nas:op"]);
    assert_eq!(deny.status.code(), Some(1));
    assert!(
        stdout(&deny).starts_with(
            "DENY   policy_denies_role: templates.observer.ssh.* grants roles [read] on \"nas\", not \"op\""
        ),
        "{}",
        stdout(&deny)
    );
    let args = ephyr(&[
        "policy",
        "explain",
        "--config",
        h,
        "--agent",
        "claude",
        "--action",
        r#"tool:files:read_file:{"path":"/srv/shared/../../etc/shadow"}"#,
    ]);
    assert!(stdout(&args).contains("argument_constraint"), "{}", stdout(&args));
    let http = ephyr(&[
        "policy",
        "explain",
        "--config",
        h,
        "--agent",
        "claude",
        "--action",
        "http:homeassistant:POST:/states/light.kitchen",
    ]);
    assert!(stdout(&http).contains("method_not_allowed"), "{}", stdout(&http));
    // A token narrows what the policy allows.
    let token = {
        let start = ephyr::macaroon::RootKey::from_bytes(&[1; 32]).start(b"01ARZ3NDEKTSV4RRFFQ69G5FAV");
        start.mint("ephyr", &["task = 01ARZ3NDEKTSV4RRFFQ69G5FAV", "target IN [pihole]"]).encode()
    };
    let narrowed = ephyr(&[
        "policy",
        "explain",
        "--config",
        h,
        "--agent",
        "claude",
        "--action",
        "ssh:nas:read",
        "--token",
        &token,
    ]);
    assert!(stdout(&narrowed).contains("token_denies_target"), "{}", stdout(&narrowed));
    let bad = ephyr(&["policy", "explain", "--config", h, "--agent", "claude", "--action", "ftp:x"]);
    assert_eq!(bad.status.code(), Some(3));
    assert!(stderr(&bad).contains("cannot read action"));
}

#[test]
fn diff_shows_gains_and_losses_per_agent() {
    let dir = TempDir::new("diff");
    let homelab = std::fs::read_to_string(repo().join("policies/homelab.yaml")).unwrap();
    let changed = homelab
        .replace("nas: { roles: [read, op] }", "nas: { roles: [read] }")
        .replace("    max_task_ttl: 1h\n", "    max_task_ttl: 30m\n");
    std::fs::write(dir.join("new.yaml"), changed).unwrap();
    let out = ephyr(&[
        "policy",
        "diff",
        repo().join("policies/homelab.yaml").to_str().unwrap(),
        dir.join("new.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "agent claude:\n  - ssh nas as op\n  ~ max_task_ttl: 1h -> 30m\n");
    // An approval rule that goes: actions that waited for a person now run on policy alone.
    let fewer = homelab.replace("    lights:\n      http: { services: [homeassistant], methods: [POST] }\n", "");
    std::fs::write(dir.join("fewer.yaml"), fewer).unwrap();
    let out = ephyr(&[
        "policy",
        "diff",
        repo().join("policies/homelab.yaml").to_str().unwrap(),
        dir.join("fewer.yaml").to_str().unwrap(),
    ]);
    assert_eq!(
        stdout(&out),
        "no change in what any agent may do\napproval rules (+ more waits for a person, - less):\n  \
         - rule lights: http homeassistant POST on all paths; approvers role:admin,local; timeout 15m\n"
    );
}

#[test]
fn keygen_prints_a_key_whose_hash_verifies_and_loads() {
    let out = ephyr(&["keygen", "agent", "bot", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = v["api_key"].as_str().unwrap();
    let hash = v["api_key_hash"].as_str().unwrap();
    assert!(key.starts_with("ephyr_ak_") && key.len() == 9 + 54, "{key}");
    // The fast form: the key id and SHA-256 of the key, both base64url (docs/policy.md "API keys").
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let want = format!("ephyr-sha256${}${}", &key[9..20], data_encoding::BASE64URL_NOPAD.encode(digest.as_ref()));
    assert_eq!(hash, want);
    assert!(!hash.contains(&key[20..]), "the secret part is not in the stored form");
    let dir = TempDir::new("keygen");
    std::fs::write(dir.join("p.yaml"), format!("agents:\n  bot:\n    api_key_hash: \"{hash}\"\n")).unwrap();
    assert_eq!(ephyr(&["policy", "check", dir.join("p.yaml").to_str().unwrap()]).status.code(), Some(0));
    assert_eq!(ephyr(&["keygen", "agent", "bad name"]).status.code(), Some(3));
}

/// A key hashed with Argon2id by an earlier version still works, costs one Argon2 run, and the
/// broker says what to replace the hash with (and that line then works without Argon2).
#[test]
fn argon2_hashes_from_earlier_versions_still_work_and_the_log_says_how_to_migrate() {
    if !require_root() {
        return;
    }
    let (key, fast) = ephyr::broker::auth::api_key::generate().unwrap();
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    let legacy = ephyr::broker::auth::api_key::argon2_hash(key.expose(), params).unwrap();
    let p = format!("agents:\n  bot:\n    api_key_hash: \"{legacy}\"\n");
    let b = Broker::start(BrokerOpts { policy: Some(&p), ..Default::default() });
    let whoami = |k: &str| {
        let a = format!("Bearer {k}");
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/clientInfo":{"name":"t","version":"1"}}}}"#;
        let h = [
            ("Authorization", a.as_str()),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
            ("MCP-Protocol-Version", "2026-07-28"),
            ("Mcp-Method", "tools/list"),
        ];
        http_request(&b.api, "POST", "/mcp", &h, body.as_bytes()).status
    };
    assert_eq!(whoami(key.expose()), 200);
    // The broker's stderr is read by a thread of the test harness: wait for the line.
    let want = format!("replace it with api_key_hash: \"{fast}\"");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !b.log().contains(&want) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = b.log();
    assert!(log.contains(&want), "{log}");
    assert!(!log.contains(key.expose()), "the key itself is never logged");
    // A key not in ephyr's format, against a policy with only fast hashes: refused at once.
    assert_eq!(whoami("sk-some-other-format-key"), 401);
}

const LIVE: &str = "roles: {read: {principal: ephyrtest}}\ntargets: {local: {host: 127.0.0.1, allowed_roles: [read]}}\nagents: {a: {uid: 4242, ssh: {local: {roles: [read]}}}}\n";

#[test]
fn reload_swaps_valid_policies_and_keeps_the_old_one_when_invalid() {
    if !require_root() {
        return;
    }
    let b = Broker::start(BrokerOpts { policy: Some(LIVE), ..Default::default() });
    let policy_file = b.socket.parent().unwrap().join("policy.yaml");
    let digest = || b.status()["policy_digest"].as_str().unwrap().to_owned();
    let first = digest();
    // A valid change through `ephyr policy reload`.
    std::fs::write(&policy_file, LIVE.replace("uid: 4242", "uid: 4243")).unwrap();
    let out = ephyr(&["policy", "reload", "--socket", b.socket.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).starts_with("reloaded: policy "));
    let second = digest();
    assert_ne!(second, first);
    // An invalid one is refused with its problems; the previous one stays.
    std::fs::write(&policy_file, "agents: {a: {ssh: {nowhere: {roles: [read]}}}}\n").unwrap();
    let out = ephyr(&["policy", "reload", "--socket", b.socket.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stdout(&out).contains("unknown target \"nowhere\"") && stdout(&out).contains("previous policy stays in force"),
        "{}",
        stdout(&out)
    );
    assert_eq!(digest(), second);
    // A new principal reloads, with a warning that the signer refuses it until a restart.
    std::fs::write(&policy_file, LIVE.replace("principal: ephyrtest", "principal: newuser")).unwrap();
    let out = ephyr(&["policy", "reload", "--socket", b.socket.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("principal \"newuser\" is not on the signer's allow-list"), "{}", stdout(&out));
    // SIGHUP does the same.
    std::fs::write(&policy_file, LIVE).unwrap();
    b.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while digest() != first {
        assert!(std::time::Instant::now() < deadline, "SIGHUP did not reload:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(b.log().contains("SIGHUP received: reloading the policy"));
}

/// One run of `policy check` lists every problem of a file with many (syntax and semantic
/// ones), each at its own line, and warns about what would fail at request time.
#[test]
fn policy_check_reports_a_dozen_mixed_problems_in_one_pass_with_their_lines() {
    let dir = TempDir::new("policy-dozen");
    let file = dir.join("policy.yaml");
    let example_hash =
        "$argon2id$v=19$m=19456,t=2,p=1$EGLPWvUDnoDhQUvjerb0Eg$eUzfssKNVqQzWz1wt4i3OthKxUWw4qY+QzwylwLkqnE";
    let text = format!(
        r#"version: 1
limits:
  cert_ttl_max: 30h
  bogus_limit: 3
roles:
  read: {{ principal: ephyr-read }}
  read: {{ principal: dup }}
  op: {{ principal: "Root User" }}
targets:
  web: {{ host: 10.0.0.1, allowed_roles: [read, nope] }}
  db: {{ host: 10.0.0.2, port: 99999, allowed_roles: [op] }}
services:
  local: {{ url: "http://127.0.0.1:8080" }}
  meta: {{ url: "http://169.254.169.254/latest" }}
  llm: {{ url: "https://llm.example", errors: gemini }}
extras: {{ a: 1 }}
agents:
  alice:
    api_key_hash: "{example_hash}"
    ssh: {{ web: {{ roles: [read] }}, ghost: {{ roles: [read] }} }}
    services: {{ local: {{}} }}
    max_task_ttl: 2x
"#
    );
    std::fs::write(&file, text).unwrap();
    let out = ephyr(&["policy", "check", file.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let at = |p: &serde_json::Value| {
        let a = p["at"].as_str().unwrap();
        a.rsplit(':').nth(1).unwrap().parse::<u32>().unwrap()
    };
    let problems: Vec<(u32, String)> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (at(p), format!("{} {}", p["path"].as_str().unwrap(), p["message"].as_str().unwrap())))
        .collect();
    for (line, needle) in [
        (7, "duplicate key \"read\" (first at line 6)"),
        (4, "limits.bogus_limit unknown field"),
        (3, "limits.cert_ttl_max is 1d6h, outside 1s..1d"),
        (8, "roles.op.principal \"Root User\" is not a valid user name"),
        (10, "unknown role \"nope\""),
        (11, "targets.db.port port 99999 is out of range"),
        (15, "services.llm.errors \"gemini\" is not an error style"),
        (16, "unknown section \"extras\""),
        (20, "agents.alice.ssh.ghost unknown target \"ghost\""),
        (22, "agents.alice.max_task_ttl duration \"2x\""),
    ] {
        assert!(
            problems.iter().any(|(l, m)| *l == line && m.contains(needle)),
            "{needle:?} at line {line} missing from {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 10, "{problems:#?}");
    let warnings: Vec<&str> = v["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    for needle in [
        ":13:3: services.local.url: every request to it will be refused: 127.0.0.1 is a loopback address",
        ":14:3: services.meta.url: every request to it will be refused: 169.254.169.254 is a link-local address",
        ":19:5: agents.alice.api_key_hash: is the example's hash",
    ] {
        assert!(warnings.iter().any(|w| w.contains(needle)), "{needle:?} missing from {warnings:#?}");
    }
}
