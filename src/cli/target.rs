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
    let s = crate::broker::ssh::setup::script(&policy, &o.targets, &ca, o.broker_url.as_deref())?;
    print!("{s}");
    Ok(())
}
