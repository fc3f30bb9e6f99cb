//! Task identity over the real MCP endpoint: create, delegate (also to another agent), bind,
//! revoke; proof of possession in both forms (ours and RFC 9449 DPoP, plus the Python example
//! from docs/pop.md); state across a clean restart and `kill -9`; tokens from another data dir.
//! Each adversarial case of DESIGN.md §4 invariants 1–6 and 10 is here.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use data_encoding::{BASE64URL_NOPAD, HEXLOWER};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};

struct Keys {
    alice: String,
    bob: String,
    carol: String,
}

/// alice: web (read) and db (read), may delegate, depth ≤ 3; bob: web (read, op) only;
/// carol: must bind a holder key to every task.
fn policy(k: &mut Option<Keys>) -> String {
    let (a, ah) = agent_key("alice");
    let (b, bh) = agent_key("bob");
    let (c, ch) = agent_key("carol");
    *k = Some(Keys { alice: a, bob: b, carol: c });
    format!(
        r#"
roles:
  read: {{principal: ephyrtest}}
  op: {{principal: ephyrop}}
targets:
  web: {{host: 127.0.0.1, allowed_roles: [read, op]}}
  db: {{host: 127.0.0.2, allowed_roles: [read]}}
limits:
  bind_deadline: 30s
agents:
  alice:
    api_key_hash: "{ah}"
    ssh: {{web: {{roles: [read]}}, db: {{roles: [read]}}}}
    can_delegate: true
    max_delegation_depth: 3
  bob:
    api_key_hash: "{bh}"
    ssh: {{web: {{roles: [read, op]}}}}
    can_delegate: true
  carol:
    api_key_hash: "{ch}"
    ssh: {{web: {{roles: [read]}}}}
    require_pop: true
"#
    )
}

fn start_at(data_dir: Option<std::path::PathBuf>, policy_text: &str) -> Broker {
    Broker::start(BrokerOpts { policy: Some(policy_text), data_dir, ..Default::default() })
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b).as_ref().to_vec()
}

struct Holder {
    kp: Ed25519KeyPair,
}

impl Holder {
    fn new(seed: u8) -> Holder {
        Holder { kp: Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap() }
    }
    fn public(&self) -> String {
        BASE64URL_NOPAD.encode(self.kp.public_key().as_ref())
    }
}

/// How to prove possession for one request.
enum Proof<'a> {
    None,
    /// Our form, `ts` offset from now, this nonce.
    Ephyr(&'a Holder, i64, String),
    /// Our form, signed for `tool` whatever the request says.
    EphyrFor(&'a Holder, String, String),
    /// A DPoP proof with this `jti`.
    Dpop(&'a Holder, String),
    /// Exactly these headers.
    Headers(Vec<(String, String)>),
}

fn nonce(tag: &str) -> String {
    format!("{tag:-<16}").replace(' ', "_")
}

#[allow(clippy::too_many_arguments)]
fn signed_text(
    method: &str,
    authority: &str,
    mcp: &str,
    tool: &str,
    body: &[u8],
    token: &str,
    ts: i64,
    n: &str,
) -> String {
    format!(
        "ephyr-pop-v1\n{method}\n{authority}/mcp\n{mcp}\n{tool}\n{}\n{}\n{ts}\n{n}",
        HEXLOWER.encode(&sha256(body)),
        HEXLOWER.encode(&sha256(token.as_bytes()))
    )
}

fn dpop(h: &Holder, authority: &str, token: &str, jti: &str) -> String {
    let header = json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": h.public()}});
    let claims = json!({"jti": jti, "htm": "POST", "htu": format!("http://{authority}/mcp"), "iat": now_secs(),
        "ath": BASE64URL_NOPAD.encode(&sha256(token.as_bytes()))});
    let input = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
        BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    );
    format!("{input}.{}", BASE64URL_NOPAD.encode(h.kp.sign(input.as_bytes()).as_ref()))
}

/// A stateless-era JSON-RPC request with `cred`; returns the HTTP response.
fn rpc(b: &Broker, cred: &str, method: &str, params: Value, proof: Proof<'_>) -> HttpResponse {
    let mut params = params;
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "tasks-test", "version": "1"},
    });
    let tool = params.get("name").and_then(Value::as_str).unwrap_or("-").to_owned();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
    let auth = format!("Bearer {cred}");
    let mut h: Vec<(String, String)> = vec![
        ("Authorization".into(), auth),
        ("Content-Type".into(), "application/json".into()),
        ("Accept".into(), "application/json, text/event-stream".into()),
        ("MCP-Protocol-Version".into(), "2026-07-28".into()),
        ("Mcp-Method".into(), method.into()),
    ];
    if tool != "-" {
        h.push(("Mcp-Name".into(), tool.clone()));
    }
    match proof {
        Proof::None => {}
        Proof::Ephyr(holder, offset, n) => {
            let ts = now_secs() + offset;
            let text = signed_text("POST", &b.api, method, &tool, body.as_bytes(), cred, ts, &n);
            let sig = BASE64URL_NOPAD.encode(holder.kp.sign(text.as_bytes()).as_ref());
            h.push(("Ephyr-PoP".into(), format!("ts={ts}; nonce={n}; sig={sig}")));
        }
        Proof::EphyrFor(holder, signed_tool, n) => {
            let ts = now_secs();
            let text = signed_text("POST", &b.api, method, &signed_tool, body.as_bytes(), cred, ts, &n);
            let sig = BASE64URL_NOPAD.encode(holder.kp.sign(text.as_bytes()).as_ref());
            h.push(("Ephyr-PoP".into(), format!("ts={ts}; nonce={n}; sig={sig}")));
        }
        Proof::Dpop(holder, jti) => h.push(("DPoP".into(), dpop(holder, &b.api, cred, &jti))),
        Proof::Headers(extra) => h.extend(extra),
    }
    let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    http_request(&b.api, "POST", "/mcp", &refs, body.as_bytes())
}

/// Calls a tool; `Ok(data)` for a result, `Err(text)` for a tool error. Panics on HTTP errors.
fn call(b: &Broker, cred: &str, tool: &str, args: Value, proof: Proof<'_>) -> Result<Value, String> {
    let r = rpc(b, cred, "tools/call", json!({"name": tool, "arguments": args}), proof);
    assert_eq!(r.status, 200, "{tool}: {}", r.text());
    let res = &r.json()["result"];
    let text = res["content"][0]["text"].as_str().unwrap_or("").to_owned();
    if res["isError"] == true { Err(text) } else { Ok(serde_json::from_str(&text).unwrap_or(Value::String(text))) }
}

fn targets(v: &Value) -> Vec<(String, Vec<String>)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let roles = t["roles"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
            (t["name"].as_str().unwrap().to_owned(), roles)
        })
        .collect()
}

#[test]
fn create_delegate_and_revoke_with_cascade_over_mcp() {
    if !require_root() {
        return;
    }
    let mut k = None;
    let p = policy(&mut k);
    let k = k.unwrap();
    let b = start_at(None, &p);

    let root = call(
        &b,
        &k.alice,
        "task_create",
        json!({"description": "deploy", "ttl": "20m", "can_delegate": true}),
        Proof::None,
    )
    .unwrap();
    let t = root["token"].as_str().unwrap().to_owned();
    assert!(t.starts_with("mac_"));
    assert_eq!(root["holder_bound"], false);
    // The token acts for alice, within her policy.
    let seen = call(&b, &t, "list_targets", json!({}), Proof::None).unwrap();
    assert_eq!(targets(&seen), [("db".into(), vec!["read".into()]), ("web".into(), vec!["read".into()])]);
    // A task token cannot start a new tree (it would shed its limits).
    assert!(
        call(&b, &t, "task_create", json!({"description": "x"}), Proof::None).unwrap_err().contains("task_delegate")
    );

    // Two children from one parent: every token of the tree keeps working (invariant 4).
    let c1 = call(
        &b,
        &t,
        "task_delegate",
        json!({"description": "c1", "ttl": "5m", "can_delegate": true,
        "envelope": {"targets": ["web"]}}),
        Proof::None,
    )
    .unwrap();
    let c1t = c1["token"].as_str().unwrap().to_owned();
    assert_eq!(c1["depth"], 1);
    let c2 = call(&b, &t, "task_delegate", json!({"description": "c2", "ttl": "5m"}), Proof::None).unwrap();
    let c2t = c2["token"].as_str().unwrap().to_owned();
    for tok in [&t, &c1t, &c2t] {
        call(&b, tok, "list_targets", json!({}), Proof::None).unwrap();
    }
    // The child is narrowed by its caveats: only web.
    assert_eq!(
        targets(&call(&b, &c1t, "list_targets", json!({}), Proof::None).unwrap()),
        [("web".into(), vec!["read".into()])]
    );
    // Narrowing outside the parent is refused with the name.
    let e = call(&b, &c1t, "task_delegate", json!({"description": "x", "envelope": {"targets": ["db"]}}), Proof::None)
        .unwrap_err();
    assert!(e.contains("\"db\" is outside the parent task's envelope"), "{e}");
    // A child cannot outlive its parent.
    let e = call(&b, &c1t, "task_delegate", json!({"description": "x", "ttl": "1h"}), Proof::None).unwrap_err();
    assert!(e.contains("outlive"), "{e}");
    // can_delegate = false stops delegation below it.
    let e = call(&b, &c2t, "task_delegate", json!({"description": "x"}), Proof::None).unwrap_err();
    assert!(e.contains("delegation_not_allowed") && e.contains("can_delegate"), "{e}");
    // Depth: alice allows 3 levels below a root.
    let mut tok = c1t.clone();
    for (depth, ttl) in [(2, "3m"), (3, "2m")] {
        let c = call(
            &b,
            &tok,
            "task_delegate",
            json!({"description": "deeper", "ttl": ttl, "can_delegate": true}),
            Proof::None,
        )
        .unwrap();
        assert_eq!(c["depth"], depth);
        tok = c["token"].as_str().unwrap().to_owned();
    }
    let e = call(
        &b,
        &tok,
        "task_delegate",
        json!({"description": "too deep", "ttl": "30s", "can_delegate": true}),
        Proof::None,
    )
    .unwrap_err();
    assert!(e.contains("depth_exceeded"), "{e}");
    let deepest = tok;

    // task_list: a token sees its own subtree; the API key sees the whole tree.
    let l = call(&b, &c1t, "task_list", json!({}), Proof::None).unwrap();
    assert_eq!(l["count"], 3, "c1 and its two descendants: {l}");
    assert_eq!(call(&b, &k.alice, "task_list", json!({}), Proof::None).unwrap()["count"], 5);
    // A sibling's task is not visible to a token (nor revocable by it).
    let c2id = c2["task_id"].as_str().unwrap();
    assert!(call(&b, &c1t, "task_info", json!({"task_id": c2id}), Proof::None).unwrap_err().contains("no task"));
    assert!(call(&b, &c1t, "task_revoke", json!({"task_id": c2id}), Proof::None).unwrap_err().contains("no task"));

    // Revoke c1: it and everything below die at once, also with caveats appended offline.
    let c1id = c1["task_id"].as_str().unwrap();
    let r = call(&b, &k.alice, "task_revoke", json!({"task_id": c1id}), Proof::None).unwrap();
    assert_eq!(r["cascade_count"], 2);
    let appended = append_caveat(&c1t, "role IN [read]");
    for dead in [&c1t, &deepest, &appended] {
        let r = rpc(&b, dead, "tools/call", json!({"name": "list_targets", "arguments": {}}), Proof::None);
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(r.text().contains(&format!("task {c1id} was revoked")), "{}", r.text());
    }
    // The parent and the sibling still work.
    call(&b, &t, "list_targets", json!({}), Proof::None).unwrap();
    call(&b, &c2t, "list_targets", json!({}), Proof::None).unwrap();
    // Revoking the root takes the sibling along.
    call(&b, &t, "task_revoke", json!({"task_id": root["task_id"]}), Proof::None).unwrap();
    assert_eq!(rpc(&b, &c2t, "tools/list", json!({}), Proof::None).status, 401);

    // Every task event is audited durably, with its lineage.
    let d = audit_events(&b, "task_delegate");
    assert!(d.len() >= 4);
    assert!(d.iter().all(|e| e["lineage"].as_array().is_some_and(|l| l.len() >= 2)), "{d:?}");
    assert_eq!(audit_events(&b, "task_create").len(), 1);
    let rv = audit_events(&b, "task_revoke");
    assert_eq!(rv.len(), 2);
    assert_eq!(rv[0]["task"], c1id);
    let raw = std::fs::read_to_string(b.data_dir.join("audit/audit.jsonl")).unwrap();
    assert!(!raw.contains(&t[4..40]), "tokens never reach the audit log");
}

/// Appends one caveat to a token offline (what any holder can do).
fn append_caveat(token: &str, caveat: &str) -> String {
    let m = ephyr::macaroon::Macaroon::decode(token).unwrap();
    ephyr::macaroon::attenuate(&m, caveat).encode()
}

#[test]
fn a_cross_agent_handoff_never_exceeds_either_policy() {
    if !require_root() {
        return;
    }
    let mut k = None;
    let p = policy(&mut k);
    let k = k.unwrap();
    let b = start_at(None, &p);
    let root =
        call(&b, &k.alice, "task_create", json!({"description": "d", "can_delegate": true}), Proof::None).unwrap();
    let t = root["token"].as_str().unwrap();
    // Hand a child to bob. alice has web:read and db:read; bob has web:read,op.
    let c = call(&b, t, "task_delegate", json!({"description": "for bob", "agent": "bob", "ttl": "5m"}), Proof::None)
        .unwrap();
    assert_eq!(c["agent"], "bob");
    let ct = c["token"].as_str().unwrap();
    // bob's own key sees web (read, op); the hand-off sees only web:read (alice ∩ bob).
    assert_eq!(
        targets(&call(&b, &k.bob, "list_targets", json!({}), Proof::None).unwrap()),
        [("web".into(), vec!["op".into(), "read".into()])]
    );
    assert_eq!(
        targets(&call(&b, ct, "list_targets", json!({}), Proof::None).unwrap()),
        [("web".into(), vec!["read".into()])]
    );
    // The hand-off cannot be narrowed to something outside bob's policy.
    let e = call(
        &b,
        t,
        "task_delegate",
        json!({"description": "x", "agent": "bob", "envelope": {"targets": ["db"]}}),
        Proof::None,
    )
    .unwrap_err();
    assert!(e.contains("agent \"bob\""), "{e}");
    // The hand-off is audited as such, with the lineage, and the child acts as bob.
    let h = audit_events(&b, "task_handoff");
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["action"]["child_agent"], "bob");
    assert_eq!(h[0]["lineage"].as_array().unwrap().len(), 2);
    let info = call(&b, ct, "task_info", json!({}), Proof::None).unwrap();
    assert_eq!(info["task"]["agent"], "bob");
    assert_eq!(info["task"]["delegated_by"], "alice");
    // alice's root token, with just the child's task caveat appended, does not act as bob's task.
    let forged = append_caveat(t, &format!("task = {}", c["task_id"].as_str().unwrap()));
    let r = rpc(&b, &forged, "tools/list", json!({}), Proof::None);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("was not minted by this broker"), "{}", r.text());
}

#[test]
fn proof_of_possession_in_both_forms_and_every_replay_is_refused() {
    if !require_root() {
        return;
    }
    let mut k = None;
    let p = policy(&mut k);
    let k = k.unwrap();
    let b = start_at(None, &p);
    let key = Holder::new(0x11);
    let root = call(
        &b,
        &k.alice,
        "task_create",
        json!({"description": "bound", "holder_pub_key": key.public(), "can_delegate": true}),
        Proof::None,
    )
    .unwrap();
    assert_eq!(root["holder_bound"], true);
    let t = root["token"].as_str().unwrap().to_owned();

    // Every request needs a proof, not only tool calls.
    let r = rpc(&b, &t, "tools/list", json!({}), Proof::None);
    assert_eq!(r.status, 401);
    assert!(r.text().contains("bound to a holder key"), "{}", r.text());
    assert!(r.header("www-authenticate").unwrap().contains("invalid_token"));
    // Our form works...
    assert_eq!(rpc(&b, &t, "tools/list", json!({}), Proof::Ephyr(&key, 0, nonce("n1"))).status, 200);
    call(&b, &t, "list_targets", json!({}), Proof::Ephyr(&key, 0, nonce("n2"))).unwrap();
    // ... once per nonce: a replay, and the same nonce for another tool, are refused.
    let r =
        rpc(&b, &t, "tools/call", json!({"name": "list_targets", "arguments": {}}), Proof::Ephyr(&key, 0, nonce("n2")));
    assert_eq!(r.status, 401);
    assert!(r.text().contains("replay"), "{}", r.text());
    let r =
        rpc(&b, &t, "tools/call", json!({"name": "task_list", "arguments": {}}), Proof::Ephyr(&key, 0, nonce("n2")));
    assert!(r.text().contains("replay"), "{}", r.text());
    // A proof made for tool A does not pass for tool B.
    let r = rpc(
        &b,
        &t,
        "tools/call",
        json!({"name": "task_list", "arguments": {}}),
        Proof::EphyrFor(&key, "list_targets".into(), nonce("n3")),
    );
    assert_eq!(r.status, 401);
    assert!(r.text().contains("signature"), "{}", r.text());
    // Stale in both directions.
    for off in [-120, 120] {
        let r = rpc(&b, &t, "tools/list", json!({}), Proof::Ephyr(&key, off, nonce(&format!("stale{off}"))));
        assert_eq!(r.status, 401);
        assert!(r.text().contains("window"), "{}", r.text());
    }
    // The stale nonce was not consumed: the same nonce with a fresh time passes.
    assert_eq!(rpc(&b, &t, "tools/list", json!({}), Proof::Ephyr(&key, 0, nonce("stale120"))).status, 200);
    // Another key is refused.
    let thief = Holder::new(0x66);
    assert_eq!(rpc(&b, &t, "tools/list", json!({}), Proof::Ephyr(&thief, 0, nonce("t1"))).status, 401);

    // RFC 9449 DPoP, including the DPoP authorization scheme; a jti is single-use.
    let r = rpc(&b, &t, "tools/list", json!({}), Proof::Dpop(&key, "jti-1".into()));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = rpc(&b, &t, "tools/list", json!({}), Proof::Dpop(&key, "jti-1".into()));
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("DPoP"), "{:?}", r.header("www-authenticate"));
    let proof = dpop(&key, &b.api, &t, "jti-2");
    let r = rpc(&b, &t, "tools/list", json!({}), Proof::Headers(vec![("DPoP".into(), proof)]));
    assert_eq!(r.status, 200);

    // A delegated child inherits the binding; stolen and attenuated, it is useless without the key.
    let c =
        call(&b, &t, "task_delegate", json!({"description": "child", "ttl": "2m"}), Proof::Ephyr(&key, 0, nonce("d1")))
            .unwrap();
    assert_eq!(c["holder_bound"], true);
    let ct = c["token"].as_str().unwrap().to_owned();
    let stolen = append_caveat(&ct, "target IN [web]");
    assert_eq!(rpc(&b, &stolen, "tools/list", json!({}), Proof::None).status, 401);
    assert_eq!(rpc(&b, &stolen, "tools/list", json!({}), Proof::Ephyr(&thief, 0, nonce("t2"))).status, 401);
    assert_eq!(rpc(&b, &stolen, "tools/list", json!({}), Proof::Ephyr(&key, 0, nonce("k2"))).status, 200);
    // The thief cannot re-bind the inherited binding either.
    let e = call(
        &b,
        &ct,
        "task_bind",
        json!({"task_id": c["task_id"], "holder_pub_key": thief.public()}),
        Proof::Ephyr(&key, 0, nonce("b1")),
    )
    .unwrap_err();
    assert!(e.contains("inherited"), "{e}");
    // The broker re-binds a child to a new key at delegation: then only that key works for it.
    let sub = Holder::new(0x22);
    let c2 = call(
        &b,
        &t,
        "task_delegate",
        json!({"description": "sub", "ttl": "2m", "holder_pub_key": sub.public()}),
        Proof::Ephyr(&key, 0, nonce("d2")),
    )
    .unwrap();
    let c2t = c2["token"].as_str().unwrap();
    assert_eq!(rpc(&b, c2t, "tools/list", json!({}), Proof::Ephyr(&key, 0, nonce("k3"))).status, 401);
    assert_eq!(rpc(&b, c2t, "tools/list", json!({}), Proof::Ephyr(&sub, 0, nonce("s1"))).status, 200);

    // The Python client from docs/pop.md signs the same way.
    let out = python("pop_client.py").args([&format!("http://{}/mcp", b.api), &t, &"11".repeat(32)]).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let py: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(py["status"], 200, "{py}");
    assert_eq!(py["replay_status"], 401, "{py}");
    // Refusals are audited with their code.
    std::thread::sleep(Duration::from_millis(100));
    let rej = audit_events(&b, "pop_rejected");
    assert!(rej.iter().any(|e| e["code"] == "pop_replayed"), "{rej:?}");
}

#[test]
fn require_pop_locks_an_unbound_task_until_task_bind() {
    if !require_root() {
        return;
    }
    let mut k = None;
    let p = policy(&mut k);
    let k = k.unwrap();
    let b = start_at(None, &p);
    let task = call(&b, &k.carol, "task_create", json!({"description": "needs a key"}), Proof::None).unwrap();
    assert_eq!(task["holder_bound"], false);
    assert!(task["bind_deadline"].is_string());
    let t = task["token"].as_str().unwrap().to_owned();
    let r = rpc(&b, &t, "tools/list", json!({}), Proof::None);
    assert_eq!(r.status, 423, "{}", r.text());
    assert!(r.text().contains("task_bind"), "{}", r.text());
    let r = rpc(&b, &t, "tools/call", json!({"name": "list_targets", "arguments": {}}), Proof::None);
    assert_eq!(r.status, 423);
    // task_bind gets through; from then on every request needs the key.
    let key = Holder::new(0x33);
    let bound =
        call(&b, &t, "task_bind", json!({"task_id": task["task_id"], "holder_pub_key": key.public()}), Proof::None)
            .unwrap();
    assert_eq!(bound["bound"], true);
    assert_eq!(rpc(&b, &t, "tools/list", json!({}), Proof::None).status, 401);
    assert_eq!(rpc(&b, &t, "tools/list", json!({}), Proof::Ephyr(&key, 0, nonce("c1"))).status, 200);
    // Malformed holder keys name the problem and change nothing.
    let e = call(&b, &k.carol, "task_create", json!({"description": "x", "holder_pub_key": "abc"}), Proof::None)
        .unwrap_err();
    assert!(e.contains("32-byte Ed25519"), "{e}");
    assert_eq!(call(&b, &k.carol, "task_list", json!({}), Proof::None).unwrap()["count"], 1);
}

#[test]
fn revocations_bindings_and_nonces_survive_restart_and_kill_9() {
    if !require_root() {
        return;
    }
    let mut k = None;
    let p = policy(&mut k);
    let k = k.unwrap();
    let dir = TempDir::new("tasks-state");
    let data = dir.join("data");
    let key = Holder::new(0x44);
    let (t, child_t, bound_t, used_nonce) = {
        let b = start_at(Some(data.clone()), &p);
        let root =
            call(&b, &k.alice, "task_create", json!({"description": "persist", "can_delegate": true}), Proof::None)
                .unwrap();
        let t = root["token"].as_str().unwrap().to_owned();
        let c = call(&b, &t, "task_delegate", json!({"description": "c", "ttl": "5m"}), Proof::None).unwrap();
        let bound = call(&b, &k.alice, "task_create", json!({"description": "bound"}), Proof::None).unwrap();
        call(
            &b,
            &k.alice,
            "task_bind",
            json!({"task_id": bound["task_id"], "holder_pub_key": key.public()}),
            Proof::None,
        )
        .unwrap();
        let bt = bound["token"].as_str().unwrap().to_owned();
        assert_eq!(rpc(&b, &bt, "tools/list", json!({}), Proof::Ephyr(&key, 0, nonce("before"))).status, 200);
        // Clean restart.
        drop(b);
        let b = start_at(Some(data.clone()), &p);
        call(&b, &t, "list_targets", json!({}), Proof::None).unwrap();
        call(&b, c["token"].as_str().unwrap(), "list_targets", json!({}), Proof::None).unwrap();
        // Revoke, and kill -9 right after the acknowledgement.
        call(&b, &k.alice, "task_revoke", json!({"task_id": c["task_id"]}), Proof::None).unwrap();
        b.signal(libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(200));
        (t, c["token"].as_str().unwrap().to_owned(), bt, nonce("before"))
    };
    let b = start_at(Some(data.clone()), &p);
    assert!(b.log().contains("tasks: 3 live in 2 trees"), "{}", b.log());
    let r = rpc(&b, &child_t, "tools/list", json!({}), Proof::None);
    assert_eq!(r.status, 401, "still revoked after kill -9: {}", r.text());
    call(&b, &t, "list_targets", json!({}), Proof::None).unwrap();
    // The binding survived: no proof, no service; and a nonce used before the restarts stays used.
    assert_eq!(rpc(&b, &bound_t, "tools/list", json!({}), Proof::None).status, 401);
    let r = rpc(&b, &bound_t, "tools/list", json!({}), Proof::Ephyr(&key, 0, used_nonce));
    assert!(r.text().contains("replay"), "{}", r.text());
    assert_eq!(rpc(&b, &bound_t, "tools/list", json!({}), Proof::Ephyr(&key, 0, nonce("after"))).status, 200);
    // The journal holds sealed keys only, never a token or a raw key.
    let journal = std::fs::read(data.join("state/tasks.journal")).unwrap();
    assert!(!String::from_utf8_lossy(&journal).contains("mac_"));

    // Tokens of another broker (another data dir) are rejected.
    let other = start_at(None, &p);
    let r = rpc(&other, &t, "tools/list", json!({}), Proof::None);
    assert_eq!(r.status, 401);
    assert!(r.text().contains("no task tree"), "{}", r.text());
    // Even with this broker's journal copied over, the other sealing key cannot open the trees.
    drop(b);
    let copy = TempDir::new("tasks-copy");
    let other_data = copy.join("data");
    let o = start_at(Some(other_data.clone()), &p);
    drop(o);
    let dest = other_data.join("state/tasks.journal");
    std::fs::copy(data.join("state/tasks.journal"), &dest).unwrap();
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(other_data.join("state")).unwrap();
    std::os::unix::fs::chown(&dest, Some(owner.uid()), Some(owner.gid())).unwrap();
    let o = start_at(Some(other_data), &p);
    assert!(o.log().contains("could not be unsealed") || o.log().contains("unseal"), "{}", o.log());
    assert_eq!(rpc(&o, &t, "tools/list", json!({}), Proof::None).status, 401);
}
