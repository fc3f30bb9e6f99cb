//! `ephyr whoami`, `ephyr targets`, `ephyr certs`, `ephyr tasks`: what a running broker knows,
//! for a person (default) or a program (`--json`).
//!
//! What runs here: one request each to the broker's local socket (`GET /v1/whoami` for anyone;
//! the others for root and the broker's user), then formatting.

use std::path::Path;

use serde_json::Value;

use super::client;

fn get(socket: &Path, path: &str) -> Result<Value, String> {
    client::request_ok(socket, http::Method::GET, path, None)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// `ephyr whoami`.
pub fn whoami(socket: &Path, json: bool) -> Result<u8, String> {
    let v = get(socket, "/v1/whoami")?;
    if json {
        print_json(&v);
        return Ok(0);
    }
    let uid = v["uid"].as_u64().map(|u| u as u32);
    let name = uid.and_then(crate::users::name_of).unwrap_or_else(|| "?".into());
    println!(
        "uid {} ({name}) on the broker at {} (ephyr {}, MCP http://{}/mcp)",
        uid.map_or("-".into(), |u| u.to_string()),
        socket.display(),
        s(&v["broker"]["version"]),
        s(&v["broker"]["listen"])
    );
    println!(
        "operator: {}",
        if v["operator"] == true { "yes (status, certs, secrets, policy reload, revocations)" } else { "no" }
    );
    match v["agent"].as_str() {
        Some(a) => {
            let reach: Vec<String> = v["ssh"]
                .as_array()
                .map(|l| {
                    l.iter()
                        .map(|t| {
                            let roles: Vec<&str> = t["roles"]
                                .as_array()
                                .map(|r| r.iter().filter_map(Value::as_str).collect())
                                .unwrap_or_default();
                            format!("{} ({})", s(&t["target"]), roles.join(", "))
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!("agent: {a} (your uid; `ephyr exec` acts as it)");
            println!("  ssh: {}", if reach.is_empty() { "nothing".into() } else { reach.join(", ") });
        }
        None => println!(
            "agent: none (no enabled agent has `uid: {}`; add it to use `ephyr exec` from here)",
            uid.unwrap_or(0)
        ),
    }
    Ok(0)
}

/// `ephyr targets`.
pub fn targets(socket: &Path, json: bool) -> Result<u8, String> {
    let v = get(socket, "/v1/targets")?;
    if json {
        print_json(&v);
        return Ok(0);
    }
    let list = v["targets"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no targets in the policy");
    }
    for t in &list {
        println!(
            "{}  {}:{}{}  host key: {}",
            s(&t["name"]),
            s(&t["host"]),
            t["port"],
            if t["enabled"] == false { " (disabled)" } else { "" },
            s(&t["host_key"])
        );
        for r in t["roles"].as_array().into_iter().flatten() {
            let agents: Vec<&str> =
                r["agents"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            println!(
                "  {:<12} as {:<16} agents: {}",
                s(&r["role"]),
                s(&r["principal"]),
                if agents.is_empty() { "none".into() } else { agents.join(", ") }
            );
        }
    }
    Ok(0)
}

/// `ephyr certs`.
pub fn certs(socket: &Path, json: bool) -> Result<u8, String> {
    let v = get(socket, "/v1/certs")?;
    if json {
        print_json(&v);
        return Ok(0);
    }
    let list = v["certificates"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no live certificates");
        return Ok(0);
    }
    println!(
        "{:<16}  {:>20}  {:<12} {:<20} {:<10} {:<20} STATE",
        "SERIAL", "(DECIMAL)", "AGENT", "TARGET/ROLE", "PRINCIPAL", "VALID UNTIL"
    );
    for c in &list {
        let state = match (c["revoked"] == true, c["in_use"] == true) {
            (true, _) => "revoked (on the KRL)",
            (false, true) => "in use",
            _ => "idle",
        };
        let tr = if s(&c["target"]).is_empty() {
            "(operator)".to_owned()
        } else {
            format!("{}/{}", s(&c["target"]), s(&c["role"]))
        };
        println!(
            "{:<16}  {:>20}  {:<12} {:<20} {:<10} {:<20} {state}",
            s(&c["serial"]),
            s(&c["serial_decimal"]),
            s(&c["agent"]),
            tr,
            s(&c["principal"]),
            s(&c["valid_before"])
        );
    }
    Ok(0)
}

/// `ephyr tasks`: the task trees.
pub fn tasks(socket: &Path, json: bool) -> Result<u8, String> {
    let v = get(socket, "/v1/tasks")?;
    if json {
        print_json(&v);
        return Ok(0);
    }
    let list = v["tasks"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no live tasks");
        return Ok(0);
    }
    let ids: std::collections::BTreeSet<&str> = list.iter().filter_map(|t| t["id"].as_str()).collect();
    // Roots first (or tasks whose parent is gone), then each task's children under it.
    let roots: Vec<&Value> = list.iter().filter(|t| t["parent_id"].as_str().is_none_or(|p| !ids.contains(p))).collect();
    fn draw(t: &Value, all: &[Value], prefix: &str, last: bool, top: bool) {
        let mut marks = Vec::new();
        if t["is_revoked"] == true {
            marks.push("REVOKED".to_owned());
        }
        if t["holder_bound"] == true {
            marks.push("holder-bound".to_owned());
        }
        if t["can_delegate"] == true {
            marks.push("may delegate".to_owned());
        }
        let branch = if top {
            ""
        } else if last {
            "└─ "
        } else {
            "├─ "
        };
        println!(
            "{prefix}{branch}{} {} {:?} expires {} ({}s left){}",
            s(&t["id"]),
            s(&t["agent"]),
            s(&t["description"]),
            s(&t["expires_at"]),
            t["remaining_ttl"],
            if marks.is_empty() { String::new() } else { format!(" [{}]", marks.join(", ")) }
        );
        let kids: Vec<&Value> = all.iter().filter(|c| c["parent_id"] == t["id"]).collect();
        let next = if top { prefix.to_owned() } else { format!("{prefix}{}", if last { "   " } else { "│  " }) };
        for (i, k) in kids.iter().enumerate() {
            draw(k, all, &next, i + 1 == kids.len(), false);
        }
    }
    for r in roots {
        draw(r, &list, "", true, true);
    }
    Ok(0)
}
