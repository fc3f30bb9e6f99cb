//! `ephyr freeze|unfreeze KIND NAME` and `ephyr freezes`: the kill switch, through the running
//! broker's local socket (root or the broker's user).

use std::path::Path;

use super::client;

/// `freeze KIND NAME [--reason TEXT]` (`on`) or `unfreeze KIND NAME`.
pub fn set(socket: &Path, kind: &str, name: &str, reason: &str, on: bool, json: bool) -> Result<(), String> {
    let path = if on { "/v1/freeze" } else { "/v1/unfreeze" };
    let mut body = serde_json::json!({ "kind": kind, "name": name });
    if on {
        body["reason"] = reason.into();
    }
    let (status, v) = client::request(socket, http::Method::POST, path, Some(&body))?;
    if !status.is_success() {
        return Err(client::refusal(status, &v));
    }
    if json {
        println!("{v}");
        return Ok(());
    }
    let fx = &v["effects"];
    match (on, fx["already"].as_bool(), v["was_frozen"].as_bool()) {
        (true, Some(true), _) => println!("{kind} {name} was frozen already"),
        (true, _, _) => println!(
            "{kind} {name} is frozen: {} task(s) revoked, {} certificate(s) revoked, {} SSH session(s) closed, {} MCP session(s) ended, {} approval request(s) denied",
            fx["tasks_revoked"],
            fx["certs_revoked"],
            fx["ssh_sessions_closed"],
            fx["mcp_sessions_ended"],
            fx["approvals_denied"]
        ),
        (false, _, Some(false)) => println!("{kind} {name} was not frozen"),
        (false, _, _) => println!("{kind} {name} is no longer frozen (revoked tasks and certificates stay revoked)"),
    }
    Ok(())
}

/// `freezes [--json]`: what is frozen.
pub fn list(socket: &Path, json: bool) -> Result<(), String> {
    let (status, v) = client::request(socket, http::Method::GET, "/v1/freezes", None)?;
    if !status.is_success() {
        return Err(client::refusal(status, &v));
    }
    if json {
        println!("{v}");
        return Ok(());
    }
    let list = v["frozen"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("nothing is frozen");
    }
    for f in list {
        let s = |k: &str| f[k].as_str().unwrap_or("").to_owned();
        let why = if s("reason").is_empty() { String::new() } else { format!(": {}", s("reason")) };
        println!("{:<8} {:<28} by {} at {}{why}", s("kind"), s("name"), s("by"), s("at"));
    }
    Ok(())
}
