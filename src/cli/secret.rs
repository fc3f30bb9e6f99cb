//! `ephyr secret set|list|rm`: the sealed store of upstream credentials, through the running
//! broker's local socket (the signer, which alone holds the sealing key, seals the value). The
//! value is read from stdin, never from the command line, and is zeroized after sending.

use std::io::{IsTerminal as _, Read as _};
use std::path::Path;

use super::client;

use client::refusal as failed;

/// `ephyr secret set NAME` (value on stdin).
pub fn set(socket: &Path, name: &str) -> Result<(), String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(format!(
            "the secret is read from stdin, not typed here: pipe it in, e.g. `read -rs V && printf %s \"$V\" | ephyr secret set {name}` \
             or `ephyr secret set {name} < file`"
        ));
    }
    let mut value = zeroize::Zeroizing::new(Vec::new());
    stdin
        .lock()
        .take(crate::broker::secrets::MAX_SECRET as u64 + 3)
        .read_to_end(&mut value)
        .map_err(|e| format!("reading stdin: {e}"))?;
    if value.len() > crate::broker::secrets::MAX_SECRET + 2 {
        return Err(format!("the secret is longer than {} bytes", crate::broker::secrets::MAX_SECRET));
    }
    let (status, v) = client::request_bytes(
        socket,
        http::Method::PUT,
        &format!("/v1/secrets/{name}"),
        "application/octet-stream",
        value.to_vec(),
    )?;
    if !status.is_success() {
        return Err(failed(status, &v));
    }
    println!("secret {name:?} stored (sealed); reference it in the policy as store:{name}");
    Ok(())
}

/// `ephyr secret list`.
pub fn list(socket: &Path, json: bool) -> Result<(), String> {
    let (status, v) = client::request(socket, http::Method::GET, "/v1/secrets", None)?;
    if !status.is_success() {
        return Err(failed(status, &v));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    for s in v["secrets"].as_array().into_iter().flatten() {
        let used: Vec<&str> = s["used_by"].as_array().into_iter().flatten().filter_map(|u| u.as_str()).collect();
        let when = crate::time::UnixMicros(s["updated"].as_i64().unwrap_or(0) * 1_000_000).to_rfc3339();
        let used = if used.is_empty() { "not referenced".to_owned() } else { format!("used by {}", used.join(", ")) };
        println!("{:<24} updated {when}  {used}", s["name"].as_str().unwrap_or(""));
    }
    for m in v["missing"].as_array().into_iter().flatten() {
        println!("{:<24} MISSING: referenced by the policy but not set", m.as_str().unwrap_or(""));
    }
    Ok(())
}

/// `ephyr secret rm NAME`.
pub fn remove(socket: &Path, name: &str) -> Result<(), String> {
    let (status, v) = client::request(socket, http::Method::DELETE, &format!("/v1/secrets/{name}"), None)?;
    if !status.is_success() {
        return Err(failed(status, &v));
    }
    println!("secret {name:?} removed");
    Ok(())
}
