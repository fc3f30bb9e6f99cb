//! `ephyr target setup-script`: prints the script that prepares a target host
//! (`broker::ssh::setup`, docs/target-setup.md).

use std::path::{Path, PathBuf};

/// Options.
#[derive(Debug, Default)]
pub struct SetupOptions {
    /// Policy file.
    pub policy: PathBuf,
    /// Targets (all when empty).
    pub targets: Vec<String>,
    /// CA public key file; else the running broker's, else `<data-dir>/keys/ca.pub`.
    pub ca_key: Option<PathBuf>,
    /// Local socket of a running broker.
    pub socket: PathBuf,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Broker URL for the KRL timer.
    pub broker_url: Option<String>,
    /// Where the script writes and which sshd it reloads; a dry-run script.
    pub layout: crate::broker::ssh::setup::Layout,
}

fn ca_line(o: &SetupOptions) -> Result<String, String> {
    if let Some(p) = &o.ca_key {
        return std::fs::read_to_string(p).map_err(|e| format!("--ca-key {}: {e}", p.display()));
    }
    if let Ok((status, v)) = super::client::request(&o.socket, http::Method::GET, "/v1/status", None)
        && status.is_success()
        && let Some(ca) = v["signer"]["ca_public_key"].as_str()
    {
        return Ok(ca.to_owned());
    }
    let p = crate::signer::protocol::KeyPaths::new(&o.data_dir).ca_pub();
    std::fs::read_to_string(&p).map_err(|e| {
        format!("no CA public key: the broker is not reachable and {} is unreadable ({e}); pass --ca-key", p.display())
    })
}

/// Prints the script.
pub fn setup_script(o: &SetupOptions) -> Result<(), String> {
    let policy = crate::broker::policy::load_file(Path::new(&o.policy)).map_err(|e| e.to_string())?;
    let ca = ca_line(o)?;
    let s = crate::broker::ssh::setup::script(&policy, &o.targets, &ca, o.broker_url.as_deref(), &o.layout)?;
    print!("{s}");
    Ok(())
}

/// `ephyr target scan HOST[:PORT]`: the host key to pin, read from the host itself.
pub fn scan(spec: &str, json: bool) -> Result<u8, String> {
    let (host, port) = match spec.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.starts_with('[') => (
            h.trim_start_matches('[').trim_end_matches(']').to_owned(),
            p.parse::<u16>().map_err(|_| format!("{spec:?}: the port is not a number"))?,
        ),
        _ => (spec.trim_start_matches('[').trim_end_matches(']').to_owned(), 22),
    };
    if host.is_empty() {
        return Err("target scan needs HOST[:PORT]".into());
    }
    let (key, fp) = crate::broker::reactor::block_on(crate::broker::ssh::client::scan(
        host.clone(),
        port,
        std::time::Duration::from_secs(10),
    ))
    .map_err(|e| format!("{host}:{port}: {e}"))?;
    if json {
        println!("{}", serde_json::json!({ "host": host, "port": port, "host_key": key.trim(), "fingerprint": fp }));
        return Ok(0);
    }
    println!("{host}:{port} presents {} {fp}", key.split_whitespace().next().unwrap_or("?"));
    println!("\nPin it in the policy, under the target:\n  host_key_fingerprint: \"{fp}\"");
    println!(
        "\nThis was read over the network: compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`\n\
         on the host's console before you trust it."
    );
    Ok(0)
}

/// `ephyr target verify NAME`: every role of the target tried by the running broker.
pub fn verify(socket: &Path, name: &str, json: bool) -> Result<u8, String> {
    let path = format!("/v1/targets/{name}/verify");
    let v = super::client::request_ok(socket, http::Method::POST, &path, None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for r in v["roles"].as_array().into_iter().flatten() {
            let head =
                format!("{name}/{} as {}", r["role"].as_str().unwrap_or("?"), r["principal"].as_str().unwrap_or("?"));
            if r["ok"] == true {
                let krl = match r["krl_age_secs"].as_u64() {
                    Some(a) => format!("KRL changed {a}s ago"),
                    None => "no KRL".into(),
                };
                println!("ok    {head}: logged in as {}; {krl}", r["logged_in_as"].as_str().unwrap_or("?"));
            } else {
                println!("FAIL  {head}");
            }
            println!("      host key: {}", r["host_key"].as_str().unwrap_or("?"));
            for p in r["problems"].as_array().into_iter().flatten() {
                println!("      problem: {}", p.as_str().unwrap_or(""));
            }
            for w in r["warnings"].as_array().into_iter().flatten() {
                println!("      warning: {}", w.as_str().unwrap_or(""));
            }
        }
        if v["roles"].as_array().is_none_or(|r| r.is_empty()) {
            println!("{name}: the target allows no roles");
        }
    }
    Ok(if v["ok"] == true { 0 } else { 1 })
}
