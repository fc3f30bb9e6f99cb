//! The built-in OAuth 2.1 authorization server from outside: metadata, dynamic registration,
//! authorization code with PKCE through the console's consent page (an operator signs in and
//! picks the template), refresh token rotation and reuse detection, revocation, RFC 8693 token
//! exchange (narrowing, never widening, the actor in the lineage), the official TypeScript and
//! Python SDK clients through the whole flow, and the conformance suite's authorization-server
//! scenarios.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use common::*;
use serde_json::{Value, json};

const ALICE_PW: &str = "alice password 12345";

fn policy(port: u16, bot_hash: &str) -> String {
    format!(
        "version: 1\nnetwork: {{ allow: ['127.0.0.1/32'] }}\noperators:\n{}{}\
         services:\n  api: {{ url: \"http://127.0.0.1:{port}/\", credential: {{ type: bearer, secret: \"env:OAUTH_UPSTREAM\" }} }}\n\
         \x20 api2: {{ url: \"http://127.0.0.1:{port}/two/\", credential: {{ type: bearer, secret: \"env:OAUTH_UPSTREAM\" }} }}\n\
         templates:\n  reader:\n    description: the api service\n    can_delegate: true\n    services: {{ api: {{}} }}\n\
         agents:\n  bot:\n    api_key_hash: \"{bot_hash}\"\n    can_delegate: true\n    services: {{ api: {{}}, api2: {{}} }}\n\
         oauth: {{ access_ttl: 10m, refresh_ttl: 1d }}\n",
        operator_entry("alice", "admin", ALICE_PW),
        operator_entry("vic", "viewer", "viewer password 123"),
    )
}

fn start(policy: &str) -> Broker {
    Broker::start(BrokerOpts {
        policy: Some(policy),
        env: vec![("OAUTH_UPSTREAM".into(), "upstream-credential-5521".into())],
        ..Default::default()
    })
}

/// Splits `http://host:port/path?q` into (`host:port`, `/path?q`).
fn split(url: &str) -> (String, String) {
    let rest = url.split_once("://").unwrap().1;
    let at = rest.find('/').unwrap_or(rest.len());
    (rest[..at].to_owned(), rest[at..].to_owned())
}

fn query_param(url: &str, k: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (a, v) = kv.split_once('=')?;
        (a == k).then(|| {
            let v = v.replace('+', " ");
            let mut out = Vec::new();
            let b = v.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' && i + 2 < b.len() {
                    out.push(u8::from_str_radix(&v[i + 1..i + 3], 16).unwrap());
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).unwrap()
        })
    })
}

fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                        (c as char).to_string()
                    } else {
                        format!("%{c:02X}")
                    }
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The browser: follows an authorization URL to the console, signs `operator` in (coming back
/// to the consent page), answers it, and returns where the client is sent back to.
fn consent(authorize: &str, operator: (&str, &str), template: &str, approve: bool) -> String {
    let (api, path) = split(authorize);
    let r = http_request(&api, "GET", &path, &[], b"");
    assert_eq!(r.status, 302, "authorize: {}", r.text());
    let console_url = r.header("location").unwrap().to_owned();
    assert!(console_url.contains("/oauth/consent?request="), "{console_url}");
    let (dash, consent_path) = split(&console_url);
    // Not signed in: the console asks for sign-in and comes back here.
    let r = http_request(&dash, "GET", &consent_path, &[], b"");
    assert_eq!(r.status, 303, "{}", r.text());
    let login = r.header("location").unwrap().to_owned();
    assert!(login.starts_with("/login?next="), "{login}");
    let next = query_param(&login, "next").unwrap();
    assert_eq!(next, consent_path);
    let origin = format!("http://{dash}");
    let body = form_encode(&[("name", operator.0), ("password", operator.1), ("next", &next)]);
    let r = http_request(
        &dash,
        "POST",
        "/login",
        &[("Origin", &origin), ("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location"), Some(consent_path.as_str()), "back to the consent page");
    let cookie = r.header("set-cookie").unwrap().split(';').next().unwrap().to_owned();
    let page = http_request(&dash, "GET", &consent_path, &[("Cookie", &cookie)], b"").text();
    assert!(page.contains("asks for access to"), "{page}");
    let csrf = {
        let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
        page[at..at + page[at..].find('"').unwrap()].to_owned()
    };
    let request = query_param(&consent_path, "request").unwrap();
    let body = form_encode(&[
        ("csrf", &csrf),
        ("request", &request),
        ("template", template),
        ("decision", if approve { "approve" } else { "deny" }),
    ]);
    let r = http_request(
        &dash,
        "POST",
        "/oauth/consent",
        &[("Origin", &origin), ("Content-Type", "application/x-www-form-urlencoded"), ("Cookie", &cookie)],
        body.as_bytes(),
    );
    assert_eq!(r.status, 302, "{}", r.text());
    r.header("location").unwrap().to_owned()
}

fn post_form(api: &str, path: &str, pairs: &[(&str, &str)]) -> HttpResponse {
    http_request(
        api,
        "POST",
        path,
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form_encode(pairs).as_bytes(),
    )
}

fn pkce() -> (String, String) {
    let verifier = "a-verifier-of-forty-three-or-more-characters-0123456789".to_owned();
    let d = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    (verifier, data_encoding::BASE64URL_NOPAD.encode(d.as_ref()))
}

fn register(b: &Broker, redirect: &str) -> String {
    let r = http_request(
        &b.api,
        "POST",
        "/oauth/register",
        &[("Content-Type", "application/json")],
        json!({"client_name": "raw test", "redirect_uris": [redirect], "token_endpoint_auth_method": "none"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["client_id"].as_str().unwrap().to_owned()
}

fn authorize_url(b: &Broker, client: &str, redirect: &str, challenge: &str, state: &str) -> String {
    format!(
        "http://{}/oauth/authorize?{}",
        b.api,
        form_encode(&[
            ("response_type", "code"),
            ("client_id", client),
            ("redirect_uri", redirect),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
            ("state", state),
            ("resource", &format!("http://{}/mcp", b.api)),
            ("scope", "mcp"),
        ])
    )
}

fn mcp_ok(b: &Broker, cred: &str) -> Result<Value, String> {
    let v = mcp_request(
        &b.api,
        cred,
        "tools/call",
        Some("list_services"),
        json!({"name": "list_services", "arguments": {}}),
    );
    if v["error"].is_object() { Err(v["error"]["message"].as_str().unwrap_or("").to_owned()) } else { Ok(v) }
}

#[test]
fn authorization_code_with_pkce_through_consent_refresh_rotation_and_revocation() {
    if !require_root() {
        return;
    }
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (_, bot_hash) = agent_key("bot");
    let b = start(&policy(up.port, &bot_hash));

    // Discovery: the resource names this server; the metadata says what it supports.
    let r = http_request(&b.api, "POST", "/mcp", &[("Content-Type", "application/json")], b"{}");
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap().to_owned();
    assert!(challenge.contains("resource_metadata=") && challenge.contains("scope=\"mcp\""), "{challenge}");
    let prm = http_request(&b.api, "GET", "/.well-known/oauth-protected-resource/mcp", &[], b"").json();
    let issuer = format!("http://{}", b.api);
    assert_eq!(prm["authorization_servers"], json!([issuer]));
    assert_eq!(prm["resource"], format!("{issuer}/mcp"));
    let meta = http_request(&b.api, "GET", "/.well-known/oauth-authorization-server", &[], b"").json();
    assert_eq!(meta["issuer"], issuer);
    assert_eq!(meta["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(meta["authorization_response_iss_parameter_supported"], true);

    // Registration: bad redirect URIs are refused.
    for bad in ["http://evil.example/cb", "https://x.example/cb#f", "javascript:alert(1)"] {
        let r = http_request(
            &b.api,
            "POST",
            "/oauth/register",
            &[("Content-Type", "application/json")],
            json!({"redirect_uris": [bad]}).to_string().as_bytes(),
        );
        assert_eq!((r.status, r.json()["error"].as_str().unwrap()), (400, "invalid_redirect_uri"), "{bad}");
    }
    let redirect = "http://127.0.0.1:9/cb";
    let client = register(&b, redirect);
    let (verifier, challenge) = pkce();

    // Errors before the redirect URI is trusted are shown, never redirected.
    let (_, p) = split(&authorize_url(&b, &client, "http://127.0.0.1:9/other", &challenge, "s1"));
    let r = http_request(&b.api, "GET", &p, &[], b"");
    assert_eq!(r.status, 400);
    assert!(r.header("location").is_none() && r.text().contains("not registered"), "{}", r.text());
    // After: back to the client with the error, state and iss.
    let (_, p) = split(&authorize_url(&b, &client, redirect, "short", "s2"));
    let r = http_request(&b.api, "GET", &p, &[], b"");
    let loc = r.header("location").unwrap().to_owned();
    assert!(loc.starts_with(redirect) && loc.contains("error=invalid_request") && loc.contains("state=s2"), "{loc}");
    assert_eq!(query_param(&loc, "iss").as_deref(), Some(issuer.as_str()));
    let wrong_resource = authorize_url(&b, &client, redirect, &challenge, "s3").replace("%2Fmcp", "%2Fother");
    let r = http_request(&b.api, "GET", &split(&wrong_resource).1, &[], b"");
    assert!(r.header("location").unwrap().contains("error=invalid_target"));

    // A viewer cannot consent; the operator's denial goes back as access_denied.
    {
        let (api, path) = split(&authorize_url(&b, &client, redirect, &challenge, "viewer"));
        let console_url = http_request(&api, "GET", &path, &[], b"").header("location").unwrap().to_owned();
        let (dash, consent_path) = split(&console_url);
        let mut vic = ConsoleClient::new(&dash);
        vic.login("vic", "viewer password 123");
        let page = vic.get(&consent_path).text();
        assert!(page.contains("only an admin can answer"), "{page}");
        let request = query_param(&consent_path, "request").unwrap();
        let form = format!("csrf={}&request={request}&template=reader&decision=approve", vic.csrf());
        let r = vic.post("/oauth/consent", &form, &[]);
        assert_eq!(r.status, 403, "{}", r.text());
        let mut alice = ConsoleClient::new(&dash);
        alice.login("alice", ALICE_PW);
        assert!(alice.get(&consent_path).text().contains("Approve"), "the request still waits for an admin");
    }
    let back =
        consent(&authorize_url(&b, &client, redirect, &challenge, "deny-me"), ("alice", ALICE_PW), "reader", false);
    assert!(back.contains("error=access_denied") && back.contains("state=deny-me"), "{back}");

    // Approve: a code, state and iss come back.
    let back = consent(&authorize_url(&b, &client, redirect, &challenge, "xyz"), ("alice", ALICE_PW), "reader", true);
    assert!(back.starts_with(redirect), "{back}");
    assert_eq!(query_param(&back, "state").as_deref(), Some("xyz"));
    assert_eq!(query_param(&back, "iss").as_deref(), Some(issuer.as_str()));
    let code = query_param(&back, "code").unwrap();

    // The token endpoint checks PKCE and the redirect URI; a code works once.
    let token = |code: &str, verifier: &str, redirect: &str| {
        post_form(
            &b.api,
            "/oauth/token",
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect),
                ("client_id", &client),
                ("code_verifier", verifier),
            ],
        )
    };
    let r = token(&code, "the-wrong-verifier-of-forty-three-characters-000000", redirect);
    assert_eq!((r.status, r.json()["error"].as_str().unwrap()), (400, "invalid_grant"));
    let r = token(&code, &verifier, "http://127.0.0.1:9/elsewhere");
    assert!(r.json()["error_description"].as_str().unwrap().contains("redirect_uri"));
    let r = token(&code, &verifier, redirect);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let t = r.json();
    let access = t["access_token"].as_str().unwrap().to_owned();
    let refresh = t["refresh_token"].as_str().unwrap().to_owned();
    assert!(access.starts_with("mac_") && refresh.starts_with("ephyr_rt_"), "{t}");
    assert_eq!(t["expires_in"], 600);
    let seen = mcp_ok(&b, &access).unwrap().to_string();
    assert!(seen.contains("api") && !seen.contains("api2"), "the template's grants: {seen}");
    // The agent the consent made: enrolled from the template, owned by alice.
    let agents = local_request(&b.socket, "GET", "/v1/agents", b"").json();
    let made = agents["agents"].as_array().unwrap().iter().find(|a| a["template"] == "reader").unwrap().clone();
    assert_eq!((made["owner"].as_str(), made["state"].as_str()), (Some("alice"), Some("active")));
    let agent = made["name"].as_str().unwrap().to_owned();
    assert!(agent.starts_with("oauth-raw-test-"), "{agent}");
    let r = token(&code, &verifier, redirect);
    assert_eq!(r.json()["error"], "invalid_grant", "a code works once");
    assert!(mcp_ok(&b, &access).is_err(), "reusing the code revoked what it made");

    // Start again, then rotate: each refresh token works once; a reuse revokes the grant.
    let back = consent(&authorize_url(&b, &client, redirect, &challenge, "again"), ("alice", ALICE_PW), "reader", true);
    let t = token(&query_param(&back, "code").unwrap(), &verifier, redirect).json();
    let (access1, refresh1) =
        (t["access_token"].as_str().unwrap().to_owned(), t["refresh_token"].as_str().unwrap().to_owned());
    let refresh_with = |rt: &str| {
        post_form(
            &b.api,
            "/oauth/token",
            &[("grant_type", "refresh_token"), ("refresh_token", rt), ("client_id", &client)],
        )
    };
    let t2 = refresh_with(&refresh1).json();
    let (access2, refresh2) =
        (t2["access_token"].as_str().unwrap().to_owned(), t2["refresh_token"].as_str().unwrap().to_owned());
    assert_ne!(refresh1, refresh2);
    assert!(mcp_ok(&b, &access2).is_ok());
    assert!(mcp_ok(&b, &access1).is_err(), "one live access token per grant");
    let r = refresh_with(&refresh1);
    assert!(r.json()["error_description"].as_str().unwrap().contains("used before"), "{}", r.text());
    assert!(refresh_with(&refresh2).json()["error"] == "invalid_grant", "the whole grant is revoked");
    assert!(mcp_ok(&b, &access2).is_err());
    assert_eq!(refresh_with("ephyr_rt_nothing").json()["error"], "invalid_grant");

    // Revocation (RFC 7009) and the agent's lifecycle reach OAuth tokens too.
    let back = consent(&authorize_url(&b, &client, redirect, &challenge, "third"), ("alice", ALICE_PW), "reader", true);
    let t = token(&query_param(&back, "code").unwrap(), &verifier, redirect).json();
    let (access3, refresh3) =
        (t["access_token"].as_str().unwrap().to_owned(), t["refresh_token"].as_str().unwrap().to_owned());
    let agent3 = {
        let v = mcp_request(
            &b.api,
            &access3,
            "tools/call",
            Some("task_info"),
            json!({"name": "task_info", "arguments": {}}),
        );
        serde_json::from_str::<Value>(v["result"]["content"][0]["text"].as_str().unwrap()).unwrap()["task"]["agent"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let out = ephyr(&["agent", "suspend", &agent3, "--socket", b.socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(mcp_ok(&b, &access3).unwrap_err().contains("suspended") || mcp_ok(&b, &access3).is_err());
    let r = refresh_with(&refresh3);
    assert!(r.json()["error_description"].as_str().unwrap().contains("suspended"), "{}", r.text());
    let r = post_form(&b.api, "/oauth/revoke", &[("token", &refresh3), ("client_id", &client)]);
    assert_eq!(r.status, 200);
    let out = ephyr(&["agent", "resume", &agent3, "--socket", b.socket.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        refresh_with(&refresh3).json()["error_description"].as_str().unwrap().contains("revoked"),
        "revoked stays revoked"
    );

    // Audited, without tokens or codes.
    for e in ["oauth_client_registered", "oauth_consent", "oauth_token_issued", "oauth_refresh_reused"] {
        assert!(!audit_events(&b, e).is_empty(), "{e}");
    }
    let audit = std::fs::read_to_string(b.data_dir.join("audit/audit.jsonl")).unwrap();
    for secret in [&access, &refresh, &code, &refresh2, &refresh3] {
        assert!(!audit.contains(secret.as_str()), "a token or code in the audit trail");
    }
}

#[test]
fn token_exchange_narrows_records_the_actor_and_never_widens() {
    if !require_root() {
        return;
    }
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (bot, bot_hash) = agent_key("bot");
    let b = start(&policy(up.port, &bot_hash));
    let parent =
        tool_call(&b.api, &bot, "task_create", json!({"description": "orchestrator", "can_delegate": true})).unwrap();
    let subject = parent["token"].as_str().unwrap().to_owned();
    let exchange = |pairs: &[(&str, &str)]| {
        let mut all = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
        ];
        all.extend_from_slice(pairs);
        post_form(&b.api, "/oauth/token", &all)
    };
    // Narrowed to one service: the child reaches api, not api2.
    let r = exchange(&[("subject_token", &subject), ("scope", "service:api")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    let child = v["access_token"].as_str().unwrap().to_owned();
    let call = |cred: &str, service: &str| {
        tool_call(
            &b.api,
            cred,
            "http_request",
            json!({"service": service, "method": "POST", "path": "/x", "body": "{}"}),
        )
    };
    assert!(call(&child, "api").is_ok());
    let e = call(&child, "api2").unwrap_err();
    assert!(e.contains("denied"), "{e}");
    // Never wider: a scope outside the subject's reach is refused.
    let r = exchange(&[("subject_token", &child), ("scope", "service:api2")]);
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text());
    // Bad input, each with its reason.
    for (pairs, want) in [
        (vec![("subject_token", bot.as_str())], "not an API key"),
        (vec![("subject_token", "mac_forged")], "subject_token"),
        (vec![("subject_token", subject.as_str()), ("scope", "planet:mars")], "KIND is tool"),
        (vec![("subject_token", subject.as_str()), ("actor_token", bot.as_str())], "needs actor_token_type"),
    ] {
        let r = exchange(&pairs);
        assert_eq!(r.status, 400);
        assert!(r.text().contains(want), "{pairs:?}: {}", r.text());
    }
    // An actor: the child is handed to the actor's agent, its lineage under the subject's task.
    let enroll = ephyr(&[
        "agent",
        "enroll",
        "--template",
        "reader",
        "--owner",
        "alice",
        "--name",
        "worker",
        "--socket",
        b.socket.to_str().unwrap(),
    ]);
    assert!(enroll.status.success(), "{}", stderr(&enroll));
    let jt = stdout(&enroll).trim().to_owned();
    let joined = http_request(
        &b.api,
        "POST",
        "/v1/agents/join",
        &[("Content-Type", "application/json")],
        json!({"join_token": jt}).to_string().as_bytes(),
    );
    let worker = joined.json()["api_key"].as_str().unwrap().to_owned();
    let r = exchange(&[
        ("subject_token", &subject),
        ("scope", "service:api"),
        ("actor_token", &worker),
        ("actor_token_type", "urn:ietf:params:oauth:token-type:access_token"),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    let handed = r.json()["access_token"].as_str().unwrap().to_owned();
    let info = tool_call(&b.api, &handed, "task_info", json!({})).unwrap();
    let task = &info["task"];
    assert_eq!(task["agent"], "worker", "{info}");
    assert_eq!((&task["root_id"], &task["delegated_by"]), (&parent["task_id"], &json!("bot")), "{info}");
    assert!(audit_events(&b, "task_handoff").iter().any(|e| e["action"]["child_agent"] == "worker"));
    let ex = audit_events(&b, "oauth_token_exchanged");
    assert!(ex.iter().any(|e| e["action"]["actor"] == "worker"), "{ex:?}");
    // Revoking the subject's task takes the exchanged tokens with it.
    let out = ephyr(&["agent", "suspend", "bot", "--socket", b.socket.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(mcp_ok(&b, &child).unwrap_err().contains("revoked"));
    assert!(mcp_ok(&b, &handed).unwrap_err().contains("revoked"));
}

/// Runs an SDK client that prints `AUTHORIZE <url>`, does the consent as the browser, and gives
/// it the URL it is sent back to; returns its last line as JSON.
fn sdk_flow(mut cmd: std::process::Command) -> Value {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let out = child.stdout.take().unwrap();
    let mut last = String::new();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some(url) = line.strip_prefix("AUTHORIZE ") {
            let back = consent(url, ("alice", ALICE_PW), "reader", true);
            writeln!(stdin, "{back}").unwrap();
            stdin.flush().unwrap();
        } else if !line.trim().is_empty() {
            last = line;
        }
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&last).unwrap_or_else(|_| panic!("{last}"))
}

#[test]
fn the_official_typescript_and_python_sdk_clients_connect_through_oauth_and_call_a_tool() {
    if !require_root() {
        return;
    }
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (_, bot_hash) = agent_key("bot");
    let b = start(&policy(up.port, &bot_hash));
    let url = format!("http://{}/mcp", b.api);
    let mut py = python("oauth_client.py");
    py.args([&url, "list_services", "{}"]);
    let v = sdk_flow(py);
    assert_eq!((v["isError"].as_bool(), v["token_prefix"].as_str()), (Some(false), Some("mac_")), "{v}");
    assert!(v["text"].as_str().unwrap().contains("api"), "{v}");
    assert_eq!(v["iss"], format!("http://{}", b.api));
    assert_eq!(v["refresh"], true);
    let mut ts = node();
    ts.args(["ts_oauth.mjs", &url, "list_services", "{}"]);
    let v = sdk_flow(ts);
    assert_eq!((v["isError"].as_bool(), v["token_prefix"].as_str()), (Some(false), Some("mac_")), "{v}");
    assert!(v["tools"].as_array().unwrap().iter().any(|t| t == "list_services"), "{v}");
    // Two clients, two consents, two agents.
    let agents = local_request(&b.socket, "GET", "/v1/agents", b"").json();
    let oauth: Vec<&str> = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .filter(|n| n.starts_with("oauth-"))
        .collect();
    assert_eq!(oauth.len(), 2, "{oauth:?}");
    assert!(
        oauth.iter().any(|n| n.starts_with("oauth-python-sdk-test-"))
            && oauth.iter().any(|n| n.starts_with("oauth-ts-sdk-test-"))
    );
}

/// The conformance suite's authorization-server scenarios (its prerelease: 0.1.x has none).
#[test]
fn the_conformance_suites_authorization_server_scenarios_pass() {
    if !require_root() {
        return;
    }
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (_, bot_hash) = agent_key("bot");
    let b = start(&policy(up.port, &bot_hash));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = register(&b, &format!("http://127.0.0.1:{port}/callback"));
    let issuer = format!("http://{}", b.api);
    let out_dir = TempDir::new("conformance-authz");
    let mut child = node()
        .current_dir(repo().join("tests/peers-next"))
        .args([
            "node_modules/.bin/conformance",
            "authorization",
            "--url",
            &issuer,
            "--client-id",
            &client,
            "--resource",
            &format!("{issuer}/mcp"),
            "-p",
            &port.to_string(),
            "-o",
            out_dir.path().to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut text = String::new();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        text.push_str(&line);
        text.push('\n');
        if line.starts_with(&format!("{issuer}/oauth/authorize?")) {
            let back = consent(&line, ("alice", ALICE_PW), "reader", true);
            let (addr, path) = split(&back);
            assert_eq!(addr, format!("127.0.0.1:{port}"));
            let r = http_request(&addr, "GET", &path, &[], b"");
            assert!(r.status < 400, "the suite's callback: {} {}", r.status, r.text());
        }
    }
    let o = child.wait_with_output().unwrap();
    let all = format!("{text}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{all}");
    for scenario in ["authorization-server-metadata-endpoint", "authorization-code-grant"] {
        assert!(all.contains(scenario), "{scenario} ran: {all}");
    }
    assert!(all.contains("Total: 2 passed, 0 failed") && !all.contains("✗"), "{all}");
}

/// An assertion signed with the agent's key (`pem`, as `ephyr agent join --key-out` wrote it).
fn es256(pem: &str, claims: &Value) -> String {
    es256_jwt(&pem_der(pem), &json!({"alg": "ES256", "typ": "JWT"}), claims)
}

#[test]
fn a_key_bound_agent_proves_its_key_on_every_token_request_and_the_python_sdk_does_it() {
    if !require_root() {
        return;
    }
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (_, bot_hash) = agent_key("bot");
    let b = start(&policy(up.port, &bot_hash));
    let sock = b.socket.to_str().unwrap().to_owned();
    let scratch = TempDir::new("keybound");
    let enroll =
        ephyr(&["agent", "enroll", "--template", "reader", "--owner", "alice", "--name", "keyed", "--socket", &sock]);
    assert!(enroll.status.success(), "{}", stderr(&enroll));
    let tf = scratch.join("jt");
    std::fs::write(&tf, stdout(&enroll).trim()).unwrap();
    let pem_path = scratch.join("keyed.pem");
    let out = ephyr(&[
        "agent",
        "join",
        "--url",
        &format!("http://{}", b.api),
        "--token-file",
        tf.to_str().unwrap(),
        "--key-out",
        pem_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("private_key_jwt"), "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&pem_path).unwrap().permissions().mode() & 0o777, 0o600);
    let pem = std::fs::read_to_string(&pem_path).unwrap();
    let shown = local_request(&b.socket, "GET", "/v1/agents/keyed", b"").json();
    assert_eq!(shown["state"], "active");

    // The SDK's extension provider: discovery, a JWT assertion, a token, a tool call.
    let url = format!("http://{}/mcp", b.api);
    let o = python("oauth_jwt_client.py")
        .args([&url, "keyed", pem_path.to_str().unwrap(), "list_services", "{}"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["isError"].as_bool(), v["token_prefix"].as_str()), (Some(false), Some("mac_")), "{v}");

    // Raw: each assertion works once, only with the agent's key, for this issuer, briefly.
    let issuer = format!("http://{}", b.api);
    let claims = |jti: &str, aud: &str, exp: i64| json!({"iss": "keyed", "sub": "keyed", "aud": aud, "exp": exp, "iat": now_secs(), "jti": jti});
    let ask = |jwt: &str| {
        post_form(
            &b.api,
            "/oauth/token",
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "keyed"),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", jwt),
            ],
        )
    };
    let good = es256(&pem, &claims("one", &issuer, now_secs() + 120));
    let r = ask(&good);
    assert_eq!(r.status, 200, "{}", r.text());
    let access = r.json()["access_token"].as_str().unwrap().to_owned();
    assert!(r.json()["refresh_token"].is_null(), "no refresh token: the key is the credential");
    assert!(mcp_ok(&b, &access).is_ok());
    let r = ask(&good);
    assert!(r.status == 401 && r.text().contains("used before"), "{}", r.text());
    // An orchestrator's token from standard OAuth hands a sub-agent a narrower one (RFC 8693).
    let r = post_form(
        &b.api,
        "/oauth/token",
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token", &access),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ("scope", "tool:list_services"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let child = r.json()["access_token"].as_str().unwrap().to_owned();
    assert!(mcp_ok(&b, &child).is_ok());
    let e = tool_call(&b.api, &child, "task_info", json!({})).unwrap_err();
    assert!(e.contains("denied"), "narrowed to one tool: {e}");
    let (_, other_pem) = {
        let rng = ring::rand::SystemRandom::new();
        let doc =
            ring::signature::EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .unwrap();
        let b64 = data_encoding::BASE64.encode(doc.as_ref());
        ((), format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"))
    };
    for (jwt, why) in [
        (es256(&other_pem, &claims("two", &issuer, now_secs() + 120)), "bad signature"),
        (es256(&pem, &claims("three", "http://elsewhere.example", now_secs() + 120)), "wrong audience"),
        (es256(&pem, &claims("four", &issuer, now_secs() - 120)), "expired"),
        (es256(&pem, &claims("five", &issuer, now_secs() + 3600)), "longer than 600s"),
    ] {
        let r = ask(&jwt);
        assert!(r.status == 401 && r.text().contains(why), "{why}: {}", r.text());
    }
    let r = post_form(
        &b.api,
        "/oauth/token",
        &[("grant_type", "client_credentials"), ("client_id", "keyed"), ("client_secret", "guess")],
    );
    assert!(r.status == 401 && r.text().contains("secrets are not accepted"), "{}", r.text());
    // Suspended: no new tokens, and the one it had stops.
    let out = ephyr(&["agent", "suspend", "keyed", "--socket", &sock]);
    assert!(out.status.success());
    let r = ask(&es256(&pem, &claims("six", &issuer, now_secs() + 120)));
    assert!(r.text().contains("suspended"), "{}", r.text());
    assert!(mcp_ok(&b, &access).is_err());
}

/// Client ID metadata documents: a URL client id on a listed host is fetched (verified TLS,
/// `network:` rules), must name itself, and then goes through the same consent and PKCE; other
/// hosts and documents that lie are refused before anything is redirected.
#[test]
fn client_id_metadata_documents_from_listed_hosts_only() {
    if !require_root() {
        return;
    }
    let certs = TempDir::new("cimd-certs");
    let o = python("upstream.py").args(["certs", certs.path().to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(certs.join("ca.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = |f: &str| certs.join(f).to_str().unwrap().to_owned();
    let docs = Upstream::start(None, "127.0.0.1", &["--tls", &c("server.pem"), &c("server.key")]);
    let up = Upstream::start(None, "127.0.0.1", &[]);
    let (_, bot_hash) = agent_key("bot");
    let p = policy(up.port, &bot_hash).replace(
        "oauth: { access_ttl: 10m, refresh_ttl: 1d }",
        &format!(
            "oauth: {{ access_ttl: 10m, refresh_ttl: 1d, client_id_domains: [localhost], client_id_ca_file: \"{}\" }}",
            c("ca.pem")
        ),
    );
    let b = start(&p);
    let meta = http_request(&b.api, "GET", "/.well-known/oauth-authorization-server", &[], b"").json();
    assert_eq!(meta["client_id_metadata_document_supported"], true);
    let (verifier, challenge) = pkce();
    let redirect = "http://127.0.0.1:9/cb";
    let client = format!("https://localhost:{}/client-metadata/app", docs.port);
    let back = consent(&authorize_url(&b, &client, redirect, &challenge, "cimd"), ("alice", ALICE_PW), "reader", true);
    let code = query_param(&back, "code").unwrap();
    let r = post_form(
        &b.api,
        "/oauth/token",
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", redirect),
            ("client_id", &client),
            ("code_verifier", &verifier),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(mcp_ok(&b, r.json()["access_token"].as_str().unwrap()).is_ok());
    let agents = local_request(&b.socket, "GET", "/v1/agents", b"").json();
    assert!(
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"].as_str().unwrap().starts_with("oauth-cimd-test-client-"))
    );

    // Refused, shown (never redirected), with the reason.
    for (id, why) in [
        (format!("https://localhost:{}/client-metadata/liar", docs.port), "not its own URL"),
        (format!("https://127.0.0.1:{}/client-metadata/app", docs.port), "not in oauth.client_id_domains"),
        (format!("http://localhost:{}/client-metadata/app", docs.port), "no client"),
        (format!("https://localhost:{}/client-metadata/../app", docs.port), "dot segments"),
    ] {
        let r = http_request(&b.api, "GET", &split(&authorize_url(&b, &id, redirect, &challenge, "x")).1, &[], b"");
        assert_eq!(r.status, 400, "{id}: {}", r.text());
        assert!(r.header("location").is_none() && r.text().contains(why), "{id}: {}", r.text());
    }
    // A document whose server the broker cannot verify is refused too.
    let b2 = start(
        &policy(up.port, &bot_hash)
            .replace("oauth: { access_ttl: 10m, refresh_ttl: 1d }", "oauth: { client_id_domains: [localhost] }"),
    );
    let r = http_request(&b2.api, "GET", &split(&authorize_url(&b2, &client, redirect, &challenge, "x")).1, &[], b"");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().to_lowercase().contains("certificate"), "untrusted TLS: {}", r.text());
}

/// Policy of a broker that federates broker `b_api`'s MCP endpoint, protected by its OAuth
/// server: one sign-in for all agents, the default loopback redirect, dynamic registration.
fn federating_policy(b_api: &str, worker_hash: &str) -> String {
    format!(
        "version: 1\nnetwork: {{ allow: ['127.0.0.1/32'] }}\noperators:\n{}\
         remotes:\n  b: {{ url: \"http://{b_api}/mcp\", oauth: {{}} }}\n\
         agents:\n  worker: {{ api_key_hash: \"{worker_hash}\", remotes: {{ b: {{}} }} }}\n",
        operator_entry("olga", "admin", "olga password 12345"),
    )
}

/// Every file under `dir` with its content (what a thief of the data dir gets).
fn all_files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
    out
}

/// A `tools/call` whose JSON-RPC answer is returned whole.
fn call(api: &str, cred: &str, tool: &str) -> Value {
    mcp_request(api, cred, "tools/call", Some(tool), json!({"name": tool, "arguments": {}}))
}

fn remote_status(a: &Broker) -> Value {
    let r = local_request(&a.socket, "GET", "/v1/status", b"");
    serde_json::from_slice::<Value>(&r.body).unwrap()["remotes"]["b"].clone()
}

fn wait_status(a: &Broker, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let s = remote_status(a);
        if ok(&s) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("remote b never became {what}: {}", remote_status(a));
}

/// OAuth towards a remote, against a real authorization server (another ephyr broker with its
/// console consent): before sign-in the remote is not called and the agent is told only that
/// an operator must sign in; `ephyr remote login` (stdin paste of the redirect) signs in
/// through dynamic registration, PKCE and the consent of B's operator; the agent's call then
/// carries the token; the tokens are sealed (no file of the data dir holds them) and survive a
/// restart; when B suspends the agent the broker refuses, tells the operator (audit, status),
/// and the agent does not learn B's words; a forged sealed file does not open.
#[test]
fn a_broker_signs_in_to_a_remote_protected_by_oauth_and_keeps_the_tokens_sealed() {
    let (_, bot_hash) = agent_key("bot");
    // B's access tokens live a minute: A refreshes before every call (60 s early), so each call
    // rotates B's refresh token and A must keep the new one.
    let b = start(&policy(9, &bot_hash).replace("access_ttl: 10m", "access_ttl: 1m"));
    let (worker, worker_hash) = agent_key("worker");
    let a_data = TempDir::new("oauth-a-data");
    let a_policy = federating_policy(&b.api, &worker_hash);
    let start_a = || {
        Broker::start(BrokerOpts {
            policy: Some(&a_policy),
            data_dir: Some(a_data.path().join("data")),
            ..Default::default()
        })
    };
    let a = start_a();

    // Not signed in: nothing is sent with a token, the agent is not served b's tools, the
    // operator sees why.
    let s = wait_status(&a, "waiting for a sign-in", |s| s["login"]["*"]["state"] == "login_needed");
    assert_eq!(s["health"], "down", "{s}");
    assert!(s["login"]["*"]["why"].as_str().unwrap().contains("no operator has signed in"), "{s}");
    let v = call(&a.api, &worker, "b.task_info");
    let text = v["result"]["content"][0]["text"].as_str().unwrap_or_default();
    assert!(v["result"]["isError"] == true && text.contains("remote \"b\" is down"), "not served: {v}");
    assert!(!text.contains("no operator has signed in"), "the agent got the operator's reason: {v}");
    assert_eq!(audit_events(&a, "remote_login_needed").len(), 1, "told once");

    // A bad sign-in request changes nothing.
    let r = local_request(&a.socket, "POST", "/v1/remotes/nope/login", b"");
    assert_eq!(r.status, 404, "{}", r.text());
    let r = local_request(&a.socket, "POST", "/v1/remotes/b/login", br#"{"agent": "worker"}"#);
    assert_eq!(r.status, 400, "b has one sign-in for all agents: {}", r.text());
    let r = local_request(
        &a.socket,
        "POST",
        "/v1/remotes/login/complete",
        br#"{"url": "http://127.0.0.1/x?code=c&state=forged"}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("no sign-in is waiting"), "{}", r.text());

    // The operator signs in with the CLI; B's operator gives consent in B's console.
    let mut cli = std::process::Command::new(ephyr_bin())
        .args(["remote", "login", "b", "--socket", a.socket.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(cli.stdout.take().unwrap());
    let url = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "the CLI printed no URL");
        if let Some(u) = line.trim().strip_prefix("http://") {
            break format!("http://{u}");
        }
    };
    assert!(url.contains("/oauth/authorize?") && url.contains("code_challenge_method=S256"), "{url}");
    assert!(url.contains(&format!("resource=http%3A%2F%2F{}%2Fmcp", b.api.replace(':', "%3A"))), "RFC 8707: {url}");
    let back = consent(&url, ("alice", ALICE_PW), "reader", true);
    assert!(back.starts_with("http://127.0.0.1/ephyr/oauth/callback?"), "{back}");
    writeln!(cli.stdin.take().unwrap(), "{back}").unwrap();
    let done = cli.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(done.status.success(), "{rest}{}", String::from_utf8_lossy(&done.stderr));
    assert!(rest.contains("remote b: signed in"), "{rest}");
    // The same redirect cannot be used twice.
    let body = serde_json::to_vec(&json!({ "url": back })).unwrap();
    let r = local_request(&a.socket, "POST", "/v1/remotes/login/complete", &body);
    assert_eq!(r.status, 400, "{}", r.text());

    let s = wait_status(&a, "connected", |s| s["health"] == "connected");
    assert_eq!(s["login"]["*"]["state"], "signed_in", "{s}");
    let info = tool_call(&a.api, &worker, "b.task_info", json!({})).unwrap();
    assert!(info.to_string().contains("task"), "B answered as the enrolled agent: {info}");
    let logins = audit_events(&a, "remote_login");
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0]["decision"], "allow", "{}", logins[0]);

    // Sealed: no file of A's data dir holds a token in the clear.
    let sealed = a_data.path().join("data/state/remote-tokens/b.sealed");
    assert!(sealed.exists());
    for (path, bytes) in all_files(&a_data.path().join("data")) {
        for needle in [&b"access_token"[..], b"refresh_token", b"ephyr_rt_", b"ephyr_cs_", b"mac_"] {
            let found = bytes.windows(needle.len()).any(|w| w == needle);
            assert!(!found, "{} in the clear in {}", String::from_utf8_lossy(needle), path.display());
        }
    }

    // Refreshed and rotated: two more calls, each with a fresh token from a rotated refresh
    // token (a reuse would make B revoke the grant).
    tool_call(&a.api, &worker, "b.task_info", json!({})).unwrap();
    tool_call(&a.api, &worker, "b.task_info", json!({})).unwrap();
    let refreshed = |b: &Broker| {
        audit_events(b, "oauth_token_issued").iter().filter(|e| e["action"]["grant_type"] == "refresh_token").count()
    };
    assert!(refreshed(&b) >= 2, "A refreshed its token at B");
    assert!(audit_events(&b, "oauth_refresh_reused").is_empty(), "never a refresh token twice");

    // A restart opens the sealed sign-in, with the latest refresh token.
    drop(a);
    let a = start_a();
    wait_status(&a, "connected after the restart", |s| s["health"] == "connected");
    let before = refreshed(&b);
    tool_call(&a.api, &worker, "b.task_info", json!({})).unwrap();
    assert!(refreshed(&b) > before, "refreshed after the restart");
    assert!(audit_events(&b, "oauth_refresh_reused").is_empty(), "the kept refresh token was the newest");

    // B suspends the agent it enrolled at the consent: A's operator is told, A's agent is not
    // given B's reason.
    let agents: Value = serde_json::from_slice(&local_request(&b.socket, "GET", "/v1/agents", b"").body).unwrap();
    let enrolled = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["template"] == "reader")
        .unwrap_or_else(|| panic!("{agents}"))["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = local_request(
        &b.socket,
        "POST",
        &format!("/v1/agents/{enrolled}/suspend"),
        br#"{"reason":"secret-reason-77"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // (Refused at the call, or no longer served if a re-read saw the refusal first.)
    let v = call(&a.api, &worker, "b.task_info");
    let text = v.to_string();
    let refused = v["result"]["isError"] == true || v["error"].is_object();
    assert!(refused && !text.contains("secret-reason-77") && !text.contains("suspended"), "{text}");
    let s = wait_status(&a, "asking for a sign-in", |s| s["login"]["*"]["state"] == "login_needed");
    assert!(s["login"]["*"]["why"].as_str().is_some(), "{s}");
    assert!(!audit_events(&a, "remote_login_needed").is_empty());

    // A forged sealed file does not open: the remote is not called, nothing panics.
    drop(a);
    std::fs::write(&sealed, b"forged sealed blob").unwrap();
    let a = start_a();
    let s = wait_status(&a, "refusing the forged file", |s| s["health"] == "down");
    assert!(s["error"].as_str().unwrap_or_default().contains("cannot be opened"), "{s}");
    let v = call(&a.api, &worker, "b.task_info");
    assert!(v["result"]["isError"] == true && !v.to_string().contains("cannot be opened"), "{v}");
    // Signing out removes it.
    let r = local_request(&a.socket, "POST", "/v1/remotes/b/logout", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!sealed.exists());
    assert_eq!(audit_events(&a, "remote_logout").len(), 1);

    // The console: A's operator signs in again (B's operator consents to a new agent), pasting
    // the address the browser ended on into the console's form.
    let mut c = ConsoleClient::new(&a.dashboard);
    assert_eq!(c.login("olga", "olga password 12345").status, 303);
    let view = c.get("/remotes").text();
    assert!(view.contains("not signed in") && view.contains("/remotes/b/login"), "{view}");
    let csrf = c.csrf();
    let page = c.post("/remotes/b/login", &format!("csrf={csrf}"), &[]).text();
    let at = page.find("href=\"http://").expect("a link to the authorization server") + 6;
    let link = page[at..at + page[at..].find('"').unwrap()].replace("&amp;", "&");
    let back = consent(&link, ("alice", ALICE_PW), "reader", true);
    let form = form_encode(&[("csrf", &csrf), ("url", &back)]);
    let done = c.post("/remotes/login/complete", &form, &[]).text();
    assert!(done.contains("signed in to remote b"), "{done}");
    wait_status(&a, "connected through the console's sign-in", |s| s["health"] == "connected");
    tool_call(&a.api, &worker, "b.task_info", json!({})).unwrap();
}

/// `per_agent: true`: each agent of A has its own sign-in at B (B enrolls one agent per
/// consent); an agent without one is refused with a sentence that names it, and calls of two
/// agents reach B as two different agents, each on its own session.
#[test]
fn a_remote_with_a_sign_in_per_agent_carries_each_callers_own_token() {
    let (_, bot_hash) = agent_key("bot");
    let b = start(&policy(9, &bot_hash));
    let (w1, h1) = agent_key("w1");
    let (w2, h2) = agent_key("w2");
    let a_policy = format!(
        "version: 1\nnetwork: {{ allow: ['127.0.0.1/32'] }}\n\
         remotes:\n  b: {{ url: \"http://{}/mcp\", oauth: {{ per_agent: true }} }}\n\
         agents:\n  w1: {{ api_key_hash: \"{h1}\", remotes: {{ b: {{}} }} }}\n  w2: {{ api_key_hash: \"{h2}\", remotes: {{ b: {{}} }} }}\n",
        b.api
    );
    let a = Broker::start(BrokerOpts { policy: Some(&a_policy), ..Default::default() });
    let sign_in = |agent: &str| {
        let body = serde_json::to_vec(&json!({ "agent": agent })).unwrap();
        let r = local_request(&a.socket, "POST", "/v1/remotes/b/login", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let url = serde_json::from_slice::<Value>(&r.body).unwrap()["url"].as_str().unwrap().to_owned();
        let back = consent(&url, ("alice", ALICE_PW), "reader", true);
        let body = serde_json::to_vec(&json!({ "url": back })).unwrap();
        let r = local_request(&a.socket, "POST", "/v1/remotes/login/complete", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(serde_json::from_slice::<Value>(&r.body).unwrap()["agent"], agent);
    };
    let r = local_request(&a.socket, "POST", "/v1/remotes/b/login", br#"{"agent": "nobody"}"#);
    assert_eq!(r.status, 404, "{}", r.text());

    sign_in("w1");
    wait_status(&a, "connected with w1's sign-in", |s| s["health"] == "connected");
    let one = tool_call(&a.api, &w1, "b.task_info", json!({})).unwrap();
    let e = tool_call(&a.api, &w2, "b.task_info", json!({})).unwrap_err();
    assert!(e.contains("for agent w2") && e.contains("operator has been told"), "{e}");
    let s = remote_status(&a);
    assert_eq!(s["login"]["w1"]["state"], "signed_in", "{s}");
    assert_eq!(s["login"]["w2"]["state"], "login_needed", "{s}");

    sign_in("w2");
    let two = tool_call(&a.api, &w2, "b.task_info", json!({})).unwrap();
    let agent_of = |v: &Value| v["task"]["agent"].as_str().unwrap_or_else(|| panic!("{v}")).to_owned();
    assert_ne!(agent_of(&one), agent_of(&two), "two agents at B: {one} / {two}");
    assert_eq!(agent_of(&tool_call(&a.api, &w1, "b.task_info", json!({})).unwrap()), agent_of(&one));
    let enrolled = audit_events(&b, "oauth_consent").len();
    assert_eq!(enrolled, 2, "one consent per agent");
}

/// A hostile remote behind its own authorization server echoes the access token the broker
/// sent it: the agent gets the answer with the token overwritten, in the text and in
/// structured content.
#[test]
fn a_remote_that_echoes_its_access_token_does_not_hand_it_to_the_agent() {
    let port = free_port();
    let mut cmd = python("oauth_echo_server.py");
    cmd.arg(port.to_string()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut server = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the echo server did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (key, hash) = agent_key("w");
    let a_policy = format!(
        "version: 1\nnetwork: {{ allow: ['127.0.0.1/32'] }}\n\
         remotes:\n  echo: {{ url: \"http://127.0.0.1:{port}/mcp\", oauth: {{}} }}\n\
         agents:\n  w: {{ api_key_hash: \"{hash}\", remotes: {{ echo: {{}} }} }}\n"
    );
    let a = Broker::start(BrokerOpts { policy: Some(&a_policy), ..Default::default() });
    let r = local_request(&a.socket, "POST", "/v1/remotes/echo/login", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let url = serde_json::from_slice::<Value>(&r.body).unwrap()["url"].as_str().unwrap().to_owned();
    let (host, path) = split(&url);
    let back = http_request(&host, "GET", &path, &[], b"").header("location").unwrap().to_owned();
    let body = serde_json::to_vec(&json!({ "url": back })).unwrap();
    let r = local_request(&a.socket, "POST", "/v1/remotes/login/complete", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..100 {
        let st: Value = serde_json::from_slice(&local_request(&a.socket, "GET", "/v1/status", b"").body).unwrap();
        if st["remotes"]["echo"]["health"] == "connected" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let v =
        mcp_request(&a.api, &key, "tools/call", Some("echo.whoami"), json!({"name": "echo.whoami", "arguments": {}}));
    let text = v.to_string();
    assert!(v["result"]["content"][0]["text"].as_str().unwrap().starts_with("you sent"), "{text}");
    assert!(!text.contains("echo-secret-token-4242"), "the token reached the agent: {text}");
    let _ = server.kill();
    let _ = server.wait();
}
