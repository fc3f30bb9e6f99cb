//! Subcommand implementations. `main.rs` parses arguments and calls these; each returns an exit
//! code or an error message (documented exit codes: docs/cli.md).

pub mod agent;
pub mod approvals;
pub mod audit;
pub mod client;
pub mod demo;
pub mod doctor;
pub mod exec;
pub mod federation_client;
pub mod freeze;
pub mod init;
pub mod inspect;
pub mod isolate;
pub mod policy;
pub mod recording;
pub mod remote;
pub mod run;
pub mod secret;
pub mod target;
pub mod views;

use std::path::{Path, PathBuf};

/// Options of `ephyr cert sign`.
#[derive(Debug, Default)]
pub struct CertSignOptions {
    /// Local socket.
    pub socket: PathBuf,
    /// Public key file (`-` = stdin).
    pub public_key: PathBuf,
    /// Principals.
    pub principals: Vec<String>,
    /// Validity, e.g. `5m`.
    pub ttl: Option<String>,
    /// `force-command`.
    pub force_command: Option<String>,
    /// `source-address`.
    pub source_address: Option<String>,
    /// Print the whole JSON answer instead of the certificate line.
    pub json: bool,
}

fn read_input(path: &Path) -> Result<String, String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| format!("stdin: {e}"))?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// `ephyr cert sign`: asks the running broker's signer for an operator certificate.
pub fn cert_sign(o: &CertSignOptions) -> Result<(), String> {
    let key = read_input(&o.public_key)?;
    let body = serde_json::json!({
        "public_key": key.trim(),
        "principals": o.principals,
        "ttl": o.ttl,
        "force_command": o.force_command,
        "source_address": o.source_address,
    });
    let v = client::request_ok(&o.socket, http::Method::POST, "/v1/certs", Some(&body))?;
    if o.json {
        println!("{v}");
    } else {
        println!("{}", v["certificate"].as_str().unwrap_or_default());
        eprintln!("serial {} key id {} valid until {}", v["serial"], v["key_id"], v["valid_before"]);
    }
    Ok(())
}

/// `ephyr cert revoke SERIAL`: puts a certificate on the broker's KRL.
pub fn cert_revoke(socket: &Path, serial: &str) -> Result<(), String> {
    let path = format!("/v1/certs/{}/revoke", serial.trim().trim_start_matches("0x"));
    let v = client::request_ok(socket, http::Method::POST, &path, None)?;
    println!(
        "certificate {} revoked; targets refuse it once they fetch /v1/ssh/krl",
        v["serial"].as_str().unwrap_or(serial)
    );
    Ok(())
}

/// `ephyr status`: the running broker's status.
pub fn status(socket: &Path, json: bool) -> Result<(), String> {
    let (code, v) = client::request(socket, http::Method::GET, "/v1/status", None)?;
    if !code.is_success() {
        return Err(format!("{code}: {}", v["message"].as_str().unwrap_or("")));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let s = &v["signer"];
    println!(
        "ephyr {}  pid {}  uid {}  up {}s",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        v["uid"],
        v["uptime_secs"]
    );
    println!("listen {}  console {}  data dir {}", v["listen"], v["dashboard_listen"], v["data_dir"]);
    println!(
        "signer: {}  keeper pid {}  worker pid {}  restarts {}",
        if s["available"].as_bool() == Some(true) { "available" } else { "UNAVAILABLE" },
        s["keeper_pid"],
        s["worker_pid"],
        s["restarts"]
    );
    println!("sandbox: {}", s["sandbox"]);
    println!("CA: {}", s["ca_public_key"].as_str().unwrap_or("?"));
    let t = &v["tls"];
    match (t["mode"].as_str(), t["ca_file"].as_str()) {
        (Some(_), Some(ca)) => {
            println!("TLS: local CA {} {}", ca, t["ca_fingerprint"].as_str().unwrap_or("?"));
        }
        (Some(_), None) => println!("TLS: certificate {}", t["fingerprint"].as_str().unwrap_or("?")),
        _ => println!("TLS: off (plain HTTP)"),
    }
    if let Some(n) = v["approvals_pending"].as_u64().filter(|n| *n > 0) {
        println!("approvals: {n} request(s) waiting for an operator (`ephyr approvals`)");
    }
    for f in v["frozen"].as_array().into_iter().flatten() {
        println!(
            "FROZEN {} {} by {} at {}",
            f["kind"].as_str().unwrap_or("?"),
            f["name"].as_str().unwrap_or("?"),
            f["by"].as_str().unwrap_or("?"),
            f["at"].as_str().unwrap_or("?")
        );
    }
    for (name, r) in v["remotes"].as_object().into_iter().flatten() {
        println!(
            "remote {name}: {}, {} tool(s), protocol {}{}{}{}",
            r["health"].as_str().unwrap_or("?"),
            r["tools"],
            r["protocol"].as_str().unwrap_or("-"),
            r["pid"].as_u64().map(|p| format!(", stdio pid {p}")).unwrap_or_default(),
            match r["quarantined"].as_u64() {
                Some(n) if n > 0 => format!(", {n} QUARANTINED (ephyr remote review {name})"),
                _ => String::new(),
            },
            r["error"].as_str().map(|e| format!(" ({e})")).unwrap_or_default()
        );
    }
    Ok(())
}
