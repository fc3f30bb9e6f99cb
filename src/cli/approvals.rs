//! `ephyr approvals [--follow]`, `ephyr approve ID` and `ephyr deny ID --reason ...`: the
//! approval queue through the running broker's local socket (root or the broker's user, who
//! answer as `operator:uid<N>` where a rule lists `local` among its approvers).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::client;

fn fetch(socket: &Path) -> Result<Value, String> {
    let (status, v) = client::request(socket, http::Method::GET, "/v1/approvals", None)?;
    if !status.is_success() {
        return Err(client::refusal(status, &v));
    }
    Ok(v)
}

/// One request on one or two lines.
fn line(a: &Value) -> String {
    let s = |k: &str| a[k].as_str().unwrap_or("").to_owned();
    let votes: Vec<String> = a["votes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let verb = if v["approve"].as_bool() == Some(true) { "approved" } else { "denied" };
            let why = v["reason"].as_str().filter(|r| !r.is_empty()).map(|r| format!(": {r}")).unwrap_or_default();
            format!("{verb} by {}{why}", v["by"].as_str().unwrap_or("?"))
        })
        .collect();
    let mut out = format!(
        "{} {:<8} {}\n    rules {} · needs {} · asked {} · expires {}",
        s("id"),
        s("state"),
        s("summary"),
        a["rules"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        a["needed"],
        s("asked_at"),
        s("expires"),
    );
    if let Some(t) = a["task"].as_str() {
        out.push_str(&format!(" · task {t}"));
    }
    if !votes.is_empty() {
        out.push_str(&format!("\n    {}", votes.join("; ")));
    }
    out
}

/// `approvals [--all] [--json] [--follow]`: the queue (open requests; `--all`: a day of closed
/// ones too). `--follow` prints each request when it appears or changes, until interrupted.
pub fn list(socket: &Path, all: bool, json: bool, follow: bool) -> Result<(), String> {
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    loop {
        let v = fetch(socket)?;
        let list: Vec<Value> = v["approvals"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| all || follow || a["state"] == "pending")
            .collect();
        if !follow {
            if json {
                println!("{}", Value::Array(list));
            } else if list.is_empty() {
                println!("no approval requests are waiting");
            } else {
                for a in &list {
                    println!("{}", line(a));
                }
            }
            return Ok(());
        }
        // Oldest first, so the stream reads in order.
        for a in list.iter().rev() {
            let id = a["id"].as_str().unwrap_or("").to_owned();
            let state = format!("{}/{}", a["state"], a["votes"].as_array().map_or(0, Vec::len));
            if seen.get(&id) != Some(&state) {
                if json {
                    println!("{a}");
                } else {
                    println!("{}", line(a));
                }
                seen.insert(id, state);
            }
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `approve ID [--waive DURATION] [--reason TEXT]` (`approve`) or `deny ID --reason TEXT`.
pub fn decide(
    socket: &Path,
    id: &str,
    approve: bool,
    reason: &str,
    waiver: Option<&str>,
    json: bool,
) -> Result<(), String> {
    let body = serde_json::json!({ "id": id, "approve": approve, "reason": reason, "waiver": waiver });
    let (status, v) = client::request(socket, http::Method::POST, "/v1/approvals/decide", Some(&body))?;
    if !status.is_success() {
        return Err(client::refusal(status, &v));
    }
    if json {
        println!("{v}");
        return Ok(());
    }
    let a = &v["approval"];
    match v["decided"].as_str() {
        Some("approved") => {
            let waiver = a["waiver_until"]
                .as_str()
                .map(|w| format!("; the same action needs no approval until {w}"))
                .unwrap_or_default();
            println!(
                "approved {id}: the agent's next identical call runs (until {}){waiver}",
                a["expires"].as_str().unwrap_or("?")
            );
        }
        Some("partly") => {
            println!("approved {id} (1 of {}): four eyes, another approver must approve too", a["needed"])
        }
        _ => println!("denied {id}: the agent is told your reason"),
    }
    Ok(())
}
