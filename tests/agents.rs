//! The agent directory from outside: enrollment with a join token (once, before it expires),
//! lifecycle transitions through `ephyr agent` with their effects on every credential (API key,
//! task token, open MCP session and stream), the journal across a restart and against forgery,
//! and the reaper on a store whose clock was shifted back.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const ALICE_PW: &str = "alice password 12345";
const BOB_PW: &str = "bob password 67890";

fn policy(port: u16, bot_hash: &str, bob: bool, lifecycle: &str) -> String {
    format!(
        "version: 1\nnetwork: {{ allow: ['127.0.0.1/32'] }}\noperators:\n{}{}\
         services:\n  api: {{ url: \"http://127.0.0.1:{port}/\", credential: {{ type: bearer, secret: \"env:AGENTS_UPSTREAM\" }} }}\n\
         \x20 api2: {{ url: \"http://127.0.0.1:{port}/two/\", credential: {{ type: bearer, secret: \"env:AGENTS_UPSTREAM\" }} }}\n\
         templates:\n  reader:\n    services: {{ api: {{}}, api2: {{}} }}\n\
         agents:\n  bot:\n    api_key_hash: \"{bot_hash}\"\n    can_delegate: true\n    services: {{ api: {{}} }}\n{lifecycle}",
        operator_entry("alice", "admin", ALICE_PW),
        if bob { operator_entry("bob", "viewer", BOB_PW) } else { String::new() },
    )
}

fn start(policy: &str, data: &Path) -> Broker {
    Broker::start(BrokerOpts {
        policy: Some(policy),
        data_dir: Some(data.to_path_buf()),
        env: vec![("AGENTS_UPSTREAM".into(), "upstream-credential-9931".into())],
        ..Default::default()
    })
}

/// `ephyr agent ARGS --socket S`: (success, stdout, stderr).
fn agent(b: &Broker, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<&str> = vec!["agent"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--socket", b.socket.to_str().unwrap()]);
    let out = ephyr(&all);
    (out.status.success(), stdout(&out), stderr(&out))
}

fn agents(b: &Broker) -> Value {
    local_request(&b.socket, "GET", "/v1/agents", b"").json()
}

fn state_of(b: &Broker, name: &str) -> String {
    let v = local_request(&b.socket, "GET", &format!("/v1/agents/{name}"), b"").json();
    v["state"].as_str().unwrap_or("?").to_owned()
}

/// Enrolls `name` (template reader) and returns its join token.
fn enroll(b: &Broker, name: &str, owner: &str, ttl: &str) -> String {
    let (ok, out, err) = agent(b, &["enroll", "--template", "reader", "--owner", owner, "--name", name, "--ttl", ttl]);
    assert!(ok, "{err}");
    assert!(err.contains(&format!("agent {name} enrolled")), "{err}");
    let token = out.trim().to_owned();
    assert!(token.starts_with("ephyr_jt_"), "{out}");
    token
}

fn join(b: &Broker, token: &str, dir: &TempDir, file: &str) -> Result<String, String> {
    let tf = dir.join(&format!("{file}.token"));
    std::fs::write(&tf, token).unwrap();
    let out_file = dir.join(file);
    let out = ephyr(&[
        "agent",
        "join",
        "--url",
        &format!("http://{}", b.api),
        "--token-file",
        tf.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ]);
    if !out.status.success() {
        return Err(stderr(&out));
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777, 0o600);
    Ok(std::fs::read_to_string(&out_file).unwrap().trim().to_owned())
}

fn proxy_post(b: &Broker, service: &str, cred: &str) -> HttpResponse {
    http_request(
        &b.api,
        "POST",
        &format!("/v1/proxy/{service}/items"),
        &[("Authorization", &format!("Bearer {cred}")), ("Content-Type", "application/json")],
        b"{}",
    )
}

#[test]
fn enrolled_agents_join_once_and_a_suspended_agent_is_refused_everywhere_at_once() {
    if !require_root() {
        return;
    }
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (bot, bot_hash) = agent_key("bot");
    let p = policy(up.port, &bot_hash, true, "");
    let data = TempDir::new("agents-data");
    let scratch = TempDir::new("agents-scratch");
    let mut b = start(&p, data.path());

    // Bad input: a clear error naming what is wrong, nothing enrolled.
    for (args, want) in [
        (
            vec!["enroll", "--template", "writer", "--owner", "alice"],
            "no template \"writer\" in the policy (templates: reader)",
        ),
        (vec!["enroll", "--template", "reader", "--owner", "mallory"], "\"mallory\" is not one"),
        (vec!["enroll", "--template", "reader", "--owner", "alice", "--name", "../etc"], "agent names are 1-64"),
        (vec!["enroll", "--template", "reader", "--owner", "alice", "--name", "bot"], "exists already"),
        (
            vec!["enroll", "--template", "reader", "--owner", "alice", "--ttl", "3d"],
            "at most lifecycle.join_ttl_max (1d)",
        ),
        (vec!["enroll", "--template", "reader"], "needs --template T and --owner"),
        (vec!["suspend", "ghost"], "no agent \"ghost\""),
        (vec!["resume", "bot"], "is active already"),
    ] {
        let (ok, _, err) = agent(&b, &args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(agents(&b)["agents"].as_array().unwrap().len(), 1, "only the policy's bot");

    // Enroll, join once.
    let token = enroll(&b, "helper", "alice", "10m");
    assert_eq!(state_of(&b, "helper"), "provisioned");
    let key = join(&b, &token, &scratch, "helper.key").unwrap();
    assert!(key.starts_with("ephyr_ak_"), "an ephyr API key");
    assert_eq!(state_of(&b, "helper"), "active");
    let again = join(&b, &token, &scratch, "again.key").unwrap_err();
    assert!(again.contains("was used already"), "{again}");
    let forged = join(&b, &format!("{}x", &token[..token.len() - 1]), &scratch, "forged.key").unwrap_err();
    assert!(forged.contains("not a join token this broker issued"), "{forged}");
    // A token past its expiry is refused (and the agent stays provisioned).
    let late = enroll(&b, "late", "alice", "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let e = join(&b, &late, &scratch, "late.key").unwrap_err();
    assert!(e.contains("expired"), "{e}");
    assert_eq!(state_of(&b, "late"), "provisioned");

    // The key works with the template's grants: both services, nothing else.
    let seen = tool_call(&b.api, &key, "list_services", json!({})).unwrap().to_string();
    assert!(seen.contains("api2"), "{seen}");
    assert_eq!(proxy_post(&b, "api", &key).status, 200);
    let task = tool_call(&b.api, &key, "task_create", json!({"description": "work"})).unwrap();
    let token_cred = task["token"].as_str().unwrap().to_owned();
    assert!(tool_call(&b.api, &token_cred, "list_services", json!({})).is_ok());
    // An open session-era MCP session and its notification stream.
    let (sid, mut stream) = session_with_stream(&b.api, &key);

    // Suspend: every credential fails at once, with the reason; the stream ends.
    let (ok, out, err) = agent(&b, &["suspend", "helper", "--reason", "laptop stolen"]);
    assert!(ok, "{err}");
    assert!(out.contains("active → suspended (1 task(s) revoked"), "{out}");
    assert!(out.contains("1 MCP session(s) ended"), "{out}");
    let r = proxy_post(&b, "api", &key);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("agent_suspended") && r.text().contains("laptop stolen"), "{}", r.text());
    let v = mcp_request(
        &b.api,
        &key,
        "tools/call",
        Some("list_services"),
        json!({"name": "list_services", "arguments": {}}),
    );
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("is suspended: laptop stolen"), "{v}");
    let v = mcp_request(
        &b.api,
        &token_cred,
        "tools/call",
        Some("list_services"),
        json!({"name": "list_services", "arguments": {}}),
    );
    assert!(v["error"].is_object(), "the task token is refused: {v}");
    let r = http_request(
        &b.api,
        "POST",
        "/mcp",
        &[
            ("Authorization", &format!("Bearer {key}")),
            ("Mcp-Session-Id", &sid),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ],
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).to_string().as_bytes(),
    );
    assert!(r.status == 403 || r.status == 404, "the session is gone: {} {}", r.status, r.text());
    assert!(stream.wait_closed(Duration::from_secs(5)), "the stream ends");
    assert!(tool_call(&b.api, &bot, "list_services", json!({})).is_ok(), "bot is untouched");

    // Resume: the key works again; the revoked task stays revoked.
    let (ok, out, err) = agent(&b, &["resume", "helper"]);
    assert!(ok && out.contains("suspended → active"), "{out}{err}");
    assert!(tool_call(&b.api, &key, "list_services", json!({})).is_ok());
    let v = mcp_request(
        &b.api,
        &token_cred,
        "tools/call",
        Some("list_services"),
        json!({"name": "list_services", "arguments": {}}),
    );
    assert!(v["error"].is_object(), "revoked stays revoked: {v}");

    // A policy agent moves through the same lifecycle.
    let (ok, _, err) = agent(&b, &["suspend", "bot"]);
    assert!(ok, "{err}");
    let v = mcp_request(
        &b.api,
        &bot,
        "tools/call",
        Some("list_services"),
        json!({"name": "list_services", "arguments": {}}),
    );
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("\"bot\" is suspended"), "{v}");
    assert!(agent(&b, &["resume", "bot"]).0);

    // Revoked is for good: resuming it is refused and changes nothing.
    let (ok, out, _) = agent(&b, &["revoke", "helper", "--reason", "left the project"]);
    assert!(ok && out.contains("active → revoked"), "{out}");
    let (ok, _, err) = agent(&b, &["resume", "helper"]);
    assert!(!ok && err.contains("is revoked: it cannot become active"), "{err}");
    assert_eq!(state_of(&b, "helper"), "revoked");
    let r = proxy_post(&b, "api", &key);
    assert!(r.status == 403 && r.text().contains("agent_revoked"), "{}", r.text());

    // The directory survives a restart: states, enrolments, the spent token.
    b.signal(15);
    b.wait_exit(Duration::from_secs(20));
    let b = start(&p, data.path());
    assert_eq!(state_of(&b, "helper"), "revoked");
    assert_eq!(state_of(&b, "late"), "provisioned");
    assert_eq!(state_of(&b, "bot"), "active");
    assert!(proxy_post(&b, "api", &key).text().contains("agent_revoked"));
    assert!(join(&b, &token, &scratch, "after.key").unwrap_err().contains("used already"));
    let (_, out, _) = agent(&b, &["list"]);
    assert!(out.contains("helper") && out.contains("enrolled") && out.contains("alice"), "{out}");
    let (_, out, _) = agent(&b, &["show", "helper"]);
    assert!(out.contains("reason        left the project") && out.contains("service:api2"), "{out}");

    // Audited, and neither the join token nor the key is in any audit line or the journal.
    let states: Vec<(String, String)> = audit_events(&b, "agent_state")
        .iter()
        .map(|e| (e["action"]["agent"].as_str().unwrap().to_owned(), e["action"]["to"].as_str().unwrap().to_owned()))
        .collect();
    for want in [("helper", "suspended"), ("helper", "active"), ("bot", "suspended"), ("helper", "revoked")] {
        assert!(states.contains(&(want.0.into(), want.1.into())), "{want:?} in {states:?}");
    }
    assert_eq!(audit_events(&b, "agent_enrolled").len(), 2);
    assert_eq!(audit_events(&b, "agent_joined").len(), 1);
    assert!(audit_events(&b, "agent_join_failed").len() >= 3);
    let audit = std::fs::read_to_string(b.data_dir.join("audit/audit.jsonl")).unwrap();
    let journal =
        String::from_utf8_lossy(&std::fs::read(b.data_dir.join("state/agents.journal")).unwrap()).into_owned();
    for secret in [&token, &late, &key] {
        assert!(!audit.contains(secret.as_str()) && !journal.contains(secret.as_str()), "a secret was written");
    }
}

/// Rewrites a journal with `records`, keeping its owner (the broker's user).
fn rewrite(path: &Path, records: &[Vec<u8>]) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    ephyr::broker::journal::rewrite(path, records).unwrap();
    std::os::unix::fs::chown(path, Some(m.uid()), Some(m.gid())).unwrap();
}

/// Shifts every time in the agents journal back by `days` (the broker is stopped).
fn shift_journal(data: &Path, days: i64) {
    let path = data.join("state/agents.journal");
    let replayed = ephyr::broker::journal::read(&path).unwrap();
    let shifted: Vec<Vec<u8>> = replayed
        .records
        .iter()
        .map(|r| {
            let mut v: Value = serde_json::from_slice(r).unwrap();
            for k in ["at", "expires"] {
                if let Some(t) = v[k].as_i64() {
                    v[k] = json!(t - days * 86_400);
                }
            }
            serde_json::to_vec(&v).unwrap()
        })
        .collect();
    rewrite(&path, &shifted);
}

#[test]
fn the_reaper_on_a_clock_shifted_store_reports_then_applies() {
    if !require_root() {
        return;
    }
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (bot, bot_hash) = agent_key("bot");
    let lifecycle = "lifecycle: { idle_after: 10d, decommission_after: 20d, drift_after: 5d }\n";
    let data = TempDir::new("reaper-data");
    let scratch = TempDir::new("reaper-scratch");
    let mut b = start(&policy(up.port, &bot_hash, true, lifecycle), data.path());
    let t1 = enroll(&b, "worker", "alice", "10m");
    let worker = join(&b, &t1, &scratch, "worker.key").unwrap();
    let t2 = enroll(&b, "orphan", "bob", "10m");
    let orphan = join(&b, &t2, &scratch, "orphan.key").unwrap();
    let _never = enroll(&b, "never", "alice", "10m");
    assert_eq!(proxy_post(&b, "api", &worker).status, 200);
    assert!(tool_call(&b.api, &bot, "list_services", json!({})).is_ok());
    let (ok, out, _) = agent(&b, &["reap"]);
    assert!(ok && out.contains("no agent is due a lifecycle step"), "{out}");

    // Thirty days pass (the store's clock is shifted back), and bob is no longer an operator.
    b.signal(15);
    b.wait_exit(Duration::from_secs(20));
    shift_journal(data.path(), 30);
    let p = policy(up.port, &bot_hash, false, lifecycle);
    let b = start(&p, data.path());
    // worker works today on api only: not idle, but api2 has drifted.
    assert_eq!(proxy_post(&b, "api", &worker).status, 200);

    let (ok, out, err) = agent(&b, &["reap", "--json"]);
    assert!(ok, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    let steps: Vec<(String, String)> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["agent"].as_str().unwrap().to_owned(), s["to"].as_str().unwrap().to_owned()))
        .collect();
    let mut want = vec![
        ("bot".to_owned(), "idle".to_owned()),
        ("never".to_owned(), "decommissioned".to_owned()),
        ("orphan".to_owned(), "revoked".to_owned()),
    ];
    want.sort();
    assert_eq!(steps, want, "{plan}");
    let why = |a: &str| plan["steps"].as_array().unwrap().iter().find(|s| s["agent"] == a).unwrap()["why"].clone();
    assert!(why("orphan").as_str().unwrap().contains("owner \"bob\" is no longer an operator"));
    assert!(why("never").as_str().unwrap().contains("join token expired unused"));
    let drift = plan["drift"].as_array().unwrap().iter().find(|d| d["agent"] == "worker").unwrap().clone();
    assert_eq!(drift["unused"], json!(["service:api2"]), "{drift}");
    assert_eq!(drift["used"], json!(["service:api"]));
    assert!(drift["suggestion"].as_str().unwrap().contains("services: [api]"), "{drift}");
    // A dry run changes nothing.
    assert_eq!(state_of(&b, "orphan"), "active");
    assert_eq!(proxy_post(&b, "api", &orphan).status, 200);

    let (ok, out, err) = agent(&b, &["reap", "--apply"]);
    assert!(ok, "{err}");
    assert!(out.contains("orphan moved active → revoked"), "{out}");
    assert_eq!(state_of(&b, "orphan"), "revoked");
    assert_eq!(state_of(&b, "never"), "decommissioned");
    assert_eq!(state_of(&b, "bot"), "idle");
    assert!(proxy_post(&b, "api", &orphan).text().contains("agent_revoked"));
    // An idle agent is still served, and its use makes it active again.
    assert!(tool_call(&b.api, &bot, "list_services", json!({})).is_ok());
    assert_eq!(state_of(&b, "bot"), "active");
    let by: Vec<String> =
        audit_events(&b, "agent_state").iter().map(|e| e["agent"].as_str().unwrap_or("").to_owned()).collect();
    assert!(by.iter().filter(|a| *a == "broker:reaper").count() == 3, "{by:?}");
    assert!(by.iter().any(|a| a == "broker:use"), "{by:?}");
    assert_eq!(audit_events(&b, "reaper_run").len(), 1);
    // The console's Agents view shows states, the plan and the drift; an admin suspends there.
    let mut console = ConsoleClient::new(&b.dashboard);
    assert_eq!(console.login("alice", ALICE_PW).status, 303);
    let page = console.get("/agents").text();
    for want in ["Lifecycle", "revoked", "reader · owner alice", "service:api2", "services: [api]"] {
        assert!(page.contains(want), "{want} in the Agents view");
    }
    let csrf = console.csrf();
    let r = console.post("/agents/worker/suspend", &format!("csrf={csrf}&reason=console+test"), &[]);
    assert!(r.text().contains("active → suspended"), "{}", r.text());
    assert_eq!(state_of(&b, "worker"), "suspended");
    let r = console.post("/agents/worker/suspend", "csrf=AAAA", &[]);
    assert_eq!(r.status, 403, "a forged form changes nothing");
    let r = console.post("/agents/worker/revive", &format!("csrf={csrf}"), &[]);
    assert_eq!(r.status, 404);
    assert_eq!(state_of(&b, "worker"), "suspended");

    // The decommissioned agent is listed but not served or in the policy snapshot.
    let list = agents(&b);
    let never = list["agents"].as_array().unwrap().iter().find(|a| a["name"] == "never").unwrap().clone();
    assert_eq!(never["state"], "decommissioned");
    assert_eq!(never["grants"], json!([]));
}

#[test]
fn a_forged_agents_journal_stops_start_up_naming_the_record() {
    if !require_root() {
        return;
    }
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (_, bot_hash) = agent_key("bot");
    let p = policy(up.port, &bot_hash, true, "");
    let data = TempDir::new("agents-forged");
    let mut b = start(&p, data.path());
    let (ok, _, err) = agent(&b, &["revoke", "bot", "--reason", "compromised"]);
    assert!(ok, "{err}\n{}", b.log());
    b.signal(15);
    b.wait_exit(Duration::from_secs(20));
    // An attacker with write access to the data dir appends "bot is active again".
    let path = data.join("state/agents.journal");
    let mut records = ephyr::broker::journal::read(&path).unwrap().records;
    records.push(br#"{"t":"state","name":"bot","to":"active","by":"x","at":1,"reason":""}"#.to_vec());
    rewrite(&path, &records);
    let mut b = Broker::start(BrokerOpts {
        policy: Some(&p),
        data_dir: Some(data.path().to_path_buf()),
        env: vec![("AGENTS_UPSTREAM".into(), "x".into())],
        expect_ready: false,
        ..Default::default()
    });
    let status = b.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    let log = b.log();
    assert!(log.contains("agent directory") && log.contains("revoked → active is not a transition"), "{log}");
}

/// A service-account token signed with the cluster key `der`.
fn es256(der: &[u8], claims: &Value) -> String {
    es256_jwt(der, &json!({"alg": "ES256", "kid": "k1", "typ": "JWT"}), claims)
}

/// A P-256 key: its PKCS#8 document and its public JWK (with `kid`).
fn cluster_key() -> (Vec<u8>, Value) {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).unwrap();
    let p = pair.public_key().as_ref();
    let enc = |v: &[u8]| data_encoding::BASE64URL_NOPAD.encode(v);
    (
        doc.as_ref().to_vec(),
        json!({"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig", "x": enc(&p[1..33]), "y": enc(&p[33..65])}),
    )
}

/// A projected service-account token's claims.
fn sa_claims(iss: &str, aud: &str, ns: &str, sa: &str, exp: i64) -> Value {
    json!({
        "iss": iss, "aud": [aud], "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "exp": exp, "iat": now_secs() - 5, "nbf": now_secs() - 5,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "0b5c"}, "pod": {"name": "runner-7f9", "uid": "9d1e"}},
    })
}

#[test]
fn kubernetes_attestation_at_join_and_again_every_interval() {
    if !require_root() {
        return;
    }
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (_, bot_hash) = agent_key("bot");
    let keys = TempDir::new("k8s-jwks");
    let (der, jwk) = cluster_key();
    let (other_der, _) = cluster_key();
    let jwks = keys.join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&jwks, std::fs::Permissions::from_mode(0o644)).unwrap();
    let iss = "https://kubernetes.default.svc.cluster.local";
    let extra = format!(
        "\x20 builder:\n    services: {{ api: {{}} }}\n    attest:\n      every: 1h\n      kubernetes: {{ jwks_file: \"{}\", issuer: \"{iss}\", audience: ephyr, namespaces: [ci], service_accounts: [runner] }}\n",
        jwks.display()
    );
    let p = policy(up.port, &bot_hash, true, "").replace("agents:\n  bot:", &format!("{extra}agents:\n  bot:"));
    let data = TempDir::new("k8s-data");
    let mut b = start(&p, data.path());
    let token = {
        let (ok, out, err) =
            agent(&b, &["enroll", "--template", "builder", "--owner", "alice", "--name", "ci-runner", "--ttl", "10m"]);
        assert!(ok, "{err}");
        out.trim().to_owned()
    };
    let join = |att: Option<String>| {
        let mut body = json!({"join_token": token});
        if let Some(a) = att {
            body["attestation"] = json!(a);
        }
        http_request(
            &b.api,
            "POST",
            "/v1/agents/join",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let exp = now_secs() + 600;
    for (att, why) in [
        (None, "asks for a Kubernetes service-account token"),
        (Some(es256(&der, &sa_claims("https://evil.example", "ephyr", "ci", "runner", exp))), "wrong issuer"),
        (Some(es256(&der, &sa_claims(iss, "kubernetes", "ci", "runner", exp))), "wrong audience"),
        (Some(es256(&der, &sa_claims(iss, "ephyr", "prod", "runner", exp))), "namespace \\\"prod\\\" is not one"),
        (Some(es256(&der, &sa_claims(iss, "ephyr", "ci", "admin", exp))), "service account \\\"admin\\\" is not one"),
        (Some(es256(&other_der, &sa_claims(iss, "ephyr", "ci", "runner", exp))), "bad signature"),
        (Some(es256(&der, &sa_claims(iss, "ephyr", "ci", "runner", now_secs() - 300))), "expired"),
        (Some("eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.".into()), "not a JWT"),
    ] {
        let r = join(att);
        assert_eq!(r.status, 401, "{why}: {}", r.text());
        assert!(r.text().contains(why), "{why}: {}", r.text());
        assert_eq!(state_of(&b, "ci-runner"), "provisioned", "a refused attestation spends nothing");
    }
    let r = join(Some(es256(&der, &sa_claims(iss, "ephyr", "ci", "runner", exp))));
    assert_eq!(r.status, 200, "{}", r.text());
    let key = r.json()["api_key"].as_str().unwrap().to_owned();
    assert_eq!(proxy_post(&b, "api", &key).status, 200);
    let joined = audit_events(&b, "agent_joined");
    assert_eq!(joined[0]["action"]["attested"], "system:serviceaccount:ci:runner");

    // Two hours later (the store's clock shifted back), the agent must attest again.
    b.signal(15);
    b.wait_exit(Duration::from_secs(20));
    let path = data.join("state/agents.journal");
    let records: Vec<Vec<u8>> = ephyr::broker::journal::read(&path)
        .unwrap()
        .records
        .iter()
        .map(|r| {
            let mut v: Value = serde_json::from_slice(r).unwrap();
            if v["t"] == "attested" {
                v["at"] = json!(v["at"].as_i64().unwrap() - 7200);
            }
            serde_json::to_vec(&v).unwrap()
        })
        .collect();
    rewrite(&path, &records);
    let b = start(&p, data.path());
    let r = proxy_post(&b, "api", &key);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("attestation_expired"), "{}", r.text());
    let attest = |jwt: String| {
        http_request(
            &b.api,
            "POST",
            "/v1/agents/attest",
            &[("Authorization", &format!("Bearer {key}")), ("Content-Type", "application/json")],
            json!({"attestation": jwt}).to_string().as_bytes(),
        )
    };
    let r = attest(es256(&der, &sa_claims(iss, "ephyr", "ci", "other", exp)));
    assert!(r.status == 401 && r.text().contains("service account"), "{}", r.text());
    let r = attest(es256(&der, &sa_claims(iss, "ephyr", "ci", "runner", exp)));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(proxy_post(&b, "api", &key).status, 200, "attested again: served");
}
