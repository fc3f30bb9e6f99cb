//! `ephyr agent`: the agent directory through the running broker's local socket (root or the
//! broker's user) — `list`, `show`, `enroll`, `suspend`, `resume`, `revoke`, `reap` — and `join`,
//! which an agent's host runs against the broker's MCP/API listener with its join token.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use super::client;

fn ok(status: http::StatusCode, v: serde_json::Value) -> Result<serde_json::Value, String> {
    if status.is_success() { Ok(v) } else { Err(client::refusal(status, &v)) }
}

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap_or("-").to_owned()
}

/// `agent list [--json]`.
pub fn list(socket: &Path, json: bool) -> Result<(), String> {
    let (status, v) = client::request(socket, http::Method::GET, "/v1/agents", None)?;
    let v = ok(status, v)?;
    if json {
        println!("{v}");
        return Ok(());
    }
    println!("{:<24} {:<9} {:<15} {:<12} {:<12} LAST USED", "AGENT", "SOURCE", "STATE", "OWNER", "TEMPLATE");
    for a in v["agents"].as_array().into_iter().flatten() {
        let frozen = if a["frozen"] == true { " (frozen)" } else { "" };
        println!(
            "{:<24} {:<9} {:<15} {:<12} {:<12} {}",
            s(a, "name"),
            s(a, "source"),
            format!("{}{frozen}", s(a, "state")),
            s(a, "owner"),
            s(a, "template"),
            s(a, "last_used")
        );
    }
    Ok(())
}

/// `agent show NAME [--json]`.
pub fn show(socket: &Path, name: &str, json: bool) -> Result<(), String> {
    let (status, v) = client::request(socket, http::Method::GET, &format!("/v1/agents/{name}"), None)?;
    let v = ok(status, v)?;
    if json {
        println!("{v}");
        return Ok(());
    }
    for k in [
        "name",
        "source",
        "state",
        "since",
        "by",
        "reason",
        "owner",
        "template",
        "enrolled",
        "join_expires",
        "joined",
        "last_used",
    ] {
        if !v[k].is_null() {
            println!("{k:<13} {}", s(&v, k));
        }
    }
    let grants: Vec<&str> = v["grants"].as_array().into_iter().flatten().filter_map(|g| g.as_str()).collect();
    println!("{:<13} {}", "grants", if grants.is_empty() { "none".into() } else { grants.join(", ") });
    if let Some(m) = v["exercised"].as_object().filter(|m| !m.is_empty()) {
        for (g, t) in m {
            println!("{:<13} {g} at {}", "used", t.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// `agent enroll --template T --owner O [--name N] [--ttl D] [--json]`: prints the join token.
pub fn enroll(
    socket: &Path,
    template: &str,
    owner: &str,
    name: Option<&str>,
    ttl: Option<&str>,
    json: bool,
) -> Result<(), String> {
    let mut body = serde_json::json!({ "template": template, "owner": owner });
    if let Some(n) = name {
        body["name"] = n.into();
    }
    if let Some(t) = ttl {
        body["ttl"] = t.into();
    }
    let (status, v) = client::request(socket, http::Method::POST, "/v1/agents/enroll", Some(&body))?;
    let v = ok(status, v)?;
    if json {
        println!("{v}");
        return Ok(());
    }
    eprintln!(
        "agent {} enrolled (template {}, owner {}); its join token works once, until {}:",
        s(&v, "agent"),
        s(&v, "template"),
        s(&v, "owner"),
        s(&v, "expires")
    );
    println!("{}", s(&v, "join_token"));
    eprintln!("on the agent's host: ephyr agent join --url http://BROKER:8554 --token-file FILE --out KEYFILE");
    Ok(())
}

/// `agent suspend|resume|revoke NAME [--reason TEXT]`.
pub fn transition(socket: &Path, verb: &str, name: &str, reason: &str, json: bool) -> Result<(), String> {
    let body = serde_json::json!({ "reason": reason });
    let (status, v) = client::request(socket, http::Method::POST, &format!("/v1/agents/{name}/{verb}"), Some(&body))?;
    let v = ok(status, v)?;
    if json {
        println!("{v}");
        return Ok(());
    }
    let fx = &v["effects"];
    println!(
        "agent {name}: {} → {} ({} task(s) revoked, {} certificate(s) revoked, {} SSH and {} MCP session(s) ended)",
        s(&v, "from"),
        s(&v, "to"),
        fx["tasks_revoked"],
        fx["certs_revoked"],
        fx["ssh_sessions_closed"],
        fx["mcp_sessions_ended"]
    );
    Ok(())
}

/// `agent reap [--apply] [--json]`.
pub fn reap(socket: &Path, apply: bool, json: bool) -> Result<(), String> {
    let body = serde_json::json!({ "apply": apply });
    let (status, v) = client::request(socket, http::Method::POST, "/v1/agents/reap", Some(&body))?;
    let v = ok(status, v)?;
    if json {
        println!("{v}");
        return Ok(());
    }
    let steps = v["steps"].as_array().cloned().unwrap_or_default();
    if steps.is_empty() {
        println!("no agent is due a lifecycle step");
    }
    for st in &steps {
        let verb = if apply { "moved" } else { "would move" };
        println!("{} {verb} {} → {}: {}", s(st, "agent"), s(st, "from"), s(st, "to"), s(st, "why"));
    }
    for r in v["results"].as_array().into_iter().flatten().filter(|r| r["ok"] == false) {
        println!("{}: not moved: {}", s(r, "agent"), s(r, "error"));
    }
    for d in v["drift"].as_array().into_iter().flatten() {
        let unused: Vec<&str> = d["unused"].as_array().into_iter().flatten().filter_map(|g| g.as_str()).collect();
        println!(
            "{} holds grants it has not used: {}; suggested: {}",
            s(d, "agent"),
            unused.join(", "),
            s(d, "suggestion")
        );
    }
    if !apply && !steps.is_empty() {
        println!("(dry run: `ephyr agent reap --apply` carries it out)");
    }
    Ok(())
}

/// `agent join --url URL (--token-file FILE | stdin) [--out FILE]`: exchanges the join token
/// for the agent's API key, written to `--out` (mode 0600, never overwritten) or printed.
pub fn join(
    url: &str,
    token_file: Option<&Path>,
    out: Option<&Path>,
    key_out: Option<&Path>,
    attestation_file: Option<&Path>,
) -> Result<(), String> {
    let token = match token_file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?,
        None => {
            let mut t = String::new();
            std::io::stdin().read_line(&mut t).map_err(|e| format!("reading the join token from stdin: {e}"))?;
            t
        }
    };
    let token = crate::secret::SecretString::new(token.trim().to_owned());
    if !token.expose().starts_with(crate::broker::agents::JOIN_PREFIX) {
        return Err(format!("that is not a join token (they start with {})", crate::broker::agents::JOIN_PREFIX));
    }
    for o in [out, key_out].into_iter().flatten() {
        if o.exists() {
            return Err(format!("{} exists; not overwriting it", o.display()));
        }
    }
    let mut req = serde_json::json!({ "join_token": token.expose() });
    if let Some(f) = attestation_file {
        let jwt = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        req["attestation"] = jwt.trim().into();
    }
    // A key pair made here: the private key never leaves this host; the broker gets the public one.
    let pair = match key_out {
        Some(_) => {
            let (pkcs8, jwk) = p256_key()?;
            req["jwk"] = jwk;
            Some(pkcs8)
        }
        None => None,
    };
    // Spent by this request whatever happens: a copy left in a buffer is worth nothing after.
    let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
    let endpoint = format!("{}/v1/agents/join", url.trim_end_matches('/'));
    let (status, answer) = client::request_tcp(
        http::Method::POST,
        &endpoint,
        &[("content-type", "application/json")],
        body,
        std::time::Duration::from_secs(30),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&answer)
        .map_err(|e| format!("the broker answered {status} with a non-JSON body: {e}"))?;
    let v = ok(status, v)?;
    if let (Some(path), Some(pkcs8)) = (key_out, pair) {
        let pem = pem_private_key(&pkcs8);
        write_private(path, pem.expose().as_bytes())?;
        eprintln!(
            "joined as agent {} with a key pair; its private key is in {} (0600). It gets tokens at {}/oauth/token \
             with client_credentials and a private_key_jwt assertion (client_id {}, ES256).",
            s(&v, "agent"),
            path.display(),
            url.trim_end_matches('/'),
            s(&v, "client_id")
        );
        return Ok(());
    }
    let key = crate::secret::SecretString::new(s(&v, "api_key"));
    match out {
        Some(o) => {
            write_private(o, format!("{}\n", key.expose()).as_bytes())?;
            eprintln!("joined as agent {}; its API key is in {} (0600)", s(&v, "agent"), o.display());
        }
        None => {
            eprintln!("joined as agent {}; its API key (shown once):", s(&v, "agent"));
            println!("{}", key.expose());
        }
    }
    Ok(())
}

/// Writes a new file readable by its owner only (never over an existing one).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// A fresh P-256 key pair: its PKCS#8 document and the public key as a JWK.
fn p256_key() -> Result<(zeroize::Zeroizing<Vec<u8>>, serde_json::Value), String> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| "no key pair (no randomness?)")?;
    let pkcs8 = zeroize::Zeroizing::new(doc.as_ref().to_vec());
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).map_err(|_| "unusable key pair")?;
    // Uncompressed point: 0x04 | X (32) | Y (32).
    let point = pair.public_key().as_ref();
    let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
    let jwk = serde_json::json!({ "kty": "EC", "crv": "P-256", "alg": "ES256", "x": b64(&point[1..33]), "y": b64(&point[33..65]) });
    Ok((pkcs8, jwk))
}

/// PKCS#8 as PEM (`PRIVATE KEY`), as the SDKs' JWT signers read it.
fn pem_private_key(der: &[u8]) -> crate::secret::SecretString {
    let b64 = zeroize::Zeroizing::new(data_encoding::BASE64.encode(der));
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap_or(""));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    crate::secret::SecretString::new(pem)
}
