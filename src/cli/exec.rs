//! `ephyr exec TARGET --role ROLE -- CMD`: run a command through the broker's `exec` tool, on
//! the broker host over the local socket (the caller's uid picks the agent, `SO_PEERCRED`) or
//! against a remote broker's MCP endpoint with a task token or API key.
//!
//! Prints the command's stdout and stderr to ours and exits with its exit code (124 when it
//! timed out, 125 when the broker refused or failed).

use std::io::Write as _;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::client;

/// Options.
#[derive(Debug, Default)]
pub struct ExecOptions {
    /// Target (not needed with a session).
    pub target: Option<String>,
    /// Role.
    pub role: Option<String>,
    /// An open session.
    pub session: Option<String>,
    /// Seconds.
    pub timeout: Option<u64>,
    /// The command (joined with spaces).
    pub command: String,
    /// Local socket.
    pub socket: PathBuf,
    /// Remote broker, e.g. `http://broker:8554`.
    pub url: Option<String>,
    /// Token or API key for `url`.
    pub token: Option<String>,
    /// Print the tool's JSON result.
    pub json: bool,
}

/// Exit code when the broker refused or failed.
pub const REFUSED: u8 = 125;

fn arguments(o: &ExecOptions) -> Value {
    let mut a = json!({ "command": o.command });
    for (k, v) in [("target", &o.target), ("role", &o.role), ("session_id", &o.session)] {
        if let Some(v) = v {
            a[k] = Value::from(v.as_str());
        }
    }
    if let Some(t) = o.timeout {
        a["timeout"] = Value::from(t);
    }
    a
}

fn local(o: &ExecOptions) -> Result<(bool, String), String> {
    let body = json!({ "name": "exec", "arguments": arguments(o) });
    let (status, v) = client::request(&o.socket, http::Method::POST, "/v1/tools/call", Some(&body))?;
    if !status.is_success() {
        return Err(format!(
            "{} ({status}): {}",
            v["error"].as_str().unwrap_or("error"),
            v["message"].as_str().unwrap_or("")
        ));
    }
    Ok((v["is_error"].as_bool().unwrap_or(true), v["text"].as_str().unwrap_or_default().to_owned()))
}

fn remote(o: &ExecOptions, url: &str) -> Result<(bool, String), String> {
    let token =
        o.token.clone().or_else(|| std::env::var("EPHYR_TOKEN").ok()).ok_or(
            "a remote broker needs a credential: set EPHYR_TOKEN (or pass --token) to a task token or API key",
        )?;
    let version = "2026-07-28";
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {
            "name": "exec", "arguments": arguments(o),
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": version,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": { "name": "ephyr-cli", "version": env!("CARGO_PKG_VERSION") },
            },
        },
    });
    let bearer = format!("Bearer {token}");
    // Either the broker's base URL or the MCP endpoint `serve` prints.
    let base = url.trim_end_matches('/');
    let endpoint = if base.ends_with("/mcp") { base.to_owned() } else { format!("{base}/mcp") };
    let (status, bytes) = client::post_tcp(
        &endpoint,
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("mcp-protocol-version", version),
            ("mcp-method", "tools/call"),
            ("mcp-name", "exec"),
        ],
        serde_json::to_vec(&body).unwrap_or_default(),
    )?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|_| format!("{endpoint} answered {status}: {}", String::from_utf8_lossy(&bytes).trim()))?;
    if let Some(e) = v.get("error") {
        return Err(format!("{endpoint} ({status}): {}", e["message"].as_str().unwrap_or("error")));
    }
    let r = &v["result"];
    let text = r["content"][0]["text"].as_str().unwrap_or_default().to_owned();
    Ok((r["isError"].as_bool().unwrap_or(false), text))
}

/// Runs it; returns the exit code.
pub fn run(o: &ExecOptions) -> Result<u8, String> {
    let (is_error, text) = match &o.url {
        Some(url) => remote(o, url)?,
        None => local(o)?,
    };
    if is_error {
        eprintln!("ephyr exec: {text}");
        return Ok(REFUSED);
    }
    if o.json {
        println!("{text}");
        return Ok(0);
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("unexpected answer: {e}"))?;
    let _ = std::io::stdout().write_all(v["stdout"].as_str().unwrap_or_default().as_bytes());
    let _ = std::io::stderr().write_all(v["stderr"].as_str().unwrap_or_default().as_bytes());
    let _ = std::io::stdout().flush();
    if v["timed_out"].as_bool() == Some(true) {
        return Ok(124);
    }
    Ok(match v["exit_code"].as_i64() {
        Some(c) if (0..=255).contains(&c) => c as u8,
        _ => 255,
    })
}
