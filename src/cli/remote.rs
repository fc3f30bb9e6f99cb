//! `ephyr remote review NAME` and `ephyr remote approve NAME [TOOL]`: the operator's side of tool
//! pinning (`broker::federation::pins`). `ephyr remote login NAME` and `logout`: the operator's
//! side of signing in to a remote protected by OAuth (`broker::federation::auth`).
//!
//! What runs here: one request to the broker's local socket (root or the broker's user). Also
//! the hidden `ephyr __remote-sandbox SPEC`, the process the broker starts for a stdio remote,
//! which confines itself and executes the remote's command (`broker::federation::confine`).

use std::path::Path;

use serde_json::Value;

use super::client;

/// `__remote-sandbox SPEC`: confines this process and executes the command; returns only with
/// the reason it could not (the broker logs it from standard error).
pub fn sandbox(spec: &str) -> String {
    match serde_json::from_str(spec) {
        Ok(spec) => match crate::broker::federation::confine::enter(&spec) {
            Ok(never) => match never {},
            Err(e) => format!("remote sandbox: {e}"),
        },
        Err(e) => format!("remote sandbox: the spec does not parse: {e}"),
    }
}

/// Shows the quarantined tools of `name`: a diff against the pinned definition and flags.
pub fn review(socket: &Path, name: &str, json: bool) -> Result<u8, String> {
    let v = client::request_ok(socket, http::Method::GET, &format!("/v1/remotes/{name}/review"), None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(0);
    }
    let list = v["quarantined"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("remote {name}: nothing quarantined");
        return Ok(0);
    }
    for q in &list {
        let tool = q["tool"].as_str().unwrap_or("?");
        println!("{name}.{tool}: changed since it was approved (- pinned, + now)");
        for l in q["diff"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            println!("  {l}");
        }
        for f in q["flags"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            println!("  WARNING: {f}");
        }
        println!("  approve with: ephyr remote approve {name} {tool}\n");
    }
    Ok(0)
}

/// Approves the quarantined `tool` of `name` (all of them without one).
pub fn approve(socket: &Path, name: &str, tool: Option<&str>) -> Result<u8, String> {
    let path = match tool {
        Some(t) => format!("/v1/remotes/{name}/approve?tool={t}"),
        None => format!("/v1/remotes/{name}/approve"),
    };
    let v = client::request_ok(socket, http::Method::POST, &path, None)?;
    for t in v["approved"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        println!("approved {name}.{t}: pinned and served again");
    }
    Ok(0)
}

/// Starts a sign-in to `name` and prints the URL to open; finishes it with the address the
/// browser ended on (`url`, or pasted on standard input), unless the broker's own callback did.
pub fn login(socket: &Path, name: &str, agent: Option<&str>, url: Option<&str>) -> Result<u8, String> {
    let body = serde_json::json!({ "agent": agent });
    let v = client::request_ok(socket, http::Method::POST, &format!("/v1/remotes/{name}/login"), Some(&body))?;
    let open = v["url"].as_str().unwrap_or_default();
    let back = v["redirect_uri"].as_str().unwrap_or_default();
    println!("Open this address in a browser and sign in (within 10 minutes):\n\n  {open}\n");
    let ended = match url {
        Some(u) => u.to_owned(),
        None => {
            println!("The browser is then sent to {back}.");
            println!("If the broker's page says \"Signed in\", press Enter. Otherwise paste the whole address");
            println!("the browser ended on (even if the page did not load) and press Enter:");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map_err(|e| format!("reading the address: {e}"))?;
            line.trim().to_owned()
        }
    };
    if ended.is_empty() {
        let st = client::request_ok(socket, http::Method::GET, "/v1/status", None)?;
        let who = agent.unwrap_or("*");
        let login = &st["remotes"][name]["login"][who];
        return if login["state"] == "signed_in" {
            println!("remote {name}: signed in");
            Ok(0)
        } else {
            Err(format!(
                "remote {name}: not signed in yet ({})",
                login["why"].as_str().unwrap_or("no redirect reached the broker")
            ))
        };
    }
    let done = client::request_ok(
        socket,
        http::Method::POST,
        "/v1/remotes/login/complete",
        Some(&serde_json::json!({ "url": ended })),
    )?;
    let whom = done["agent"].as_str().map_or(String::new(), |a| format!(" for agent {a}"));
    println!("remote {name}: signed in{whom}");
    Ok(0)
}

/// Forgets the sign-in to `name` (for `agent`).
pub fn logout(socket: &Path, name: &str, agent: Option<&str>) -> Result<u8, String> {
    let body = serde_json::json!({ "agent": agent });
    let v = client::request_ok(socket, http::Method::POST, &format!("/v1/remotes/{name}/logout"), Some(&body))?;
    if v["removed"] == true {
        println!("remote {name}: signed out");
    } else {
        println!("remote {name}: there was no sign-in");
    }
    Ok(0)
}
